"""The memory plan (rpo.models.memory_plan) against the measured peak of real training steps, on CPU.

Per configuration, in a fresh process: a tiny random LLaMA/Mistral built by rpo.models.build_gpt_model (megatron-core
local layers: rpo.models.local_layers), wrapped in megatron's DistributedDataParallel with the trainer's
DistributedDataParallelConfig (fp32 gradient buffer), the trainer's optimiser (rpo.train.optim.TrainOptimizer),
the frozen reference copy when the configuration keeps one, then two trainer-like steps: policy log-probs with
grad (rpo.models.sequence_logprobs, chunked), reference log-probs without, a DPO loss, backward, gradient sync,
optimiser step. The second step is the steady state (the optimiser creates its state lazily in the first).

Measured: the rise of the process's peak resident set over the whole block (model build to the end of the
second step) above the resident set before it (benchmarks/_common.PeakMemory, with glibc's malloc caching
limited so freed tensors leave the resident set). On CPU the Python/torch baseline dwarfs a small model, so only
the increment is compared, after a warm-up step of a one-layer model has loaded the libraries' lazy state.
Planned: estimate_memory(..., device="cpu") (no CUDA overhead, per-tensor optimiser loops).

Recomputation: when build_gpt_model has no `recompute` argument yet, megatron's own recompute settings are put
into the TransformerConfig that rpo.models.gpt builds (recompute_granularity="selective", or "full" with the
uniform method, one layer per checkpoint), which is what the trainer's --recompute will select.

    .venv/bin/python benchmarks/memory_plan.py [--configs llama-none mistral-full llama-bf16-selective] [--out PATH]
    .venv/bin/python benchmarks/memory_plan.py --scaling [--attention flash] [--reference precomputed] [--no-foreach]
                                            (the plan only, for 7B-70B at the paper's setting)
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import inspect
import os
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

import torch  # noqa: E402

# Tens of MB of parameters each; every row differs in model family, dtype, recompute, optimiser and reference.
CONFIGS = {
    "llama-none": dict(
        model=dict(model_type="llama", num_hidden_layers=4, hidden_size=256, num_attention_heads=8,
                   num_key_value_heads=4, intermediate_size=688, vocab_size=32001, tie_word_embeddings=False),
        pairs=2, length=256, prompt=128, dtype="float32", optimizer="rmsprop", momentum=0.0, reference="kept",
        recompute="none", chunk=1024),
    "mistral-full": dict(
        model=dict(model_type="mistral", num_hidden_layers=6, hidden_size=256, num_attention_heads=8,
                   num_key_value_heads=2, intermediate_size=768, vocab_size=49152, tie_word_embeddings=True,
                   sliding_window=128),
        pairs=1, length=512, prompt=256, dtype="float32", optimizer="adamw", momentum=0.0,
        reference="precomputed", recompute="full", chunk=1024),
    "llama-bf16-selective": dict(
        model=dict(model_type="llama", num_hidden_layers=4, hidden_size=384, num_attention_heads=6,
                   num_key_value_heads=2, intermediate_size=1024, vocab_size=32000, tie_word_embeddings=True),
        pairs=2, length=384, prompt=192, dtype="bfloat16", optimizer="rmsprop", momentum=0.9, reference="kept",
        recompute="selective", chunk=256),
}


def _hf_config(model: dict):
    from transformers import LlamaConfig, MistralConfig

    fields = {key: value for key, value in model.items() if key != "model_type"}
    cls = LlamaConfig if model["model_type"] == "llama" else MistralConfig
    return cls(max_position_embeddings=1024, rms_norm_eps=1e-5, **fields)


def _train_config(spec: dict):
    from rpo.train.config import TrainConfig

    return TrainConfig(optimizer=spec["optimizer"], momentum=spec["momentum"], lr=1e-4, grad_clip=1.0,
                       micro_batch_size=spec["pairs"], global_batch_size=spec["pairs"], max_length=spec["length"],
                       max_prompt_length=spec["prompt"], dtype=spec["dtype"],
                       precompute_reference=spec["reference"] == "precomputed")


@contextlib.contextmanager
def _recompute(mode: str):
    """Build models whose TransformerConfig carries megatron's recompute settings for `mode`."""
    from rpo.models import gpt as gpt_lib
    from rpo.models.memory_plan import megatron_recompute_settings

    settings = megatron_recompute_settings(mode)
    original = gpt_lib.transformer_config_from_hf

    def with_recompute(*args, **kwargs):
        return dataclasses.replace(original(*args, **kwargs), **settings)

    gpt_lib.transformer_config_from_hf = with_recompute
    try:
        yield
    finally:
        gpt_lib.transformer_config_from_hf = original


