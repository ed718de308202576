"""Separable losses: dpo, ipo, simpo (paired), kto (paired or unpaired), sft.

ρ = log π_θ(y|x) − log π_ref(y|x) (per-sequence sums); h_i = ρ_chosen,i − ρ_rejected,i. Equations and defaults:
README.md (section "Losses").
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from rpo.losses.base import (POLICY_AND_REFERENCE, LossInputError, LossOutput, check_non_negative, check_paired,
                             check_positive, check_range, per_token, reward_metrics)
from rpo.losses.registry import register_loss


@register_loss("dpo")
class DPOLoss:
    """DPO: mean_i −(1−ε)·log σ(β h_i) − ε·log σ(−β h_i)  (ε = label_smoothing, conservative DPO)."""

    batch_coupled = False

    def __init__(self, beta: float = 0.1, label_smoothing: float = 0.0):
        check_positive("dpo", "beta", beta)
        check_range("dpo", "label_smoothing", label_smoothing, 0.0, 0.5, high_inclusive=False)
        self.beta, self.label_smoothing = beta, label_smoothing
        self.requires = POLICY_AND_REFERENCE
        self.optional = frozenset()

    def __call__(self, *, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                 reference_rejected_logps) -> LossOutput:
        check_paired("dpo", policy_chosen_logps, policy_rejected_logps)
        chosen_ratio = policy_chosen_logps - reference_chosen_logps
        rejected_ratio = policy_rejected_logps - reference_rejected_logps
        logits = self.beta * (chosen_ratio - rejected_ratio)
        losses = -(1.0 - self.label_smoothing) * F.logsigmoid(logits)
        if self.label_smoothing:
            losses = losses - self.label_smoothing * F.logsigmoid(-logits)
        metrics = reward_metrics(self.beta * chosen_ratio, self.beta * rejected_ratio, policy_chosen_logps,
                                 policy_rejected_logps)
        return LossOutput(losses.mean(), metrics)


@register_loss("ipo")
class IPOLoss:
    """IPO (Azar et al., Eq. 5 with τ = β): mean_i (h_i − 1/(2β))².

    length_normalized=True is TRL's variant: every log-prob is divided by its completion length first.
    """

    batch_coupled = False

    def __init__(self, beta: float = 0.1, length_normalized: bool = False):
        check_positive("ipo", "beta", beta)
        self.beta, self.length_normalized = beta, length_normalized
        self.requires = POLICY_AND_REFERENCE | ({"chosen_lengths", "rejected_lengths"} if length_normalized else set())
        self.optional = frozenset()

    def __call__(self, *, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                 reference_rejected_logps, chosen_lengths=None, rejected_lengths=None) -> LossOutput:
        check_paired("ipo", policy_chosen_logps, policy_rejected_logps)
        chosen_ratio = policy_chosen_logps - reference_chosen_logps
        rejected_ratio = policy_rejected_logps - reference_rejected_logps
        if self.length_normalized:
            chosen_ratio = per_token(chosen_ratio, chosen_lengths)
            rejected_ratio = per_token(rejected_ratio, rejected_lengths)
        losses = (chosen_ratio - rejected_ratio - 1.0 / (2.0 * self.beta)) ** 2
        metrics = reward_metrics(self.beta * chosen_ratio, self.beta * rejected_ratio, policy_chosen_logps,
                                 policy_rejected_logps)
        return LossOutput(losses.mean(), metrics)


@register_loss("simpo")
class SimPOLoss:
    """SimPO: mean_i −log σ(β/|y_w|·log π(y_w) − β/|y_l|·log π(y_l) − γ), γ = margin; no reference model."""

    batch_coupled = False

    def __init__(self, beta: float = 2.0, margin: float = 0.5):
        check_positive("simpo", "beta", beta)
        self.beta, self.margin = beta, margin
        self.requires = frozenset({"policy_chosen_logps", "policy_rejected_logps", "chosen_lengths",
                                   "rejected_lengths"})
        self.optional = frozenset()

    def __call__(self, *, policy_chosen_logps, policy_rejected_logps, chosen_lengths, rejected_lengths) -> LossOutput:
        check_paired("simpo", policy_chosen_logps, policy_rejected_logps)
        chosen_rewards = self.beta * per_token(policy_chosen_logps, chosen_lengths)
        rejected_rewards = self.beta * per_token(policy_rejected_logps, rejected_lengths)
        losses = -F.logsigmoid(chosen_rewards - rejected_rewards - self.margin)
        metrics = reward_metrics(chosen_rewards, rejected_rewards, policy_chosen_logps, policy_rejected_logps)
        return LossOutput(losses.mean(), metrics)


@register_loss("kto")
class KTOLoss:
    """KTO on paired or unpaired batches: chosen rows are the desirable examples, rejected rows the undesirable.

    r = ρ; z = max(0, mean(kl_policy_logps − kl_reference_logps)), detached (0 without KL log-probs);
    loss = mean over all M + N examples of λ_D·(1 − σ(β(r − z))) (desirable) resp. λ_U·(1 − σ(β(z − r))).
    """

    batch_coupled = False

    def __init__(self, beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0):
        check_positive("kto", "beta", beta)
        check_non_negative("kto", "desirable_weight", desirable_weight)
        check_non_negative("kto", "undesirable_weight", undesirable_weight)
        self.beta, self.desirable_weight, self.undesirable_weight = beta, desirable_weight, undesirable_weight
        self.requires = POLICY_AND_REFERENCE
        self.optional = frozenset({"kl_policy_logps", "kl_reference_logps"})

    def __call__(self, *, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                 reference_rejected_logps, kl_policy_logps=None, kl_reference_logps=None) -> LossOutput:
        if policy_chosen_logps.shape[0] + policy_rejected_logps.shape[0] == 0:
            raise LossInputError("loss 'kto': the batch has no rows")
        chosen_ratio = policy_chosen_logps - reference_chosen_logps
        rejected_ratio = policy_rejected_logps - reference_rejected_logps
        kl = self._reference_point(kl_policy_logps, kl_reference_logps, chosen_ratio)
        desirable = self.desirable_weight * (1.0 - torch.sigmoid(self.beta * (chosen_ratio - kl)))
        undesirable = self.undesirable_weight * (1.0 - torch.sigmoid(self.beta * (kl - rejected_ratio)))
        loss = torch.cat([desirable, undesirable]).mean()
        metrics = reward_metrics(self.beta * chosen_ratio, self.beta * rejected_ratio, policy_chosen_logps,
                                 policy_rejected_logps, accuracies=False)
        metrics["kl"] = kl.float()
        return LossOutput(loss, metrics)

    @staticmethod
    def _reference_point(kl_policy_logps: Optional[torch.Tensor], kl_reference_logps: Optional[torch.Tensor],
                         like: torch.Tensor) -> torch.Tensor:
        if kl_policy_logps is None and kl_reference_logps is None:
            return like.new_zeros(())
        if kl_policy_logps is None or kl_reference_logps is None:
            given = "kl_policy_logps" if kl_reference_logps is None else "kl_reference_logps"
            other = "kl_reference_logps" if kl_reference_logps is None else "kl_policy_logps"
            raise LossInputError(f"loss 'kto': {given} is given without {other}; pass both (mismatched-pair "
                                 f"log-probs) or neither (z = 0)")
        if kl_policy_logps.numel() == 0:
            raise LossInputError("loss 'kto': kl_policy_logps is empty")
        # The reference point is a batch statistic, not a path for gradients (as in the KTO paper).
        return (kl_policy_logps - kl_reference_logps).mean().clamp(min=0).detach().to(like.dtype)


@register_loss("sft")
class SFTLoss:
    """Per-token NLL of the chosen responses: −Σ_i log π(y_w,i) / Σ_i |y_w,i| (token-weighted mean)."""

    batch_coupled = False

    def __init__(self):
        self.requires = frozenset({"policy_chosen_logps", "chosen_lengths"})
        self.optional = frozenset()

    def __call__(self, *, policy_chosen_logps, chosen_lengths) -> LossOutput:
        if policy_chosen_logps.shape[0] == 0:
            raise LossInputError("loss 'sft': the batch has no chosen rows")
        loss = -policy_chosen_logps.sum() / chosen_lengths.sum().to(policy_chosen_logps.dtype)
        return LossOutput(loss, {"sft/nll_per_token": loss.detach()})
