"""Loading of the compiled extension `rpo._C` and the Python-side registrations of its op.

`import rpo._C` runs the C++ `TORCH_LIBRARY` registrations (csrc/rpo.cpp), which define
`torch.ops.rpo.contrast_loss_and_grads`. Its autograd formula (backward = grad_loss · saved gradients) and its
fake kernel (for torch.compile and meta tensors) are registered here. Without the extension, or with
RPO_DISABLE_EXTENSION=1, `LOAD_ERROR` says why and `rpo.ops` falls back to `rpo.ops.reference`.
"""
from __future__ import annotations

import os
import warnings
from typing import Optional

import torch

OP_NAME = "rpo::contrast_loss_and_grads"


def _load() -> Optional[str]:
    """Imports rpo._C (which registers torch.ops.rpo.*); returns why it is unavailable, or None."""
    if os.environ.get("RPO_DISABLE_EXTENSION") == "1":
        return "disabled by RPO_DISABLE_EXTENSION=1"
    try:
        from rpo import _C  # noqa: F401  (loading the library runs its TORCH_LIBRARY registrations)
    except (ImportError, OSError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


LOAD_ERROR: Optional[str] = _load()
_fallback_warned = False


def extension_available() -> bool:
    """True when the compiled op `torch.ops.rpo.contrast_loss_and_grads` is in use."""
    return LOAD_ERROR is None


def warn_fallback_once() -> None:
    global _fallback_warned
    if not _fallback_warned:
        _fallback_warned = True
        warnings.warn(f"rpo.ops: the compiled extension rpo._C is unavailable ({LOAD_ERROR}); using the "
                      "pure-PyTorch reference, which materialises the M x N matrix. Build it with "
                      "`pip install --no-build-isolation -e .` (or `make install`).", RuntimeWarning, stacklevel=3)


if LOAD_ERROR is None:

    @torch.library.register_fake(OP_NAME)
    def _contrast_loss_and_grads_fake(chosen, rejected, chosen_emb, rejected_emb, beta, margin, tau, alpha,
                                      weighting, weight_normalization, diag_offset, loss_scale, compute_grad):
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
            raise RuntimeError(f"{OP_NAME} was called with compute_grad=False; it has no gradient")
        grad_chosen, grad_rejected = ctx.saved_tensors
        # The op is first-order only: its backward is a product with saved values, so a double backward
        # would silently drop the second-order terms. Refuse it instead.
        if torch.is_grad_enabled():
            raise RuntimeError("rpo.ops.contrast_loss does not support double backward (create_graph=True)")
        grad_chosen = grad_loss * grad_chosen if ctx.needs_input_grad[0] else None
        grad_rejected = grad_loss * grad_rejected if ctx.needs_input_grad[1] else None
        return (grad_chosen, grad_rejected) + (None,) * 11

    torch.library.register_autograd(OP_NAME, _backward, setup_context=_setup_context)
