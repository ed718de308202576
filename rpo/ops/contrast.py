"""Python side of the contrast-matrix op: validation, autograd/fake registration, the public functions.

The compiled extension (`rpo._C`, built from csrc/) defines `torch.ops.rpo.contrast_loss_terms`, which computes
the loss and both score gradients in one blocked pass without materialising the M × N matrix. Its autograd
formula (backward = grad_loss · saved gradients) and fake kernel are registered here. Without the extension
(or with RPO_DISABLE_EXTENSION=1) the functions fall back to the pure-PyTorch `rpo.ops.reference` with a
one-time warning.
"""
from __future__ import annotations

import math
import numbers
import os
import warnings
from typing import Optional

import torch

from rpo.ops import reference

# Integer codes of the op's `weighting` / `normalization` arguments (csrc/kernels/contrast_math.h).
WEIGHTINGS = {"embedding": 0, "uniform": 1, "diagonal": 2, "none": 3}
WEIGHT_NORMALIZATIONS = {"row": 0, "mean": 1}
SCORE_DTYPES = (torch.float32, torch.bfloat16, torch.float64)

_OP_NAME = "rpo::contrast_loss_terms"


def _load_extension() -> Optional[str]:
    """Imports rpo._C (which registers torch.ops.rpo.*); returns why it is unavailable, or None."""
    if os.environ.get("RPO_DISABLE_EXTENSION") == "1":
        return "disabled by RPO_DISABLE_EXTENSION=1"
    try:
        from rpo import _C  # noqa: F401  (loading the library runs its TORCH_LIBRARY registrations)
    except (ImportError, OSError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


_EXTENSION_ERROR = _load_extension()
_fallback_warned = False


def extension_available() -> bool:
    """True when the compiled op `torch.ops.rpo.contrast_loss_terms` is in use."""
    return _EXTENSION_ERROR is None


def _warn_fallback_once() -> None:
    global _fallback_warned
    if not _fallback_warned:
        _fallback_warned = True
        warnings.warn(f"rpo.ops: the compiled extension rpo._C is unavailable ({_EXTENSION_ERROR}); using the "
                      "pure-PyTorch reference, which materialises the M x N matrix. Build it with "
                      "`pip install --no-build-isolation -e .` (or `make install`).", RuntimeWarning, stacklevel=3)


# ---- autograd and fake kernel of the native op ----------------------------------------------------------------

if _EXTENSION_ERROR is None:

    @torch.library.register_fake(_OP_NAME)
    def _contrast_loss_terms_fake(chosen, rejected, chosen_emb, rejected_emb, beta, margin, tau, alpha, weighting,
                                  normalization, diag_offset, loss_scale, compute_grad):
        loss = chosen.new_empty(())
        if compute_grad:
            return loss, chosen.new_empty(chosen.shape), rejected.new_empty(rejected.shape)
        return loss, chosen.new_empty((0,)), rejected.new_empty((0,))

    def _setup_context(ctx, inputs, output):
        _, grad_chosen, grad_rejected = output
        ctx.compute_grad = inputs[-1]
        ctx.save_for_backward(grad_chosen, grad_rejected)
        # The returned gradients are results, not differentiable functions of the inputs here.
        ctx.mark_non_differentiable(grad_chosen, grad_rejected)

    def _backward(ctx, grad_loss, _grad_of_grad_chosen, _grad_of_grad_rejected):
        if not ctx.compute_grad:
            raise RuntimeError("rpo::contrast_loss_terms was called with compute_grad=False; it has no gradient")
        grad_chosen, grad_rejected = ctx.saved_tensors
        # The op is first-order only: its backward is a product with saved values, so a double backward
        # would silently drop the second-order terms. Refuse it instead.
        if torch.is_grad_enabled():
            raise RuntimeError("rpo.ops.contrast_loss does not support double backward (create_graph=True)")
        grad_chosen = grad_loss * grad_chosen if ctx.needs_input_grad[0] else None
        grad_rejected = grad_loss * grad_rejected if ctx.needs_input_grad[1] else None
        return (grad_chosen, grad_rejected) + (None,) * 11

    torch.library.register_autograd(_OP_NAME, _backward, setup_context=_setup_context)


# ---- validation ----------------------------------------------------------------------------------------------

def _check_number(fn: str, name: str, value, *, positive: bool = False, unit_interval: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{fn}: {name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{fn}: {name} must be finite, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{fn}: {name} must be > 0, got {value}")
    if unit_interval and not 0.0 <= value <= 1.0:
        raise ValueError(f"{fn}: {name} must be in [0, 1], got {value}")
    return value


def _check_choice(fn: str, name: str, value, choices: dict) -> int:
    if not isinstance(value, str) or value not in choices:
        valid = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{fn}: {name} must be one of {valid}; got {value!r}")
    return choices[value]


def _check_finite_values(fn: str, name: str, tensor: torch.Tensor) -> None:
    # Inspects values (a device sync on GPU); skipped while torch.compile traces.
    finite = torch.isfinite(tensor)
    if not bool(finite.all()):
        bad = (~finite).nonzero()[0].tolist()
        where = f"index {bad[0]}" if tensor.dim() == 1 else f"row {bad[0]}, column {bad[1]}"
        raise ValueError(f"{fn}: {name} has a non-finite value ({tensor[tuple(bad)].item()}) at {where} "
                         f"(first of {int((~finite).sum())})")


def _validate(fn: str, chosen_scores, rejected_scores, chosen_embeddings, rejected_embeddings, *, beta, margin, tau,
              alpha, weighting, weight_normalization, diag_offset: int = 0, allow_empty: bool,
              diagonal_layout: str, loss_scale: Optional[float] = None) -> dict:
    """Checks every argument; returns the scalar arguments of the op (floats and integer codes).

    diagonal_layout: "square" (contrast_loss: M = N >= 2), "offset" (contrast_loss_terms: row i's diagonal is
    column diag_offset + i) or "global" (a rank's shard of a distributed matrix: rpo.distributed checks the
    global shape).
    """
    for name, scores in (("chosen_scores", chosen_scores), ("rejected_scores", rejected_scores)):
        if not isinstance(scores, torch.Tensor):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(scores).__name__}")
        if scores.dim() != 1:
            raise ValueError(f"{fn}: {name} must be 1-D (one score per answer), got shape {tuple(scores.shape)}")
        if scores.dtype not in SCORE_DTYPES:
            raise TypeError(f"{fn}: {name} must be float32, bfloat16 or float64, got {scores.dtype}")
    if chosen_scores.dtype != rejected_scores.dtype:
        raise TypeError(f"{fn}: chosen_scores and rejected_scores must have the same dtype, got "
                        f"{chosen_scores.dtype} and {rejected_scores.dtype}")
    if chosen_scores.device != rejected_scores.device:
        raise ValueError(f"{fn}: mixed devices: chosen_scores on {chosen_scores.device}, rejected_scores on "
                         f"{rejected_scores.device}")
    num_rows, num_cols = chosen_scores.shape[0], rejected_scores.shape[0]
    if not allow_empty and (num_rows == 0 or num_cols == 0):
        raise ValueError(f"{fn}: needs at least one chosen and one rejected score, got M={num_rows} chosen and "
                         f"N={num_cols} rejected")
    weighting_code = _check_choice(fn, "weighting", weighting, WEIGHTINGS)
    normalization_code = _check_choice(fn, "weight_normalization", weight_normalization, WEIGHT_NORMALIZATIONS)
    args = dict(beta=_check_number(fn, "beta", beta), margin=_check_number(fn, "margin", margin),
                tau=_check_number(fn, "tau", tau, positive=True),
                alpha=_check_number(fn, "alpha", alpha, unit_interval=True), weighting=weighting_code,
                normalization=normalization_code)
    if loss_scale is not None:
        args["loss_scale"] = _check_number(fn, "loss_scale", loss_scale)

    if weighting == "embedding":
        for name, emb, rows, rows_name in (("chosen_embeddings", chosen_embeddings, num_rows, "M"),
                                           ("rejected_embeddings", rejected_embeddings, num_cols, "N")):
            if emb is None:
                raise ValueError(f"{fn}: weighting='embedding' needs chosen_embeddings and rejected_embeddings; "
                                 f"{name} is None")
            if not isinstance(emb, torch.Tensor):
                raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(emb).__name__}")
            if emb.dim() != 2:
                raise ValueError(f"{fn}: {name} must be 2-D [{rows_name}, D], got shape {tuple(emb.shape)}")
            if not emb.is_floating_point():
                raise TypeError(f"{fn}: {name} must be floating point, got {emb.dtype}")
            if emb.shape[0] != rows:
                raise ValueError(f"{fn}: {name} has {emb.shape[0]} rows but there are {rows_name}={rows} "
                                 f"{'chosen' if rows_name == 'M' else 'rejected'} scores")
            if emb.device != chosen_scores.device:
                raise ValueError(f"{fn}: mixed devices: {name} on {emb.device}, scores on {chosen_scores.device}")
        if chosen_embeddings.shape[1] != rejected_embeddings.shape[1]:
            raise ValueError(f"{fn}: embedding dims differ: chosen_embeddings has D={chosen_embeddings.shape[1]}, "
                             f"rejected_embeddings has D={rejected_embeddings.shape[1]}")

    if weighting == "diagonal":
        if diagonal_layout == "square" and (num_rows != num_cols or num_rows < 2):
            raise ValueError(f"{fn}: weighting='diagonal' needs a square matrix with at least 2 pairs (paired data), "
                             f"got M={num_rows} chosen and N={num_cols} rejected")
        if diagonal_layout == "offset" and num_rows > 0:
            if num_cols < 2:
                raise ValueError(f"{fn}: weighting='diagonal' needs at least 2 columns, got N={num_cols}")
            if isinstance(diag_offset, bool) or not isinstance(diag_offset, int):
                raise TypeError(f"{fn}: diag_offset must be an int, got {type(diag_offset).__name__}")
            if diag_offset < 0 or diag_offset + num_rows > num_cols:
                raise ValueError(f"{fn}: diag_offset={diag_offset} puts the diagonal of rows 0..{num_rows - 1} "
                                 f"outside the N={num_cols} columns")

    if not torch.compiler.is_compiling():
        _check_finite_values(fn, "chosen_scores", chosen_scores)
        _check_finite_values(fn, "rejected_scores", rejected_scores)
        if weighting == "embedding":
            _check_finite_values(fn, "chosen_embeddings", chosen_embeddings)
            _check_finite_values(fn, "rejected_embeddings", rejected_embeddings)
    return args


def _detached(tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return tensor.detach() if tensor is not None else None


# ---- public API ------------------------------------------------------------------------------------------------

def contrast_loss_terms(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor,
                        chosen_embeddings: Optional[torch.Tensor], rejected_embeddings: Optional[torch.Tensor], *,
                        beta: float, margin: float, tau: float, alpha: float, weighting: str,
                        weight_normalization: str, diag_offset: int = 0, loss_scale: float,
                        compute_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The native primitive: (loss, grad_chosen, grad_rejected) as plain tensors (no autograd graph).

    loss = loss_scale · Σ_{i<M, j<N} softplus(−ω_ij (β (a_i − b_j) − margin)) in the score dtype;
    grad_chosen = ∂loss/∂a [M], grad_rejected = ∂loss/∂b [N] (size-0 tensors when compute_grad=False).
    ω is normalised over the N columns passed in; for "diagonal" the diagonal of row i is column
    diag_offset + i. M = 0 or N = 0 gives loss 0 and zero gradients. Embeddings are used only by "embedding".
    """
    fn = "rpo.ops.contrast_loss_terms"
    args = _validate(fn, chosen_scores, rejected_scores, chosen_embeddings, rejected_embeddings, beta=beta,
                     margin=margin, tau=tau, alpha=alpha, weighting=weighting,
                     weight_normalization=weight_normalization, diag_offset=diag_offset, allow_empty=True,
                     diagonal_layout="offset", loss_scale=loss_scale)
    if weighting != "embedding":
        chosen_embeddings = rejected_embeddings = None
    if _EXTENSION_ERROR is None:
        return torch.ops.rpo.contrast_loss_terms(
            chosen_scores.detach(), rejected_scores.detach(), _detached(chosen_embeddings),
            _detached(rejected_embeddings), args["beta"], args["margin"], args["tau"], args["alpha"],
            args["weighting"], args["normalization"], int(diag_offset), args["loss_scale"], bool(compute_grad))
    _warn_fallback_once()
    return reference.contrast_loss_terms(
        chosen_scores, rejected_scores, chosen_embeddings, rejected_embeddings, beta=args["beta"],
        margin=args["margin"], tau=args["tau"], alpha=args["alpha"], weighting=weighting,
        weight_normalization=weight_normalization, diag_offset=int(diag_offset), loss_scale=args["loss_scale"],
        compute_grad=compute_grad)


def contrast_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor, *, beta: float,
                  weighting: str = "embedding", chosen_embeddings: Optional[torch.Tensor] = None,
                  rejected_embeddings: Optional[torch.Tensor] = None, tau: float = 0.5, alpha: float = 0.8,
                  weight_normalization: str = "row", margin: float = 0.0, process_group=None) -> torch.Tensor:
    """RPO contrast loss −1/(M·N) Σ_ij log σ(ω_ij (β (a_i − b_j) − margin)), a scalar in the score dtype.

    chosen_scores a [M] and rejected_scores b [N] (M ≠ N allowed) are DPO-style rewards (policy − reference
    log-ratios) or length-normalised policy log-probs (SimPO, with margin = γ). Differentiable w.r.t. both;
    embeddings get no gradient. weighting: "embedding" (ω = row softmax of −(1 − cos(e_i, f_j))/τ), "uniform"
    (1/N), "diagonal" (α on i = j, (1−α)/(N−1) elsewhere; square, N ≥ 2) or "none" (all ones).
    weight_normalization: "row" (rows of ω sum to 1, the paper) or "mean" (ω × N: rows sum to N, the average
    pair keeps the full β); ignored by "none". process_group: the global contrast over a data-parallel group
    (rpo.distributed.global_contrast_loss); None for one process.
    """
    fn = "rpo.ops.contrast_loss"
    if process_group is not None:
        # The global path validates collectively (every rank raises together); validating here first would
        # raise on one rank only and leave the others blocked in the first collective.
        from rpo.distributed.contrast import global_contrast_loss  # lazy: rpo.distributed imports rpo.ops

        return global_contrast_loss(chosen_scores, rejected_scores, beta=beta, process_group=process_group,
                                    weighting=weighting, chosen_embeddings=chosen_embeddings,
                                    rejected_embeddings=rejected_embeddings, tau=tau, alpha=alpha,
                                    weight_normalization=weight_normalization, margin=margin)
    args = _validate(fn, chosen_scores, rejected_scores, chosen_embeddings, rejected_embeddings, beta=beta,
                     margin=margin, tau=tau, alpha=alpha, weighting=weighting,
                     weight_normalization=weight_normalization, allow_empty=False, diagonal_layout="square")
    if weighting != "embedding":
        chosen_embeddings = rejected_embeddings = None
    num_pairs = chosen_scores.shape[0] * rejected_scores.shape[0]
    if _EXTENSION_ERROR is None:
        needs_grad = torch.is_grad_enabled() and (chosen_scores.requires_grad or rejected_scores.requires_grad)
        loss, _, _ = torch.ops.rpo.contrast_loss_terms(
            chosen_scores, rejected_scores, _detached(chosen_embeddings), _detached(rejected_embeddings),
            args["beta"], args["margin"], args["tau"], args["alpha"], args["weighting"], args["normalization"], 0,
            1.0 / num_pairs, needs_grad)
        return loss
    _warn_fallback_once()
    pair_losses = reference.contrast_loss_matrix(
        chosen_scores, rejected_scores, _detached(chosen_embeddings), _detached(rejected_embeddings),
        beta=args["beta"], margin=args["margin"], tau=args["tau"], alpha=args["alpha"], weighting=weighting,
        weight_normalization=weight_normalization)
    return pair_losses.mean().to(chosen_scores.dtype)
