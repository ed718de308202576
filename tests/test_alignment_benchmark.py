"""The alignment benchmark's bookkeeping (benchmarks/alignment.py): held-out accuracy and margin, bootstrap
intervals, and the report that keeps other methods' results measured at the same budget."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import alignment  # noqa: E402


def test_accuracy_and_margin_paired_and_unpaired():
    paired = np.array([[1.0, 0.0], [0.2, 0.5], [3.0, 1.0]])
    assert alignment.accuracy_and_margin(paired, True) == pytest.approx((2 / 3, (1.0 - 0.3 + 2.0) / 3))
    # unpaired: (reward, label); accuracy over every desirable x undesirable pair
    unpaired = np.array([[1.0, 1], [0.0, 1], [0.5, 0], [-1.0, 0]])
    accuracy, margin = alignment.accuracy_and_margin(unpaired, False)
    assert accuracy == pytest.approx(3 / 4) and margin == pytest.approx(0.5 - (-0.25))


def test_bootstrap_interval_brackets_the_statistic_and_is_seeded():
    values = np.random.default_rng(0).normal(1.0, 1.0, size=(400, 1))
    low, high = alignment.bootstrap(values, lambda v: float(v.mean()), draws=500, seed=1)
    assert low < float(values.mean()) < high and high - low == pytest.approx(2 * 1.96 / 20, rel=0.25)
    assert alignment.bootstrap(values, lambda v: float(v.mean()), draws=500, seed=1) == [low, high]


def test_a_subset_run_keeps_the_other_methods_of_the_same_budget(tmp_path):
    args = alignment.build_parser().parse_args(["--steps", "20"])
    budget = alignment.budget_of(args)
    earlier = [alignment.Result("dpo", accuracy=0.5).__dict__, alignment.Result("rpo-local", accuracy=0.6).__dict__]
    report = tmp_path / "alignment.json"
    report.write_text(json.dumps({"date": "2026-12-01", "budget": budget, "results": earlier}))
    kept = alignment.kept_results(report, args, ["rpo-local"])
    assert [(r.method, r.accuracy) for r in kept] == [("dpo", 0.5)]  # rpo-local is re-run, dpo kept
    other = alignment.build_parser().parse_args(["--steps", "6"])
    assert alignment.kept_results(report, other, ["rpo-local"]) == []  # another budget: nothing kept
    assert alignment.kept_results(tmp_path / "missing.json", args, []) == []
