"""One objective, whatever the layout: the loss of a step is a function of the data, the global batch and the
options only.

Every loss of objective_workers.LOSSES (rpo --global-contrast with its defaults and each normalisation, rpo per
micro-batch, dpo, sft, rpo + 0.5 dpo, rpo + 0.2 sft, KTO with its KL reference point on unpaired data, rpo's
global matrix on unpaired data) trains 3 exact SGD steps of the tiny LLaMA on each layout of
objective_workers.LAYOUTS: 1 process with 1 and with 2 micro-batches, DP=2, DP=2 with --packing, TP=2, TP=2 with
--sequence-parallel. The per-step losses agree to 1e-6 and the final weights to 1e-5 with the 1-process,
1-micro-batch run.

rpo without --global-contrast is local by definition (one matrix per micro-batch and rank): it is invariant to
the layouts that form the same matrices, and only to those. With 8 pairs per step: 1 process × 1 micro-batch,
TP=2 and TP=2 + SP contrast all 8 pairs in one 8×8 matrix; 1 process × 2 micro-batches, DP=2 and DP=2 + packing
contrast pairs 0–3 and pairs 4–7 in two 4×4 matrices; the two groups differ.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import kto_kl_workers
import objective_workers as workers

LOSS_TOLERANCE = 1e-6
WEIGHT_TOLERANCE = 1e-5
LAUNCHES = {1: ("1x1", "1x2"), 2: ("dp2", "dp2-packing")}
TP_LAUNCH = ("tp2", "tp2-sp")
REFERENCE_LAYOUT = "1x1"
# rpo per micro-batch: the layouts that form the same contrast matrices.
LOCAL_GROUPS = (("1x1", "tp2", "tp2-sp"), ("1x2", "dp2", "dp2-packing"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("objective")
    kto_kl_workers.build_assets(workdir)
    started = [workers.start(1, LAUNCHES[1], workdir), workers.start(2, LAUNCHES[2], workdir),
               workers.start(2, TP_LAUNCH, workdir)]
    for launch in started:
        launch.wait().check()
    return workdir


def run(workdir: Path, loss: str, layout: str):
    """(per-step losses, final weights) of one run."""
    name = f"{loss}-{layout}"
    record = json.loads((workdir / "results" / f"{name}.json").read_text())
    losses = [entry["loss"] for entry in record["history"]]
    assert [entry["step"] for entry in record["history"]] == list(range(1, workers.STEPS + 1)), name
    return losses, load_file(str(workdir / "results" / f"{name}.safetensors"))


def differences(first, second):
    """(largest per-step loss difference, largest weight difference) between two runs."""
    (losses_a, weights_a), (losses_b, weights_b) = first, second
    assert weights_a.keys() == weights_b.keys()
    loss_gap = max(abs(a - b) for a, b in zip(losses_a, losses_b))
    weight_gap = max((weights_a[k] - weights_b[k]).abs().max().item() for k in weights_a)
    return loss_gap, weight_gap


def test_the_matrix_covers_every_loss_and_layout():
    assert set(workers.LAYOUTS) == {layout for layouts in (*LAUNCHES.values(), TP_LAUNCH) for layout in layouts}
    assert {name for group in LOCAL_GROUPS for name in group} == set(workers.LAYOUTS)


@pytest.mark.parametrize("loss", [name for name in workers.LOSSES if name != "rpo-local"])
def test_every_layout_trains_the_same_objective(runs, loss):
    reference = run(runs, loss, REFERENCE_LAYOUT)
    start = reference[0][0]
    assert abs(start - reference[0][-1]) > 1e-4, f"{loss}: the steps changed nothing, the test would tell nothing"
    for layout in workers.LAYOUTS:
        loss_gap, weight_gap = differences(reference, run(runs, loss, layout))
        assert loss_gap <= LOSS_TOLERANCE, (loss, layout, loss_gap)
        assert weight_gap <= WEIGHT_TOLERANCE, (loss, layout, weight_gap)


def test_rpo_per_micro_batch_is_invariant_to_the_layouts_of_the_same_matrices(runs):
    for group in LOCAL_GROUPS:
        first = run(runs, "rpo-local", group[0])
        for layout in group[1:]:
            loss_gap, weight_gap = differences(first, run(runs, "rpo-local", layout))
            assert loss_gap <= LOSS_TOLERANCE and weight_gap <= WEIGHT_TOLERANCE, (group[0], layout)
    # One 8x8 matrix is another objective than two 4x4 ones.
    loss_gap, weight_gap = differences(run(runs, "rpo-local", LOCAL_GROUPS[0][0]),
                                       run(runs, "rpo-local", LOCAL_GROUPS[1][0]))
    assert loss_gap > 1e-4 and weight_gap > 1e-4


@pytest.mark.parametrize("loss, layout", sorted(workers.EXPORTED))
def test_rpo_eval_reports_the_loss_the_run_trained_with(runs, loss, layout, tmp_path):
    """rpo-eval on a run's final/ reports the run's loss with every option resolved as the trainer resolved it
    (its loss.json), the unpaired τ and the global default included."""
    from rpo.evaluation.cli import main as evaluate_main

    run_dir = runs / "runs" / f"{loss}-{layout}"
    data = runs / workers.LOSSES[loss][1]
    out = tmp_path / "eval.json"
    assert evaluate_main(["--model", str(run_dir / "final"), "--dataset", str(data), "--output-json", str(out),
                          "--no-progress"]) == 0
    reported = json.loads(out.read_text())["run_loss"]
    trained = json.loads((run_dir / "loss.json").read_text())
    assert {**reported, "paired": trained["paired"]} == trained
    contrast = reported["terms"][0]
    assert contrast["name"] == "rpo" and contrast["options"]["normalization_columns"] == 8
    assert contrast["options"]["tau"] == (0.5 if trained["paired"] else 0.75)


def test_the_global_default_is_the_eight_column_scale_and_not_the_others(runs):
    """--global-contrast's default trains rpo with reference_columns K = 8 (at 8 pairs the matrix of `row`), and
    not the matrix of another normalisation."""
    default = run(runs, "rpo-global", REFERENCE_LAYOUT)
    loss_gap, weight_gap = differences(default, run(runs, "rpo-global-row", REFERENCE_LAYOUT))
    assert loss_gap <= LOSS_TOLERANCE and weight_gap <= WEIGHT_TOLERANCE
    for other in ("rpo-global-mean", "rpo-global-reference4"):
        assert differences(default, run(runs, other, REFERENCE_LAYOUT))[1] > 1e-4, other
