"""The trainer's scale options (rpo.train.scale): --recompute, --packing, --distributed-optimizer,
--sequence-parallel, --plan.

Two launches of tests/train/scale_workers.py through tests/multirank.py (2 gloo ranks; the first runs every
equivalence case, then a distributed-optimizer run that SIGKILLs itself after step 3, the second resumes it), and
one of 4 ranks for --sequence-parallel at TP=2 x DP=2.
Each option is held to the run without it (the baseline, itself checked against float64 in test_trainer.py).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import scale_workers as sw
import trainer_workers as tw
from rpo.train import ConfigError, TrainConfig, Trainer



@pytest.fixture(scope="module")
def launches(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("scale")
    sw.build_assets(workdir)
    first = sw.start(["equivalence", "sequence_parallel", "kept_graphs", "distributed_optimizer",
                      "resume_reference", "resume_killed"], workdir)
    first.wait(timeout=1800).check([-9, -9])  # killed by its own ranks after step 3 of the last case
    sw.start(["resume_continue"], workdir).wait().check()
    return workdir


def _result(workdir: Path, name: str):
    from safetensors.torch import load_file

    weights = load_file(str(workdir / "results" / f"{name}.safetensors"))
    return weights, json.loads((workdir / "results" / f"{name}.json").read_text())


def initial_weights(workdir: Path, model: str):
    from safetensors.torch import load_file

    return load_file(str(workdir / f"tiny-{model}" / "model.safetensors"))


def assert_same_step(workdir: Path, name: str, baseline: str, model: str, lr: float, atol: float = 1e-5) -> None:
    """Loss, gradient norm, gradients g = (θ0 − θ1)/lr (SGD; the update for Adam) and parameters equal (to
    `atol`)."""
    ours, ours_info = _result(workdir, name)
    theirs, theirs_info = _result(workdir, baseline)
    before = initial_weights(workdir, model)
    assert set(ours) == set(theirs) == set(before), name
    ours_log, theirs_log = ours_info["history"][0], theirs_info["history"][0]
    assert ours_log["loss"] == pytest.approx(theirs_log["loss"], abs=1e-6), name
    assert ours_log["grad_norm"] == pytest.approx(theirs_log["grad_norm"], rel=1e-5), name
    moved = max((theirs[key] - before[key]).abs().max().item() for key in before)
    assert moved > 1e-3, baseline  # the step is not trivially zero
    for key in before:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=atol, msg=f"{name} {key}")
        torch.testing.assert_close((before[key] - ours[key]) / lr, (before[key] - theirs[key]) / lr, rtol=0,
                                   atol=atol, msg=f"{name} gradient {key}")


CASES = [("llama", "selective"), ("llama", "full"), ("llama", "packing"), ("mistral", "packing")]


@pytest.mark.parametrize("model, variant", CASES, ids=[f"{m}-{v}" for m, v in CASES])
@pytest.mark.parametrize("loss", sw.LOSSES)
def test_option_leaves_the_sgd_step_unchanged(launches, model, variant, loss):
    """At TP=2/DP=1 and TP=1/DP=2, two micro-batches per rank (two-pass global contrast for rpo): the step with
    recomputation or packing is the baseline's."""
    for tp, dp in sw.TOPOLOGIES:
        assert_same_step(launches, sw.run_name(model, loss, variant, tp, dp),
                         sw.run_name(model, loss, "baseline", tp, dp), model, tw.SGD_LR)


SP_CASES = [("llama", variant) for variant in sw.SP_VARIANTS] + [("mistral", v) for v in sw.MISTRAL_SP_VARIANTS]


@pytest.mark.parametrize("model, variant", SP_CASES, ids=[f"{m}-{v}" for m, v in SP_CASES])
@pytest.mark.parametrize("loss", sw.LOSSES)
def test_sequence_parallel_leaves_the_sgd_step_unchanged(launches, model, variant, loss):
    """TP=2, DP=1, two micro-batches (two-pass global contrast for rpo): with the sequence split over the two TP
    ranks (alone, with --packing, with --recompute selective or full) the step is the baseline's at the same TP."""
    assert_same_step(launches, sw.run_name(model, loss, variant, 2, 1),
                     sw.run_name(model, loss, "baseline", 2, 1), model, tw.SGD_LR)


# ================================================================ the global contrast's kept graphs ===
def _kept(workdir: Path, name: str):
    info = _result(workdir, name)[1]
    return info["kept_graphs"], tuple(info["last_kept"])


