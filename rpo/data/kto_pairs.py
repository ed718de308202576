"""KTO's mismatched pairs: each prompt of a batch with the completion of another row, for KTO's reference point z.

The KTO paper (and TRL) estimate z ≈ KL(π_θ ‖ π_ref) on (prompt, completion) pairs whose completion answers
a different prompt of the same batch. As TRL, the completions are shifted by one within the batch, so the
pairing is deterministic:
  unpaired data (R = M + N rows, each with its own prompt): row r gets the completion of row (r + 1) mod R;
  paired data (chosen row i and rejected row M + i share prompt i): shifted within each half, so prompt i gets
  the chosen and the rejected completion of pair (i + 1) mod M — never its own prompt's answer.
Either way there are K = R mismatched sequences (one per desirable or undesirable example, as TRL), or none for
a batch without a partner (one unpaired row, one pair, no rows).

The trainer pairs over the *global* batch of a step (`rpo.data.PreferenceBatcher.global_completions`: every
rank's rows, in rank order), each rank building the sequences of its own rows, so the pairs, and KTO's z, are
the same whatever the data-parallel layout.

Each sequence is prompt i followed by completion j, the completion cut on the right to fit ``max_length``: the
tokeniser's rule (rpo.data.tokenization), whose prompts are already cut to ``max_prompt_length`` on the left.
A completion is the one in the batch, i.e. as the tokeniser truncated it after its own prompt.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from .batching import GlobalCompletions, collate_preference_batch


def mismatched_partners(num_chosen: int, num_rejected: int, *, paired: bool) -> torch.Tensor:
    """For each sequence r of the batch, the sequence whose completion it gets; empty without a partner."""
    rows = num_chosen + num_rejected
    if paired:
        if num_chosen != num_rejected:
            raise ValueError(f"paired batch needs as many chosen as rejected rows, got {num_chosen} and "
                             f"{num_rejected}")
        if num_chosen < 2:
            return torch.zeros(0, dtype=torch.long)
        within_half = (torch.arange(num_chosen) + 1) % num_chosen
        return torch.cat([within_half, num_chosen + within_half])
    if rows < 2:
        return torch.zeros(0, dtype=torch.long)
    return (torch.arange(rows) + 1) % rows


def _prompt_and_completion(batch: Mapping[str, Any], r: int) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) of sequence r: the tokeniser lays out prompt tokens, then response tokens."""
    length = int(batch["attention_mask"][r].sum())
    ids = batch["input_ids"][r, :length].tolist()
    response = batch["loss_mask"][r, :length]
    prompt_length = length - int(response.sum())
    if prompt_length == length or not bool(response[prompt_length:].all()):
        raise ValueError(f"mismatched pairs: sequence {r} (row {int(batch['row_ids'][r])}) is not prompt tokens "
                         f"followed by at least one response token (loss_mask)")
    return ids[:prompt_length], ids[prompt_length:]


def mismatched_pairs(batch: Mapping[str, Any], *, max_length: int, pad_token_id: int,
                     pad_to_multiple_of: int | None = None,
                     global_batch: GlobalCompletions | None = None) -> dict[str, Any]:
    """The mismatched sequences of a collated batch (rpo.data.batching), as a collated batch.

    Returns a batch dict of K sequences (input_ids, attention_mask, loss_mask True on the borrowed completion),
    laid out as rpo.data.batching's so that ``micro_batches`` and the log-prob function take it as it is: all K
    sequences in the chosen slot (num_chosen = K, num_rejected = 0, paired False, no embeddings), ``row_ids`` the
    dataset rows of the prompts; plus ``completion_row_ids`` (the dataset rows of the completions) and
    ``partners`` (for each sequence, the sequence of the pairing batch whose completion it carries). K = 0 when
    no row has a partner (then input_ids is [0, 0]).

    The pairing batch is ``batch`` itself, or, with ``global_batch`` (PreferenceBatcher.global_completions), the
    global batch that ``batch`` is a rank's share of: each of the batch's sequences then gets the completion of its
    partner in the global order, wherever that partner is.
    """
    num_chosen, num_rejected = batch["num_chosen"], batch["num_rejected"]
    split = [_prompt_and_completion(batch, r) for r in range(num_chosen + num_rejected)]
    if global_batch is None:
        partners = mismatched_partners(num_chosen, num_rejected, paired=batch["paired"])
        completions = [(int(batch["row_ids"][r]), completion) for r, (_, completion) in enumerate(split)]
    else:
        total = len(global_batch.completions)
        every = mismatched_partners(global_batch.num_chosen, total - global_batch.num_chosen,
                                    paired=global_batch.paired)
        partners = every[global_batch.positions] if every.numel() else every
        completions = global_batch.completions
    sequences, row_ids = [], []
    for r, partner in enumerate(partners.tolist()):
        prompt, completion = split[r][0], completions[partner][1]
        budget = max_length - len(prompt)
        if budget < 1:
            raise ValueError(f"mismatched pairs: sequence {r} (row {int(batch['row_ids'][r])}) has a prompt of "
                             f"{len(prompt)} tokens, no room for a completion within max_length {max_length}")
        completion = completion[:budget]
        sequences.append((prompt + completion, [False] * len(prompt) + [True] * len(completion)))
        row_ids.append(int(batch["row_ids"][r]))
    completion_row_ids = torch.tensor([completions[partner][0] for partner in partners.tolist()], dtype=torch.long)
    if not sequences:
        return {"input_ids": torch.zeros((0, 0), dtype=torch.long),
                "attention_mask": torch.zeros((0, 0), dtype=torch.long),
                "loss_mask": torch.zeros((0, 0), dtype=torch.bool), "num_chosen": 0, "num_rejected": 0,
                "chosen_embeddings": None, "rejected_embeddings": None, "row_ids": torch.zeros(0, dtype=torch.long),
                "paired": False, "completion_row_ids": completion_row_ids, "partners": partners}
    collated = collate_preference_batch(sequences, [], row_ids, None, paired=False, pad_token_id=pad_token_id,
                                        pad_to_multiple_of=pad_to_multiple_of)
    collated.update(completion_row_ids=completion_row_ids, partners=partners)
    return collated
