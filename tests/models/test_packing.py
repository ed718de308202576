"""rpo.models.packing without a model: the packing plan, the packed rows, the block-diagonal mask, the errors.

Log-probs of packed batches against unpacked ones and Hugging Face are in test_megatron_models.py (2 ranks).
"""
from __future__ import annotations

import pytest
import torch

from rpo.models.packing import pack_batch, packed_attention_mask, plan_packing
from tiny_hf_models import LENGTH, ROWS, tiny_batch


def test_plan_places_every_token_once_within_pack_length():
    batch = tiny_batch()
    lengths = batch["attention_mask"].sum(1)
    for pack_length in (14, 20, 24, 40, 200):
        plan = plan_packing(batch["attention_mask"], pack_length)
        assert torch.equal(plan.length, lengths) and plan.packed_length <= pack_length
        occupied = torch.zeros(plan.packed_rows, plan.packed_length, dtype=torch.int64)
        for r in range(ROWS):
            occupied[plan.row[r], plan.offset[r]:plan.offset[r] + plan.length[r]] += 1
            # the tokens taken are the row's attended ones
            taken = torch.zeros(LENGTH, dtype=torch.bool)
            taken[plan.start[r]:plan.start[r] + plan.length[r]] = True
            assert torch.equal(taken, batch["attention_mask"][r].bool())
        assert occupied.max() == 1 and int(occupied.sum()) == int(lengths.sum())
        # No packed row could take another sequence whole: fewer rows than one per sequence once they fit.
        assert plan.packed_rows >= -(-int(lengths.sum()) // pack_length)
    assert plan_packing(batch["attention_mask"], 14).packed_rows == ROWS  # the longest row fills a row alone
    assert plan_packing(batch["attention_mask"], 200).packed_rows == 1


def test_padding_fractions_closed_form():
    mask = torch.zeros(4, 10, dtype=torch.long)
    for r, n in enumerate([10, 6, 4, 2]):
        mask[r, :n] = 1  # 22 tokens in 40 slots
    plan = plan_packing(mask, 12)
    # first fit decreasing, capacity narrowed to 12: [10, 2], [6, 4]
    assert plan.packed_rows == 2 and plan.packed_length == 12
    assert plan.row.tolist() == [0, 1, 1, 0] and plan.offset.tolist() == [0, 0, 6, 10]
    assert plan.padding_fraction_unpacked == pytest.approx(18 / 40)
    assert plan.padding_fraction_packed == pytest.approx(2 / 24)
    assert plan.padding_removed == pytest.approx(1 - 24 / 40)


def test_pack_batch_moves_tokens_and_loss_mask():
    batch = tiny_batch()
    plan = plan_packing(batch["attention_mask"], 24)
    packed = pack_batch(batch, plan, pad_token_id=1)
    for r in range(ROWS):
        cols = slice(int(plan.offset[r]), int(plan.offset[r] + plan.length[r]))
        source = slice(int(plan.start[r]), int(plan.start[r] + plan.length[r]))
        assert torch.equal(packed["input_ids"][plan.row[r], cols], batch["input_ids"][r, source])
        assert torch.equal(packed["loss_mask"][plan.row[r], cols], batch["loss_mask"][r, source])
        assert (packed["segment"][plan.row[r], cols] == r).all()
    free = packed["segment"] < 0
    assert (packed["input_ids"][free] == 1).all() and not packed["loss_mask"][free].any()
    assert int(packed["loss_mask"].sum()) == int(batch["loss_mask"].sum())


def test_packed_mask_is_block_diagonal_causal_with_window():
    segment = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1, -1], [2, 2, 2, 2, 2, 2, 2, 2, 2]])
    for window in (None, 3):
        mask = packed_attention_mask(segment, window)
        assert mask.shape == (2, 1, 9, 9) and mask.dtype == torch.bool
        for p in range(2):
            for q in range(9):
                for k in range(9):
                    allowed = (segment[p, q] == segment[p, k] >= 0 and k <= q
                               and (window is None or q - k < window))
                    assert bool(mask[p, 0, q, k]) == (not allowed), (p, q, k, window)


def test_packing_errors_name_rows_and_option():
    batch = tiny_batch()
    with pytest.raises(ValueError, match=r"rows \[0, 3, 4\] have \[14, 12, 12\] tokens, more than pack_length=11"):
        plan_packing(batch["attention_mask"], 11)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="pack_length must be a positive integer"):
            plan_packing(batch["attention_mask"], bad)
    holes = batch["attention_mask"].clone()
    holes[4, 5] = 0
    with pytest.raises(ValueError, match=r"rows \[4\] have padding inside"):
        plan_packing(holes, 24)


def test_a_scored_first_token_is_refused():
    from rpo.models.packing import check_scored_tokens_have_context

    batch = tiny_batch()
    plan = plan_packing(batch["attention_mask"], 24)
    check_scored_tokens_have_context(batch["loss_mask"], plan)  # the tiny batch scores responses after prompts
    loss_mask = batch["loss_mask"].clone()
    loss_mask[3, 2] = True  # row 3 is left-padded by 2: column 2 is its first token
    with pytest.raises(ValueError, match=r"loss_mask marks the first token of rows \[3\]: it has no context"):
        check_scored_tokens_have_context(loss_mask, plan)
