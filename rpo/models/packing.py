"""Sequence packing (padding-free log-probs): the sequences of a micro-batch packed into rows of ≤ pack_length.

The rows of a log-prob batch (rpo.models.logprobs' layout: input_ids, attention_mask, loss_mask [R, T]) are
placed first-fit-decreasing into P packed rows of L ≤ pack_length columns, each sequence's tokens contiguous. One
forward of the packed rows uses megatron's local-spec explicit attention mask, block-diagonal and causal: a token
attends to the tokens before it in its own sequence only (and within the sliding window, for Mistral). The
per-sequence sums, counts and per-token log-probs come back in the unpacked [R, T] layout and equal
`sequence_logprobs` on the unpacked batch (up to float summation order).

Positions: megatron-core's GPTModel computes RoPE for the packed columns 0..L−1 (position ids feed only learned
absolute embeddings, which LLaMA and Mistral do not have). Each sequence is contiguous in its packed row, and a
RoPE attention score depends only on the difference of the two positions, so a sequence placed at any column
offset sees exactly the relative positions it has unpacked; the sliding window is applied on the same
differences. This is why a row with padding *inside* it (not left or right) is refused.

Transformer Engine's packed-sequence (THD) format is not wired here: packing needs the local layer spec.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch

from rpo.models import gpt as gpt_lib
from rpo.models.logprobs import (DEFAULT_CHUNK_SIZE, SequenceLogProbs, logprobs_from_hidden, sequence_logprobs,
                                 validate_batch)


@dataclass(frozen=True)
class PackPlan:
    """Where each sequence r of an [R, T] batch goes: packed row `row[r]`, columns offset[r] .. + length[r],
    taken from its columns start[r] .. + length[r]."""

    row: torch.Tensor  # [R] int64
    offset: torch.Tensor  # [R] int64
    start: torch.Tensor  # [R] int64: first attended column in the unpacked row
    length: torch.Tensor  # [R] int64: attended tokens
    packed_rows: int  # P
    packed_length: int  # L: the longest packed row (≤ pack_length)
    unpacked_shape: tuple[int, int]  # (R, T)

    @property
    def tokens(self) -> int:
        return int(self.length.sum())

    @property
    def padding_fraction_unpacked(self) -> float:
        rows, length = self.unpacked_shape
        return 1.0 - self.tokens / max(rows * length, 1)

    @property
    def padding_fraction_packed(self) -> float:
        return 1.0 - self.tokens / max(self.packed_rows * self.packed_length, 1)

    @property
    def padding_removed(self) -> float:
        """Fraction of the unpacked batch's token slots that the packed forward no longer computes."""
        rows, length = self.unpacked_shape
        return 1.0 - self.packed_rows * self.packed_length / max(rows * length, 1)


