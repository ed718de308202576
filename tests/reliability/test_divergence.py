"""Divergence fails loudly and loses nothing: the guard (rpo.train.guard) skips a bounded number of steps whose
numbers are not finite, then stops with exit 3 and one line naming the step and the quantity, exports no final/,
keeps the last good checkpoint (the one that produced the bad numbers is set aside) and logs NaN as NaN.
`rpo-eval` refuses a model whose weights or outputs are not finite.

The runs are cases of tests/reliability/reliability_workers.py (2 gloo ranks, a tiny random LLaMA).
"""
from __future__ import annotations

import math
import shutil

import pytest
import torch

from conftest import assert_same_steps, assert_same_weights, history, metrics, one_line, outcome, quiet, weights

# What diverges first at lr 1e9 depends on the layers' float arithmetic: SGD's second step either vanishes (the
# gradient norm 0 while the loss is finite) or overflows (a NaN gradient norm); both are divergence.
LR_1E9 = {"adamw": ("a log-prob is not finite",), "rmsprop": ("a log-prob is not finite",),
          "sgd": ("the gradient norm is 0 while the loss is", "the gradient norm is nan")}


@pytest.mark.parametrize("optimizer", sorted(LR_1E9))
def test_lr_1e9_stops_with_exit_3_one_line_and_no_final(cases, optimizer):
    """Before: exit 0, final/ exported with weights of 1e9 (adamw/rmsprop: every update skipped, the loss missing
    from metrics.jsonl; sgd: grad norm 0 and loss ~0.69, no warning)."""
    name = f"lr1e9-{optimizer}"
    line = one_line(outcome(cases, name), 3)
    assert line.startswith(tuple(f"train.py: error: the run diverged at step 4: {quantity}"
                                 for quantity in LR_1E9[optimizer])), line
    assert "no final/ written" in line and "no checkpoint was written before it" in line
    run = cases / "runs" / name
    assert not (run / "final").exists()
    records = metrics(run)
    assert [r["step"] for r in records] == [1, 2, 3, 4]  # every step logged, the skipped ones too
    assert math.isfinite(records[0]["loss"]) and math.isfinite(records[0]["grad_norm"])
    if optimizer == "sgd":
        norms = [r["grad_norm"] for r in records[1:]]
        assert norms == [0.0, 0.0, 0.0] or all(math.isnan(norm) for norm in norms), norms  # NaN logged as NaN
    else:
        assert all(math.isnan(r["loss"]) for r in records[1:])  # NaN logged as NaN, not dropped


def test_poisoned_weights_stop_the_run_keep_the_good_checkpoint_and_resume_exactly(cases):
    """The weights turn NaN in step 4's update, before its checkpoint is written: steps 5 and 6 are skipped, the
    run stops at step 6 (its last) with exit 3; checkpoint 4 (whose weights gave the NaN) is set aside, checkpoint 2
    is intact and `--resume` continues from it bit for bit as the uninterrupted run."""
    line = one_line(outcome(cases, "poisoned"), 3)
    run = cases / "runs" / "poisoned"
    assert line.startswith("train.py: error: the run diverged at step 6: a log-prob is not finite (the last step "
                           "could not be applied)"), line
    assert f"the last good checkpoint is {run / 'checkpoints' / 'step-00000002'}" in line
    assert not (run / "final").exists()
    records = metrics(cases / "results" / "poisoned-metrics")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert [math.isnan(r["loss"]) for r in records] == [False] * 4 + [True] * 2  # NaN logged, not dropped
    assert (run / "checkpoints" / "diverged-step-00000004").is_dir()
    for file in ("model-tp00.safetensors", "optimizer-tp00.safetensors", "rank-00000.safetensors",
                 "rank-00001.json"):  # checkpoint 2 kept as written: the same bytes as the uninterrupted run's
        assert (run / "checkpoints" / "step-00000002" / file).read_bytes() == \
            (cases / "runs" / "reference" / "checkpoints" / "step-00000002" / file).read_bytes(), file
    # the resumed run (it fell back past the set-aside checkpoint to step 2) equals the uninterrupted one
    assert outcome(cases, "poisoned-resumed") == [(0, []), (0, [])]
    assert_same_steps(history(cases, "poisoned-resumed"), history(cases, "reference")[2:])
    assert_same_steps(metrics(run), metrics(cases / "runs" / "reference"))
    assert_same_weights(weights(cases, "poisoned-resumed"), weights(cases, "reference"))
    log = (cases / "logs" / "cases-rank0.log").read_text()
    assert f"resumed from {run / 'checkpoints' / 'step-00000002'} at step 2" in log


