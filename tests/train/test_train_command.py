"""The training command as a user meets it: run folders that protect their contents, one error line for an error
on any rank, the unpaired tau default, option files that name themselves, --report-to's checks, `python -m`.

The multi-rank cases start real ranks (tests/multirank.py): the command (train_command_worker.py) and the rank
agreement helpers (rank_agreement_worker.py); the successful runs (--overwrite, --resume, TensorBoard) are in
test_trainer.py's launches.
"""
from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import multirank
import trainer_workers as workers
from rpo.train import ConfigError, TrainConfig
from rpo.train import cli, preflight

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def folder_state(folder: Path) -> dict:
    """Every file under `folder`: its bytes' hash and modification time."""
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def previous_run(folder: Path) -> Path:
    """A folder as a finished run leaves it (the files' contents do not matter to the guard)."""
    (folder / "checkpoints" / "step-00000002").mkdir(parents=True)
    (folder / "checkpoints" / "step-00000002" / "trainer.json").write_text("{}")
    (folder / "final").mkdir()
    (folder / "final" / "config.json").write_text("{}")
    (folder / "metrics.jsonl").write_text('{"step": 1, "loss": 0.69}\n')
    (folder / "config.yaml").write_text("loss: rpo\n")
    return folder


# =========================================================================================== run folders ===
def test_used_output_dir_is_refused_and_left_untouched(tmp_path, capsys):
    run = previous_run(tmp_path / "run")
    before = folder_state(run)
    code = cli.main(["--loss", "dpo", "--max-steps", "1", "--output-dir", str(run)], prog="train.py")
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"train.py: error: --output-dir {run} holds a previous run (metrics.jsonl, config.yaml, final/, "
                   f"checkpoints/); pass --resume to continue it, --overwrite to replace it, or another "
                   f"--output-dir"]
    assert folder_state(run) == before


def test_debug_adds_the_traceback(tmp_path, capsys, monkeypatch):
    run = previous_run(tmp_path / "run")
    assert cli.main(["--output-dir", str(run), "--debug"], prog="train.py") == 2
    err = capsys.readouterr().err
    assert err.startswith("Traceback") and err.rstrip().splitlines()[-1].startswith("train.py: error: --output-dir")
    monkeypatch.setenv("RPO_DEBUG", "1")
    assert cli.main(["--output-dir", str(run)], prog="train.py") == 2
    assert "Traceback" in capsys.readouterr().err


@pytest.mark.parametrize("present", ["metrics.jsonl", "config.yaml", "final", "checkpoints"])
def test_each_output_marks_a_used_folder(tmp_path, present):
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine")  # a file of the user's is no run output
    preflight.check_run_folder(TrainConfig(output_dir=str(run)))
    if present in ("final", "checkpoints"):
        (run / present).mkdir()
        preflight.check_run_folder(TrainConfig(output_dir=str(run)))  # an empty folder is no run either
        (run / present / "x").write_text("")
    else:
        (run / present).write_text("")
    with pytest.raises(ConfigError, match="holds a previous run"):
        preflight.check_run_folder(TrainConfig(output_dir=str(run)))
    preflight.check_run_folder(TrainConfig(output_dir=str(run), resume="latest"))  # --resume continues it


def test_overwrite_removes_only_the_previous_runs_outputs_and_says_so(tmp_path, caplog):
    run = previous_run(tmp_path / "run")
    (run / "notes.txt").write_text("mine")
    with caplog.at_level("WARNING", logger="rpo.train"):
        preflight.check_run_folder(TrainConfig(output_dir=str(run), overwrite=True))
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]
    assert "--overwrite: removed the previous run's metrics.jsonl, config.yaml, final/, checkpoints/" in caplog.text


def test_resume_and_overwrite_exclude_each_other():
    with pytest.raises(ConfigError, match="--resume continues the run in --output-dir and --overwrite replaces it"):
        TrainConfig(resume="latest", overwrite=True)


# ======================================================================================= cheap checks ===
def test_tensor_parallel_must_divide_the_launch_and_the_models_heads(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"num_attention_heads": 4, "num_key_value_heads": 2}))
    preflight.check_tensor_parallel(TrainConfig(model=str(model), tensor_parallel=2), world_size=4)
    with pytest.raises(ConfigError, match=r"--tensor-parallel 3 does not divide the 4 processes of this launch"):
        preflight.check_tensor_parallel(TrainConfig(model=str(model), tensor_parallel=3), world_size=4)
    with pytest.raises(ConfigError, match=r"--tensor-parallel 4 does not divide the model's num_key_value_heads "
                                          r"\(2, in .*config.json\); pass a divisor of 2"):
        preflight.check_tensor_parallel(TrainConfig(model=str(model), tensor_parallel=4), world_size=4)