def build_policy(hf_config, dtype: torch.dtype, recompute: str):
    """rpo.models.build_gpt_model at TP = 1 with `recompute` (its own argument once it has one)."""
    from rpo.models import build_gpt_model

    if "recompute" in inspect.signature(build_gpt_model).parameters:
        return build_gpt_model(hf_config, tp_size=1, dtype=dtype, recompute=recompute)
    with _recompute(recompute):
        return build_gpt_model(hf_config, tp_size=1, dtype=dtype)


def _batch(vocab: int, rows: int, length: int, prompt: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    loss_mask = torch.zeros(rows, length, dtype=torch.bool)
    loss_mask[:, prompt:] = True
    return {"input_ids": torch.randint(0, vocab, (rows, length), generator=generator),
            "attention_mask": torch.ones(rows, length, dtype=torch.long), "loss_mask": loss_mask}


def _run_steps(spec: dict, hf_config, steps: int, checkpoints: dict | None = None) -> float:
    """Build policy, DDP, optimiser (and reference), run `steps` trainer-like steps; returns the last loss."""
    import torch.nn.functional as F
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from rpo.models import reference_model, sequence_logprobs
    from rpo.train.optim import TrainOptimizer

    dtype = torch.bfloat16 if spec["dtype"] == "bfloat16" else torch.float32
    config = _train_config(spec)
    policy = build_policy(hf_config, dtype, spec["recompute"])
    ddp = DistributedDataParallel(config=policy.config, module=policy, ddp_config=DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=False))
    optimizer = TrainOptimizer(config, ddp, bf16=dtype == torch.bfloat16, total_steps=steps)
    reference = reference_model(policy) if spec["reference"] == "kept" else None
    if checkpoints is not None:
        checkpoints["after_build"] = _common.resident_bytes()
    pairs = spec["pairs"]
    batch = _batch(hf_config.vocab_size, 2 * pairs, spec["length"], spec["prompt"])
    loss = torch.zeros(())
    for step in range(steps):
        ddp.train()
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        policy_logps = sequence_logprobs(ddp, batch, chunk_size=spec["chunk"], return_token_logprobs=False).sums
        if reference is not None:
            with torch.no_grad():
                reference_logps = sequence_logprobs(reference, batch, chunk_size=spec["chunk"],
                                                    return_token_logprobs=False).sums
        else:  # what --precompute-reference's cache would supply
            reference_logps = torch.zeros(2 * pairs)
        margin = (policy_logps[:pairs] - reference_logps[:pairs]) - (policy_logps[pairs:] - reference_logps[pairs:])
        loss = -F.logsigmoid(0.1 * margin).mean()
        loss.backward()
        ddp.finish_grad_sync()
        optimizer.step()
        if checkpoints is not None:
            checkpoints[f"after_step_{step + 1}"] = _common.resident_bytes()
    return float(loss)


