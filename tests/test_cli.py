"""examples/train.py and examples/evaluate.py as a user runs them: --help, option precedence, every error.

The invalid-option cases are generated from TrainConfig's field metadata, so a new option is covered (and the
coverage test fails if a field gets no case). Training itself is replaced by a recording fake Trainer here;
tests/test_trainer.py runs the real one.
"""
import dataclasses
import importlib.util
import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import torch
import yaml

import rpo.train
from rpo.train.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = REPO / "examples" / "train.py"
EVALUATE_SCRIPT = REPO / "examples" / "evaluate.py"


def load_script(path):
    spec = importlib.util.spec_from_file_location(f"_example_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def train_script():
    return load_script(TRAIN_SCRIPT)


class RecordingTrainer:
    """Stands in for rpo.train.Trainer: keeps the config it was given and whether fit() ran."""

    instances = []

    def __init__(self, config):
        self.config, self.fitted = config, False
        RecordingTrainer.instances.append(self)

    def fit(self):
        self.fitted = True
        return {}


@pytest.fixture
def fake_trainer(monkeypatch):
    RecordingTrainer.instances = []
    # The command does `from rpo.train.trainer import Trainer` after parsing: it finds the recording one.
    import rpo.train.trainer

    monkeypatch.setattr(rpo.train.trainer, "Trainer", RecordingTrainer)
    return RecordingTrainer


def run_script(*args, timeout=300):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def flag_of(field: dataclasses.Field) -> str:
    return field.metadata.get("cli_flag") or "--" + field.name.replace("_", "-")


# --- --help ------------------------------------------------------------------------------------------------------

def test_train_help_lists_every_option_with_its_help_and_default():
    result = run_script(TRAIN_SCRIPT, "--help", timeout=60)
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())  # argparse wraps lines
    for field in dataclasses.fields(TrainConfig):
        assert flag_of(field) in text, flag_of(field)
        # The first words of the field's help text appear (argparse may re-wrap the rest).
        first_words = " ".join(field.metadata["help"].split()[:4])
        assert first_words in text, (field.name, first_words)
        if "default" not in field.metadata["help"].lower():
            default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
            assert f"[default: {default}]" in text, field.name
    assert "--config FILE.yaml" in text


def test_evaluate_help_lists_the_documented_options():
    result = run_script(EVALUATE_SCRIPT, "--help", timeout=60)
    assert result.returncode == 0, result.stderr
    for flag in ("--model", "--dataset", "--reference", "--output-json", "--run-held-out", "--prompts",
                 "--temperature", "--judge", "--judge-url", "--judge-model", "--reward-fn", "--judge-task",
                 "--baseline", "--seed"):
        assert flag in result.stdout, flag


# --- the commands: console scripts, python -m, the example scripts --------------------------------------------------

COMMANDS = {"rpo-train": "rpo.train.cli:main", "rpo-eval": "rpo.evaluation.cli:main",
            "rpo-generate": "rpo.generation.cli:main"}
HELP_FLAGS = {"rpo-train": "--global-contrast", "rpo-eval": "--run-held-out", "rpo-generate": "--samples-per-prompt"}