def test_data_files_must_exist_and_hold_something(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ConfigError, match=r"--dataset .*empty.jsonl: the file is empty \(0 bytes\)"):
        preflight.check_data_source("--dataset", str(tmp_path / "empty.jsonl"), given=True)
    with pytest.raises(ConfigError, match=r"--eval-dataset .*missing.jsonl: no such file or folder"):
        preflight.check_data_source("--eval-dataset", str(tmp_path / "missing.jsonl"), given=True)
    preflight.check_data_source("--dataset", "Anthropic/hh-rlhf", given=True)  # a Hub name: the loader's job


def test_report_to_wandb_without_the_package_is_a_clean_error(tmp_path, monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else
                        real_find_spec(name, *a))
    with pytest.raises(ConfigError, match=r"--report-to wandb: the wandb package is not installed"):
        preflight.check_before_start(TrainConfig(report_to="wandb", output_dir=str(tmp_path / "run")))


# ============================================================================================= options ===
def test_unknown_yaml_key_suggests_the_option(tmp_path):
    config_file = tmp_path / "run.yaml"
    config_file.write_text("max_step: 3\n")
    with pytest.raises(ConfigError) as error:
        TrainConfig.from_yaml(config_file)
    assert str(error.value) == (f"{config_file}: unknown option 'max_step'; did you mean 'max-steps' or "
                                f"'max-skipped-steps' or 'warmup-steps'?")


def test_bad_yaml_value_names_the_file(tmp_path, capsys):
    config_file = tmp_path / "run.yaml"
    config_file.write_text("lr: fast\n")
    with pytest.raises(ConfigError, match=rf"^{config_file}: --lr: expected a number, got 'fast'$"):
        TrainConfig.from_yaml(config_file)
    with pytest.raises(SystemExit):
        TrainConfig.from_cli(["--config", str(config_file)], prog="train.py")
    assert f"train.py: error: {config_file}: --lr: expected a number, got 'fast'" in capsys.readouterr().err


@pytest.mark.parametrize("loss, given_tau, expected", [
    ("rpo", None, {"paired": 0.5, "unpaired": 0.75}),
    ("rpo", 0.3, {"paired": 0.3, "unpaired": 0.3}),  # the user's --tau wins
    ("rpo+0.2*sft", None, {"paired": 0.5, "unpaired": 0.75}),  # the term that takes a tau
])
def test_unpaired_data_gets_tau_075_unless_given(loss, given_tau, expected):
    from rpo.train.config import build_training_loss

    for kind, paired in (("paired", True), ("unpaired", False)):
        built = build_training_loss(TrainConfig(loss=loss, tau=given_tau), paired=paired)
        assert built.option("tau") == expected[kind], (loss, kind)


def test_losses_without_tau_are_built_unchanged_for_unpaired_data():
    from rpo.train.config import build_training_loss

    for loss in ("kto", "kto+0.1*sft"):
        built = build_training_loss(TrainConfig(loss=loss), paired=False)
        assert not any("tau" in term.options for _, _, term in built.terms)
        assert built.describe() == build_training_loss(TrainConfig(loss=loss)).describe()


@pytest.mark.parametrize("loss, term", [("dpo", "dpo"), ("rpo+0.5*simpo", "simpo"), ("rpo-z", "rpo-z")])
def test_a_loss_on_pairs_only_is_refused_for_unpaired_data(loss, term):
    from rpo.train.config import build_training_loss

    with pytest.raises(ConfigError, match="^" + re.escape(f"--loss {loss}: loss '{term}' needs paired data")):
        build_training_loss(TrainConfig(loss=loss), paired=False)
    with pytest.raises(ConfigError, match="^--loss rpo: loss 'rpo' needs paired data"):
        build_training_loss(TrainConfig(loss="rpo", weighting="diagonal"), paired=False)


def test_summary_lists_checkpoints_only_when_written():
    from rpo.train.reporting import format_summary

    summary = {"steps": 2, "steps_this_run": 2, "time_s": 1.0, "tokens_per_s": 10.0, "final_train_metrics": {},
               "final_eval_metrics": {}, "output_dir": "runs/x", "checkpoints": None, "final_model": "runs/x/final"}
    assert format_summary(summary).splitlines()[-1] == "  outputs: runs/x (metrics.jsonl, curves.png, final/)"
    summary.update(checkpoints="runs/x/checkpoints", final_model=None, tensorboard="runs/x/tensorboard")
    assert format_summary(summary).splitlines()[-1] == \
        "  outputs: runs/x (metrics.jsonl, curves.png, tensorboard/, checkpoints/)"