def _worker(spec: dict) -> dict:
    _common.limit_malloc_caching()
    torch.set_num_threads(spec["threads"])
    torch.set_flush_denormal(True)
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
    from rpo.models import init_parallel, teardown

    init_parallel(1, seed=0)
    # Warm-up: one step of a one-layer, small-vocabulary model of the same kind loads every library's lazy state.
    warm = dict(spec, model=dict(spec["model"], num_hidden_layers=1, vocab_size=512), length=32, prompt=16)
    _run_steps(warm, _hf_config(warm["model"]), steps=1)
    gc.collect()
    hf_config = _hf_config(spec["model"])
    checkpoints: dict = {}
    with _common.PeakMemory("cpu") as memory:
        loss = _run_steps(spec, hf_config, steps=2, checkpoints=checkpoints)
    teardown()
    start = memory.start_bytes
    return {"peak_bytes": memory.peak_bytes, "loss": loss,
            **{key: value - start for key, value in checkpoints.items()}}


def _plan(spec: dict):
    from rpo.models.memory_plan import plan_from_train_config

    return plan_from_train_config(_train_config(spec), spec["model"], world_size=1,
                                  needs_reference=True, device="cpu", recompute=spec["recompute"],
                                  logprob_chunk_size=spec["chunk"])


# Published configs (config.json of meta-llama/Llama-2-{7b,13b,70b}-hf and mistralai/Mistral-7B-v0.1).
PUBLISHED = {
    "LLaMA-2-7B": dict(model_type="llama", num_hidden_layers=32, hidden_size=4096, num_attention_heads=32,
                       num_key_value_heads=32, intermediate_size=11008, vocab_size=32000, tie_word_embeddings=False),
    "Mistral-7B": dict(model_type="mistral", num_hidden_layers=32, hidden_size=4096, num_attention_heads=32,
                       num_key_value_heads=8, intermediate_size=14336, vocab_size=32000, tie_word_embeddings=False),
    "LLaMA-2-13B": dict(model_type="llama", num_hidden_layers=40, hidden_size=5120, num_attention_heads=40,
                        num_key_value_heads=40, intermediate_size=13824, vocab_size=32000,
                        tie_word_embeddings=False),
    "LLaMA-2-70B": dict(model_type="llama", num_hidden_layers=80, hidden_size=8192, num_attention_heads=64,
                        num_key_value_heads=8, intermediate_size=28672, vocab_size=32000, tie_word_embeddings=False),
}
# The families added by issue 25, from their config.json numbers (Qwen/Qwen3-8B, Qwen/Qwen2.5-32B-Instruct, the
# text_config of google/gemma-3-27b-it, mistralai/Mixtral-8x7B-v0.1, Qwen/Qwen3-30B-A3B).
PUBLISHED_FAMILIES = {
    "Qwen3-8B": dict(model_type="qwen3", num_hidden_layers=36, hidden_size=4096, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, intermediate_size=12288, vocab_size=151936,
                     tie_word_embeddings=False, rms_norm_eps=1e-6, rope_theta=1000000.0,
                     max_position_embeddings=40960),
    "Qwen2.5-32B": dict(model_type="qwen2", num_hidden_layers=64, hidden_size=5120, num_attention_heads=40,
                        num_key_value_heads=8, intermediate_size=27648, vocab_size=152064, tie_word_embeddings=False,
                        rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=32768,
                        use_sliding_window=False, sliding_window=131072, max_window_layers=70),
    "Gemma-3-27B": dict(model_type="gemma3_text", num_hidden_layers=62, hidden_size=5376, num_attention_heads=32,
                        num_key_value_heads=16, head_dim=128, intermediate_size=21504, vocab_size=262208,
                        tie_word_embeddings=True, query_pre_attn_scalar=168, sliding_window=1024,
                        sliding_window_pattern=6, rms_norm_eps=1e-6, max_position_embeddings=131072,
                        rope_theta=1000000.0, rope_local_base_freq=10000.0,
                        rope_scaling={"rope_type": "linear", "factor": 8.0}),
    "Mixtral-8x7B": dict(model_type="mixtral", num_hidden_layers=32, hidden_size=4096, num_attention_heads=32,
                         num_key_value_heads=8, intermediate_size=14336, vocab_size=32000, tie_word_embeddings=False,
                         num_local_experts=8, num_experts_per_tok=2, router_aux_loss_coef=0.02, rms_norm_eps=1e-5,
                         rope_theta=1000000.0, max_position_embeddings=32768),
    "Qwen3-30B-A3B": dict(model_type="qwen3_moe", num_hidden_layers=48, hidden_size=2048, num_attention_heads=32,
                          num_key_value_heads=4, head_dim=128, intermediate_size=6144, moe_intermediate_size=768,
                          num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, router_aux_loss_coef=0.001,
                          vocab_size=151936, tie_word_embeddings=False, rms_norm_eps=1e-6, rope_theta=1000000.0,
                          max_position_embeddings=40960),
}
# nvidia-smi's total memory of an 80 GB H100 (81559 MiB) and a 141 GB H200 (143771 MiB), in GiB.
GPU_MEMORY_GIB = {"80 GB": 79.6, "141 GB": 140.4}
# The paper's setting: 64 pairs per step, 512 tokens (256 prompt), bf16, RMSprop, a reference model kept.
PAPER = dict(global_pairs=64, max_length=512, prompt_length=256, dtype="bfloat16", optimizer="rmsprop",
             reference="kept")
