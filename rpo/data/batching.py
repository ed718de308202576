"""Batches for the trainer: one concatenated forward, chosen rows first, then rejected rows; and their
micro-batches (gradient accumulation).

Batch dict (R = M + N sequences, T = longest sequence in the batch):
  input_ids LongTensor[R, T] (right padding), attention_mask LongTensor[R, T] (1 = real token),
  loss_mask BoolTensor[R, T] (True on response tokens), num_chosen M, num_rejected N, paired bool,
  chosen_embeddings FloatTensor[M, D], rejected_embeddings FloatTensor[N, D] (prompt embeddings),
  row_ids LongTensor[R] (dataset row of each sequence).
Paired: M = N and row i pairs with row M + i.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch

from .related import BATCHINGS, related_paired_layout, related_rows_per_batch, related_unpaired_layout
from .tokenization import TokenizedPreferenceDataset

logger = logging.getLogger(__name__)


def collate_preference_batch(chosen: Sequence[tuple[Sequence[int], Sequence[bool]]],
                             rejected: Sequence[tuple[Sequence[int], Sequence[bool]]],
                             row_ids: Sequence[int], embeddings: torch.Tensor | None, *, paired: bool,
                             pad_token_id: int, pad_to_multiple_of: int | None = None) -> dict[str, Any]:
    """Pad (input_ids, loss_mask) sequences into the batch dict; ``row_ids`` lists chosen then rejected rows.

    ``embeddings`` is the [num_rows, D] prompt-embedding table indexed by row id (None: the embedding keys are
    None, for uniform weighting).
    """
    sequences = list(chosen) + list(rejected)
    if len(row_ids) != len(sequences):
        raise ValueError(f"{len(row_ids)} row ids for {len(sequences)} sequences")
    if paired and len(chosen) != len(rejected):
        raise ValueError(f"paired batch needs as many chosen as rejected rows, got {len(chosen)} and {len(rejected)}")
    length = max(len(ids) for ids, _ in sequences)
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(sequences), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    loss_mask = torch.zeros((len(sequences), length), dtype=torch.bool)
    for r, (ids, mask) in enumerate(sequences):
        if len(ids) != len(mask):
            raise ValueError(f"sequence {r} (row {row_ids[r]}): {len(ids)} token ids but {len(mask)} mask entries")
        input_ids[r, :len(ids)] = torch.as_tensor(ids, dtype=torch.long)
        attention_mask[r, :len(ids)] = 1
        loss_mask[r, :len(ids)] = torch.as_tensor(mask, dtype=torch.bool)
    row_tensor = torch.as_tensor(list(row_ids), dtype=torch.long)
    num_chosen = len(chosen)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "loss_mask": loss_mask,
        "num_chosen": num_chosen,
        "num_rejected": len(rejected),
        "chosen_embeddings": None if embeddings is None else embeddings[row_tensor[:num_chosen]],
        "rejected_embeddings": None if embeddings is None else embeddings[row_tensor[num_chosen:]],
        "row_ids": row_tensor,
        "paired": paired,
    }


def even_offsets(total: int, parts: int) -> np.ndarray:
    """Cumulative offsets that split ``total`` items into ``parts`` runs whose sizes differ by at most one."""
    return (np.arange(parts + 1) * total) // parts


def micro_batches(batch: dict[str, Any], parts: int) -> list[dict[str, Any]]:
    """Split a batch into ``parts`` micro-batches (pairs stay together), each trimmed to its own longest row.

    Chosen and rejected rows are each cut into ``parts`` runs whose sizes differ by at most one; a micro-batch
    may hold no rows of one kind (unpaired data).
    """
    if parts == 1:
        return [batch]
    m, n = batch["num_chosen"], batch["num_rejected"]
    chosen_offsets = even_offsets(m, parts)
    rejected_offsets = chosen_offsets if batch["paired"] else even_offsets(n, parts)
    micro = []
    for part in range(parts):
        a, b = int(chosen_offsets[part]), int(chosen_offsets[part + 1])
        c, d = int(rejected_offsets[part]), int(rejected_offsets[part + 1])
        rows = torch.cat([torch.arange(a, b), m + torch.arange(c, d)])
        length = max(1, int(batch["attention_mask"][rows].sum(1).max())) if len(rows) else 1
        sub = {key: batch[key][rows, :length] for key in ("input_ids", "attention_mask", "loss_mask")}
        sub.update(num_chosen=b - a, num_rejected=d - c, row_ids=batch["row_ids"][rows], paired=batch["paired"],
                   chosen_embeddings=_rows(batch["chosen_embeddings"], a, b),
                   rejected_embeddings=_rows(batch["rejected_embeddings"], c, d))
        micro.append(sub)
    return micro


def _rows(tensor: torch.Tensor | None, start: int, stop: int) -> torch.Tensor | None:
    return None if tensor is None else tensor[start:stop]


@dataclass(frozen=True)
class GlobalCompletions:
    """The completions of a global batch (`PreferenceBatcher.global_completions`)."""

    completions: list[tuple[int, list[int]]]  # (dataset row, completion token ids), chosen sequences first
    num_chosen: int  # chosen sequences of the global batch
    positions: list[int]  # where each sequence of the rank batch (chosen, then rejected) is in `completions`
    paired: bool


class PreferenceBatcher:
    """Deterministic, resumable batches for data-parallel rank ``rank`` of ``world_size``.

    ``batch_size`` is per rank: a paired batch holds ``batch_size`` pairs (2 x batch_size sequences), an unpaired
    one ``batch_size`` sequences. Each epoch is a fresh permutation drawn from (seed, epoch); a global batch of
    batch_size x world_size rows is cut into one slice per rank, and rows that do not fill a last global batch
    are left out of that epoch (counted in the log; a different set each epoch). Unpaired batches hold as many
    chosen (label True) as rejected rows when the data allow; otherwise every row of the smaller class is used
    and spread evenly over the batches, and the log says so.

    ``batching="related"`` fills a ``related_fraction`` of every rank batch with one group of related prompts
    (rpo.data.related, from ``embeddings``; the global batch is related too) and the rest with random rows, redone
    each epoch from (seed, epoch); the same rows sit out, and unpaired batches keep the same chosen/rejected counts,
    as with ``batching="random"``.

    Iterating yields the rest of the current epoch and then moves to the next; ``state_dict()`` taken after a
    batch was yielded counts that batch as consumed, so ``load_state_dict`` resumes exactly after it.
    """

    def __init__(self, tokenized: TokenizedPreferenceDataset, embeddings: torch.Tensor | None, batch_size: int,
                 rank: int = 0, world_size: int = 1, seed: int = 0, *, pad_to_multiple_of: int | None = None,
                 batching: str = "random", related_fraction: float = 0.5):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if embeddings is not None and (embeddings.dim() != 2 or embeddings.shape[0] != len(tokenized)):
            raise ValueError(f"embeddings must be [num_rows={len(tokenized)}, D], got {tuple(embeddings.shape)}")
        if batching not in BATCHINGS:
            raise ValueError(f"batching must be one of {', '.join(BATCHINGS)}, got {batching!r}")
        if batching == "related":
            if embeddings is None:
                raise ValueError("batching='related' groups rows by their prompt embeddings: pass them")
            if world_size * related_rows_per_batch(related_fraction, batch_size) < 2:
                raise ValueError(f"related fraction {related_fraction} of {batch_size} rows per rank x {world_size} "
                                 f"ranks makes related groups of fewer than 2 rows; raise it or the batch size")
        self.batching, self.related_fraction = batching, float(related_fraction)
        # A view of the embeddings when they are float32 on the CPU (as the prompt-embedding cache gives them).
        self._vectors = None if batching == "random" else embeddings.detach().float().cpu().numpy()
        self.tokenized, self.embeddings = tokenized, embeddings
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.pad_to_multiple_of = pad_to_multiple_of
        self.num_global_batches = len(tokenized) // (batch_size * world_size)
        if self.num_global_batches == 0:
            raise ValueError(f"{len(tokenized)} rows cannot fill one global batch of batch_size {batch_size} x "
                             f"world_size {world_size}")
        # Only the token columns are read per batch, not the message texts.
        self._sequences = tokenized.rows.select_columns(
            [f"{field}_{column}" for field in tokenized.response_fields for column in ("input_ids", "loss_mask")])
        self.labels = None if tokenized.paired else np.asarray(list(tokenized.rows["label"]), dtype=bool)
        self.epoch = 0
        self.batch_in_epoch = 0
        self._plan_cache: tuple[int, list[tuple[np.ndarray, np.ndarray]]] | None = None

    def __len__(self) -> int:
        """Batches per epoch (the same on every rank)."""
        return self.num_global_batches

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.batch_in_epoch = epoch, 0

    def state_dict(self) -> dict[str, int | str | float]:
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "seed": self.seed,
                "batch_size": self.batch_size, "world_size": self.world_size, "num_rows": len(self.tokenized),
                "batching": self.batching,
                "related_fraction": self.related_fraction if self.batching == "related" else None}

    def load_state_dict(self, state: dict[str, int | str | float]) -> None:
        state = {"batching": "random", "related_fraction": None, **state}  # checkpoints from before the option
        for key in ("seed", "batch_size", "world_size", "num_rows", "batching", "related_fraction"):
            if state[key] != self.state_dict()[key]:
                raise ValueError(f"cannot resume: saved {key}={state[key]} but this batcher has "
                                 f"{key}={self.state_dict()[key]}; the batch order would differ")
        if not 0 <= state["batch_in_epoch"] <= len(self):
            raise ValueError(f"batch_in_epoch {state['batch_in_epoch']} outside [0, {len(self)}]")
        self.epoch, self.batch_in_epoch = state["epoch"], state["batch_in_epoch"]
        if self.batch_in_epoch == len(self):  # saved after the last batch of an epoch
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0

    def _rng(self, epoch: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, epoch])

    def _epoch_plan(self, epoch: int) -> list[list[tuple[np.ndarray, np.ndarray]]]:
        """(chosen row ids, rejected row ids) of every rank's share of each global batch in ``epoch``:
        plan[batch][rank]."""
        if self._plan_cache is not None and self._plan_cache[0] == epoch:
            return self._plan_cache[1]
        plan = self._paired_plan(epoch) if self.tokenized.paired else self._unpaired_plan(epoch)
        self._plan_cache = (epoch, plan)
        return plan

    def _paired_plan(self, epoch: int) -> list[list[tuple[np.ndarray, np.ndarray]]]:
        rng = self._rng(epoch)
        order = rng.permutation(len(self.tokenized))
        global_size = self.batch_size * self.world_size
        left_out = len(order) - self.num_global_batches * global_size
        if left_out and self.rank == 0:
            logger.info("epoch %d: %d of %d pairs do not fill a last global batch of %d and sit this epoch out",
                        epoch, left_out, len(order), global_size)
        used = order[:self.num_global_batches * global_size]
        if self.batching == "related":
            layout = related_paired_layout(self._vectors, used, self.world_size, self.batch_size,
                                           self.related_fraction, rng)
        else:
            layout = used.reshape(self.num_global_batches, self.world_size, self.batch_size)
        return [[(rows, rows) for rows in ranks] for ranks in layout]

    def _unpaired_plan(self, epoch: int) -> list[list[tuple[np.ndarray, np.ndarray]]]:
        rng = self._rng(epoch)
        chosen_rows = rng.permutation(np.flatnonzero(self.labels))
        rejected_rows = rng.permutation(np.flatnonzero(~self.labels))
        num_batches = self.num_global_batches * self.world_size  # rank batches, in order (global batch, rank)
        slots = num_batches * self.batch_size
        # As close to half chosen as the two classes allow.
        total_chosen = min(len(chosen_rows), max(slots - len(rejected_rows), slots // 2))
        chosen_offsets = even_offsets(total_chosen, num_batches)
        rejected_offsets = np.arange(num_batches + 1) * self.batch_size - chosen_offsets
        chosen_counts = np.diff(chosen_offsets)
        unbalanced = int(np.sum(np.abs(2 * chosen_counts - self.batch_size) > 1))
        if self.rank == 0:
            left_out = len(self.labels) - slots
            if unbalanced:
                logger.warning(
                    "epoch %d: unpaired data has %d chosen and %d rejected rows, so %d of %d batches of %d cannot "
                    "be balanced; chosen per batch ranges %d..%d (every row of the smaller class is used)",
                    epoch, len(chosen_rows), len(rejected_rows), unbalanced, num_batches, self.batch_size,
                    chosen_counts.min(), chosen_counts.max())
            if left_out:
                logger.info("epoch %d: %d rows (%d chosen, %d rejected) do not fit the %d batches of %d and sit "
                            "this epoch out", epoch, left_out, len(chosen_rows) - total_chosen,
                            len(rejected_rows) - (slots - total_chosen), num_batches, self.batch_size)
        if self.batching == "related":
            batches = related_unpaired_layout(self._vectors, chosen_rows[:total_chosen],
                                              rejected_rows[:slots - total_chosen], chosen_counts,
                                              np.diff(rejected_offsets), self.world_size, self.related_fraction, rng)
        else:
            batches = [(chosen_rows[chosen_offsets[batch]:chosen_offsets[batch + 1]],
                        rejected_rows[rejected_offsets[batch]:rejected_offsets[batch + 1]])
                       for batch in range(num_batches)]
        # Rank batches are in (global batch, rank) order.
        return [batches[start:start + self.world_size] for start in range(0, num_batches, self.world_size)]

    def batch(self, epoch: int, index: int) -> dict[str, Any]:
        """Batch ``index`` of ``epoch`` for this rank (does not move the position)."""
        chosen_rows, rejected_rows = self._epoch_plan(epoch)[index][self.rank]
        fields = self.tokenized.response_fields
        chosen_field, rejected_field = (fields[0], fields[1]) if self.tokenized.paired else (fields[0], fields[0])
        row_ids = [int(i) for i in chosen_rows] + [int(i) for i in rejected_rows]
        columns = self._sequences[row_ids]  # one columnar read of all rows of the batch

        def sequences(field: str, positions: range) -> list[tuple[list[int], list[bool]]]:
            return [(columns[f"{field}_input_ids"][p], columns[f"{field}_loss_mask"][p]) for p in positions]

        num_chosen = len(chosen_rows)
        collated = collate_preference_batch(
            sequences(chosen_field, range(num_chosen)),
            sequences(rejected_field, range(num_chosen, len(row_ids))),
            row_ids, self.embeddings, paired=self.tokenized.paired, pad_token_id=self.tokenized.pad_token_id,
            pad_to_multiple_of=self.pad_to_multiple_of)
        collated["position"] = (epoch, index)
        return collated

    def global_completions(self, batch: dict[str, Any]) -> GlobalCompletions:
        """The completions of the *global* batch that this rank's ``batch`` is part of, in the global order (ranks
        in order: every rank's chosen sequences, then every rank's rejected ones), and where this rank's sequences
        sit in it. The same on every data-parallel layout of the same global batch, so what is built on it (KTO's
        mismatched pairs, rpo.data.kto_pairs) does not depend on the layout."""
        epoch, index = batch["position"]
        shares = self._epoch_plan(epoch)[index]
        fields = self.tokenized.response_fields
        chosen_field, rejected_field = (fields[0], fields[1]) if self.tokenized.paired else (fields[0], fields[0])
        chosen = [(int(row), chosen_field) for rows, _ in shares for row in rows]
        rejected = [(int(row), rejected_field) for _, rows in shares for row in rows]
        chosen_start = sum(len(rows) for rows, _ in shares[:self.rank])
        rejected_start = len(chosen) + sum(len(rows) for _, rows in shares[:self.rank])
        mine, theirs = shares[self.rank]
        positions = list(range(chosen_start, chosen_start + len(mine))) + list(
            range(rejected_start, rejected_start + len(theirs)))
        columns = self._sequences[[row for row, _ in chosen + rejected]]
        completions = []
        for p, (row, field) in enumerate(chosen + rejected):
            ids, mask = columns[f"{field}_input_ids"][p], columns[f"{field}_loss_mask"][p]
            completions.append((row, ids[mask.index(True):] if True in mask else []))
        return GlobalCompletions(completions, len(chosen), positions, self.tokenized.paired)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        epoch = self.epoch
        while self.epoch == epoch and self.batch_in_epoch < len(self):
            batch = self.batch(epoch, self.batch_in_epoch)
            # Advance before yielding: a state_dict() taken while the caller holds this batch counts it consumed.
            self.batch_in_epoch += 1
            if self.batch_in_epoch == len(self):
                self.epoch, self.batch_in_epoch = epoch + 1, 0
            yield batch