def test_no_traceback_in_any_case(cases):
    for rank in range(2):
        assert quiet((cases / "logs" / f"cases-rank{rank}.log").read_text())


# ================================================================================================ units ===
def test_weighted_mean_keeps_a_nan_loss_and_drops_an_undefined_accuracy():
    from rpo.train.metrics import WeightedMean

    mean = WeightedMean()
    mean.add({"loss": 0.5, "rewards/accuracies": 1.0}, weight=2)
    mean.add({"loss": float("nan"), "rewards/accuracies": float("nan")}, weight=1)
    reduced = mean.reduce()
    assert math.isnan(reduced["loss"]) and reduced["rewards/accuracies"] == 1.0
    mean = WeightedMean()
    mean.add({"loss": 0.5, "rewards/margins": 0.1})
    mean.poison(["rewards/margins"])
    reduced = mean.reduce()
    assert reduced["loss"] == 0.5 and math.isnan(reduced["rewards/margins"])


@pytest.mark.parametrize("loss, grad_norm, logps, problem", [
    (0.69, 1.3, [-3.0, -4.0], None),
    (0.69, 1.3, [-3.0, float("nan")], "a log-prob is not finite"),
    (0.69, 1.3, [-3.0, float("-inf")], "a log-prob is not finite"),
    (float("nan"), 1.3, [-3.0, -4.0], "the loss is nan"),
    (0.69, float("inf"), [-3.0, -4.0], "the gradient norm is inf"),
    (0.69, 0.0, [-3.0, -4.0], "the gradient norm is 0 while the loss is 0.69"),
    (0.0, 0.0, [-3.0, -4.0], None),  # a loss of 0 has a zero gradient: converged, not diverged
])
def test_guard_verdicts(loss, grad_norm, logps, problem):
    from rpo.train.guard import DivergenceGuard

    guard = DivergenceGuard(max_skipped_steps=1)
    screened = guard.screen(torch.tensor(logps))
    assert torch.isfinite(screened).all()
    verdict = guard.judge(loss, grad_norm)
    assert (verdict.problem or None) == problem or verdict.problem.startswith(problem)
    assert verdict.update == (problem is None)


def test_guard_stops_after_max_skipped_steps_in_a_row():
    from rpo.train.guard import DivergenceGuard, StepVerdict

    guard = DivergenceGuard(max_skipped_steps=2)
    bad, good = StepVerdict("the loss is nan", 0), StepVerdict(None, 0)
    assert [guard.record(step, v) for step, v in enumerate([bad, bad, good, bad, bad, bad], start=1)] == \
        [False, False, False, False, False, True]
    assert guard.first_bad_step == 4 and guard.streak == 3


@pytest.fixture(scope="module")
def eval_models(cases):
    """The tiny LLaMA, a copy with a NaN weight, and a copy whose weights are finite but whose outputs are not."""
    from safetensors.torch import load_file, save_file

    root = cases
    for name, change in (("nan-weights", lambda w: w["model.norm.weight"].__setitem__(0, float("nan"))),
                         ("inf-outputs", lambda w: w["lm_head.weight"].mul_(1e38))):
        folder = root / name
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(root / "tiny-llama", folder)
        state = load_file(str(folder / "model.safetensors"))
        change(state)
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return root


@pytest.mark.parametrize("model, message", [
    ("nan-weights", "rpo-eval: error: model '{root}/nan-weights' has 1 non-finite weights (first in "
                    "model.norm.weight), e.g. from a diverged run: it cannot be evaluated"),
    ("inf-outputs", "rpo-eval: error: --model {root}/inf-outputs gives a non-finite log-prob"),
])
def test_rpo_eval_refuses_a_model_whose_weights_or_outputs_are_not_finite(eval_models, model, message, capsys):
    """Before: exit 0 and "accuracy 0.0000, margin nan"."""
    from rpo.evaluation.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--model", str(eval_models / model), "--reference", str(eval_models / "tiny-llama"), "--dataset",
              str(eval_models / "paired8.jsonl"), "--max-length", "48", "--max-prompt-length", "24",
              "--no-progress"])
    assert exit_info.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("rpo-eval:")]
    assert len(err) == 1 and err[0].startswith(message.format(root=eval_models)), err
