"""The RPO contrast-matrix op: `contrast_loss` (public loss) and `contrast_loss_terms` (native primitive).

See README.md (section "The contrast-matrix op"). `reference` holds the pure-PyTorch fallback and the authors' eager formulation.
"""
from rpo.ops import reference
from rpo.ops.contrast import (
    SCORE_DTYPES,
    WEIGHT_NORMALIZATIONS,
    WEIGHTINGS,
    contrast_loss,
    contrast_loss_terms,
    extension_available,
)

__all__ = [
    "SCORE_DTYPES",
    "WEIGHT_NORMALIZATIONS",
    "WEIGHTINGS",
    "contrast_loss",
    "contrast_loss_terms",
    "extension_available",
    "reference",
]
