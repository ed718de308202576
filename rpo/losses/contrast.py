"""Batch-coupled contrast losses: rpo, rpo-z, simpo-rpo — all through `rpo.ops.contrast_loss`.

The op computes  L = −1/(M·N) Σ_ij log σ(ω_ij·(β(a_i − b_j) − margin))  over every chosen row i and rejected row
j; these losses only choose the scores a (chosen) and b (rejected). Equations and defaults: README.md (section "Losses").
"""
from __future__ import annotations

from typing import Any, Dict, Literal, Mapping, Tuple

import torch

from rpo import ops
from rpo.losses.base import (EMBEDDING_KEYWORDS, POLICY_AND_REFERENCE, LossInputError, LossOutput, check_paired,
                             check_positive, check_range, per_token, reward_metrics)
from rpo.losses.registry import register_loss

Weighting = Literal["embedding", "uniform", "diagonal", "none"]
WeightNormalization = Literal["row", "mean"]


def _metric_weights(loss: "_ContrastLoss", rows: int, columns: int, batch: Mapping[str, Any]) -> torch.Tensor:
    """The M×N weights ω of the local block, float32, for the contrast/* metrics only (the op never builds them).

    With global_contrast the op normalises each row over the GLOBAL columns; these local weights are normalised
    over the local columns, so the contrast/* metrics then describe the local block (documented).
    """
    device = batch["policy_chosen_logps"].device
    if loss.weighting == "diagonal" and columns < 2:
        # Only a rank's 1×1 local block under global contrast gets here (the op rejects it otherwise).
        return torch.full((rows, columns), loss.alpha, device=device)
    embedding = loss.weighting == "embedding"
    return ops.reference.pair_weights(
        rows, columns, weighting=loss.weighting, weight_normalization=loss.weight_normalization,
        chosen_embeddings=batch["chosen_embeddings"].detach() if embedding else None,
        rejected_embeddings=batch["rejected_embeddings"].detach() if embedding else None,
        tau=loss.tau, alpha=loss.alpha, dtype=torch.float32, device=device)


def contrast_metrics(loss: "_ContrastLoss", chosen_scores: torch.Tensor, rejected_scores: torch.Tensor,
                     batch: Mapping[str, Any]) -> Dict[str, torch.Tensor]:
    """contrast/diag_weight (mean ω_ii), contrast/effective_beta (mean β·ω_ij over all pairs),
    contrast/offdiag_accuracy (fraction of pairs i != j with a_i > b_j); 0 where a set is empty."""
    with torch.no_grad():
        rows, columns = chosen_scores.shape[0], rejected_scores.shape[0]
        zero = chosen_scores.new_zeros((), dtype=torch.float32)
        if rows == 0 or columns == 0:
            return {"contrast/diag_weight": zero, "contrast/effective_beta": zero, "contrast/offdiag_accuracy": zero}
        weights = _metric_weights(loss, rows, columns, batch)
        wins = (chosen_scores.detach().float()[:, None] > rejected_scores.detach().float()[None, :]).float()
        off_diagonal = torch.ones(rows, columns, dtype=torch.bool, device=wins.device)
        off_diagonal.diagonal().fill_(False)
        return {
            "contrast/diag_weight": weights.diagonal().mean() if min(rows, columns) else zero,
            "contrast/effective_beta": loss.beta * weights.mean(),
            "contrast/offdiag_accuracy": wins[off_diagonal].mean() if off_diagonal.any() else zero,
        }


