"""What every loss shares: the batch keywords, `LossOutput`, option checks, the reward metrics and
`PreferenceLoss`, the base of the built-in preference losses.

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
# chosen_tokens_per_row: the chosen response tokens of the whole optimiser step (all micro-batches and data-parallel
# ranks) per row (chosen + rejected) of it; the trainer passes it to a loss that declares it, so that a token mean
# (sft) is that of the global batch (see SFTLoss).
BATCH_KEYWORDS = CHOSEN_KEYWORDS + REJECTED_KEYWORDS + KL_KEYWORDS + ("process_group", "chosen_tokens_per_row")
# A loss that needs one of these needs a reference model (or precomputed reference log-probs).
REFERENCE_KEYWORDS = frozenset({"reference_chosen_logps", "reference_rejected_logps", "kl_reference_logps"})
LENGTH_KEYWORDS = frozenset({"chosen_lengths", "rejected_lengths"})
EMBEDDING_KEYWORDS = frozenset({"chosen_embeddings", "rejected_embeddings"})

POLICY_KEYWORDS = frozenset({"policy_chosen_logps", "policy_rejected_logps"})
POLICY_AND_REFERENCE = POLICY_KEYWORDS | {"reference_chosen_logps", "reference_rejected_logps"}


class LossConfigError(ValueError):
    """A loss name, option or option value that cannot be built (raised by `build_loss` / `register_loss`).

    `option` names the option at fault when there is one (an entry point maps it to its own flag or field)."""

    def __init__(self, message: str, *, option: Optional[str] = None):
        super().__init__(message)
        self.option = option


class LossInputError(ValueError):
    """A batch a built loss cannot compute on: missing or unknown keyword, wrong shape, unpaired data, ..."""


MetricValue = Union[torch.Tensor, float, int]


@dataclasses.dataclass
class LossOutput:
    """What a loss returns.

    loss:        0-dim floating tensor (differentiable).
    metrics:     name -> 0-dim tensor (detached) or Python number. A metric is a mean over the local batch, or
                 over the global batch (the same value on every rank) for the contrast/* metrics of a global
                 contrast; either way the trainer may average it over data-parallel ranks. Built losses
                 (`build_loss`) convert every value to a detached 0-dim float32 tensor on the loss's device, so
                 the trainer can stack and all-reduce them in one collective and call `.item()` only when it logs.
    global_loss: the part of `loss` that is a quantity of the global batch (the same on every rank of the
                 process group: a contrast over the group), or None when nothing is global. `loss - global_loss`
                 is then the separable part, a mean over this rank's rows. For "rpo+0.2*sft" over a group it is
                 rpo's loss (times its weight).
    """

    loss: torch.Tensor
    metrics: Dict[str, MetricValue] = dataclasses.field(default_factory=dict)
    global_loss: Optional[torch.Tensor] = None


# --- option checks (factories call these; the messages name the loss and the option) -----------------------------

def check_positive(loss: str, option: str, value: float) -> None:
    if not value > 0:
        raise LossConfigError(f"loss {loss!r}: option {option} must be > 0, got {value!r}", option=option)


def check_non_negative(loss: str, option: str, value: float) -> None:
    if not value >= 0:
        raise LossConfigError(f"loss {loss!r}: option {option} must be >= 0, got {value!r}", option=option)


def check_range(loss: str, option: str, value: float, low: float, high: float, *, high_inclusive: bool) -> None:
    inside = low <= value <= high if high_inclusive else low <= value < high
    if not inside:
        bracket = "]" if high_inclusive else ")"
        raise LossConfigError(f"loss {loss!r}: option {option} must be in [{low}, {high}{bracket}, got {value!r}",
                              option=option)


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


# --- the shared base of the built-in losses ----------------------------------------------------------------------

class PreferenceLoss:
    """Base of the built-in preference losses: the work every loss shares, done once here.

    From the batch the base takes the implicit-reward scores of every answer — the log-ratios
    ρ = log π_θ − log π_ref, or the per-token policy log-probs log π/|y| for a reference-free loss (SimPO), or the
    per-token log-ratios ρ/|y| — and, after the loss, the reward metrics of the rewards β·score. A loss only
    supplies `score_loss(chosen, rejected, batch)`: its `LossOutput` from those scores (extra metrics and, for a
    global contrast, `global_loss` included).

    Attributes a loss may set: `name`; `needs_pairs` (defined on (chosen_i, rejected_i) pairs of one prompt only:
    `rpo.losses.resolve_loss` refuses it for unpaired data); `reward_accuracies` (False: no rewards/accuracies,
    e.g. KTO, whose answers need not be pairs); `is_global` (set by a loss contrasting over a process group);
    `options` (option values the loss resolved itself, e.g. a default that depends on another option).
    """

    name = "preference"
    needs_pairs = False
    is_global = False
    reward_accuracies = True

    def _set_scores(self, beta: float, *, reference_free: bool = False, per_token: bool = False) -> None:
        """Options shared by every loss: β and which scores it works on; sets `requires` and `optional`."""
        check_positive(self.name, "beta", beta)
        self.beta, self.reference_free, self.per_token = beta, reference_free, per_token
        self.requires = (POLICY_KEYWORDS if reference_free else POLICY_AND_REFERENCE) | (
            LENGTH_KEYWORDS if per_token else frozenset())
        self.optional = frozenset()

    def implicit_scores(self, batch) -> "tuple[torch.Tensor, torch.Tensor]":
        """(chosen scores [M], rejected scores [N]): ρ, ρ/|y| or log π/|y| (see the class docstring)."""
        chosen, rejected = batch["policy_chosen_logps"], batch["policy_rejected_logps"]
        if not self.reference_free:
            chosen = chosen - batch["reference_chosen_logps"]
            rejected = rejected - batch["reference_rejected_logps"]
        if self.per_token:
            chosen = per_token(chosen, batch["chosen_lengths"])
            rejected = per_token(rejected, batch["rejected_lengths"])
        return chosen, rejected

    def score_loss(self, chosen: torch.Tensor, rejected: torch.Tensor, batch) -> LossOutput:
        raise NotImplementedError

    def __call__(self, **batch) -> LossOutput:
        chosen, rejected = self.implicit_scores(batch)
        scored = self.score_loss(chosen, rejected, batch)
        metrics = reward_metrics(self.beta * chosen, self.beta * rejected, batch["policy_chosen_logps"],
                                 batch["policy_rejected_logps"], accuracies=self.reward_accuracies)
        metrics.update(scored.metrics)
        return LossOutput(scored.loss, metrics, scored.global_loss)