@pytest.mark.parametrize("variant", sw.KEPT_VARIANTS)
def test_kept_graphs_equal_the_two_pass_step(launches, variant):
    """rpo --global-contrast, two micro-batches per rank at TP=2/DP=1 and TP=1/DP=2 (alone, with --recompute
    selective or full, with --packing): keeping both micro-batches' graphs (the default here) takes the step of
    re-running both (--keep-graphs 0, the two-pass path), to 1e-6 in loss, gradients and parameters."""
    for tp, dp in sw.TOPOLOGIES:
        kept = sw.run_name("llama", "rpo", variant, tp, dp)
        assert _kept(launches, kept) == (2, (True, True))
        assert _kept(launches, sw.run_name("llama", "rpo", sw.rerun(variant), tp, dp)) == (0, (False, False))
        assert_same_step(launches, kept, sw.run_name("llama", "rpo", sw.rerun(variant), tp, dp), "llama", tw.SGD_LR,
                         atol=1e-6)


@pytest.mark.parametrize("variant", sw.KEPT_SP_VARIANTS)
def test_kept_graphs_equal_the_two_pass_step_with_sequence_parallelism(launches, variant):
    kept = sw.run_name("llama", "rpo", variant, 2, 1)
    assert _kept(launches, kept) == (2, (True, True))
    assert_same_step(launches, kept, sw.run_name("llama", "rpo", sw.rerun(variant), 2, 1), "llama", tw.SGD_LR,
                     atol=1e-6)


def test_kept_graphs_follow_the_memory_bound(launches):
    """4 micro-batches per rank (TP=1/DP=2): every graph kept when the memory plan fits them (this machine), the
    first 2 with --keep-graphs 2, the first 3 in a device memory that the plan fills with 3.5 graphs, none with
    --keep-graphs 0; the step is the same each time (1e-6)."""
    expected = {"auto": (True,) * 4, "bound2": (True, True, False, False), "memory3": (True, True, True, False),
                "rerun": (False,) * 4}
    for label, modes in expected.items():
        assert _kept(launches, f"llama-rpo-4mb-{label}-tp1dp2") == (sum(modes), modes), label
        if label != "rerun":
            assert_same_step(launches, f"llama-rpo-4mb-{label}-tp1dp2", "llama-rpo-4mb-rerun-tp1dp2", "llama",
                             tw.SGD_LR, atol=1e-6)


def test_kept_graph_count_is_the_plans_arithmetic():
    from rpo.models.memory_plan import estimate_memory
    from rpo.train.scale import KEPT_GRAPHS_MEMORY_FRACTION, kept_graph_count

    shape = dict(model_type="llama", num_hidden_layers=4, hidden_size=256, num_attention_heads=8,
                 num_key_value_heads=4, intermediate_size=512, vocab_size=32000)
    for recompute in ("none", "full"):
        plan = estimate_memory(shape, micro_batch_pairs=2, max_length=256, prompt_length=128, recompute=recompute)
        fixed = plan.persistent + plan.overhead
        for graphs in range(1, 6):
            peak = fixed + max(graphs * plan.activations + plan.logprob_chunk + plan.working, plan.optimizer_step)
            memory = peak / KEPT_GRAPHS_MEMORY_FRACTION
            assert kept_graph_count(plan, 8, memory * (1 + 1e-12)) == graphs  # just fits
            assert kept_graph_count(plan, 8, memory * (1 - 1e-9)) == max(1, graphs - 1)
            assert kept_graph_count(plan, 8, memory * (1 + 1e-12), bound=2) == min(graphs, 2)
            assert kept_graph_count(plan, graphs - 1 or 1, memory) == (graphs - 1 or 1)  # at most the micro-batches
        assert kept_graph_count(plan, 8, 1.0) == 1  # nothing fits: one graph, what any accumulated step holds
        assert kept_graph_count(plan, 8, 1.0, bound=0) == 0
        assert kept_graph_count(plan, 8, None) == 8
    # full recomputation keeps only each layer's input: many more graphs fit in the same memory
    none, full = (estimate_memory(shape, micro_batch_pairs=2, max_length=256, prompt_length=128, recompute=mode)
                  for mode in ("none", "full"))
    memory = (none.persistent + none.overhead + 3.5 * none.activations + none.logprob_chunk
              + none.working) / KEPT_GRAPHS_MEMORY_FRACTION
    assert kept_graph_count(none, 64, memory) == 3 and kept_graph_count(full, 64, memory) > 12


@pytest.fixture(scope="module")
def sp_dp2(launches):
    sw.start(["sequence_parallel_dp2"], launches, world_size=4).wait().check()
    return launches


@pytest.mark.parametrize("loss", sw.LOSSES)
def test_sequence_parallel_at_tp2_dp2(sp_dp2, loss):
    """4 ranks, TP=2 x DP=2, two micro-batches per rank: the same step with and without --sequence-parallel."""
    assert_same_step(sp_dp2, sw.run_name("llama", loss, "sp", 2, 2), sw.run_name("llama", loss, "baseline", 2, 2),
                     "llama", tw.SGD_LR)


