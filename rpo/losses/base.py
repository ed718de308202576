"""What every loss shares: the batch keywords, `LossOutput`, option checks and the reward metrics.

Losses work on per-sequence log-probs, never on logits: `policy_chosen_logps[i]` is the SUM of the token
log-probs of chosen completion i (prompt tokens excluded), `chosen_lengths[i]` its number of tokens.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Union

import torch

# The keywords a trainer may pass to a built loss. Chosen rows: [M]; rejected rows: [N] (M != N for unpaired data).
CHOSEN_KEYWORDS = ("policy_chosen_logps", "reference_chosen_logps", "chosen_lengths", "chosen_embeddings")
REJECTED_KEYWORDS = ("policy_rejected_logps", "reference_rejected_logps", "rejected_lengths", "rejected_embeddings")
KL_KEYWORDS = ("kl_policy_logps", "kl_reference_logps")
BATCH_KEYWORDS = CHOSEN_KEYWORDS + REJECTED_KEYWORDS + KL_KEYWORDS + ("process_group",)
# A loss that needs one of these needs a reference model (or precomputed reference log-probs).
REFERENCE_KEYWORDS = frozenset({"reference_chosen_logps", "reference_rejected_logps", "kl_reference_logps"})
LENGTH_KEYWORDS = frozenset({"chosen_lengths", "rejected_lengths"})
EMBEDDING_KEYWORDS = frozenset({"chosen_embeddings", "rejected_embeddings"})

POLICY_AND_REFERENCE = frozenset({"policy_chosen_logps", "policy_rejected_logps", "reference_chosen_logps",
                                  "reference_rejected_logps"})


class LossConfigError(ValueError):
    """A loss name, option or option value that cannot be built (raised by `build_loss` / `register_loss`)."""


class LossInputError(ValueError):
    """A batch a built loss cannot compute on: missing or unknown keyword, wrong shape, unpaired data, ..."""


MetricValue = Union[torch.Tensor, float, int]


@dataclasses.dataclass
class LossOutput:
    """What a loss returns.

    loss:    0-dim floating tensor (differentiable).
    metrics: name -> 0-dim tensor (detached) or Python number. Each metric is a MEAN over the local batch, so the
             trainer may average it over data-parallel ranks. Built losses (`build_loss`) convert every value to a
             detached 0-dim float32 tensor on the loss's device, so the trainer can stack and all-reduce them in
             one collective and call `.item()` only when it logs.
    """

    loss: torch.Tensor
    metrics: Dict[str, MetricValue] = dataclasses.field(default_factory=dict)


# --- option checks (factories call these; the messages name the loss and the option) -----------------------------

def check_positive(loss: str, option: str, value: float) -> None:
    if not value > 0:
        raise LossConfigError(f"loss {loss!r}: option {option} must be > 0, got {value!r}")


def check_non_negative(loss: str, option: str, value: float) -> None:
    if not value >= 0:
        raise LossConfigError(f"loss {loss!r}: option {option} must be >= 0, got {value!r}")


def check_range(loss: str, option: str, value: float, low: float, high: float, *, high_inclusive: bool) -> None:
    inside = low <= value <= high if high_inclusive else low <= value < high
    if not inside:
        bracket = "]" if high_inclusive else ")"
        raise LossConfigError(f"loss {loss!r}: option {option} must be in [{low}, {high}{bracket}, got {value!r}")


# --- batch checks used by several losses --------------------------------------------------------------------------

def check_paired(loss: str, chosen: torch.Tensor, rejected: torch.Tensor) -> None:
    """Losses defined on (chosen_i, rejected_i) pairs of the same prompt need M == N >= 1."""
    if chosen.shape[0] != rejected.shape[0]:
        raise LossInputError(
            f"loss {loss!r} needs paired data (chosen row i and rejected row i answer the same prompt), got "
            f"{chosen.shape[0]} chosen and {rejected.shape[0]} rejected rows; use 'rpo' or 'kto' for unpaired data")
    if chosen.shape[0] == 0:
        raise LossInputError(f"loss {loss!r}: the batch has no rows")


def per_token(logps: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Length-normalised log-probs logps / |y| (lengths are checked > 0 by the built loss)."""
    return logps / lengths.to(logps.dtype)


# --- metrics -----------------------------------------------------------------------------------------------------

def _mean(values: torch.Tensor) -> torch.Tensor:
    # Empty local batches (legal for a rank of a global contrast) report 0 instead of NaN, so averaging a metric
    # over data-parallel ranks never turns into NaN.
    return values.mean() if values.numel() else values.new_zeros(())


def reward_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                   chosen_logps: Optional[torch.Tensor] = None, rejected_logps: Optional[torch.Tensor] = None, *,
                   accuracies: bool = True) -> Dict[str, torch.Tensor]:
    """TRL-named reward metrics, float32 and detached.

    rewards/accuracies: M == N: the fraction of pairs (i, i) with r_chosen,i > r_rejected,i (per pair, as TRL);
    M != N: the fraction of all M·N pairs (i, j) with r_chosen,i > r_rejected,j. rewards/margins is
    mean(r_chosen) − mean(r_rejected) (for paired data the mean of the per-pair margins).
    """
    with torch.no_grad():
        chosen = chosen_rewards.detach().float()
        rejected = rejected_rewards.detach().float()
        metrics = {
            "rewards/chosen": _mean(chosen),
            "rewards/rejected": _mean(rejected),
            "rewards/margins": _mean(chosen) - _mean(rejected),
        }
        if accuracies:
            wins = (chosen > rejected) if chosen.shape == rejected.shape else (chosen[:, None] > rejected[None, :])
            metrics["rewards/accuracies"] = _mean(wins.float())
        if chosen_logps is not None:
            metrics["logps/chosen"] = _mean(chosen_logps.detach().float())
        if rejected_logps is not None:
            metrics["logps/rejected"] = _mean(rejected_logps.detach().float())
    return metrics