# Option combinations, cheapest first (full recomputation costs about one more forward per step).
OPTION_LADDER = [dict(recompute="none", distributed_optimizer=False),
                 dict(recompute="selective", distributed_optimizer=False),
                 dict(recompute="none", distributed_optimizer=True),
                 dict(recompute="selective", distributed_optimizer=True),
                 dict(recompute="full", distributed_optimizer=False),
                 dict(recompute="full", distributed_optimizer=True)]


def _scaling_plans(model: dict, gpus: int, gpu_gib: float, attention: str, foreach: bool | None,
                   headroom: float, reference: str):
    """Every (TP, option combination, micro-batch) of the paper's setting on `gpus` GPUs that the plan allows."""
    from rpo.models.memory_plan import estimate_memory

    experts = model.get("num_local_experts") or model.get("num_experts") or 0
    for tp in (1, 2, 4, 8):
        if gpus % tp or model["num_attention_heads"] % tp or model["num_key_value_heads"] % tp:
            continue
        dp = gpus // tp
        for rank, options in enumerate(OPTION_LADDER):
            # Mixture of experts: megatron's MoE layer trains at TP > 1 only with sequence parallelism; the trainer
            # runs expert parallelism without the distributed optimizer and without a precomputed reference.
            for sequence_parallel in ((True,) if experts and tp > 1 else (False, True) if tp > 1 else (False,)):
                for ep in ([e for e in (1, 2, 4, 8) if dp % e == 0 and experts % e == 0] if experts else [1]):
                    if ep > 1 and (options["distributed_optimizer"] or reference == "precomputed"):
                        continue
                    for pairs in (8, 4, 2, 1):
                        if PAPER["global_pairs"] % (pairs * dp):
                            continue
                        plan = estimate_memory(
                            model, tensor_parallel=tp, data_parallel=dp, expert_parallel=ep,
                            micro_batch_pairs=pairs, max_length=PAPER["max_length"],
                            prompt_length=PAPER["prompt_length"], dtype=PAPER["dtype"],
                            # megatron-core's DistributedOptimizer takes Adam(W) only: the trainer refuses rmsprop.
                            optimizer="adamw" if options["distributed_optimizer"] else PAPER["optimizer"],
                            reference=reference, attention=attention,
                            sequence_parallel=sequence_parallel, optimizer_foreach=foreach,
                            gpu_memory_gb=gpu_gib * headroom, **options)
                        yield rank, plan


