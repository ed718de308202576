"""Pure-PyTorch implementations of the contrast loss.

* `pair_weights`, `contrast_loss_matrix`, `contrast_loss_and_grads`: the semantics of the native op
  (`torch.ops.rpo.contrast_loss_and_grads`), materialising the M × N matrix. `rpo.ops` falls back to them (with a
  one-time warning) when the compiled extension is missing; fine for small batches, O(M·N) memory.
* `authors_contrast_loss`: the authors' eager style (Listing 1 of the paper) (full distance, weight and logit matrices built with plain
  torch ops, gradients by autograd, row-normalised weights inside the sigmoid). It is the baseline of
  benchmarks/contrast_loss.py.

Arguments are assumed valid here; `rpo.ops.check_contrast_inputs` checks them.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

# Same epsilon convention as the native op: zero embedding rows get cosine 0 instead of NaN.
_NORM_EPS = 1e-8


def accumulate_dtype(score_dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 scores, else float32 (bfloat16 inputs are computed in float32)."""
    return torch.float64 if score_dtype == torch.float64 else torch.float32


def pair_weights(num_rows: int, num_cols: int, *, weighting: str, weight_normalization: str,
                 chosen_embeddings: Optional[torch.Tensor] = None,
                 rejected_embeddings: Optional[torch.Tensor] = None, tau: float = 0.5, alpha: float = 0.8,
                 diag_offset: int = 0, dtype: torch.dtype = torch.float64,
                 device: Optional[torch.device] = None) -> torch.Tensor:
    """The M × N weight matrix ω of `weighting` ("embedding", "uniform", "diagonal", "none").

    "row" normalisation makes every row sum to 1 (the paper); "mean" multiplies by N so rows sum to N.
    "none" is all ones whatever the normalisation. For "diagonal" the diagonal of row i is column
    diag_offset + i.
    """
    scale = float(num_cols) if weight_normalization == "mean" else 1.0
    if weighting == "none":
        return torch.ones(num_rows, num_cols, dtype=dtype, device=device)
    if weighting == "uniform":
        return torch.full((num_rows, num_cols), scale / num_cols, dtype=dtype, device=device)
    if weighting == "diagonal":
        weights = torch.full((num_rows, num_cols), (1.0 - alpha) * scale / (num_cols - 1), dtype=dtype,
                             device=device)
        rows = torch.arange(num_rows, device=device)
        weights[rows, rows + diag_offset] = alpha * scale
        return weights
    if weighting == "embedding":
        e = chosen_embeddings.to(dtype)
        f = rejected_embeddings.to(dtype)
        e = e / e.norm(dim=1, keepdim=True).clamp_min(_NORM_EPS)
        f = f / f.norm(dim=1, keepdim=True).clamp_min(_NORM_EPS)
        distance = 1.0 - e @ f.T
        return torch.softmax(-distance / tau, dim=1) * scale
    raise ValueError(f"unknown weighting {weighting!r}")


def contrast_loss_matrix(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor,
                         chosen_embeddings: Optional[torch.Tensor] = None,
                         rejected_embeddings: Optional[torch.Tensor] = None, *, beta: float, margin: float = 0.0,
                         tau: float = 0.5, alpha: float = 0.8, weighting: str = "embedding",
                         weight_normalization: str = "row", diag_offset: int = 0) -> torch.Tensor:
    """Per-pair losses softplus(−ω_ij (β (a_i − b_j) − margin)) as an M × N matrix in the accumulate dtype.

    Differentiable w.r.t. the scores by plain autograd.
    """
    acc = accumulate_dtype(chosen_scores.dtype)
    a = chosen_scores.to(acc)
    b = rejected_scores.to(acc)
    weights = pair_weights(a.shape[0], b.shape[0], weighting=weighting, weight_normalization=weight_normalization,
                           chosen_embeddings=chosen_embeddings, rejected_embeddings=rejected_embeddings, tau=tau,
                           alpha=alpha, diag_offset=diag_offset, dtype=acc, device=a.device)
    logits = weights * (beta * (a[:, None] - b[None, :]) - margin)
    return -F.logsigmoid(logits)


def contrast_loss_and_grads(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor,
                        chosen_embeddings: Optional[torch.Tensor], rejected_embeddings: Optional[torch.Tensor], *,
                        beta: float, margin: float, tau: float, alpha: float, weighting: str,
                        weight_normalization: str, diag_offset: int = 0, loss_scale: float,
                        compute_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, ∂loss/∂chosen, ∂loss/∂rejected) with loss = loss_scale · Σ_ij pair loss; no autograd graph.

    Same contract as the native op: outputs in the score dtype, empty gradients when compute_grad is False,
    loss 0 and zero gradients when M = 0 or N = 0.
    """
    dtype = chosen_scores.dtype
    device = chosen_scores.device
    num_rows, num_cols = chosen_scores.shape[0], rejected_scores.shape[0]
    if num_rows == 0 or num_cols == 0:
        loss = torch.zeros((), dtype=dtype, device=device)
        if not compute_grad:
            return loss, torch.empty(0, dtype=dtype, device=device), torch.empty(0, dtype=dtype, device=device)
        return (loss, torch.zeros(num_rows, dtype=dtype, device=device),
                torch.zeros(num_cols, dtype=dtype, device=device))
    acc = accumulate_dtype(dtype)
    with torch.enable_grad():
        a = chosen_scores.detach().to(acc).requires_grad_(compute_grad)
        b = rejected_scores.detach().to(acc).requires_grad_(compute_grad)
        emb_a = chosen_embeddings.detach() if chosen_embeddings is not None else None
        emb_b = rejected_embeddings.detach() if rejected_embeddings is not None else None
        loss = loss_scale * contrast_loss_matrix(a, b, emb_a, emb_b, beta=beta, margin=margin, tau=tau, alpha=alpha,
                                                 weighting=weighting, weight_normalization=weight_normalization,
                                                 diag_offset=diag_offset).sum()
        if compute_grad:
            grad_a, grad_b = torch.autograd.grad(loss, (a, b))
            grad_a, grad_b = grad_a.to(dtype), grad_b.to(dtype)
        else:
            grad_a = torch.empty(0, dtype=dtype, device=device)
            grad_b = torch.empty(0, dtype=dtype, device=device)
    return loss.detach().to(dtype), grad_a, grad_b


def authors_contrast_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor,
                          chosen_embeddings: torch.Tensor, rejected_embeddings: torch.Tensor, *, beta: float,
                          tau: float = 0.5) -> torch.Tensor:
    """The authors' eager RPO loss (embedding weighting, row normalisation), in their style.

    Builds the full M × N cosine-distance, weight and logit matrices with plain torch ops; autograd keeps
    them alive for backward. Equal to `rpo.ops.contrast_loss(..., weighting="embedding",
    weight_normalization="row")` up to rounding; used as the benchmark baseline.
    """
    chosen_embeddings = F.normalize(chosen_embeddings, dim=-1)
    rejected_embeddings = F.normalize(rejected_embeddings, dim=-1)
    distance = 1 - torch.matmul(chosen_embeddings, rejected_embeddings.T)
    weights = torch.exp(-distance / tau)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    logits = chosen_scores.unsqueeze(1) - rejected_scores.unsqueeze(0)
    losses = -F.logsigmoid(beta * weights * logits)
    return losses.mean()
