"""Preference losses by name: built-ins (dpo, ipo, simpo, kto, sft, rpo, rpo-z, simpo-rpo), user plugins and
weighted combinations. See docs/losses.md.

    from rpo.losses import build_loss
    loss = build_loss("rpo+0.2*sft", beta=0.1)
    out = loss(policy_chosen_logps=..., policy_rejected_logps=..., reference_chosen_logps=..., ...)
    out.loss.backward(); out.metrics["rewards/accuracies"]

An entry point that knows more about its run (unpaired data, a β from another config) calls `resolve_loss`.
"""
from rpo.losses.base import (BATCH_KEYWORDS, REFERENCE_KEYWORDS, LossConfigError, LossInputError, LossOutput,
                             PreferenceLoss, reward_metrics)
from rpo.losses.build import UNPAIRED_TAU, build_loss, resolve_loss
from rpo.losses.registry import Loss, available_losses, register_loss

# Importing the built-in modules registers their losses.
from rpo.losses import separable  # noqa: E402,F401  isort:skip
from rpo.losses import contrast_matrix  # noqa: E402,F401  isort:skip

__all__ = [
    "BATCH_KEYWORDS",
    "REFERENCE_KEYWORDS",
    "UNPAIRED_TAU",
    "Loss",
    "LossConfigError",
    "LossInputError",
    "LossOutput",
    "PreferenceLoss",
    "available_losses",
    "build_loss",
    "register_loss",
    "resolve_loss",
    "reward_metrics",
]