def _scaling(args) -> int:
    """Print the recommended (and the plain) layout of each published model per GPU size; no training."""
    gib = 2**30
    rows = []
    published = PUBLISHED_FAMILIES if args.families else PUBLISHED
    gpu_sizes = {"80 GB": GPU_MEMORY_GIB["80 GB"]} if args.families else GPU_MEMORY_GIB
    for name, model in published.items():
        for gpu, gpu_gib in gpu_sizes.items():
            for gpus in ((8, 16, 32, 64) if "70B" in name else (8,)):
                plans = list(_scaling_plans(model, gpus, gpu_gib, args.attention,
                                            False if args.no_foreach else None, args.headroom, args.reference))
                fitting = [(plan.settings.tensor_parallel, rank, plan.settings.expert_parallel,
                            plan.settings.sequence_parallel, -plan.settings.micro_batch_pairs, index, plan)
                           for index, (rank, plan) in enumerate(plans) if plan.fits]
                if fitting:
                    plan = min(fitting)[-1]
                    tp = plan.settings.tensor_parallel
                    # Sequence parallelism is an option, except for MoE at TP > 1 (megatron's MoE layer needs it).
                    plain = min((p for r, p in plans if r == 0 and p.settings.tensor_parallel == tp
                                 and p.settings.expert_parallel == plan.settings.expert_parallel
                                 and p.settings.sequence_parallel == (plan.shape.is_moe and tp > 1)),
                                key=lambda p: p.settings.micro_batch_pairs)
                else:
                    plan = plain = min((p for _, p in plans), key=lambda p: p.peak_bytes)
                s = plan.settings
                shape = plan.shape
                rows.append({
                    "model": name, "gpu": gpu, "gpus": gpus, "fits": "yes" if plan.fits else "no",
                    "params_b": shape.parameters() / 1e9, "active_b": shape.active_parameters() / 1e9,
                    "tp": s.tensor_parallel, "dp": s.data_parallel, "ep": s.expert_parallel,
                    "micro_pairs": s.micro_batch_pairs,
                    "recompute": s.recompute, "distributed_optimizer": "on" if s.distributed_optimizer else "off",
                    "sequence_parallel": "on" if s.sequence_parallel else "off",
                    "weights_states_gib": (plan.persistent - plan.attention_buffer) / gib,
                    "activations_gib": plan.activations / gib, "peak_gib": plan.peak_bytes / gib,
                    "plain_peak_gib": plain.peak_bytes / gib,
                })
    columns = [("model", "model", ""), ("GPU", "gpu", ""), ("GPUs", "gpus", ""), ("fits", "fits", ""),
               ("TP", "tp", ""), ("DP", "dp", ""), ("micro pairs", "micro_pairs", ""),
               ("recompute", "recompute", ""), ("dist. optimizer", "distributed_optimizer", ""),
               ("seq. parallel", "sequence_parallel", ""),
               ("weights+grads+optimizer+reference (GiB)", "weights_states_gib", ".1f"),
               ("activations (GiB)", "activations_gib", ".1f"), ("peak (GiB)", "peak_gib", ".1f"),
               ("peak without options, micro 1 (GiB)", "plain_peak_gib", ".1f")]
    if args.families:
        columns[1:1] = [("parameters (B)", "params_b", ".2f"), ("active (B)", "active_b", ".2f")]
        columns.insert(columns.index(("DP", "dp", "")) + 1, ("EP", "ep", ""))
    print(f"Paper setting: {dict(PAPER, reference=args.reference)}; attention {args.attention}; optimizer foreach "
          f"{'off' if args.no_foreach else 'torch default (on for CUDA)'}; GPU memory {GPU_MEMORY_GIB} GiB; "
          f"fits = peak within {args.headroom:.0%} of it; rows that do not fit show the smallest peak found")
    print(_common.format_table(columns, rows))
    return 0