def plan_packing(attention_mask: torch.Tensor, pack_length: int) -> PackPlan:
    """First-fit-decreasing placement of every row's attended tokens into rows of at most `pack_length`."""
    if isinstance(pack_length, bool) or not isinstance(pack_length, int) or pack_length < 1:
        raise ValueError(f"pack_length must be a positive integer, got {pack_length!r}")
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be [rows, tokens], got shape {tuple(attention_mask.shape)}")
    attended = attention_mask.bool().cpu()
    rows, width = attended.shape
    length = attended.sum(dim=1)
    columns = torch.arange(width)
    start = torch.where(attended, columns, width).min(dim=1).values.clamp(max=width)
    end = torch.where(attended, columns + 1, 0).max(dim=1).values
    holes = ((end - start) != length) & (length > 0)
    if holes.any():
        raise ValueError(f"packing needs each row's tokens contiguous (left or right padding only); rows "
                         f"{holes.nonzero().flatten().tolist()[:10]} have padding inside")
    too_long = length > pack_length
    if too_long.any():
        bad = too_long.nonzero().flatten().tolist()[:10]
        raise ValueError(f"rows {bad} have {length[bad].tolist()} tokens, more than pack_length={pack_length}")
    sizes = length.tolist()
    row, offset, filled = _first_fit_decreasing(sizes, pack_length)
    # Every packed row is as long as the longest one: the narrowest capacity that still needs no more rows
    # balances them (less padding in the last row).
    tokens, longest = sum(sizes), max(sizes, default=0)
    for capacity in range(max(longest, -(-tokens // max(len(filled), 1))), max(filled, default=0)):
        attempt = _first_fit_decreasing(sizes, capacity)
        if len(attempt[2]) <= len(filled):
            row, offset, filled = attempt
            break
    return PackPlan(row=row, offset=offset, start=torch.where(length > 0, start, 0), length=length,
                    packed_rows=max(len(filled), 1), packed_length=max(max(filled, default=0), 2),
                    unpacked_shape=(rows, width))


def _first_fit_decreasing(sizes: list[int], capacity: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """(packed row, offset) of each size, longest first, each into the first row it fits; and the rows' fill."""
    row = torch.zeros(len(sizes), dtype=torch.int64)
    offset = torch.zeros(len(sizes), dtype=torch.int64)
    filled: list[int] = []
    for r in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        target = next((p for p, used in enumerate(filled) if used + sizes[r] <= capacity), None)
        if target is None:
            target = len(filled)
            filled.append(0)
        row[r], offset[r] = target, filled[target]
        filled[target] += sizes[r]
    return row, offset, filled


def packed_attention_mask(segment: torch.Tensor, sliding_window: int | None = None) -> torch.Tensor:
    """megatron's boolean mask [P, 1, L, L] (True = masked) from segment ids [P, L] (−1 = padding).

    Query q may attend key k iff both are in the same sequence, k ≤ q and (window W) q − k < W.
    """
    columns = torch.arange(segment.shape[1], device=segment.device)
    allowed = (columns[None, :] <= columns[:, None])[None]
    if sliding_window is not None:
        allowed = allowed & (columns[None, :] > columns[:, None] - sliding_window)[None]
    allowed = allowed & (segment[:, :, None] == segment[:, None, :]) & (segment >= 0)[:, None, :]
    return ~allowed[:, None]


def _scatter(plan: PackPlan, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Index tensors of every attended token: (sequence, unpacked column, packed row, packed column)."""
    sequence = torch.repeat_interleave(torch.arange(plan.length.numel()), plan.length)
    within = torch.arange(plan.tokens) - torch.repeat_interleave(plan.length.cumsum(0) - plan.length, plan.length)
    unpacked_column = plan.start[sequence] + within
    packed_row = plan.row[sequence]
    packed_column = plan.offset[sequence] + within
    return tuple(t.to(device) for t in (sequence, unpacked_column, packed_row, packed_column))


def pack_batch(batch: Mapping[str, torch.Tensor], plan: PackPlan, pad_token_id: int = 0) -> dict:
    """The packed rows: input_ids, loss_mask and segment ids (the unpacked row index, −1 = padding), [P, L]."""
    input_ids, loss_mask = batch["input_ids"], batch["loss_mask"]
    device = input_ids.device
    sequence, column, packed_row, packed_column = _scatter(plan, device)
    shape = (plan.packed_rows, plan.packed_length)
    packed_ids = torch.full(shape, pad_token_id, dtype=input_ids.dtype, device=device)
    packed_ids[packed_row, packed_column] = input_ids[sequence, column]
    packed_loss_mask = torch.zeros(shape, dtype=torch.bool, device=device)
    packed_loss_mask[packed_row, packed_column] = loss_mask[sequence, column]
    segment = torch.full(shape, -1, dtype=torch.int64, device=device)
    segment[packed_row, packed_column] = sequence
    return {"input_ids": packed_ids, "loss_mask": packed_loss_mask, "segment": segment}


def check_scored_tokens_have_context(loss_mask: torch.Tensor, plan: PackPlan) -> None:
    """A scored token's log-prob comes from the token before it, which packed must be of the same sequence:
    refuse a loss_mask that marks a row's first attended token (unpacked, it would be scored after padding)."""
    rows = torch.arange(loss_mask.shape[0])
    first_scored = loss_mask.cpu()[rows, plan.start] & (plan.length > 0)
    if first_scored.any():
        raise ValueError(f"loss_mask marks the first token of rows {first_scored.nonzero().flatten().tolist()[:10]}"
                         f": it has no context")


def packed_sequence_logprobs(model, batch: Mapping[str, torch.Tensor], pack_length: int | PackPlan,
                             chunk_size: int = DEFAULT_CHUNK_SIZE, return_token_logprobs: bool = True
                             ) -> SequenceLogProbs:
    """`rpo.models.sequence_logprobs` computed on the packed batch; results in the unpacked row order and layout.

    `pack_length` is the longest packed row, or a PackPlan from `plan_packing(batch["attention_mask"], ...)`
    (its `padding_removed` is what to log). Every TP rank passes the same batch and gets the same result.
    """
    info = gpt_lib.model_info(model)
    if info.uses_te:
        raise ValueError("sequence packing needs the local layer spec (explicit attention mask); this model uses "
                         "Transformer Engine, whose packed-sequence format is not supported here")
    input_ids, attention_mask, loss_mask = validate_batch(batch, info.vocab_size)
    plan = pack_length if isinstance(pack_length, PackPlan) else plan_packing(attention_mask, pack_length)
    if plan.unpacked_shape != tuple(input_ids.shape):
        raise ValueError(f"the PackPlan is for a batch of shape {plan.unpacked_shape}, got {tuple(input_ids.shape)}")
    check_scored_tokens_have_context(loss_mask, plan)
    device = next(gpt_lib.unwrap(model).parameters()).device
    packed = pack_batch({"input_ids": input_ids.to(device), "loss_mask": loss_mask.to(device)}, plan)
    mask = packed_attention_mask(packed["segment"], info.sliding_window)
    length = plan.packed_length
    position_ids = torch.arange(length, device=device).unsqueeze(0).expand(plan.packed_rows, length)
    hidden = gpt_lib.hidden_states_with_mask(model, packed["input_ids"], position_ids, mask,
                                             token_mask=packed["segment"] >= 0)
    out = logprobs_from_hidden(model, hidden, packed["input_ids"], packed["loss_mask"], chunk_size,
                               return_token_logprobs=True)
    sequence, column, packed_row, packed_column = _scatter(plan, device)
    per_token = out.token_logprobs[packed_row, packed_column]  # every attended token, 0 where not scored
    # Back in the unpacked [R, T] layout and summed per row as the unpacked path sums: a sequential float32
    # index_add over a row's ~100 tokens of about −6 each would lose ~1e-4 to rounding.
    token_logprobs = per_token.new_zeros(input_ids.shape).index_put((sequence, column), per_token)
    sums = token_logprobs.sum(dim=1)
    return SequenceLogProbs(sums=sums, counts=loss_mask.to(device).sum(dim=1),
                            token_logprobs=token_logprobs if return_token_logprobs else None)


def sequence_logps(model, batch: Mapping[str, Any], *, grad: bool,
                   packing: Optional[PackPlan] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence sums of response-token log-probs [R] (float32) and response token counts [R] of a batch
    (input_ids, attention_mask, loss_mask; other keys are ignored), with or without autograd.

    `packing`: the batch's PackPlan (`plan_packing`, --packing): the same values from one padding-free forward.
    """
    tensors = {key: batch[key] for key in ("input_ids", "attention_mask", "loss_mask")}
    with torch.set_grad_enabled(grad):
        if packing is None:
            result = sequence_logprobs(model, tensors, return_token_logprobs=False)
        else:
            result = packed_sequence_logprobs(model, tensors, packing, return_token_logprobs=False)
    return result.sums.float(), result.counts
