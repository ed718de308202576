"""rpo.integrations.trl against independent references, on a tiny random float64 LLaMA (CPU, trl==1.16.0):

- on a fixed batch RPOTrainer's loss, gradients and metrics equal rpo.losses called on log-probs computed here
  from the model's plain logits (not TRL's fused head), for a contrast loss with embedding weights, a
  reference-free one and a combination; TRL's precomputed reference log-probs give the same loss;
- 2 gloo ranks with the global contrast give, after accelerate/DDP's gradient averaging, the gradients and
  logged metrics of 1 process on the same 8 pairs;
- LoRA: the adapter trains, the base weights do not move, the reference is the base model (adapter disabled),
  and the saved adapter loads with PEFT into the trained model's outputs.

TRL is not a dependency of the core: where this interpreter has no trl/peft, each test runs itself in the TRL
environment ($RPO_TRL_PYTHON, default benchmarks/results/.venv-trl/bin/python, e.g. `make bench-trl`'s) in a
subprocess, and skips, naming that command, when there is no such environment either.
"""
from __future__ import annotations

import copy
import functools
import importlib.util
import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import multirank
import trl_tiny

REPO = Path(__file__).resolve().parents[2]
TRL_VERSION, PEFT_VERSION = "1.16.0", "0.21.2"
# The interpreter of an environment with TRL: $RPO_TRL_PYTHON, else the one `make bench-trl` makes.
TRL_PYTHON = Path(os.environ.get("RPO_TRL_PYTHON") or REPO / "benchmarks" / "results" / ".venv-trl" / "bin" / "python")
HAVE_TRL = all(importlib.util.find_spec(name) is not None for name in ("trl", "peft"))
TOLERANCE = dict(rtol=1e-6, atol=1e-6)
SUBPROCESS_TIMEOUT_S = 300


