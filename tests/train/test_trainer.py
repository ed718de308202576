"""The trainer (rpo.train): exact optimiser steps across topologies, gradient accumulation, resume after SIGKILL,
run outputs, and the configuration object.

Four launches of tests/train/trainer_workers.py through tests/multirank.py (1 rank, 2 ranks, 2 ranks killed
mid-run, then 2 ranks resuming) run every distributed case on CPU/gloo with a tiny random LLaMA; this file asserts
against a float64 Hugging Face model and losses written here (not the library's).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

import trainer_workers as workers
from rpo.train import ConfigError, TrainConfig

BETA, TAU = 0.1, 0.5
TOLERANCE = dict(rtol=0, atol=1e-5)


# ============================================================================================ launches =====
@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    path = tmp_path_factory.mktemp("trainer")
    workers.build_assets(path)
    # Fill the prompt-embedding cache once, so concurrent launches only read it (and the float64 reference
    # below uses the very same embeddings).
    reference_inputs(path, "paired")
    reference_inputs(path, "unpaired")
    return path


@pytest.fixture(scope="module")
def launches(workdir):
    """Run every worker case; returns workdir. Launch 3 is SIGKILLed by its own ranks after step 3."""
    groups = [(1, ["equivalence", "unpaired", "variants", "run3", "overwrite"]),
              (2, ["equivalence", "unpaired", "resume_reference"]),
              (2, ["resume_killed"])]
    started = [workers.start(world, cases, workdir) for world, cases in groups]
    results = [launch.wait() for launch in started]
    for result in results[:2]:
        result.check()
    results[2].check([-9, -9])
    workers.start(2, ["resume_continue"], workdir).wait().check()
    return workdir


def result(workdir: Path, name: str):
    from safetensors.torch import load_file

    weights = load_file(str(workdir / "results" / f"{name}.safetensors"))
    info = json.loads((workdir / "results" / f"{name}.json").read_text())
    return weights, info


# ================================================================================= float64 reference =====
def reference_inputs(workdir: Path, kind: str = "paired"):
    """Per answer: (token ids, response mask) and prompt embedding, split into chosen and rejected answers.

    Token ids come from rpo.data (the trainer's input pipeline); unpaired rows are chosen when labelled true.
    """
    from transformers import AutoTokenizer

    from rpo.data import compute_prompt_embeddings, load_preference_dataset, tokenize_preference_dataset

    tokenizer = AutoTokenizer.from_pretrained(workdir / "tiny-llama")
    rows = workers.EQUIVALENCE_ROWS if kind == "paired" else workers.UNPAIRED_ROWS
    dataset = load_preference_dataset(workdir / f"{kind}{rows}.jsonl")
    tokenized = tokenize_preference_dataset(dataset, tokenizer, max_prompt_length=workers.MAX_PROMPT_LENGTH,
                                            max_length=workers.MAX_LENGTH)
    embeddings = compute_prompt_embeddings(list(tokenized.rows["prompt"]), cache_dir=workdir / "cache" /
                                           "prompt_embeddings").double()

    def answers(field, indices):
        return [(torch.tensor(tokenized.rows[f"{field}_input_ids"][i]),
                 torch.tensor(tokenized.rows[f"{field}_loss_mask"][i])) for i in indices]

    if kind == "paired":
        everything = range(len(tokenized))
        return {"chosen": (answers("chosen", everything), embeddings),
                "rejected": (answers("rejected", everything), embeddings)}
    labels = list(tokenized.rows["label"])
    chosen = [i for i, label in enumerate(labels) if label]
    rejected = [i for i, label in enumerate(labels) if not label]
    assert chosen and rejected
    return {"chosen": (answers("completion", chosen), embeddings[chosen]),
            "rejected": (answers("completion", rejected), embeddings[rejected])}


def sequence_logp64(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ over response tokens t of log p(ids[t] | ids[<t]), one unpadded sequence, float64."""
    logits = model(ids[None]).logits[0].double()
    token_logp = torch.log_softmax(logits[:-1], dim=-1).gather(1, ids[1:, None])[:, 0]
    return (token_logp * mask[1:]).sum()


def dpo64(chosen_rewards, rejected_rewards):
    return -F.logsigmoid(chosen_rewards - rejected_rewards).mean()


def rpo64(chosen_rewards, rejected_rewards, chosen_embeddings, rejected_embeddings):
    """−1/(M·N) Σ_ij log σ(ω_ij (r_i − r_j)), ω_ij = softmax_j(−(1 − cos(e_i, f_j))/τ)."""
    cosine = F.normalize(chosen_embeddings, dim=1) @ F.normalize(rejected_embeddings, dim=1).T
    weights = torch.softmax(-(1 - cosine) / TAU, dim=1)
    return -F.logsigmoid(weights * (chosen_rewards[:, None] - rejected_rewards[None, :])).mean()


def kto64(chosen_rewards, rejected_rewards):
    """KTO with the KL reference point z = 0 (no mismatched pairs): mean of 1 − σ(r) and 1 − σ(−r)."""
    return torch.cat([1 - torch.sigmoid(chosen_rewards), 1 - torch.sigmoid(-rejected_rewards)]).mean()


def reference_step(workdir: Path, loss_name: str, kind: str = "paired"):
    """(loss, {HF name: gradient}) of the whole batch at the initial weights, in float64 with HF's LLaMA."""
    from transformers import AutoModelForCausalLM

    inputs = reference_inputs(workdir, kind)
    model = AutoModelForCausalLM.from_pretrained(workdir / "tiny-llama", dtype=torch.float64,
                                                 attn_implementation="eager")
    rewards, policy = {}, {}
    for side, (answers, _) in inputs.items():
        policy[side] = torch.stack([sequence_logp64(model, ids, mask) for ids, mask in answers])
        rewards[side] = BETA * (policy[side] - policy[side].detach())  # the reference model is the starting policy
    chosen, rejected = rewards["chosen"], rewards["rejected"]
    embeddings = (inputs["chosen"][1], inputs["rejected"][1])
    # sft: the token mean of the whole batch's chosen responses
    chosen_tokens = sum(int(mask[1:].sum()) for _, mask in inputs["chosen"][0])
    loss = {"dpo": lambda: dpo64(chosen, rejected),
            "rpo": lambda: rpo64(chosen, rejected, *embeddings),
            "combo": lambda: (rpo64(chosen, rejected, *embeddings) + 0.5 * dpo64(chosen, rejected)
                              - 0.2 * policy["chosen"].sum() / chosen_tokens),
            "kto": lambda: kto64(chosen, rejected)}[loss_name]()
    loss.backward()
    grads = {name: p.grad.float() for name, p in model.named_parameters()}
    return loss.item(), grads


@pytest.fixture(scope="module")
def references(workdir):
    cases = [("dpo", "paired"), ("rpo", "paired"), ("combo", "paired"), ("kto", "unpaired"), ("rpo", "unpaired")]
    return {(name, kind): reference_step(workdir, name, kind) for name, kind in cases}


def initial_weights(workdir: Path):
    from safetensors.torch import load_file

    return load_file(str(workdir / "tiny-llama" / "model.safetensors"))


# ============================================================================== equivalence (acceptance) ===
VARIANTS = ["tp1dp1", "tp2dp1", "tp1dp2", "tp1dp1-accum", "tp1dp2-accum"]


def check_step(workdir: Path, name: str, reference) -> None:
    """Loss, gradient norm, gradients (g = (θ0 − θ1)/lr of the SGD update) and parameters after the step equal the
    float64 reference."""
    loss_ref, grads_ref = reference
    before = initial_weights(workdir)
    after, info = result(workdir, name)
    assert set(after) == set(grads_ref), name
    logged = info["history"][0]
    assert logged["loss"] == pytest.approx(loss_ref, abs=1e-6), name
    norm_ref = math.sqrt(sum((g.double() ** 2).sum().item() for g in grads_ref.values()))
    assert logged["grad_norm"] == pytest.approx(norm_ref, rel=1e-5), name
    for key, grad in grads_ref.items():
        torch.testing.assert_close(after[key], before[key] - workers.SGD_LR * grad, **TOLERANCE, msg=f"{name} {key}")
        torch.testing.assert_close((before[key] - after[key]) / workers.SGD_LR, grad, **TOLERANCE,
                                   msg=f"{name} gradient {key}")


@pytest.mark.parametrize("loss_name", ["dpo", "rpo", "combo"])
def test_one_sgd_step_equals_float64_reference_on_every_topology(launches, references, loss_name):
    """TP=1/DP=1 full batch, TP=2, DP=2, and two micro-batches per rank (gradient accumulation; the two-pass path
    for the batch-coupled rpo and rpo+0.5*dpo+0.2*sft) all take the float64 single-process step."""
    reference = references[(loss_name, "paired")]
    assert max(g.abs().max().item() for g in reference[1].values()) > 1e-3  # the step is not trivially zero
    for variant in VARIANTS:
        check_step(launches, f"{loss_name}-{variant}", reference)


@pytest.mark.parametrize("loss_name", ["kto", "rpo"])
def test_unpaired_step_equals_float64_reference(launches, references, loss_name):
    """Unpaired data (M != N, each rank with its own class counts): one rank, and two ranks x two micro-batches."""
    for variant in ("tp1dp1", "tp1dp2-accum"):
        check_step(launches, f"{loss_name}-unpaired-{variant}", references[(loss_name, "unpaired")])


def test_precomputed_reference_equals_live_reference_and_bf16_is_close(launches):
    live, live_info = result(launches, "dpo-live-reference")
    cached, cached_info = result(launches, "dpo-precomputed-reference")
    assert live_info["reference_model_loaded"] and not cached_info["reference_model_loaded"]
    assert list((launches / "cache" / "reference_logps").glob("*.safetensors"))
    for ours, theirs in zip(cached_info["history"], live_info["history"]):
        assert {k: v for k, v in ours.items() if k not in ("step_time", "tokens_per_s")} == \
            {k: v for k, v in theirs.items() if k not in ("step_time", "tokens_per_s")}
    for name in live:
        assert torch.equal(live[name], cached[name]), name
    assert live_info["history"][1]["loss"] < live_info["history"][0]["loss"]  # the second step sees the first
    bf16, bf16_info = result(launches, "dpo-bf16")
    assert bf16_info["dtype"] == "torch.bfloat16"
    for ours, theirs in zip(bf16_info["history"], live_info["history"]):
        assert ours["loss"] == pytest.approx(theirs["loss"], abs=2e-3)
    for name in live:
        torch.testing.assert_close(bf16[name].float(), live[name], rtol=2e-2, atol=2e-2)


def test_rpo_step_is_not_dpo_step(launches):
    """The contrast (off-diagonal) terms change the update: the two losses are told apart by the check above."""
    dpo, _ = result(launches, "dpo-tp1dp1")
    rpo, _ = result(launches, "rpo-tp1dp1")
    assert max((dpo[k] - rpo[k]).abs().max().item() for k in dpo) > 1e-3


# ================================================================================== resume after SIGKILL ===
def _metrics(path: Path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_resume_after_sigkill_continues_exactly(launches):
    run = launches / "runs" / "resume"
    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert checkpoints == ["step-00000002", "step-00000004", "step-00000006"]  # no partial .tmp-* left
    reference = _metrics(launches / "runs" / "resume-reference" / "metrics.jsonl")
    resumed = _metrics(run / "metrics.jsonl")
    assert [r["step"] for r in resumed] == [r["step"] for r in reference] == [1, 2, 3, 4, 5, 6]
    timing = {"step_time", "tokens_per_s"}
    for ours, theirs in zip(resumed, reference):
        assert set(ours) == set(theirs)
        for key in set(ours) - timing:
            assert ours[key] == theirs[key], (ours["step"], key)  # bit-identical, not merely close
    assert any("eval/loss" in r for r in resumed[2:])
    assert all(-1 <= r["batch/offdiag_prompt_cosine"] <= 1 for r in resumed)  # --batching related was logged
    assert resumed[-1]["loss"] < resumed[0]["loss"]  # it trained (rmsprop, lr 3e-3)
    ours, info = result(launches, "resume")
    theirs, _ = result(launches, "resume-reference")
    assert info["summary"]["steps_this_run"] == 4
    for name in theirs:
        assert torch.equal(ours[name], theirs[name]), name


# ============================================================================================ run outputs ===
def registry_metric_names(loss_name: str, **options):
    """The metric names the registry's loss reports (by calling it on a small batch)."""
    from rpo.losses import build_loss

    loss = build_loss(loss_name, **options)
    values = torch.tensor([-3.0, -2.0])
    batch = dict(policy_chosen_logps=values, policy_rejected_logps=values - 1, reference_chosen_logps=values,
                 reference_rejected_logps=values, chosen_lengths=torch.tensor([3, 4]),
                 rejected_lengths=torch.tensor([2, 5]), chosen_embeddings=torch.eye(2),
                 rejected_embeddings=torch.eye(2))
    return set(loss(**{k: v for k, v in batch.items() if k in loss.accepted_keywords}).metrics)


def test_three_step_run_writes_metrics_config_curves_final(launches):
    run = launches / "runs" / "run3"
    records = _metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]
    metric_names = registry_metric_names("rpo", beta=BETA, tau=TAU, weighting="embedding")
    assert {"rewards/accuracies", "rewards/margins", "contrast/offdiag_accuracy"} <= metric_names
    for record in records:
        assert metric_names | {"loss", "lr", "grad_norm", "tokens_per_s", "step_time", "step", "epoch"} <= set(record)
        assert all(math.isfinite(record[k]) for k in metric_names | {"loss", "grad_norm", "tokens_per_s"})
    # eval every 2 steps and at the end, with the same metric names under eval/
    assert [r["step"] for r in records if "eval/loss" in r] == [2, 3]
    assert {f"eval/{name}" for name in metric_names} <= set(records[-1])
    assert (run / "curves.png").stat().st_size > 10_000
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000002"]
    log = (launches / "logs" / "equivalence+unpaired+variants+run3+overwrite-rank0.log").read_text()
    assert "writing checkpoint of step 2 ..." in log and f"writing final model {run / 'final'} ..." in log
    # --report-to tensorboard: the same numbers as metrics.jsonl, read back with TensorBoard's own reader
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    for key in ("loss", "grad_norm", "rewards/accuracies", "eval/loss", "contrast/offdiag_accuracy"):
        logged = [(r["step"], r[key]) for r in records if key in r]
        stored = [(e.step, e.value) for e in events.Scalars(key)]
        assert [s for s, _ in stored] == [s for s, _ in logged], key
        assert [v for _, v in stored] == pytest.approx([v for _, v in logged], rel=1e-6), key
    assert set(events.Tags()["scalars"]) == {k for r in records for k in r if k != "step"}
    # config.yaml is the resolved config and loads back
    saved = TrainConfig.from_yaml(run / "config.yaml")
    assert saved.max_steps == 3 and saved.loss == "rpo" and saved.model == str(launches / "tiny-llama")
    # final/ is an HF folder transformers loads, holding the trained weights, with the tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(run / "final")
    trained, _ = result(launches, "run3")
    for name, param in model.state_dict().items():
        assert torch.equal(param, trained[name]), name
    assert not torch.equal(trained["model.norm.weight"], initial_weights(launches)["model.norm.weight"])
    tokenizer = AutoTokenizer.from_pretrained(run / "final")
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    generated = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] == prompt["input_ids"].shape[1] + 4


