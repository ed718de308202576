"""The functions of the contrast-matrix op: `contrast_loss` (the loss, with autograd) and
`contrast_loss_and_grads` (the native primitive: loss and both score gradients as plain tensors).
(Not a module called contrast_loss: `rpo.ops.contrast_loss` is the function.)

Both run `torch.ops.rpo.contrast_loss_and_grads` (csrc/), which computes the loss and its gradients in one
blocked pass without materialising the M × N matrix, or fall back to `rpo.ops.reference` with a one-time
warning when the extension is unavailable. Local only: the global contrast over a process group is
`rpo.distributed.global_contrast_loss`, built on `contrast_loss_and_grads`.
"""
from __future__ import annotations

from typing import Optional

import torch

from rpo.ops import reference
from rpo.ops._extension import LOAD_ERROR, warn_fallback_once
from rpo.ops.checks import check_contrast_inputs, check_embedding_values


def _detached(tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return tensor.detach() if tensor is not None else None


def _op_flags_embedding_values(weighting: str, chosen_scores: torch.Tensor) -> bool:
    # The CPU kernel computes the embedding norms itself and returns a NaN loss when one is not finite, so the
    # finiteness check of the embeddings (two more passes over them, each a parallel region) runs only for a
    # non-finite loss, to name the bad value (`_check_embeddings_if_not_finite`).
    return LOAD_ERROR is None and weighting == "embedding" and chosen_scores.device.type == "cpu"


def _check_embeddings_if_not_finite(fn: str, loss: torch.Tensor, chosen_embeddings, rejected_embeddings) -> None:
    if not torch.compiler.is_compiling() and not bool(torch.isfinite(loss)):
        check_embedding_values(fn, chosen_embeddings, rejected_embeddings)


def contrast_loss_and_grads(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor,
                            chosen_embeddings: Optional[torch.Tensor], rejected_embeddings: Optional[torch.Tensor],
                            *, beta: float, margin: float, tau: float, alpha: float, weighting: str,
                            weight_normalization: str, diag_offset: int = 0, loss_scale: float,
                            compute_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The native primitive: (loss, grad_chosen, grad_rejected) as plain tensors (no autograd graph).

    loss = loss_scale · Σ_{i<M, j<N} softplus(−ω_ij (β (a_i − b_j) − margin)) in the score dtype;
    grad_chosen = ∂loss/∂a [M], grad_rejected = ∂loss/∂b [N] (size-0 tensors when compute_grad=False).
    ω is normalised over the N columns passed in; for "diagonal" the diagonal of row i is column
    diag_offset + i. M = 0 or N = 0 gives loss 0 and zero gradients. Embeddings are used only by "embedding";
    their cosines are computed in full float32 (float64 for float64 scores) whatever the process's TF32 or
    float32-matmul-precision setting.
    """
    fn = "rpo.ops.contrast_loss_and_grads"
    op_flags_embeddings = _op_flags_embedding_values(weighting, chosen_scores)
    args = check_contrast_inputs(fn, chosen_scores, rejected_scores, chosen_embeddings, rejected_embeddings,
                                 beta=beta, margin=margin, tau=tau, alpha=alpha, weighting=weighting,
                                 weight_normalization=weight_normalization, diag_offset=diag_offset,
                                 allow_empty=True, diagonal_layout="offset", loss_scale=loss_scale,
                                 embedding_values=not op_flags_embeddings)
    if weighting != "embedding":
        chosen_embeddings = rejected_embeddings = None
    if LOAD_ERROR is None:
        result = torch.ops.rpo.contrast_loss_and_grads(
            chosen_scores.detach(), rejected_scores.detach(), _detached(chosen_embeddings),
            _detached(rejected_embeddings), args["beta"], args["margin"], args["tau"], args["alpha"], weighting,
            weight_normalization, int(diag_offset), args["loss_scale"], bool(compute_grad))
        if op_flags_embeddings:
            _check_embeddings_if_not_finite(fn, result[0], chosen_embeddings, rejected_embeddings)
        return result
    warn_fallback_once()
    return reference.contrast_loss_and_grads(
        chosen_scores, rejected_scores, chosen_embeddings, rejected_embeddings, beta=args["beta"],
        margin=args["margin"], tau=args["tau"], alpha=args["alpha"], weighting=weighting,
        weight_normalization=weight_normalization, diag_offset=int(diag_offset), loss_scale=args["loss_scale"],
        compute_grad=compute_grad)


def contrast_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor, *, beta: float,
                  weighting: str = "embedding", chosen_embeddings: Optional[torch.Tensor] = None,
                  rejected_embeddings: Optional[torch.Tensor] = None, tau: float = 0.5, alpha: float = 0.8,
                  weight_normalization: str = "row", margin: float = 0.0) -> torch.Tensor:
    """RPO contrast loss −1/(M·N) Σ_ij log σ(ω_ij (β (a_i − b_j) − margin)), a scalar in the score dtype.

    chosen_scores a [M] and rejected_scores b [N] (M ≠ N allowed) are DPO-style rewards (policy − reference
    log-ratios) or length-normalised policy log-probs (SimPO, with margin = γ). Differentiable w.r.t. both;
    embeddings get no gradient. weighting: "embedding" (ω = row softmax of −(1 − cos(e_i, f_j))/τ), "uniform"
    (1/N), "diagonal" (α on i = j, (1−α)/(N−1) elsewhere; square, N ≥ 2) or "none" (all ones).
    weight_normalization: "row" (rows of ω sum to 1, the paper) or "mean" (ω × N: rows sum to N, the average
    pair keeps the full β); ignored by "none". The matrix of this process's batch only; for the global
    matrix over a data-parallel group use `rpo.distributed.global_contrast_loss`.
    """
    fn = "rpo.ops.contrast_loss"
    op_flags_embeddings = _op_flags_embedding_values(weighting, chosen_scores)
    args = check_contrast_inputs(fn, chosen_scores, rejected_scores, chosen_embeddings, rejected_embeddings,
                                 beta=beta, margin=margin, tau=tau, alpha=alpha, weighting=weighting,
                                 weight_normalization=weight_normalization, allow_empty=False,
                                 diagonal_layout="square", embedding_values=not op_flags_embeddings)
    if weighting != "embedding":
        chosen_embeddings = rejected_embeddings = None
    num_pairs = chosen_scores.shape[0] * rejected_scores.shape[0]
    if LOAD_ERROR is None:
        needs_grad = torch.is_grad_enabled() and (chosen_scores.requires_grad or rejected_scores.requires_grad)
        loss, _, _ = torch.ops.rpo.contrast_loss_and_grads(
            chosen_scores, rejected_scores, _detached(chosen_embeddings), _detached(rejected_embeddings),
            args["beta"], args["margin"], args["tau"], args["alpha"], weighting, weight_normalization, 0,
            1.0 / num_pairs, needs_grad)
        if op_flags_embeddings:
            _check_embeddings_if_not_finite(fn, loss, chosen_embeddings, rejected_embeddings)
        return loss
    warn_fallback_once()
    pair_losses = reference.contrast_loss_matrix(
        chosen_scores, rejected_scores, _detached(chosen_embeddings), _detached(rejected_embeddings),
        beta=args["beta"], margin=args["margin"], tau=args["tau"], alpha=args["alpha"], weighting=weighting,
        weight_normalization=weight_normalization)
    return pair_losses.mean().to(chosen_scores.dtype)