@pytest.mark.parametrize("module", ["rpo.train", "rpo.train.metrics"])
def test_python_m_commands_answer_help(module):
    result = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: python -m {module}")


# ================================================================================= one error, once ===
@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    path = tmp_path_factory.mktemp("train-command")
    workers.build_assets(path)
    rows = (path / f"paired{workers.RUN_ROWS}.jsonl").read_text().splitlines()
    bad = json.loads(rows[3])
    del bad["rejected"]
    rows[3] = json.dumps(bad)
    (path / "bad-row.jsonl").write_text("\n".join(rows) + "\n")
    (path / "empty.jsonl").write_text("")
    return path


ERROR_CASES = {
    "bad-row": (["--dataset", "{assets}/bad-row.jsonl"],
                "{assets}/bad-row.jsonl: row 3 (line 4), field 'rejected': missing or null"),
    "missing-file": (["--dataset", "{assets}/nothing-here.jsonl"],
                     "--dataset {assets}/nothing-here.jsonl: no such file or folder"),
    "empty-file": (["--dataset", "{assets}/empty.jsonl"], "--dataset {assets}/empty.jsonl: the file is empty"),
    "impossible-tp": (["--tensor-parallel", "3"], "--tensor-parallel 3 does not divide the 2 processes"),
}


def test_an_error_on_any_rank_is_one_line_and_exit_2_on_every_rank(assets):
    """Under 2 ranks: a bad data row (found by rank 0 while the other waits), a missing file, an empty file and
    an impossible tensor-parallel size each give exactly one `train.py: error:` line (rank 0's), no traceback,
    and exit status 2 on both ranks."""
    common = ["--model", assets / "tiny-llama", "--cache-dir", assets / "cache", "--max-length", "48",
              "--max-prompt-length", "24", "--global-batch-size", "4", "--micro-batch-size", "2", "--max-steps", "1",
              "--no-progress-bar", "--save-every", "0", "--no-save-final"]
    launches = {}
    for name, (args, _) in ERROR_CASES.items():
        argv = [a.format(assets=assets) for a in args] + common + ["--output-dir", assets / "runs" / name]
        launches[name] = multirank.start(HERE / "train_command_worker.py", 2, args=argv, log_dir=assets / "logs",
                                         name=name)
    for name, launch in launches.items():
        result = launch.wait(timeout=600)
        assert result.returncodes == [2, 2] and not result.timed_out, result.report()
        expected = ERROR_CASES[name][1].format(assets=assets)
        error_lines = [(rank, line) for rank, log in enumerate(result.logs) for line in log.splitlines()
                       if "error:" in line]
        assert len(error_lines) == 1, result.report()
        rank, line = error_lines[0]
        assert rank == 0 and line.startswith(f"train.py: error: {expected}"), result.report()
        assert not any("Traceback" in log for log in result.logs), result.report()


@pytest.fixture(scope="module")
def rank_agreement(tmp_path_factory):
    """One 2-rank launch of every case of rank_agreement_worker.py; returns the folder of its records."""
    out = tmp_path_factory.mktemp("rank-agreement")
    multirank.launch(HERE / "rank_agreement_worker.py", 2, args=[out], log_dir=out, timeout=300).check()
    return out


@pytest.mark.parametrize("case, expected", [
    # (ran the block, error type, is a ConfigError, message) per rank
    ("together-rank1-user", [(True, "UserRankFailure", True, "row 3 of data.jsonl is bad"),
                             (True, "ConfigError", True, "row 3 of data.jsonl is bad")]),
    ("together-rank0-bug", [(True, "KeyError", False, "missing"), (True, "RankFailure", False, "missing")]),
    ("main-first-rank0-user", [(True, "ConfigError", True, "--dataset x: no such file"),
                               (False, "UserRankFailure", True, "--dataset x: no such file")]),
    ("main-first-rank1-user", [(True, "UserRankFailure", True, "rank 1 cannot read the cache"),
                               (True, "ConfigError", True, "rank 1 cannot read the cache")]),
    ("main-first-ok", [(True, None, False, None), (True, None, False, None)]),
])
def test_ranks_share_the_first_failure(rank_agreement, case, expected):
    seen = [json.loads((rank_agreement / f"{case}-rank{rank}.json").read_text()) for rank in range(2)]
    assert [(s["ran_block"], s["error_type"], s["is_config_error"], s["error"]) for s in seen] == expected


def test_yaml_options_round_trip_the_new_fields(tmp_path):
    config = TrainConfig(overwrite=True, report_to="tensorboard", debug=True)
    config.to_yaml(tmp_path / "c.yaml")
    assert TrainConfig.from_yaml(tmp_path / "c.yaml") == config
    assert yaml.safe_load((tmp_path / "c.yaml").read_text())["report_to"] == "tensorboard"