def test_overwrite_replaces_the_previous_run(launches):
    """A dpo run with --overwrite in an rpo run's folder: the rpo checkpoints and final/ are gone, the log says so,
    and the folder holds the dpo run alone."""
    run = launches / "runs" / "overwrite"
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "curves.png", "loss.json", "metrics.jsonl"]
    assert json.loads((run / "loss.json").read_text())["loss"] == "dpo"
    records = _metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records] == [1]
    assert not any(key.startswith("contrast/") for key in records[0])  # dpo's metrics, not rpo's
    assert TrainConfig.from_yaml(run / "config.yaml").loss == "dpo"
    _, info = result(launches, "overwrite")
    assert info["summary"]["checkpoints"] is None and info["summary"]["final_model"] is None
    log = (launches / "logs" / "equivalence+unpaired+variants+run3+overwrite-rank0.log").read_text()
    assert (f"--overwrite: removed the previous run's metrics.jsonl, config.yaml, final/, checkpoints/, loss.json, "
            f"curves.png from {run}") in log


@pytest.mark.slow
def test_smollm2_rpo_training_lowers_loss_and_raises_reward_accuracy(tmp_path):
    """The embedded default model (SmolLM2-135M-Instruct) on the shared paired data: four rpo --global-contrast
    steps on one batch of 8 pairs. Metrics of step k are measured before update k."""
    workers.start(1, ["smollm2"], tmp_path).wait(timeout=1800).check()
    _, info = result(tmp_path, "smollm2")
    history = info["history"]
    assert [r["step"] for r in history] == [1, 2, 3, 4]
    assert history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at the start
    assert history[-1]["loss"] < history[0]["loss"] - 0.01
    assert history[-1]["rewards/accuracies"] > history[0]["rewards/accuracies"]
    assert history[-1]["rewards/margins"] > 0


