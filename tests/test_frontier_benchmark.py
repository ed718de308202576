"""benchmarks/frontier.py: the frontier bookkeeping (DPO's frontier interpolated at a point's KL, paired by prompt;
the prompt set and its splits; the plan of each preset), and the quick benchmark end to end (slow: ~10 minutes on
2 cores, `make test-slow`)."""
from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import t as student_t

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import frontier  # noqa: E402


def point(method, kl, scores, lr=1e-6):
    return frontier.Point(method, lr, kl={"mean": kl}, score={"mean": float(np.mean(scores))},
                          per_prompt={"score": list(scores)})


def test_score_against_dpo_is_interpolated_at_the_points_kl_and_paired_by_prompt():
    dpo = [point("dpo", 1.0, [0.0, 0.2, 0.4, 0.1]), point("dpo", 3.0, [0.4, 0.6, 0.4, 0.5]),
           point("dpo", 9.0, [0.9, 0.9, 0.9, 0.9])]
    rpo = point("rpo", 2.5, [0.5, 0.4, 0.6, 0.3])
    # KL 2.5 lies 3/4 of the way from 1.0 to 3.0: DPO per prompt = 0.25 * first + 0.75 * second.
    expected = [a - (0.25 * b + 0.75 * c) for a, b, c in zip([0.5, 0.4, 0.6, 0.3], [0.0, 0.2, 0.4, 0.1],
                                                              [0.4, 0.6, 0.4, 0.5])]
    result = frontier.versus_frontier(rpo, dpo)
    half = student_t.ppf(0.975, 3) * statistics.stdev(expected) / 2
    assert result["mean"] == pytest.approx(statistics.mean(expected))
    assert (result["ci_low"], result["ci_high"]) == pytest.approx((statistics.mean(expected) - half,
                                                                   statistics.mean(expected) + half))
    assert frontier.versus_frontier(point("rpo", 0.5, [0, 0, 0, 0]), dpo) is None  # outside DPO's KL range
    assert frontier.versus_frontier(point("rpo", 12.0, [0, 0, 0, 0]), dpo) is None
    assert frontier.versus_frontier(rpo, dpo[:1]) is None


def test_prompt_set_splits_by_topic_and_the_presets_plan(tmp_path):
    rows = [json.loads(line) for line in frontier.PROMPTS.read_text().splitlines()]
    assert len(rows) >= 300 and len({r["prompt"] for r in rows}) == len(rows)
    held_out = {r["topic"] for r in rows if r["split"] == "held_out"}
    assert held_out and not held_out & {r["topic"] for r in rows if r["split"] == "train"}
    assert len({r["category"] for r in rows}) >= 10
    paths = frontier.write_prompt_splits(tmp_path, 32, 24)
    train = [json.loads(line) for line in paths["train"].read_text().splitlines()]
    assert len(train) == 32 and len({r["topic"] for r in train}) > 16
    args = frontier.resolve(frontier.build_parser().parse_args([]))
    points = frontier.plan(args, frontier.METHODS)
    assert len(points) == 15 and {len(m.lrs) for m in frontier.METHODS} == {3}
    # Every method sees the same pairs; the two global contrasts span 8 and 64 columns.
    for method, lr in points:
        arguments = frontier.train_arguments(method, lr, args, tmp_path / "pairs.jsonl", tmp_path / "run")
        steps = int(arguments[arguments.index("--max-steps") + 1])
        batch = int(arguments[arguments.index("--global-batch-size") + 1])
        assert steps * batch == args.pairs_per_run
    columns = {m.name: m.global_batch for m in frontier.METHODS if "--global-contrast" in m.args}
    assert columns == {"rpo-global-8": 8, "rpo-global-64": 64}
    gpu = frontier.resolve(frontier.build_parser().parse_args(["--gpu"]))
    assert gpu.pairs_per_run >= 10 * args.pairs_per_run and gpu.eval_samples >= 10 * args.eval_samples


def test_dry_run_prints_the_plan():
    result = subprocess.run([sys.executable, "benchmarks/frontier.py", "--dry-run"], cwd=REPO, capture_output=True,
                            text=True, timeout=300, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert result.returncode == 0, result.stderr
    assert "preset full: 15 trainings" in result.stdout and "-m rpo.generation" in result.stdout


@pytest.mark.slow
def test_quick_benchmark_end_to_end(tmp_path):
    out = tmp_path / "frontier"
    result = subprocess.run([sys.executable, "benchmarks/frontier.py", "--quick", "--output-dir", str(out)],
                            cwd=REPO, capture_output=True, text=True, timeout=3600,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    report = json.loads((out / "frontier.json").read_text())
    pairs = report["pairs"]
    assert pairs["written"] >= 2 and pairs["written"] + pairs["tied"] + pairs["too_few_usable"] == pairs["prompts"]
    assert report["reference"]["kl"]["mean"] == 0.0 and report["reference"]["difference"]["mean"] == 0.0
    assert [(p["method"], p["lr"]) for p in report["points"]] == [
        (m, lr) for m in frontier.QUICK_METHODS for lr in frontier.QUICK_LRS]
    for p in report["points"]:
        assert p["status"] == "ok"
        assert len(p["per_prompt"]["score"]) == 24 and math.isfinite(p["kl"]["mean"])
        assert p["score"]["mean"] == pytest.approx(float(np.nanmean(p["per_prompt"]["score"])))
        assert p["kl"]["ci_low"] <= p["kl"]["mean"] <= p["kl"]["ci_high"]
    assert (out / "frontier.png").is_file() and "| dpo |" in report["table"]