def test_packing_logs_the_padding_it_removed(launches):
    for tp, dp in sw.TOPOLOGIES:
        for model in ("llama", "mistral"):
            for loss in sw.LOSSES:
                packed = _result(launches, sw.run_name(model, loss, "packing", tp, dp))[1]["history"][0]
                plain = _result(launches, sw.run_name(model, loss, "baseline", tp, dp))[1]["history"][0]
                assert 0 < packed["packing/padding_removed"] < 1
                assert "packing/padding_removed" not in plain
    # The answers of the varied data have different lengths, so the unpacked rows hold padding at all.
    lengths = _varied_lengths(launches)
    assert len(set(lengths)) > 4 and max(lengths) <= tw.MAX_LENGTH < sw.PACK_LENGTH


def _varied_lengths(workdir: Path):
    from transformers import AutoTokenizer

    from rpo.data import load_preference_dataset, tokenize_preference_dataset

    tokenized = tokenize_preference_dataset(
        load_preference_dataset(workdir / sw.VARIED_DATA), AutoTokenizer.from_pretrained(workdir / "tiny-llama"),
        max_prompt_length=tw.MAX_PROMPT_LENGTH, max_length=tw.MAX_LENGTH)
    return [len(ids) for field in ("chosen", "rejected") for ids in tokenized.rows[f"{field}_input_ids"]]


# ============================================================================== distributed optimizer ===
@pytest.mark.parametrize("loss", sw.LOSSES)
def test_distributed_optimizer_step_equals_the_replicated_one(launches, loss):
    """AdamW at DP=2: the optimizer state sharded over the two ranks takes the same step as a full copy on each."""
    assert_same_step(launches, sw.run_name("llama", loss, "distributed", 1, 2),
                     sw.run_name("llama", loss, "adamw", 1, 2), "llama", sw.ADAMW["lr"])