# ============================================================================================ config =======
def test_config_precedence_defaults_yaml_command_line(tmp_path):
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump({"loss": "dpo", "beta": 0.3, "lr": 1e-6, "global-contrast": False,
                                           "max_steps": 7}))
    config = TrainConfig.from_cli(["--config", str(config_file), "--beta", "0.2", "--global-batch-size", "32"])
    assert (config.loss, config.beta, config.lr, config.max_steps, config.global_batch_size) == \
        ("dpo", 0.2, 1e-6, 7, 32)
    # untouched options keep the paper's defaults
    defaults = TrainConfig()
    assert (defaults.optimizer, defaults.lr, defaults.global_batch_size, defaults.max_prompt_length,
            defaults.max_length) == ("rmsprop", 5e-7, 64, 256, 512)
    # to_yaml round-trips through --config
    config.to_yaml(tmp_path / "resolved.yaml")
    assert TrainConfig.from_cli(["--config", str(tmp_path / "resolved.yaml")]) == config


def test_help_lists_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        TrainConfig.from_cli(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for name in TrainConfig.field_names():
        flag = "--loss-option" if name == "loss_options" else "--" + name.replace("_", "-")
        assert flag in text, flag
    assert "{rmsprop,adamw,sgd}" in text


@pytest.mark.parametrize("argv, message", [
    (["--lr", "-1"], "--lr: must be > 0.0"),
    (["--lr", "fast"], "--lr: expected a number"),
    (["--optimizer", "adam"], "--optimizer: invalid choice 'adam'"),
    (["--micro-batch-size", "0"], "--micro-batch-size: must be >= 1"),
    (["--max-prompt-length", "600"], "--max-prompt-length (600) must be smaller than --max-length (512)"),
    (["--micro-batch-size", "128"], "--micro-batch-size (128) is larger than --global-batch-size (64)"),
    (["--eval-split-fraction", "1.0"], "--eval-split-fraction: must be < 1.0"),
    (["--alpha", "0.5", "--weighting", "embedding"], "--alpha: loss 'rpo': option alpha applies to weighting="
                                                     "'diagonal' only"),
    (["--loss-option", "beta=0.2"], "use --beta instead"),
    (["--loss-option", "novalue"], "--loss-option expects KEY=VALUE"),
])
def test_invalid_command_line_values_name_the_option(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        TrainConfig.from_cli(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("content, message", [
    ({"learning_rate": 1e-6}, "unknown option 'learning_rate'"),
    ({"lr": "fast"}, "--lr: expected a number, got 'fast'"),
    ({"global_contrast": "yes please"}, "--global-contrast: expected true or false"),
    ({"max_steps": 2.5}, "--max-steps: expected an integer"),
    ({"loss": [["rpo", "heavy"]]}, "--loss: term 0 must be a [name, weight] pair"),
    ([1, 2], "expected a mapping of option: value"),
])
def test_invalid_yaml_names_the_option(tmp_path, content, message):
    config_file = tmp_path / "bad.yaml"
    config_file.write_text(yaml.safe_dump(content))
    with pytest.raises(ConfigError, match=None) as error:
        TrainConfig.from_yaml(config_file)
    assert message in str(error.value)


def test_loss_options_reach_only_the_loss_and_are_checked_by_it():
    from rpo.train.config import build_training_loss

    assert TrainConfig(loss="dpo").loss_settings() == {}  # the loss's own defaults apply
    config = TrainConfig(loss="rpo+0.2*sft", beta=0.2, tau=0.75, global_contrast=True,
                         loss_options={"sft": {}})
    assert config.loss_settings() == {"beta": 0.2, "tau": 0.75, "global_contrast": True, "sft": {}}
    loss = build_training_loss(config)
    assert loss.is_global and (loss.option("beta"), loss.option("tau")) == (0.2, 0.75)
    with pytest.raises(ConfigError, match="^--tau: loss 'dpo' has no option 'tau'"):  # an error, not a silent drop
        build_training_loss(TrainConfig(loss="dpo", tau=0.5))
    with pytest.raises(ConfigError, match="global_contrast"):
        build_training_loss(TrainConfig(loss="dpo", global_contrast=True))
    with pytest.raises(ConfigError, match="^--beta: loss 'rpo': option beta must be > 0, got -1.0"):
        build_training_loss(TrainConfig(loss="rpo", beta=-1.0))
    with pytest.raises(ConfigError, match="^--loss-option length_normalized: loss 'dpo' has no option"):
        build_training_loss(TrainConfig(loss="dpo", loss_options={"length_normalized": True}))


@pytest.mark.parametrize("argv, expected", [
    (["--loss", "rpo", "--global-contrast"], ("reference_columns", 8)),  # K = 8 whatever the layout
    (["--loss", "rpo", "--global-contrast", "--normalization-columns", "32", "--weight-normalization",
      "reference_columns"], ("reference_columns", 32)),
    (["--loss", "rpo", "--global-contrast", "--weight-normalization", "row"], ("row", None)),
    (["--loss", "rpo", "--global-contrast", "--weighting", "diagonal", "--contrast-form", "authors"], ("row", None)),
    (["--loss", "rpo"], ("row", None)),  # the per-rank matrix keeps the paper's rows
    (["--loss", "simpo-rpo", "--global-contrast"], ("reference_columns", 8)),
])
@pytest.mark.parametrize("world_size", ["1", "2", "16"])
def test_global_contrast_default_normalisation(monkeypatch, argv, expected, world_size):
    """The loss a command line trains with does not depend on the launch (WORLD_SIZE), for a single loss and for
    the contrast term of a combination."""
    from rpo.train.config import build_training_loss

    monkeypatch.setenv("WORLD_SIZE", world_size)
    loss = build_training_loss(TrainConfig.from_cli(argv))
    assert (loss.option("weight_normalization"), loss.option("normalization_columns")) == expected
    combined = build_training_loss(TrainConfig.from_cli(["--loss", "rpo+0.5*dpo", "--global-contrast"]))
    rpo_options = combined.terms[0][2].options
    assert (rpo_options["weight_normalization"], rpo_options["normalization_columns"]) == ("reference_columns", 8)


def test_batch_layout_divides_or_names_the_options():
    config = TrainConfig(global_batch_size=64, micro_batch_size=8)
    assert config.batch_layout(1) == 8 and config.batch_layout(8) == 1
    with pytest.raises(ConfigError, match="--global-batch-size .64. must be a multiple of --micro-batch-size"):
        config.batch_layout(3)


# ============================================================================ schedule / checkpoint codec ===
def test_lr_schedule_warmup_then_cosine_closed_form():
    from rpo.train.optim import lr_factor

    kwargs = dict(warmup_steps=4, total_steps=12, min_lr_ratio=0.1)
    assert [lr_factor(k, schedule="constant", **kwargs) for k in (1, 2, 4, 5, 12)] == [0.25, 0.5, 1.0, 1.0, 1.0]
    cosine = [lr_factor(k, schedule="cosine", **kwargs) for k in range(1, 13)]
    expected = [k / 4 for k in range(1, 5)] + [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (k - 5) / 8))
                                               for k in range(5, 13)]
    assert cosine == pytest.approx(expected, abs=1e-12)
    assert cosine[4] == 1.0 and cosine[-1] > 0.1  # the last update still learns


def test_checkpoint_codec_round_trips_optimizer_and_rng_state(tmp_path):
    import random

    import numpy as np

    from rpo.train.checkpoint import load_nested, rng_state, save_nested

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.RMSprop(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    state = {"optimizer": optimizer.state_dict(), "rng": rng_state(), "misc": (1, [2.5, None], {3: "x"})}
    save_nested(state, tmp_path / "state")
    assert not list(tmp_path.glob("*.pt"))  # safetensors + JSON only, nothing pickled
    loaded = load_nested(tmp_path / "state")
    assert loaded["misc"] == (1, [2.5, None], {3: "x"})
    restored = torch.optim.RMSprop(model.parameters(), lr=0.1)
    restored.load_state_dict(loaded["optimizer"])
    for key, value in optimizer.state_dict()["state"][0].items():
        assert torch.equal(torch.as_tensor(value), torch.as_tensor(restored.state_dict()["state"][0][key]))
    draws = (random.random(), np.random.rand(), torch.rand(3))
    random.setstate(loaded["rng"]["python"])
    np.random.set_state(loaded["rng"]["numpy"])
    torch.set_rng_state(loaded["rng"]["torch"])
    assert (random.random(), np.random.rand()) == draws[:2] and torch.equal(torch.rand(3), draws[2])