class _ContrastLoss:
    """Shared options, checks and the call of the op; subclasses define `name` and `scores()`."""

    name = "contrast"
    batch_coupled = True

    def _configure(self, *, beta: float, weighting: str, tau: float, alpha: float, weight_normalization: str,
                   margin: float, global_contrast: bool, score_keywords: frozenset) -> None:
        check_positive(self.name, "beta", beta)
        check_positive(self.name, "tau", tau)
        check_range(self.name, "alpha", alpha, 0.0, 1.0, high_inclusive=True)
        self.beta, self.weighting, self.tau, self.alpha = beta, weighting, tau, alpha
        self.weight_normalization, self.margin, self.global_contrast = weight_normalization, margin, global_contrast
        self.requires = frozenset(score_keywords) | (EMBEDDING_KEYWORDS if weighting == "embedding" else frozenset())
        self.optional = frozenset({"process_group"}) if global_contrast else frozenset()

    def scores(self, batch: Mapping[str, Any]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(chosen scores a, rejected scores b fed to the op, chosen rewards, rejected rewards for the metrics)."""
        raise NotImplementedError

    def __call__(self, **batch: Any) -> LossOutput:
        chosen_scores, rejected_scores, chosen_rewards, rejected_rewards = self.scores(batch)
        process_group = batch.get("process_group") if self.global_contrast else None
        if self.weighting == "diagonal" and process_group is None and chosen_scores.shape != rejected_scores.shape:
            raise LossInputError(f"loss {self.name!r}: weighting='diagonal' needs paired data (M == N), got "
                                 f"{chosen_scores.shape[0]} chosen and {rejected_scores.shape[0]} rejected rows")
        embedding = self.weighting == "embedding"
        loss = ops.contrast_loss(
            chosen_scores, rejected_scores, beta=self.beta, weighting=self.weighting,
            chosen_embeddings=batch["chosen_embeddings"] if embedding else None,
            rejected_embeddings=batch["rejected_embeddings"] if embedding else None,
            tau=self.tau, alpha=self.alpha, weight_normalization=self.weight_normalization, margin=self.margin,
            process_group=process_group)
        metrics = reward_metrics(chosen_rewards, rejected_rewards, batch["policy_chosen_logps"],
                                 batch["policy_rejected_logps"])
        metrics.update(contrast_metrics(self, chosen_scores, rejected_scores, batch))
        return LossOutput(loss, metrics)


@register_loss("rpo")
class RPOLoss(_ContrastLoss):
    """RPO: scores a_i = ρ_chosen,i, b_j = ρ_rejected,j (log π_θ − log π_ref), the paper's contrast matrix."""

    name = "rpo"

    def __init__(self, beta: float = 0.1, weighting: Weighting = "embedding", tau: float = 0.5, alpha: float = 0.8,
                 weight_normalization: WeightNormalization = "row", margin: float = 0.0,
                 global_contrast: bool = False):
        self._configure(beta=beta, weighting=weighting, tau=tau, alpha=alpha,
                        weight_normalization=weight_normalization, margin=margin, global_contrast=global_contrast,
                        score_keywords=POLICY_AND_REFERENCE)

    def scores(self, batch):
        chosen = batch["policy_chosen_logps"] - batch["reference_chosen_logps"]
        rejected = batch["policy_rejected_logps"] - batch["reference_rejected_logps"]
        return chosen, rejected, self.beta * chosen, self.beta * rejected


@register_loss("rpo-z")
class RPOZLoss(RPOLoss):
    """RPO with a per-prompt log Z(x) estimate added to every score (paired data only).

    The implicit reward is r(x, y) = β(ρ(x, y) + log Z(x)); log Z cancels on the diagonal but not across prompts.
    Anchoring each prompt's reward so that the reference model's answers score 0 on average gives
    log Z(x) = KL(π_ref(·|x) ‖ π_θ(·|x)), estimated from the prompt's two answers in the batch:
    log Ẑ(x_i) = −(ρ_chosen,i + ρ_rejected,i)/2, detached. Scores a_i = ρ_chosen,i + log Ẑ(x_i),
    b_j = ρ_rejected,j + log Ẑ(x_j); the diagonal (DPO) terms are unchanged.
    """

    name = "rpo-z"

    def scores(self, batch):
        chosen, rejected, chosen_rewards, rejected_rewards = super().scores(batch)
        check_paired(self.name, chosen, rejected)
        # A baseline, not a path for gradients: it keeps the diagonal gradient exactly DPO's.
        log_z = (-0.5 * (chosen + rejected)).detach()
        return chosen + log_z, rejected + log_z, chosen_rewards, rejected_rewards


@register_loss("simpo-rpo")
class SimPORPOLoss(_ContrastLoss):
    """SimPO scores in the contrast matrix (the paper's Appendix B): a_i = log π(y_w,i)/|y_w,i|,
    b_j = log π(y_l,j)/|y_l,j|, margin γ; no reference model."""

    name = "simpo-rpo"

    def __init__(self, beta: float = 2.0, margin: float = 0.5, weighting: Weighting = "embedding", tau: float = 0.5,
                 alpha: float = 0.8, weight_normalization: WeightNormalization = "row",
                 global_contrast: bool = False):
        self._configure(beta=beta, weighting=weighting, tau=tau, alpha=alpha,
                        weight_normalization=weight_normalization, margin=margin, global_contrast=global_contrast,
                        score_keywords=frozenset({"policy_chosen_logps", "policy_rejected_logps", "chosen_lengths",
                                                  "rejected_lengths"}))

    def scores(self, batch):
        chosen = per_token(batch["policy_chosen_logps"], batch["chosen_lengths"])
        rejected = per_token(batch["policy_rejected_logps"], batch["rejected_lengths"])
        return chosen, rejected, self.beta * chosen, self.beta * rejected