def test_console_scripts_are_declared_in_pyproject():
    import tomllib

    assert tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"] == COMMANDS


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_python_m_runs_the_command(command):
    module = COMMANDS[command].split(":")[0].rsplit(".", 1)[0]  # rpo.train.cli -> python -m rpo.train
    result = run_script("-m", module, "--help", timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: python -m {module} ") and HELP_FLAGS[command] in result.stdout


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_installed_console_script_answers_help(command):
    import importlib.metadata

    installed = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="console_scripts")}
    assert installed.get(command) == COMMANDS[command], (
        f"{command} is not in the installed rpo's entry points: run `make install` (pip install -e .) again")
    script = Path(sys.executable).parent / command
    assert script.is_file(), f"{script} missing: run `make install` again"
    result = subprocess.run([str(script), "--help"], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: {command} ") and HELP_FLAGS[command] in result.stdout


def test_example_scripts_call_the_commands_code(monkeypatch):
    import rpo.train.cli

    calls = []
    monkeypatch.setattr(rpo.train.cli, "main", lambda argv=None, prog="rpo-train": calls.append((argv, prog)) or 0)
    assert load_script(TRAIN_SCRIPT).main(["--max-steps", "1"]) == 0  # loaded after the patch: binds the fake
    assert calls == [(["--max-steps", "1"], "train.py")]
    assert "from rpo.evaluation.cli import main" in EVALUATE_SCRIPT.read_text()
    result = run_script(EVALUATE_SCRIPT, "--model", "m", timeout=120)
    assert result.returncode == 2 and result.stderr.startswith("usage: evaluate.py ")
    assert "evaluate.py: error: nothing to evaluate" in result.stderr


# --- precedence ----------------------------------------------------------------------------------------------------

def test_defaults_then_yaml_then_command_line(train_script, fake_trainer, tmp_path):
    plugin = tmp_path / "extra_options_loss.py"  # a user's loss that takes any further option
    plugin.write_text("from rpo.losses import build_loss, register_loss\n\n\n"
                      "@register_loss('test-extra-options')\n"
                      "def factory(beta: float = 0.1, **extra):\n"
                      "    return build_loss('dpo', beta=beta)\n")
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump({
        "loss": str(plugin), "lr": 1e-6, "beta": 0.3, "max-steps": 7, "global_batch_size": 32,
        "loss_options": {"extra_a": 1, "extra_b": 2}}))
    code = train_script.main(["--config", str(config_file), "--beta", "0.2", "--loss-option", "extra_b=3",
                              "--resume", "--output-dir", str(tmp_path / "out")])
    assert code == 0
    (trainer,) = fake_trainer.instances
    config = trainer.config
    assert trainer.fitted
    # Command line > YAML > defaults, option by option; dashed and underscored YAML keys both work.
    assert (config.loss, config.lr, config.beta, config.max_steps, config.global_batch_size) == \
        (str(plugin), 1e-6, 0.2, 7, 32)
    assert config.loss_options == {"extra_a": 1, "extra_b": 3}  # merged key by key, the command line wins
    assert config.resume == "latest"  # a bare --resume means the newest checkpoint
    assert config.output_dir == str(tmp_path / "out")
    untouched = {f.name for f in dataclasses.fields(TrainConfig)} - {
        "loss", "lr", "beta", "max_steps", "global_batch_size", "loss_options", "resume", "output_dir"}
    defaults = TrainConfig()
    assert {name: getattr(config, name) for name in untouched} == {name: getattr(defaults, name) for name in untouched}
    # The command line alone: defaults everywhere else (rmsprop, the paper's lr, batch and lengths).
    train_script.main(["--max-steps", "3"])
    config = fake_trainer.instances[-1].config
    assert (config.optimizer, config.lr, config.global_batch_size, config.max_prompt_length, config.max_length,
            config.max_steps) == ("rmsprop", 5e-7, 64, 256, 512, 3)


def test_train_script_flushes_denormals_on_cpu(train_script, fake_trainer):
    torch.set_flush_denormal(False)
    try:
        assert torch.tensor([1e-40], dtype=torch.float32).item() != 0.0
        train_script.main(["--max-steps", "1"])
        assert torch.tensor([1e-40], dtype=torch.float32).item() == 0.0
    finally:
        torch.set_flush_denormal(True)


# --- every invalid option ----------------------------------------------------------------------------------------

def _base(annotation):
    if typing.get_origin(annotation) is typing.Union:
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    return typing.get_origin(annotation) or annotation


def _number(base, value):
    return int(value) if base is int else float(value)


def invalid_cases():
    """(field name, how, value, expected message) for every field: wrong type, each bound, bad choice."""
    hints = typing.get_type_hints(TrainConfig)
    cases = []
    for field in dataclasses.fields(TrainConfig):
        meta, flag, base = field.metadata, flag_of(field), _base(hints[field.name])
        if field.name == "loss":
            cases.append((field.name, "cli", [flag, ""], "--loss: expected a loss name, got an empty string"))
            cases.append((field.name, "yaml", {"loss": [["rpo", "heavy"]]}, "--loss: term 0 must be a [name, weight]"))
            continue
        if base is bool:
            cases.append((field.name, "yaml", {field.name: "maybe"}, f"{flag}: expected true or false, got 'maybe'"))
            continue
        if base is dict:
            cases.append((field.name, "cli", [flag, "novalue"], f"{flag} expects KEY=VALUE, got 'novalue'"))
            cases.append((field.name, "yaml", {field.name: [1, 2]}, f"{flag}: expected a mapping"))
            continue
        if meta["choices"]:
            cases.append((field.name, "cli", [flag, "bogus"], f"{flag}: invalid choice 'bogus'"))
            continue
        if base is str:
            cases.append((field.name, "cli", [flag, ""], f"{flag}: expected a non-empty string, got ''"))
            continue
        if base is int:
            cases.append((field.name, "cli", [flag, "many"], f"{flag}: expected an integer, got 'many'"))
            cases.append((field.name, "yaml", {field.name: 2.5}, f"{flag}: expected an integer, got 2.5"))
        if base is float:
            cases.append((field.name, "cli", [flag, "fast"], f"{flag}: expected a number, got 'fast'"))
            cases.append((field.name, "cli", [flag, "nan"], f"{flag}: expected a finite number"))
        for bound, offset, text in (("minimum", -1, ">="), ("exclusive_minimum", 0, ">"),
                                    ("maximum", +1, "<="), ("exclusive_maximum", 0, "<")):
            if meta[bound] is not None:
                value = _number(base, meta[bound] + offset)
                cases.append((field.name, "cli", [flag, str(value)],
                              f"{flag}: must be {text} {meta[bound]}, got {value}"))
    return cases