def in_trl_environment(test):
    """Run `test` here when trl and peft import, else in the TRL environment's interpreter (one pytest
    subprocess for this test), else skip naming the command that makes that environment."""
    if HAVE_TRL:
        return test

    @functools.wraps(test)
    def run_in_trl_environment(request, **_fixtures):
        if not TRL_PYTHON.is_file():
            pytest.skip(f"trl=={TRL_VERSION} and peft=={PEFT_VERSION} are not importable here and the TRL "
                        f"environment {TRL_PYTHON} does not exist; `make install` puts them in .venv (requirements.txt)")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        result = subprocess.run([str(TRL_PYTHON), "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                                 request.node.nodeid], cwd=REPO, env=env, capture_output=True, text=True,
                                timeout=SUBPROCESS_TIMEOUT_S)
        assert result.returncode == 0, (f"{request.node.nodeid} failed in {TRL_PYTHON} (exit "
                                        f"{result.returncode}):\n{result.stdout[-6000:]}\n{result.stderr[-3000:]}")

    # pytest reads fixtures and parameters from the signature; `request` names the test for the subprocess.
    parameters = [p for p in inspect.signature(test).parameters.values() if p.name != "request"]
    run_in_trl_environment.__signature__ = inspect.Signature(
        [inspect.Parameter("request", inspect.Parameter.POSITIONAL_OR_KEYWORD), *parameters])
    return run_in_trl_environment


def prompt_embeddings(prompts):
    """The MiniLM embeddings computed here with sentence-transformers itself (no rpo cache), L2-normalised."""
    from rpo.data import load_sentence_transformer

    encoder = load_sentence_transformer()
    return encoder.encode(list(prompts), convert_to_tensor=True, normalize_embeddings=True).float().cpu()


def fixed_batch(trainer):
    """All pairs in data-set order, through the trainer's own collator (with the prompt embeddings)."""
    return trainer.data_collator([trainer.train_dataset[i] for i in range(len(trainer.train_dataset))])


def make_trainer(tmp_path, loss, policy, reference=None, **overrides):
    from rpo.integrations.trl import RPOTrainer

    peft_config = overrides.pop("peft_config", None)
    return RPOTrainer(policy, ref_model=reference, args=trl_tiny.dpo_config(tmp_path / "out", **overrides),
                      train_dataset=trl_tiny.preference_dataset(), processing_class=trl_tiny.tiny_tokenizer(),
                      loss=loss, embedding_cache_dir=str(tmp_path / "embeddings"), peft_config=peft_config)


def assert_metrics_equal(logged: dict, expected: dict) -> None:
    for name, value in expected.items():
        assert logged[name] == pytest.approx(float(value), rel=1e-6, abs=1e-6), name


@in_trl_environment
@pytest.mark.parametrize("spec", ["rpo", "simpo-rpo", "rpo+0.2*sft"])
def test_trl_loss_and_gradients_equal_rpo_losses(tmp_path, spec):
    from rpo.losses import build_loss

    policy, reference = trl_tiny.tiny_llama(0), trl_tiny.tiny_llama(1)
    trainer = make_trainer(tmp_path, spec, policy, reference)
    batch = fixed_batch(trainer)
    value = trainer.compute_loss(trainer.model, batch)
    value.backward()
    trl_gradients = trl_tiny.gradients(policy)
    logged = {name: values[-1] for name, values in trainer._metrics["train"].items()}
    policy.zero_grad()

    loss = build_loss(spec, beta=0.1)  # DPOConfig's beta, passed by the trainer to every loss taking one
    embeddings = prompt_embeddings(trainer.train_dataset["prompt"]) if loss.needs_embeddings else None
    expected = trl_tiny.reference_loss(loss, policy, reference, batch, embeddings)
    expected.loss.backward()
    torch.testing.assert_close(value.detach().double(), expected.loss.detach().double(), **TOLERANCE)
    reference_gradients = trl_tiny.gradients(policy)
    assert reference_gradients.keys() == trl_gradients.keys() and len(trl_gradients) > 10
    for name, gradient in reference_gradients.items():
        torch.testing.assert_close(trl_gradients[name], gradient, **TOLERANCE, msg=name)
    assert_metrics_equal(logged, expected.metrics)
    assert {"rewards/accuracies", "rewards/margins", "logps/chosen", "entropy", "logits/chosen",
            "mean_token_accuracy", "num_tokens"} <= logged.keys()
    if spec.startswith("rpo"):
        assert {"contrast/effective_beta", "contrast/offdiag_accuracy"} <= logged.keys()


# (name, RPOTrainer's loss and options, the same for rpo's trainer): the contrast per batch, the global default (6
# pairs, so its 8-column scale is not the row normalisation), a combination with a token mean, a loss whose own β
# default differs from DPOConfig's (which RPOTrainer hands over), and dpo.
MATCH_PAIRS = 6
MATCH_CASES = [
    ("rpo", "rpo", {}, dict(loss="rpo")),
    ("rpo-global", "rpo", dict(global_contrast=True), dict(loss="rpo", global_contrast=True)),
    ("rpo-sft-global", "rpo+0.2*sft", dict(global_contrast=True), dict(loss="rpo+0.2*sft", global_contrast=True)),
    ("simpo-rpo", "simpo-rpo", {}, dict(loss="simpo-rpo", beta=0.1)),  # DPOConfig's beta: 0.1
    ("dpo", "dpo", {}, dict(loss="dpo")),
]


@pytest.fixture(scope="module")
def trainer_first_losses(tmp_path_factory):
    """The first-step losses of rpo's Megatron trainer (one process, one micro-batch) on the same model, reference,
    rows and options."""
    import json

    import trainer_match_worker as worker

    workdir = tmp_path_factory.mktemp("trainer_match")
    worker.write_assets(workdir, MATCH_PAIRS)
    cases = [{"name": name, "options": options} for name, _, _, options in MATCH_CASES]
    multirank.launch(Path(worker.__file__), 1, args=[workdir, json.dumps(cases)], log_dir=workdir / "logs",
                     timeout=600).check()
    return {name: json.loads((workdir / "results" / f"{name}.json").read_text())["loss"]
            for name, _, _, _ in MATCH_CASES}


@in_trl_environment
@pytest.mark.parametrize("case", MATCH_CASES, ids=[case[0] for case in MATCH_CASES])
def test_rpo_trainer_first_step_loss_equals_the_megatron_trainers(tmp_path, trainer_first_losses, case):
    """RPOTrainer and rpo's trainer build the loss by the same rules (rpo.losses.resolve_loss): on the same rows
    (conversational, one chat template) and options their first-step losses agree to 1e-5."""
    from datasets import Dataset

    from rpo.integrations.trl import RPOTrainer

    name, spec, options, _ = case
    policy, reference = trl_tiny.tiny_llama(0), trl_tiny.tiny_llama(1)
    trainer = RPOTrainer(policy, ref_model=reference,
                         args=trl_tiny.dpo_config(tmp_path / "out", per_device_train_batch_size=MATCH_PAIRS),
                         train_dataset=Dataset.from_list(trl_tiny.conversational_dataset(MATCH_PAIRS)),
                         processing_class=trl_tiny.chat_tokenizer(), loss=spec, loss_options=options,
                         embedding_cache_dir=str(tmp_path / "embeddings"))
    with torch.no_grad():
        value = trainer.compute_loss(trainer.model, fixed_batch(trainer)).item()
    assert value == pytest.approx(trainer_first_losses[name], abs=1e-5), name


@in_trl_environment
def test_precomputed_reference_logps_are_used(tmp_path):
    from rpo.losses import build_loss

    policy, reference = trl_tiny.tiny_llama(0), trl_tiny.tiny_llama(1)
    original_reference = copy.deepcopy(reference)
    trainer = make_trainer(tmp_path, "rpo", policy, reference, precompute_ref_log_probs=True)
    assert "ref_chosen_logps" in trainer.train_dataset.column_names
    with torch.no_grad():  # a live reference forward would now give other log-probs than the precomputed ones
        reference.lm_head.weight.add_(1.0)
    batch = fixed_batch(trainer)
    value = trainer.compute_loss(trainer.model, batch)
    expected = trl_tiny.reference_loss(build_loss("rpo", beta=0.1), policy, original_reference, batch,
                                       prompt_embeddings(trainer.train_dataset["prompt"]))
    torch.testing.assert_close(value.detach().double(), expected.loss.detach().double(), **TOLERANCE)


@in_trl_environment
def test_global_contrast_over_two_ranks_gives_single_process_gradients(tmp_path):
    import trl_global_contrast_worker as worker

    double = multirank.start(worker.__file__, 2, args=[tmp_path / "double"], log_dir=tmp_path / "logs")
    try:  # the 1-process reference runs here meanwhile
        expected = worker.train_one_step(tmp_path / "single", 1)
    except BaseException:
        double.kill()
        raise
    double.wait(timeout=240).check()
    for rank in range(2):
        got = torch.load(tmp_path / "double" / f"rank{rank}-of-2.pt")
        assert got["gradients"].keys() == expected["gradients"].keys()
        for name, gradient in expected["gradients"].items():
            torch.testing.assert_close(got["gradients"][name], gradient, **TOLERANCE, msg=name)
        metrics = {name: value for name, value in expected["logged"].items()
                   if name.startswith(("rewards/", "logps/", "contrast/", "loss", "entropy", "num_tokens"))}
        assert "contrast/effective_contrasts" in metrics and "rewards/accuracies" in metrics
        assert_metrics_equal(got["logged"], metrics)


@in_trl_environment
def test_lora_trains_the_adapter_against_the_base_model_and_saves_it(tmp_path):
    from peft import LoraConfig, PeftModel

    policy = trl_tiny.tiny_llama(0)
    base = copy.deepcopy(policy)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"],
                      task_type="CAUSAL_LM")
    trainer = make_trainer(tmp_path, "rpo", policy, peft_config=lora, max_steps=3, learning_rate=0.5)
    assert trainer.ref_model is None  # the reference is the base model: the adapter disabled
    before = {name: param.detach().clone() for name, param in trainer.model.named_parameters()}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    adapter = [name for name in before if "lora_" in name]
    assert adapter and all(after[name].requires_grad for name in adapter)
    assert all(not torch.equal(before[name], after[name]) for name in adapter)
    assert all(torch.equal(before[name], after[name]) for name in before if "lora_" not in name)

    batch = fixed_batch(trainer)
    trained = trainer.model.eval()
    with torch.no_grad():
        ref_chosen, ref_rejected = trainer.compute_ref_log_probs(trained, batch)
        base_logps, _ = trl_tiny.sequence_logps(base, batch)
        trained_logps, _ = trl_tiny.sequence_logps(trained, batch)
    torch.testing.assert_close(torch.cat([ref_chosen, ref_rejected]).double(), base_logps, **TOLERANCE)
    assert (trained_logps - base_logps).abs().max() > 1e-3  # the adapter changed the policy

    trainer.save_model(str(tmp_path / "adapter"))
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        loaded_logps, _ = trl_tiny.sequence_logps(loaded, batch)
    torch.testing.assert_close(loaded_logps, trained_logps, **TOLERANCE)