def _add_arguments(parser) -> None:
    parser.add_argument("--scaling", action="store_true",
                        help="print the plan of LLaMA-2 7B/13B/70B and Mistral-7B at the paper's setting on 80 GB "
                        "and 141 GB GPUs (no measurement)")
    parser.add_argument("--families", action="store_true",
                        help="with --scaling: Qwen3-8B, Qwen2.5-32B, Gemma-3-27B, Mixtral-8x7B and Qwen3-30B-A3B on "
                        "8 x 80 GB instead of LLaMA-2/Mistral (experts split over TP x EP, EP over the DP ranks)")
    parser.add_argument("--attention", choices=("local", "flash"), default="local",
                        help="with --scaling: megatron-core's local attention or Transformer Engine's fused one")
    parser.add_argument("--headroom", type=float, default=0.9,
                        help="with --scaling: the fraction of GPU memory a plan may use (the rest for the allocator's "
                        "fragmentation, which the plan does not model)")
    parser.add_argument("--reference", choices=("kept", "precomputed"), default=PAPER["reference"],
                        help="with --scaling: keep the reference model or precompute its log-probs")
    parser.add_argument("--no-foreach", action="store_true",
                        help="with --scaling: plan the optimiser with foreach=False (per-tensor step)")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--out", type=Path, default=_common.default_output("memory_plan"))


def _run(args, parser) -> int:
    if args.scaling:
        return _scaling(args)
    mib = _common.MIB
    threads = args.threads or os.cpu_count() or 1
    rows = []
    for name in args.configs:
        spec = dict(CONFIGS[name], threads=threads)
        plan = _plan(spec)
        measured = _common.run_worker(Path(__file__), spec, env=_common.benchmark_env(threads))[0]
        model = spec["model"]
        rows.append({
            "config": name,
            "model": f"{model['model_type']} L{model['num_hidden_layers']} h{model['hidden_size']} "
                     f"a{model['num_attention_heads']}/{model['num_key_value_heads']} V{model['vocab_size']}"
                     f"{' tied' if model['tie_word_embeddings'] else ''}",
            "run": f"{spec['pairs']}x{spec['length']} {spec['dtype']} {spec['optimizer']} ref={spec['reference']} "
                   f"recompute={spec['recompute']}",
            "params_m": plan.parameters_per_gpu / 1e6,
            "plan_persistent_mib": plan.persistent / mib,
            "plan_activations_mib": plan.activations / mib,
            "plan_peak_mib": plan.peak_bytes / mib,
            "measured_after_step_2_mib": measured["after_step_2"] / mib,
            "measured_peak_mib": measured["peak_bytes"] / mib,
            "plan_over_measured": plan.peak_bytes / measured["peak_bytes"],
            "plan": plan.as_dict(), "measured": measured,
        })
        print(plan.format_plan())
        print(f"  measured peak increment {measured['peak_bytes'] / mib:.1f} MiB "
              f"(plan/measured {rows[-1]['plan_over_measured']:.3f})\n")
    columns = [("config", "config", ""), ("model", "model", ""), ("run", "run", ""),
               ("params (M)", "params_m", ".1f"), ("plan persistent (MiB)", "plan_persistent_mib", ".1f"),
               ("plan activations (MiB)", "plan_activations_mib", ".1f"), ("plan peak (MiB)", "plan_peak_mib", ".1f"),
               ("measured resident after step 2 (MiB)", "measured_after_step_2_mib", ".1f"),
               ("measured peak (MiB)", "measured_peak_mib", ".1f"), ("plan / measured", "plan_over_measured", ".3f")]
    _common.report(args.out, columns, rows, machine=_common.machine_info("cpu"),
                   settings={"configs": args.configs, "threads": threads},
                   notes=["Measured: rise of the peak resident set over model build + 2 steps, after a warm-up."])
    return 0


def main(argv=None) -> int:
    return _common.benchmark_main(__doc__, _add_arguments, _run, worker=_worker, argv=argv)


if __name__ == "__main__":
    sys.exit(main())