CASES = invalid_cases()

# Errors that involve several options or the config file itself.
CROSS_OPTION_CASES = [
    (["--max-prompt-length", "600"], "--max-prompt-length (600) must be smaller than --max-length (512)"),
    (["--micro-batch-size", "128"], "--micro-batch-size (128) is larger than --global-batch-size (64)"),
    (["--alpha", "0.5", "--weighting", "uniform"], "--alpha: loss 'rpo': option alpha applies to weighting="
                                                   "'diagonal' only, got weighting='uniform'"),
    (["--beta", "0"], "--beta: loss 'rpo': option beta must be > 0, got 0.0"),
    (["--loss", "kto", "--desirable-weight", "-1"], "--desirable-weight: loss 'kto': option desirable_weight must "
                                                     "be >= 0, got -1.0"),
    (["--loss-option", "tau=0.3"], "--loss-option tau=...: use --tau instead"),
    (["--learning-rate", "1e-6"], "unrecognized arguments: --learning-rate"),
    (["--config", "/nonexistent/run.yaml"], "--config: file not found: /nonexistent/run.yaml"),
]


def _expect_usage_error(train_script, argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_script.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert err.startswith("usage: train.py")


@pytest.mark.parametrize("name, how, value, message", CASES, ids=[f"{c[0]}-{c[1]}-{i}" for i, c in enumerate(CASES)])
def test_every_invalid_option_is_named(train_script, fake_trainer, tmp_path, capsys, name, how, value, message):
    if how == "yaml":
        config_file = tmp_path / "bad.yaml"
        config_file.write_text(yaml.safe_dump(value))
        argv = ["--config", str(config_file)]
    else:
        argv = value
    _expect_usage_error(train_script, argv, message, capsys)
    assert fake_trainer.instances == []  # nothing starts on a bad option


def test_every_option_has_an_invalid_case():
    assert {case[0] for case in CASES} == set(TrainConfig.field_names())


@pytest.mark.parametrize("argv, message", CROSS_OPTION_CASES)
def test_cross_option_and_config_file_errors(train_script, fake_trainer, capsys, argv, message):
    _expect_usage_error(train_script, argv, message, capsys)


@pytest.mark.parametrize("content, message", [
    ("lr: [unclosed", "not valid YAML"),
    ("- 1\n- 2\n", "expected a mapping of option: value, got list"),
    ("learning_rate: 0.001\n", "unknown option 'learning_rate'"),
])
def test_bad_config_files(train_script, fake_trainer, tmp_path, capsys, content, message):
    config_file = tmp_path / "run.yaml"
    config_file.write_text(content)
    _expect_usage_error(train_script, ["--config", str(config_file)], message, capsys)


def test_trainer_time_option_errors_exit_cleanly(tmp_path):
    """Errors only the trainer can find (the loss registry, the batch layout) still end in one clear line."""
    result = run_script(TRAIN_SCRIPT, "--loss", "nosuchloss", "--output-dir", tmp_path / "a")
    assert result.returncode == 2
    assert "train.py: error: --loss nosuchloss: unknown loss 'nosuchloss'" in result.stderr
    assert "Traceback" not in result.stderr
    result = run_script(TRAIN_SCRIPT, "--global-batch-size", "64", "--micro-batch-size", "7", "--output-dir",
                        tmp_path / "b")
    assert result.returncode == 2
    assert "--global-batch-size (64) must be a multiple of --micro-batch-size (7)" in result.stderr
    assert "Traceback" not in result.stderr
