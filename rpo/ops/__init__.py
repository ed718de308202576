"""The RPO contrast-matrix op, a leaf package (it imports nothing else of rpo but its extension `rpo._C`).

* `contrast_loss`: the local loss with autograd; `contrast_loss_and_grads`: the native primitive (loss and
  both score gradients, no autograd graph), also `torch.ops.rpo.contrast_loss_and_grads`.
* `check_contrast_inputs`: the argument checks, shared with the global path in `rpo.distributed`.
* `reference`: the pure-PyTorch fallback and the authors' eager formulation.

See docs/op.md.
"""
from rpo.ops import reference
from rpo.ops._extension import extension_available
from rpo.ops.checks import SCORE_DTYPES, WEIGHT_NORMALIZATIONS, WEIGHTINGS, check_contrast_inputs
from rpo.ops.functions import contrast_loss, contrast_loss_and_grads

__all__ = [
    "SCORE_DTYPES",
    "WEIGHT_NORMALIZATIONS",
    "WEIGHTINGS",
    "check_contrast_inputs",
    "contrast_loss",
    "contrast_loss_and_grads",
    "extension_available",
    "reference",
]