def _metrics(path: Path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_distributed_optimizer_resume_after_sigkill_continues_exactly(launches):
    from transformers import AutoModelForCausalLM

    from rpo.models import padded_vocab_size
    from rpo.train.checkpoint import load_nested

    run = launches / "runs" / "distopt-resume"
    reference = _metrics(launches / "runs" / "distopt-resume-reference" / "metrics.jsonl")
    resumed = _metrics(run / "metrics.jsonl")
    assert [r["step"] for r in resumed] == [r["step"] for r in reference] == [1, 2, 3, 4, 5, 6]
    for ours, theirs in zip(resumed, reference):
        assert set(ours) == set(theirs)
        for key in set(ours) - {"step_time", "tokens_per_s"}:
            assert ours[key] == theirs[key], (ours["step"], key)  # bit-identical
    assert resumed[-1]["loss"] < resumed[0]["loss"]
    ours, info = _result(launches, "distopt-resume")
    theirs, _ = _result(launches, "distopt-resume-reference")
    assert info["summary"]["steps_this_run"] == 4 and info["dtype"] == "torch.bfloat16"
    for name in theirs:
        assert torch.equal(ours[name], theirs[name]), name
    # Each data-parallel rank wrote its own shard: fp32 master weights (of the bf16 model) split between them.
    checkpoint = run / "checkpoints" / "step-00000006"
    shards = [load_nested(checkpoint / f"optimizer-tp00-dp{dp:02d}")["optimizer"] for dp in range(2)]
    assert not (checkpoint / "optimizer-tp00.json").exists()
    sizes = [sum(p.numel() for p in shard["main_params"]) for shard in shards]
    vocab, hidden = ours["model.embed_tokens.weight"].shape  # megatron pads the vocabulary of both matrices
    total = sum(p.numel() for p in ours.values()) + 2 * (padded_vocab_size(vocab, 1) - vocab) * hidden
    assert sum(sizes) == total and max(sizes) < total
    assert all(p.dtype == torch.float32 for shard in shards for p in shard["main_params"])
    # final/ is a plain HF folder with the trained weights (all in bf16: the local spec keeps fp32 norm weights).
    model = AutoModelForCausalLM.from_pretrained(run / "final", dtype=torch.bfloat16)
    for name, param in model.state_dict().items():
        assert torch.equal(param, ours[name].to(torch.bfloat16)), name


# ============================================================================================ errors ===
@pytest.mark.parametrize("options, message", [
    (dict(packing=True, pack_length=100), "--pack-length (100) must be at least --max-length (512)"),
    (dict(pack_length=600), "--pack-length 600 applies with --packing only"),
    (dict(distributed_optimizer=True), "--distributed-optimizer: megatron-core's DistributedOptimizer supports "
                                       "only Adam-type optimisers; use --optimizer adamw (got --optimizer rmsprop)"),
    (dict(distributed_optimizer=True, optimizer="sgd"), "use --optimizer adamw (got --optimizer sgd)"),
    (dict(sequence_parallel=True), "--sequence-parallel splits the sequence over the tensor-parallel group: it "
                                   "needs --tensor-parallel > 1 (got 1)"),
    (dict(gpu_memory_gb=80.0), "--gpu-memory-gb applies with --plan only"),
    (dict(plan_gpus=8), "--plan-gpus applies with --plan only"),
    (dict(plan=True), "--plan prints the memory estimate without training"),
])
def test_invalid_scale_option_combinations_name_the_option(options, message):
    with pytest.raises(ConfigError) as error:
        Trainer(TrainConfig(**options))
    assert message in str(error.value)


def test_scale_options_reach_the_command_line():
    config = TrainConfig.from_cli(["--recompute", "full", "--packing", "--pack-length", "1024",
                                   "--distributed-optimizer", "--optimizer", "adamw"])
    assert (config.recompute, config.packing, config.pack_length, config.distributed_optimizer) == \
        ("full", True, 1024, True)
    from rpo.train.scale import check_scale_options, pack_length

    sequence_parallel = TrainConfig.from_cli(["--sequence-parallel", "--tensor-parallel", "2"])
    assert sequence_parallel.sequence_parallel
    check_scale_options(sequence_parallel)  # trained since issue 13 (test_sequence_parallel_* above)
    assert pack_length(config) == 1024
    assert pack_length(TrainConfig(packing=True, max_length=256, max_prompt_length=128)) == 256
    assert pack_length(TrainConfig()) is None
    assert math.isclose(TrainConfig(plan=True, gpu_memory_gb=80).gpu_memory_gb, 80.0)


# ============================================================================================== --plan ===
def test_plan_prints_the_memory_components_and_does_not_train(tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    from rpo.train.cli import main

    config = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    config.save_pretrained(tmp_path / "model")  # config.json only: --plan reads no weights
    parameters = sum(p.numel() for p in LlamaForCausalLM(config).parameters())
    run = tmp_path / "run"
    argv = ["--plan", "--model", str(tmp_path / "model"), "--output-dir", str(run), "--tensor-parallel", "2",
            "--plan-gpus", "8", "--recompute", "selective", "--distributed-optimizer", "--optimizer", "adamw"]
    assert main(argv + ["--gpu-memory-gb", "80"]) == 0
    text = capsys.readouterr().out
    for component in ("parameters", "gradients", "master weights", "optimizer state", "reference model",
                      "activations", "log-prob chunk", "peak"):
        assert f"\n  {component} " in text, component
    assert f"of {parameters:,}" in text  # the HF model's own parameter count
    assert "TP=2 DP=4" in text and "recompute=selective" in text and "sharded over DP=4" in text
    assert "fits in 80 GiB" in text
    assert main(argv + ["--gpu-memory-gb", "0.0001"]) == 0
    assert "does NOT fit in 0.0001 GiB" in capsys.readouterr().out
    assert main(argv + ["--sequence-parallel"]) == 0
    assert "sequence parallel on" in capsys.readouterr().out
    assert not run.exists()  # nothing was trained or written


def test_plan_reports_the_global_contrasts_kept_graphs(tmp_path, capsys):
    from transformers import LlamaConfig

    from rpo.train.cli import main

    LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2).save_pretrained(tmp_path / "model")
    argv = ["--plan", "--model", str(tmp_path / "model"), "--output-dir", str(tmp_path / "run"), "--loss", "rpo",
            "--global-contrast", "--global-batch-size", "16", "--micro-batch-size", "2", "--plan-gpus", "2"]
    assert main(argv + ["--gpu-memory-gb", "80"]) == 0
    assert "global contrast over 4 micro-batches per GPU: graphs of 4 kept (one forward each), 0 re-run" in \
        capsys.readouterr().out
    assert main(argv + ["--gpu-memory-gb", "80", "--keep-graphs", "1"]) == 0
    assert "--keep-graphs 1: graphs of 1 kept (one forward each), 3 re-run" in capsys.readouterr().out
    assert main(argv) == 0
    assert "graphs kept: as many as fit in the GPU's memory (pass --gpu-memory-gb to see how many)" in \
        capsys.readouterr().out
    assert main(argv[:-2] + ["--plan-gpus", "8", "--gpu-memory-gb", "80"]) == 0  # 1 micro-batch per GPU: no line
    assert "global contrast over" not in capsys.readouterr().out
