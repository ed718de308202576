"""Peak memory per rank of one training step with each --recompute mode and --distributed-optimizer, beside TRL.

One DPO step (sigmoid, β = 0.1, lr 5e-7, clipping 1.0, float32 on the CPU, reference model kept in memory, no
evaluation, logging or checkpoints) of the same model on the same batch: --pairs pairs per rank of the first rows of
../shared/data/paired.jsonl, shortened to ≤ --prompt-tokens + ≤ --response-tokens tokens
(benchmarks/_common.short_paired_subset: no side truncates; most rows reach both caps, so every batch has about
the same shape; tokens/step per rank are in the table). At W = 1, rpo and TRL read the same --pairs rows, so every
step is the same batch; at W = 2 the file has 2 × --pairs rows, --pairs per rank.

  rpo cases (benchmarks/trainer_step.py's worker, an rpo.train.Trainer per fresh process):
    none, selective, full           W = 1 (--threads torch threads), --recompute MODE
    dp2, dp2-full                   W = 2 data-parallel gloo ranks (--threads / 2 each), replicated optimizer
    dp2-distopt, dp2-full-distopt   the same with --distributed-optimizer (optimizer state sharded over DP)
  trl, trl-checkpointing           trl.DPOTrainer (benchmarks/trl_dpo.py's worker, in TRL's own environment:
                                    --trl-python, created by `make bench-trl`), gradient checkpointing off / on
                                    (on is DPOConfig's default); W = 1, --threads threads.
The optimizer is --optimizer on every case (default adamw: megatron-core's DistributedOptimizer takes Adam only;
TRL: optim="adamw_torch"; rmsprop gives trl_dpo.py's setting, without the distributed-optimizer cases).

Memory, per rank (the max over ranks and over the --steps steps timed after --warmup, in a fresh process per case,
glibc's malloc caching limited so freed tensors leave the resident set: benchmarks/_common.py):
  step rise   the rise of the peak resident set (VmHWM) during a step above the resident set at its start, the
              measure of trl_dpo.py's 0.73× (rpo's weights, fp32 gradient buffer and optimizer state are resident
              before the step; TRL frees its gradients after each step (zero_grad(set_to_none=True)), so its rise
              also counts allocating them, about one model's size);
  peak RSS    the process's whole peak resident set during a step (weights, reference, gradients, optimizer
              state, activations, libraries): what a rank needs, and the only one of the two that the distributed
              optimizer's sharding of persistent state shows in.
Ratios: the case ÷ TRL without gradient checkpointing (the issue's goal: ≤ 0.5), and ÷ TRL with it (JSON).

    make bench-scale        # or: .venv/bin/python benchmarks/scale_memory.py [--model smollm2|tiny|PATH]
                            #        [--cases none selective full dp2 dp2-distopt ...] [--trl-variants trl ...]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402
import trl_dpo  # noqa: E402

HERE = Path(__file__).resolve().parent

# name: (world size, TrainConfig fields)
RPO_CASES = {
    "none": (1, dict(recompute="none")),
    "selective": (1, dict(recompute="selective")),
    "full": (1, dict(recompute="full")),
    "dp2": (2, dict(recompute="none")),
    "dp2-distopt": (2, dict(recompute="none", distributed_optimizer=True)),
    "dp2-full": (2, dict(recompute="full")),
    "dp2-full-distopt": (2, dict(recompute="full", distributed_optimizer=True)),
}
TRL_CASES = {"trl": False, "trl-checkpointing": True}  # name: gradient_checkpointing
DEFAULT_CASES = ["none", "selective", "full", "dp2", "dp2-distopt", "dp2-full-distopt"]


def model_folder(choice: str) -> str:
    """smollm2: the embedded default (SmolLM2-135M-Instruct); tiny: benchmarks/_common's random tiny LLaMA."""
    if choice == "smollm2":
        return str(_common.smollm2_folder())
    if choice == "tiny":
        return str(_common.tiny_llama_folder(_common.cache_root() / "models", hidden=128, layers=2, heads=4,
                                             kv_heads=2, intermediate=256))
    return choice