@in_trl_environment
def test_trl_loss_options_and_cli_errors(tmp_path):
    from trl import TrlParser

    from rpo.integrations.trl import RPOConfig, RPOTrainer

    def trainer(**config):
        args = trl_tiny.dpo_config(tmp_path / "out", **config.pop("dpo", {}))
        return RPOTrainer(trl_tiny.tiny_llama(0), args=args, train_dataset=trl_tiny.preference_dataset(),
                          processing_class=trl_tiny.tiny_tokenizer(), **config)

    with pytest.raises(ValueError, match=r"loss_type=\['hinge'\].*would be ignored"):
        trainer(dpo={"loss_type": "hinge"})
    with pytest.raises(ValueError, match="'dpo' has no option 'global_contrast'"):
        trainer(loss="dpo", global_contrast=True)
    with pytest.raises(ValueError, match="has no option 'tua'"):
        trainer(loss="rpo", loss_options={"tua": 0.5})
    (args,) = TrlParser((RPOConfig,)).parse_args_and_config(
        args=["--output_dir", str(tmp_path), "--rpo_loss", "simpo-rpo", "--rpo_loss_options",
              '{"margin": 0.3, "weighting": "uniform"}', "--beta", "2.0", "--report_to", "none", "--use_cpu"])
    assert (args.rpo_loss, args.rpo_loss_options, args.beta) == ("simpo-rpo", {"margin": 0.3, "weighting": "uniform"},
                                                                 2.0)
    with pytest.raises(ValueError, match="rpo_loss_options must be a JSON object"):
        RPOConfig(output_dir=str(tmp_path), rpo_loss_options="{margin: 1}", report_to="none", use_cpu=True)
