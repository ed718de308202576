"""The pure helpers of the scale benchmarks (benchmarks/scale_memory.py, packing_throughput.py, trainer_step.py,
trl_dpo.py) and the CPU peak-memory measure they share (benchmarks/_common.PeakMemory)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import _common  # noqa: E402
import packing_throughput  # noqa: E402
import scale_memory  # noqa: E402
import trainer_step  # noqa: E402
import trl_dpo  # noqa: E402


def _mask(*lengths: int, width: int | None = None) -> torch.Tensor:
    width = width or max(lengths)
    return torch.tensor([[1] * n + [0] * (width - n) for n in lengths])


def test_packing_slots_counts_the_padding_packing_removes():
    # [2, 3] unpacked; lengths 3 and 1 share one packed row of 4 (6 slots -> 4); lengths 4 and 4 cannot share one
    slots = packing_throughput.packing_slots([_mask(3, 1), _mask(4, 4)], pack_length=4)
    assert slots == {"tokens": 12, "unpacked_slots": 14, "packed_slots": 12, "padding_removed": pytest.approx(1 / 7)}
    assert packing_throughput.padding_share(slots["tokens"], slots["packed_slots"]) == 0
    assert packing_throughput.padding_share(slots["tokens"], slots["unpacked_slots"]) == pytest.approx(2 / 14)
    assert packing_throughput.padding_share(0, 0) is None


def test_padded_slots_trims_each_micro_batch_to_its_longest_row():
    from rpo.data import collate_preference_batch

    def sequence(n):
        return [1] * n, [True] * n

    batch = collate_preference_batch([sequence(2), sequence(5)], [sequence(3), sequence(1)], [0, 1, 0, 1], None,
                                     paired=True, pad_token_id=0)
    assert trainer_step.padded_slots(batch, 1) == 4 * 5
    # micro-batch 1: chosen 0 and rejected 0 (lengths 2, 3); micro-batch 2: lengths 5, 1
    assert trainer_step.padded_slots(batch, 2) == 2 * 3 + 2 * 5


def test_every_trainer_step_case_has_its_dpo_baseline():
    """Each global-contrast case over micro-batches is compared with dpo at the same micro-batches and
    --recompute: each recompute mode × 2 and 4 micro-batches, plus the all-re-run (--keep-graphs 0) cases."""
    cases = {case[0]: case for case in trainer_step.CASES}
    accumulated = [case for case in trainer_step.CASES if case[2] and case[3] > 1]
    assert {(case[3], case[4]["recompute"]) for case in accumulated} == {
        (micro, mode) for micro in (2, 4) for mode in ("none", "selective", "full")}
    for name, loss, global_contrast, micro, options in accumulated:
        baseline = cases[trainer_step.baseline_of(cases[name])]
        assert baseline[1] == "dpo" and not baseline[2] and baseline[3] == micro
        assert baseline[4]["recompute"] == options["recompute"] and "keep_graphs" not in baseline[4]
    assert trainer_step.baseline_of(cases["rpo"]) == "dpo"
    assert sum(case[4].get("keep_graphs") == 0 for case in accumulated) == 2


def test_trl_lengths_option():
    import argparse

    parser = argparse.ArgumentParser()
    assert trl_dpo._lengths(["32+32", "64+192"], parser) == [(32, 32), (64, 192)]
    with pytest.raises(SystemExit):
        trl_dpo._lengths(["256"], parser)


def test_memory_ratios_over_the_trl_row():
    row = {"peak_extra_mib": 300.0, "peak_rss_mib": 2000.0}
    trl = {"peak_extra_mib": 1200.0, "peak_rss_mib": 4000.0}
    assert scale_memory.memory_ratios(row, trl, "trl") == {"rise_vs_trl": 0.25, "peak_rss_vs_trl": 0.5}
    assert scale_memory.memory_ratios(row, None, "trl") == {}


@pytest.mark.skipif(not _common.cpu_peak_reset_supported(), reason="needs a writable /proc/self/clear_refs")
def test_cpu_peak_memory_sees_a_freed_tensor():
    _common.limit_malloc_caching()
    size = 64 * _common.MIB
    with _common.PeakMemory("cpu") as memory:
        block = torch.ones(size // 4)  # written, so resident
        del block
    assert memory.start_bytes > 0
    assert size * 0.9 <= memory.peak_bytes <= size * 1.5