def memory_ratios(row: dict, baseline: dict | None, suffix: str) -> dict:
    """row's step rise and peak RSS over baseline's, keyed `rise_vs_{suffix}` and `peak_rss_vs_{suffix}`."""
    if baseline is None:
        return {}
    return {f"rise_vs_{suffix}": _common.ratio(row["peak_extra_mib"], baseline["peak_extra_mib"]),
            f"peak_rss_vs_{suffix}": _common.ratio(row["peak_rss_mib"], baseline["peak_rss_mib"])}


def _verdict(ratio: float, goal: float = 0.5) -> str:
    return "met" if ratio <= goal else "NOT met"


def _rpo_case(name: str, args, model: str, data: dict) -> dict:
    world, options = RPO_CASES[name]
    threads = max(1, args.threads // world)
    spec = dict(model=model, data=str(data[world]), cache=str(_common.cache_root() / "rpo-cache"),
                cases=[(name, "dpo", False, 1, options)], global_batch=args.pairs * world,
                max_length=data["max_length"], max_prompt_length=data["max_length"] // 2, steps=args.steps,
                warmup=args.warmup, threads=threads, optimizer=args.optimizer)
    ranks = _common.run_worker(HERE / "trainer_step.py", spec, world_size=world,
                               env=_common.benchmark_env(threads), timeout=args.timeout)
    per_rank = [r[name] for r in ranks]
    return {"library": "rpo", "world_size": world, "threads_per_rank": threads,
            "recompute": options["recompute"],
            "distributed_optimizer": "on" if options.get("distributed_optimizer") else "off",
            "tokens_per_step": max(r["tokens_per_step"] for r in per_rank),
            "median_ms": max(r["median_ms"] for r in per_rank), "cpu_ms": max(r["cpu_ms"] for r in per_rank),
            **{key: max(r[key] for r in per_rank) for key in ("peak_extra_mib", "peak_rss_mib",
                                                              "start_resident_mib")},
            "per_rank": per_rank}


def _trl_case(name: str, args, model: str, data: dict) -> dict:
    spec = dict(model=model, data=str(data[1]), batch=args.pairs, max_length=data["max_length"], steps=args.steps,
                warmup=args.warmup, optimizer=args.optimizer)
    result = trl_dpo._trl_run(spec, args.threads, args.trl_python, TRL_CASES[name])
    return {"library": "trl", "world_size": 1, "threads_per_rank": args.threads,
            "recompute": "gradient checkpointing" if TRL_CASES[name] else "none", "distributed_optimizer": "off",
            **{key: result[key] for key in ("tokens_per_step", "median_ms", "cpu_ms", "peak_extra_mib",
                                            "peak_rss_mib", "start_resident_mib", "versions")}}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2", help="smollm2 (the embedded default), tiny, or an HF folder")
    parser.add_argument("--cases", nargs="+", default=DEFAULT_CASES, choices=list(RPO_CASES))
    parser.add_argument("--trl-variants", nargs="*", default=list(TRL_CASES), choices=list(TRL_CASES),
                        help="TRL runs (none: rpo only; the ratio columns then stay empty)")
    parser.add_argument("--trl-python", type=Path, default=trl_dpo.DEFAULT_TRL_PYTHON,
                        help="interpreter of the environment that has trl installed")
    parser.add_argument("--optimizer", default="adamw", choices=sorted(trl_dpo.TRL_OPTIMIZERS))
    parser.add_argument("--pairs", type=int, default=4, help="pairs per rank and step")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--response-tokens", type=int, default=32)
    parser.add_argument("--steps", type=int, default=2, help="measured steps per case")
    parser.add_argument("--warmup", type=int, default=1, help="steps before them (the optimizer's state appears)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads per case (W = 2: "
                        "half per rank)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per case")
    parser.add_argument("--out", type=Path, default=_common.default_output("scale_memory"))


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.optimizer != "adamw" and any(RPO_CASES[c][1].get("distributed_optimizer") for c in args.cases):
        parser.error("the distributed-optimizer cases need --optimizer adamw (megatron-core's takes Adam only)")
    if args.trl_variants:
        trl_dpo.check_trl_python(args.trl_python, parser)
    model = model_folder(args.model)
    assets = _common.cache_root()
    data = {world: _common.short_paired_subset(assets / "data", args.pairs * world, prompt_tokens=args.prompt_tokens,
                                               response_tokens=args.response_tokens)
            for world in {1} | {RPO_CASES[c][0] for c in args.cases}}
    data["max_length"] = 4 * (args.prompt_tokens + args.response_tokens)  # above every shortened row
    machine = _common.machine_info("cpu")
    machine["torch_threads"] = f"{args.threads} per case (W = 2: {max(1, args.threads // 2)} per rank)"
    rows, failures = [], []
    for name in list(args.trl_variants) + list(args.cases):
        started = time.perf_counter()
        try:
            result = (_trl_case(name, args, model, data) if name in TRL_CASES
                      else _rpo_case(name, args, model, data))
        except RuntimeError as error:  # keep the other cases; report and exit non-zero at the end
            failures.append(name)
            print(f"{name} FAILED:\n{error}", flush=True)
            continue
        rows.append({"case": name, **result, "wall_s": time.perf_counter() - started})
        if "versions" in result:
            machine["trl_environment"] = result["versions"]
        print(f"{name}: step rise {result['peak_extra_mib']:.0f} MiB, peak RSS {result['peak_rss_mib']:.0f} MiB, "
              f"{rows[-1]['wall_s']:.0f} s", flush=True)
        _common.write_results(args.out, machine=machine, settings=vars(args) | {"model": model}, rows=rows)
    trl_plain = next((r for r in rows if r["case"] == "trl"), None)
    trl_checkpointing = next((r for r in rows if r["case"] == "trl-checkpointing"), None)
    for row in rows:
        row.update(memory_ratios(row, trl_plain, "trl"))
        row.update(memory_ratios(row, trl_checkpointing, "trl_checkpointing"))
    columns = [("case", "case", ""), ("library", "library", ""), ("W", "world_size", ""),
               ("threads/rank", "threads_per_rank", ""), ("recompute", "recompute", ""),
               ("dist. optimizer", "distributed_optimizer", ""), ("tokens/step/rank", "tokens_per_step", ".0f"),
               ("median step ms", "median_ms", ".0f"), ("resident before step MiB", "start_resident_mib", ".0f"),
               ("step rise MiB", "peak_extra_mib", ".0f"), ("rise × TRL", "rise_vs_trl", ".2f"),
               ("peak RSS MiB", "peak_rss_mib", ".0f"), ("peak RSS × TRL", "peak_rss_vs_trl", ".2f")]
    notes = [f"model {model}; {args.pairs} pairs per rank of rows ≤{args.prompt_tokens} prompt + "
             f"≤{args.response_tokens} answer tokens; float32, DPO, {args.optimizer}, reference kept; max over "
             f"ranks and {args.steps} steps after {args.warmup}",
             "step rise: peak resident set during the step above the resident set at its start (trl_dpo.py's "
             "measure); peak RSS: the process's whole peak resident set during the step; × TRL: ÷ TRL without "
             "gradient checkpointing"]
    if trl_plain is not None:
        for row in rows:
            if row["library"] == "rpo":
                rise, peak = row["rise_vs_trl"], row["peak_rss_vs_trl"]
                notes.append(f"goal ≤ 0.5× TRL, {row['case']}: step rise {rise:.2f}× ({_verdict(rise)}), "
                             f"peak RSS {peak:.2f}× ({_verdict(peak)})")
    if rows:
        _common.report(args.out, columns, rows, machine=machine, settings=vars(args) | {"model": model},
                       notes=notes)
    if failures:
        print(f"{len(failures)} case(s) failed: {failures}")
        return 1
    return 0


def main(argv=None) -> int:
    return _common.benchmark_main(__doc__, add_arguments, run, argv=argv)


if __name__ == "__main__":
    sys.exit(main())
