"""Held-out implicit-reward evaluation of a policy against its reference, with Hugging Face models.

For every sequence, log π(y|x) is the SUM of the response tokens' log-probs (prompt tokens excluded), computed
with the same tokenisation as training (:mod:`rpo.data`). The implicit reward is

- ``dpo``:    r = β · (log π_θ(y|x) − log π_ref(y|x))   (DPO, IPO, KTO, RPO);
- ``simpo``:  r = β / |y| · log π_θ(y|x)              (SimPO, SimPO+RPO; no reference model).

Reward accuracy: paired data, the fraction of rows with r(chosen) > r(rejected) (ties count as wrong, as in
training's ``rewards/accuracies``); unpaired data, the fraction of all (desirable, undesirable) pairs with
r(desirable) > r(undesirable). Reward margin: mean r(chosen) − mean r(rejected).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Sequence

import torch

from rpo.data import collate_preference_batch
from rpo.models.logprobs import response_token_logprobs

logger = logging.getLogger(__name__)

REWARD_TYPES = ("dpo", "simpo")


@torch.no_grad()
def sequence_logprobs(
    model: torch.nn.Module,
    sequences: Sequence[tuple[Sequence[int], Sequence[bool]]],
    pad_token_id: int,
    batch_size: int = 4,
    progress_desc: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence sum of log π(token) over the tokens whose mask is True, and their count.

    ``sequences``: (input_ids, loss_mask) pairs; the mask marks the response tokens. Returns float64 sums and
    int64 token counts on the CPU, in the order given. Sequences are batched longest first (less padding) and
    right-padded; position ids are unaffected by right padding.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = next(model.parameters()).device
    count = len(sequences)
    sums = torch.zeros(count, dtype=torch.float64)
    lengths = torch.zeros(count, dtype=torch.int64)
    for index, (ids, mask) in enumerate(sequences):
        if len(ids) != len(mask):
            raise ValueError(f"sequence {index}: {len(ids)} input ids but {len(mask)} loss-mask entries")
        if not any(mask[1:]):
            raise ValueError(f"sequence {index}: no response token to score (the loss mask is empty after the "
                             f"first token)")
    order = sorted(range(count), key=lambda i: -len(sequences[i][0]))
    batches = [order[start:start + batch_size] for start in range(0, count, batch_size)]
    if progress_desc:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc=progress_desc, unit="batch")
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            # The trainer's padding (right padding, loss mask on response tokens).
            padded = collate_preference_batch([sequences[i] for i in batch], [], batch, None, paired=False,
                                              pad_token_id=pad_token_id)
            input_ids, attention_mask, loss_mask = padded["input_ids"], padded["attention_mask"], padded["loss_mask"]
            input_ids, loss_mask = input_ids.to(device), loss_mask.to(device)
            logits = model(input_ids=input_ids, attention_mask=attention_mask.to(device)).logits
            token_logps = response_token_logprobs(logits, input_ids, loss_mask)
            batch_sums = token_logps.double().sum(-1).cpu()
            batch_lengths = loss_mask[:, 1:].sum(-1).cpu()  # the first token is never scored
            for row, i in enumerate(batch):
                sums[i] = batch_sums[row]
                lengths[i] = batch_lengths[row]
    finally:
        model.train(was_training)
    return sums, lengths


@dataclass
class SequenceScores:
    """Log-probs of one response field (chosen / rejected / completion) for every row."""

    policy_logps: torch.Tensor  # float64 [n]
    reference_logps: torch.Tensor | None  # float64 [n]; None for the simpo reward
    lengths: torch.Tensor  # int64 [n], response tokens scored


def implicit_rewards(scores: SequenceScores, beta: float, reward_type: str) -> torch.Tensor:
    if reward_type == "dpo":
        if scores.reference_logps is None:
            raise ValueError("reward_type 'dpo' needs the reference model's log-probs")
        return beta * (scores.policy_logps - scores.reference_logps)
    if reward_type == "simpo":
        return beta * scores.policy_logps / scores.lengths.to(torch.float64)
    raise ValueError(f"unknown reward_type {reward_type!r}; choose one of {REWARD_TYPES}")


def reward_summary(chosen: SequenceScores, rejected: SequenceScores, beta: float, reward_type: str,
                   paired: bool) -> dict:
    """The metrics of the module docstring from the log-probs of the chosen and rejected responses."""
    chosen_rewards = implicit_rewards(chosen, beta, reward_type)
    rejected_rewards = implicit_rewards(rejected, beta, reward_type)
    if paired:
        if chosen_rewards.shape != rejected_rewards.shape:
            raise ValueError(f"paired data needs as many chosen as rejected rows, got {chosen_rewards.numel()} "
                             f"and {rejected_rewards.numel()}")
        wins = chosen_rewards > rejected_rewards
        ties = chosen_rewards == rejected_rewards
        policy_prefers_chosen = chosen.policy_logps > rejected.policy_logps
    else:
        wins = chosen_rewards[:, None] > rejected_rewards[None, :]
        ties = chosen_rewards[:, None] == rejected_rewards[None, :]
        policy_prefers_chosen = chosen.policy_logps[:, None] > rejected.policy_logps[None, :]
    if wins.numel() == 0:
        raise ValueError("no (chosen, rejected) pair to evaluate: unpaired data needs both desirable and "
                         "undesirable rows")

    def mean(values: torch.Tensor) -> float:
        return float(values.to(torch.float64).mean())

    summary = {
        "reward_accuracy": mean(wins),
        "reward_margin": mean(chosen_rewards) - mean(rejected_rewards),
        "n": int(chosen_rewards.numel() if paired else chosen_rewards.numel() + rejected_rewards.numel()),
        "n_comparisons": int(wins.numel()),
        "reward_ties": int(ties.sum()),
        "reward_type": reward_type,
        "beta": beta,
        "kind": "paired" if paired else "unpaired",
        "chosen_reward": mean(chosen_rewards),
        "rejected_reward": mean(rejected_rewards),
        "policy_logp_chosen": mean(chosen.policy_logps),
        "policy_logp_rejected": mean(rejected.policy_logps),
        "policy_logp_per_token_chosen": mean(chosen.policy_logps / chosen.lengths),
        "policy_logp_per_token_rejected": mean(rejected.policy_logps / rejected.lengths),
        # Whether the policy alone gives the chosen response the higher log-prob (no reference involved).
        "policy_logp_accuracy": mean(policy_prefers_chosen),
        "response_tokens_chosen": mean(chosen.lengths),
        "response_tokens_rejected": mean(rejected.lengths),
    }
    if paired:
        summary["n_chosen"] = summary["n_rejected"] = int(chosen_rewards.numel())
    else:
        summary["n_chosen"], summary["n_rejected"] = int(chosen_rewards.numel()), int(rejected_rewards.numel())
    if chosen.reference_logps is not None:
        summary["reference_logp_chosen"] = mean(chosen.reference_logps)
        summary["reference_logp_rejected"] = mean(rejected.reference_logps)
    for key, value in summary.items():
        if isinstance(value, float) and not math.isfinite(value):
            logger.warning("evaluation metric %s is %s", key, value)
    return summary


def evaluate_implicit_reward(policy: torch.nn.Module, reference: torch.nn.Module | None, tokenized, beta: float,
                             reward_type: str = "dpo", batch_size: int = 4,
                             progress: bool = False) -> tuple[dict, list[dict]]:
    """Implicit-reward metrics of ``policy`` on a tokenised preference data set (:mod:`rpo.data`).

    ``tokenized``: a ``TokenizedPreferenceDataset`` (paired: chosen/rejected sequences; unpaired: completion
    sequences split by label). ``reference`` may be None only for ``reward_type='simpo'``. Returns the summary
    (see :func:`reward_summary`) and one record per row with its log-probs and rewards.
    """
    if reward_type not in REWARD_TYPES:
        raise ValueError(f"unknown reward_type {reward_type!r}; choose one of {REWARD_TYPES}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if reward_type == "dpo" and reference is None:
        raise ValueError("reward_type 'dpo' needs a reference model (r = beta * (log pi - log pi_ref))")
    rows = tokenized.rows
    fields = ("chosen", "rejected") if tokenized.paired else ("completion",)
    scores = {}
    for name in fields:
        sequences = list(zip(rows[f"{name}_input_ids"], rows[f"{name}_loss_mask"]))
        policy_logps, lengths = sequence_logprobs(policy, sequences, tokenized.pad_token_id, batch_size,
                                                  f"policy {name}" if progress else None)
        reference_logps = None
        if reward_type == "dpo":
            reference_logps, reference_lengths = sequence_logprobs(
                reference, sequences, tokenized.pad_token_id, batch_size, f"reference {name}" if progress else None)
            assert torch.equal(lengths, reference_lengths)
        scores[name] = SequenceScores(policy_logps, reference_logps, lengths)

    def select(scores_: SequenceScores, keep: torch.Tensor) -> SequenceScores:
        reference_ = scores_.reference_logps[keep] if scores_.reference_logps is not None else None
        return SequenceScores(scores_.policy_logps[keep], reference_, scores_.lengths[keep])

    if tokenized.paired:
        chosen, rejected = scores["chosen"], scores["rejected"]
        labels = None
    else:
        labels = torch.as_tensor(list(rows["label"]), dtype=torch.bool)
        chosen, rejected = select(scores["completion"], labels), select(scores["completion"], ~labels)
    summary = reward_summary(chosen, rejected, beta, reward_type, paired=tokenized.paired)

    records = []
    source_rows = list(rows["source_row"])
    for name in fields:
        rewards = implicit_rewards(scores[name], beta, reward_type)
        for i in range(len(source_rows)):
            if name == fields[0]:
                records.append({"source_row": int(source_rows[i])})
                if labels is not None:
                    records[i]["label"] = bool(labels[i])
            records[i][f"policy_logp_{name}"] = float(scores[name].policy_logps[i])
            if scores[name].reference_logps is not None:
                records[i][f"reference_logp_{name}"] = float(scores[name].reference_logps[i])
            records[i][f"tokens_{name}"] = int(scores[name].lengths[i])
            records[i][f"reward_{name}"] = float(rewards[i])
    return summary, records
