"""Separable losses, a mean of per-row terms: dpo, ipo, simpo (paired), kto (paired or unpaired), sft.

ρ = log π_θ(y|x) − log π_ref(y|x) (per-sequence sums); h_i = ρ_chosen,i − ρ_rejected,i. Each preference loss
is a score function on `PreferenceLoss` (which takes the scores from the batch and reports the reward metrics).
Equations and defaults: docs/losses.md.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from rpo.losses.base import (KL_KEYWORDS, LossInputError, LossOutput, PreferenceLoss, check_non_negative,
                             check_paired, check_range)
from rpo.losses.registry import register_loss

logger = logging.getLogger(__name__)


@register_loss("dpo")
class DPOLoss(PreferenceLoss):
    """DPO: mean_i −(1−ε)·log σ(β h_i) − ε·log σ(−β h_i)  (ε = label_smoothing, conservative DPO)."""

    name = "dpo"
    needs_pairs = True

    def __init__(self, beta: float = 0.1, label_smoothing: float = 0.0):
        self._set_scores(beta)
        check_range(self.name, "label_smoothing", label_smoothing, 0.0, 0.5, high_inclusive=False)
        self.label_smoothing = label_smoothing

    def score_loss(self, chosen, rejected, batch) -> LossOutput:
        check_paired(self.name, chosen, rejected)
        logits = self.beta * (chosen - rejected)
        losses = -(1.0 - self.label_smoothing) * F.logsigmoid(logits)
        if self.label_smoothing:
            losses = losses - self.label_smoothing * F.logsigmoid(-logits)
        return LossOutput(losses.mean())


@register_loss("ipo")
class IPOLoss(PreferenceLoss):
    """IPO (Azar et al., Eq. 5 with τ = β): mean_i (h_i − 1/(2β))².

    length_normalized=True is TRL's variant: every log-ratio is divided by its completion length first.
    """

    name = "ipo"
    needs_pairs = True

    def __init__(self, beta: float = 0.1, length_normalized: bool = False):
        self._set_scores(beta, per_token=length_normalized)
        self.length_normalized = length_normalized

    def score_loss(self, chosen, rejected, batch) -> LossOutput:
        check_paired(self.name, chosen, rejected)
        return LossOutput(((chosen - rejected - 1.0 / (2.0 * self.beta)) ** 2).mean())


@register_loss("simpo")
class SimPOLoss(PreferenceLoss):
    """SimPO: mean_i −log σ(β/|y_w|·log π(y_w) − β/|y_l|·log π(y_l) − γ), γ = margin; no reference model."""

    name = "simpo"
    needs_pairs = True

    def __init__(self, beta: float = 2.0, margin: float = 0.5):
        self._set_scores(beta, reference_free=True, per_token=True)
        self.margin = margin

    def score_loss(self, chosen, rejected, batch) -> LossOutput:
        check_paired(self.name, chosen, rejected)
        return LossOutput(-F.logsigmoid(self.beta * (chosen - rejected) - self.margin).mean())


@register_loss("kto")
class KTOLoss(PreferenceLoss):
    """KTO on paired or unpaired batches: chosen rows are the desirable examples, rejected rows the undesirable.

    r = ρ; loss = mean over all M + N examples of λ_D·(1 − σ(β(r − z))) (desirable) resp. λ_U·(1 − σ(β(z − r))).
    z, the reference point, is the KTO paper's (and TRL's) estimate of KL(π_θ ‖ π_ref):
        z = max(0, mean_k(kl_policy_logps[k] − kl_reference_logps[k])), detached,
    over K mismatched pairs (prompt of row i with the completion of another row, built by
    `rpo.data.kto_pairs.mismatched_pairs`). With `process_group` the mean is over every rank's pairs (a sum and a
    count all-reduced, so each pair weighs the same), and z is identical on every rank. Without KL log-probs z = 0
    ("KTO-zero"). Metrics: `kl` (z) and `kl_pairs` (K, over the group).

    Cost: z needs the log-probs of the K mismatched sequences under the policy (no_grad, z is detached) and under
    the reference, i.e. one more forward of the mismatched rows through each model per step (with the usual K = R,
    as many rows as the batch).

    Collective: with `process_group` and KL log-probs, every rank of the group must pass them (an empty [0]
    tensor on a rank without pairs: z then comes from the other ranks); a rank passing only one of the two makes
    every rank raise. No pairs in the whole group: z = 0, with one warning per loss.
    """

    name = "kto"
    reward_accuracies = False  # desirable and undesirable answers need not be pairs

    def __init__(self, beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0):
        self._set_scores(beta)
        check_non_negative(self.name, "desirable_weight", desirable_weight)
        check_non_negative(self.name, "undesirable_weight", undesirable_weight)
        self.desirable_weight, self.undesirable_weight = desirable_weight, undesirable_weight
        self.optional = frozenset(KL_KEYWORDS) | {"process_group"}
        self._warned_no_pairs = False

    def score_loss(self, chosen, rejected, batch) -> LossOutput:
        if chosen.shape[0] + rejected.shape[0] == 0:
            raise LossInputError("loss 'kto': the batch has no rows")
        kl, pairs = self._reference_point(batch, chosen)
        desirable = self.desirable_weight * (1.0 - torch.sigmoid(self.beta * (chosen - kl)))
        undesirable = self.undesirable_weight * (1.0 - torch.sigmoid(self.beta * (kl - rejected)))
        metrics = {"kl": kl.float()}
        if pairs is not None:
            metrics["kl_pairs"] = pairs
        return LossOutput(torch.cat([desirable, undesirable]).mean(), metrics)

    def _reference_point(self, batch, like: torch.Tensor) -> "tuple[torch.Tensor, Optional[int]]":
        """(z as a 0-dim tensor of like's dtype, number of mismatched pairs it averages or None without KL)."""
        policy, reference = batch.get("kl_policy_logps"), batch.get("kl_reference_logps")
        group = batch.get("process_group")
        if policy is None and reference is None:
            return like.new_zeros(()), None
        # [sum of the pairs' log-ratios, pairs, ranks that passed only one of the two]; float64 so that the
        # sum does not depend on how the pairs are spread over ranks (beyond float64 rounding).
        totals = torch.zeros(3, dtype=torch.float64, device=like.device)
        if policy is None or reference is None:
            totals[2] = 1.0
        else:
            # The reference point is a batch statistic, not a path for gradients (as in the KTO paper).
            totals[0] = (policy.detach().double() - reference.detach().double()).sum()
            totals[1] = policy.numel()
        if group is not None:
            dist.all_reduce(totals, op=dist.ReduceOp.SUM, group=group)
        log_ratio_sum, pairs, one_sided = totals.tolist()
        if one_sided:
            where = f"{int(one_sided)} rank(s) of the process group" if group is not None else "the batch"
            raise LossInputError(f"loss 'kto': {where} gave only one of kl_policy_logps / kl_reference_logps; "
                                 f"pass both (mismatched-pair log-probs) or neither (z = 0)")
        if not pairs:
            if not self._warned_no_pairs:
                logger.warning("loss 'kto': the batch%s has no mismatched pairs (a batch of one row has no other "
                               "row's completion to borrow), so KTO's reference point z is 0 there; the kl_pairs "
                               "metric counts them (warned once)", " of every rank" if group is not None else "")
                self._warned_no_pairs = True
            return like.new_zeros(()), 0
        return like.new_tensor(max(0.0, log_ratio_sum / pairs)), int(pairs)


@register_loss("sft")
class SFTLoss:
    """Per-token NLL of the chosen responses: −Σ_i log π(y_w,i) / Σ_i |y_w,i| (token-weighted mean).

    A token mean is not a mean over rows, so it does not split over micro-batches and data-parallel ranks the way
    the trainer weights a separable loss (rows_mb / rows_global each). The trainer therefore passes
    `chosen_tokens_per_row`: the chosen response tokens of the whole optimiser step (every micro-batch, every DP
    rank) per row of it (chosen + rejected rows). The loss is then written as a row mean,
    −Σ_i log π(y_w,i) / (rows · chosen_tokens_per_row), whose row-weighted sum over the step is exactly the global
    batch's token mean. Without it (one call on one batch) both forms are the same number.
    Not a preference loss (no rejected answers, no rewards), so not a `PreferenceLoss`.
    """

    def __init__(self):
        self.requires = frozenset({"policy_chosen_logps", "chosen_lengths"})
        self.optional = frozenset({"policy_rejected_logps", "chosen_tokens_per_row"})

    def __call__(self, *, policy_chosen_logps, chosen_lengths, policy_rejected_logps=None,
                 chosen_tokens_per_row=None) -> LossOutput:
        if policy_chosen_logps.shape[0] == 0:
            raise LossInputError("loss 'sft': the batch has no chosen rows")
        if chosen_tokens_per_row is None:
            tokens = chosen_lengths.sum().to(policy_chosen_logps.dtype)
        else:
            if not chosen_tokens_per_row > 0:
                raise LossInputError(f"loss 'sft': chosen_tokens_per_row must be > 0, got {chosen_tokens_per_row!r}")
            rejected = 0 if policy_rejected_logps is None else policy_rejected_logps.shape[0]
            tokens = (policy_chosen_logps.shape[0] + rejected) * float(chosen_tokens_per_row)
        loss = -policy_chosen_logps.sum() / tokens
        return LossOutput(loss, {"sft/nll_per_token": loss.detach()})
