"""Trainer step time and peak memory: rpo vs dpo with the same model, batch and machine, and rpo's global contrast.

Every case is an `rpo.train.Trainer` (float32, RMSprop, reference model in memory, no evaluation or checkpoints)
on the same tiny LLaMA with SmolLM2's tokenizer and 49152-token vocabulary (benchmarks/_common.py) and the same
shortened rows of ../shared/data/paired.jsonl. Per world size W (1, 2: gloo ranks, cores / W torch threads each),
ONE process per rank builds a trainer for each case and runs their steps interleaved (step k of every case, in a
rotating order, on the same batch k), so slow phases of a shared machine hit all cases alike.

Cases (loss, --global-contrast, micro-batches per rank step, options):
  dpo                      the baseline
  rpo                      per-rank contrast matrix, embedding weights (the paper's RPO)
  rpo --global-contrast    one matrix over all ranks' answers
  dpo, A micro-batches[, --recompute R]   the accumulated baseline, A = 2 and 4, R = none (no suffix), selective,
                           full
  rpo --global-contrast, A micro-batches[, --recompute R]   the matrix over ranks and micro-batches
                           (rpo.distributed.TwoPassContrast: every micro-batch's scores first; each micro-batch's
                           backward through its kept graph, as many as the memory plan fits, or a second forward)
  rpo --global-contrast, A micro-batches, --keep-graphs 0   every micro-batch re-run (the two-pass path), R = none
Time: per step, wall time and the process's CPU time (all threads; on a shared machine the CPU time is the stable
measure of the work a step does, while wall time also counts waiting for a core); medians over --steps steps after
--warmup, the fastest wall time too. "× DPO, paired" is the median over steps of this case's CPU time on batch k
divided by its baseline's on batch k, the baseline being dpo with the same micro-batches and --recompute. Memory:
the rise of the peak resident set during a step above the resident set before it (the trainer's weights,
gradients and optimizer state are resident already), max over steps and ranks, and its ratio to the baseline's.

    .venv/bin/python benchmarks/trainer_step.py [--world-sizes 1 2] [--steps 6] [--out PATH]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

import torch  # noqa: E402

RECOMPUTE_MODES = ("none", "selective", "full")
ACCUMULATION = (2, 4)


def accumulated_name(base: str, micro: int, recompute: str = "none", keep_graphs=None) -> str:
    name = f"{base}, {micro} micro-batches"
    if recompute != "none":
        name += f", --recompute {recompute}"
    if keep_graphs is not None:
        name += f", --keep-graphs {keep_graphs}"
    return name


# name, loss, global contrast, micro-batches per rank step, further TrainConfig fields
CASES = [("dpo", "dpo", False, 1, {}), ("rpo", "rpo", False, 1, {}), ("rpo --global-contrast", "rpo", True, 1, {})]
for _recompute in RECOMPUTE_MODES:
    for _micro in ACCUMULATION:
        CASES.append((accumulated_name("dpo", _micro, _recompute), "dpo", False, _micro, dict(recompute=_recompute)))
        CASES.append((accumulated_name("rpo --global-contrast", _micro, _recompute), "rpo", True, _micro,
                      dict(recompute=_recompute)))
        if _recompute == "none":
            CASES.append((accumulated_name("rpo --global-contrast", _micro, keep_graphs=0), "rpo", True, _micro,
                          dict(recompute=_recompute, keep_graphs=0)))


def baseline_of(case: tuple) -> str:
    """The dpo case with the same micro-batches and --recompute."""
    _, _, _, micro, options = case
    return "dpo" if micro == 1 else accumulated_name("dpo", micro, options.get("recompute", "none"))


def _worker(spec: dict) -> dict:
    _common.limit_malloc_caching()
    torch.set_num_threads(spec["threads"])
    torch.set_flush_denormal(True)
    import logging

    logging.basicConfig(level=logging.WARNING)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    trainers = build_trainers(spec, world)
    names = list(trainers)
    records = {name: [] for name in names}
    batches = len(next(iter(trainers.values())).batcher)
    for step in range(spec["warmup"] + spec["steps"]):
        shift = step % len(names)  # rotating order: no case always runs first or last
        for name in names[shift:] + names[:shift]:
            trainer = trainers[name]
            batch = trainer.batcher.batch(step // batches, step % batches)  # batch `step` for every case
            with _common.PeakMemory("cpu") as memory:
                started, cpu_started = time.perf_counter(), time.process_time()
                metrics = trainer.train_step(batch)
                seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
            if step >= spec["warmup"]:
                records[name].append({"seconds": seconds, "cpu_seconds": cpu_seconds, "peak_bytes": memory.peak_bytes,
                                      "start_bytes": memory.start_bytes,
                                      "tokens": int(batch["attention_mask"].sum()),
                                      "slots": padded_slots(batch, trainer.accumulation), "loss": metrics["loss"],
                                      "padding_removed": metrics.get("packing/padding_removed")})
    result = {}
    for name in names:
        steps, trainer = records[name], trainers[name]
        result[name] = {"median_ms": statistics.median(r["seconds"] for r in steps) * 1e3,
                        "min_ms": min(r["seconds"] for r in steps) * 1e3,
                        "cpu_ms": statistics.median(r["cpu_seconds"] for r in steps) * 1e3,
                        "step_ms": [r["seconds"] * 1e3 for r in steps],
                        "step_cpu_ms": [r["cpu_seconds"] * 1e3 for r in steps],
                        "peak_extra_mib": max(r["peak_bytes"] for r in steps) / _common.MIB,
                        # the process's whole peak resident set during a step, and its resident set before one
                        "peak_rss_mib": max(r["start_bytes"] + r["peak_bytes"] for r in steps) / _common.MIB,
                        "start_resident_mib": max(r["start_bytes"] for r in steps) / _common.MIB,
                        "tokens_per_step": statistics.mean(r["tokens"] for r in steps),
                        "slots_per_step": statistics.mean(r["slots"] for r in steps),
                        "padding_removed": _mean_or_none([r["padding_removed"] for r in steps]),
                        "resident_mib": _common.resident_bytes() / _common.MIB,
                        "last_loss": steps[-1]["loss"], "kept_graphs": trainer.kept_graphs}
    return result


def build_trainers(spec: dict, world: int) -> dict:
    """{case name: a set-up rpo.train.Trainer} for spec["cases"] (in this process, one rank of `world`)."""
    from rpo.train import TrainConfig, Trainer

    workdir = Path(tempfile.mkdtemp(prefix="rpo-trainer-step-"))
    trainers = {}
    for name, loss, global_contrast, micro, *overrides in spec["cases"]:
        # An optional 5th entry: further TrainConfig fields of the case (recompute, packing, optimizer, ...).
        options = dict(optimizer=spec.get("optimizer", "rmsprop"))
        options.update(overrides[0] if overrides else {})
        rank_batch = spec["global_batch"] // world
        config = TrainConfig(
            model=spec["model"], dataset=spec["data"], cache_dir=spec["cache"],
            output_dir=str(workdir / name.replace(" ", "_")), loss=loss, global_contrast=global_contrast,
            max_length=spec["max_length"], max_prompt_length=spec["max_prompt_length"],
            global_batch_size=spec["global_batch"], micro_batch_size=rank_batch // micro,
            lr=5e-7, max_steps=spec["warmup"] + spec["steps"] + spec.get("profile_steps", 0), eval_split_fraction=0.0,
            save_every=0, save_final=False, progress_bar=False, seed=0, dtype="float32", **options)
        trainer = Trainer(config)
        trainer.setup()
        trainers[name] = trainer
    return trainers


def padded_slots(batch: dict, micro_batches: int) -> int:
    """Token slots (rows × length) of the unpacked forwards of `batch` cut into `micro_batches` (each trimmed to
    its own longest row, as the trainer does): what --packing's padding_removed is relative to."""
    from rpo.data import micro_batches as split

    return sum(mb["attention_mask"].numel() for mb in split(batch, micro_batches))


def _mean_or_none(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.mean(values) if values else None


def loss_call_times(pairs: int, dim: int = 384, repeat: int = 300) -> dict:
    """Forward + backward of the loss alone (no model) on `pairs` pairs: what rpo adds to a step over dpo."""
    from rpo.losses import build_loss

    generator = torch.Generator().manual_seed(0)
    scores = {key: -100 + torch.randn(pairs, generator=generator) for key in
              ("policy_chosen_logps", "policy_rejected_logps", "reference_chosen_logps", "reference_rejected_logps")}
    embeddings = torch.randn(pairs, dim, generator=generator)
    result = {}
    for name in ("dpo", "rpo"):
        loss = build_loss(name)
        extra = {"chosen_embeddings": embeddings, "rejected_embeddings": embeddings} if name == "rpo" else {}

        def call():
            inputs = {key: value.clone().requires_grad_(key.startswith("policy")) for key, value in scores.items()}
            loss(**inputs, **extra).loss.backward()

        result[f"{name}_loss_us"] = _common.timing_summary(_common.time_repeated(call, repeat=repeat, warmup=20))[
            "median_ms"] * 1e3
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per case")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--global-batch", type=int, default=8, help="pairs per optimizer step over all ranks")
    parser.add_argument("--rows", type=int, default=64, help="rows of ../shared/data/paired.jsonl used")
    parser.add_argument("--prompt-tokens", type=int, default=48, help="prompt tokens kept per row")
    parser.add_argument("--response-tokens", type=int, default=48, help="answer tokens kept per row")
    parser.add_argument("--hidden", type=int, default=128, help="tiny LLaMA width")
    parser.add_argument("--layers", type=int, default=2, help="tiny LLaMA depth")
    parser.add_argument("--model", default=None, help="an HF folder instead of the tiny LLaMA (e.g. SmolLM2)")
    parser.add_argument("--cases", nargs="+", default=[c[0] for c in CASES], choices=[c[0] for c in CASES],
                        metavar="CASE", help="cases by name (default: all); their baselines are added")
    parser.add_argument("--out", type=Path, default=_common.default_output("trainer_step"))


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    assets = _common.cache_root()
    model = args.model or str(_common.tiny_llama_folder(assets / "models", hidden=args.hidden, layers=args.layers,
                                                        heads=4, kv_heads=2, intermediate=2 * args.hidden))
    data = _common.short_paired_subset(assets / "data", args.rows, prompt_tokens=args.prompt_tokens,
                                       response_tokens=args.response_tokens)
    # No truncation: every shortened row fits (template tokens included).
    max_length = 4 * (args.prompt_tokens + args.response_tokens)
    wanted = set(args.cases) | {baseline_of(c) for c in CASES if c[0] in args.cases}
    cases = [c for c in CASES if c[0] in wanted]
    cores = os.cpu_count() or 1
    rows = []
    for world in args.world_sizes:
        threads = max(1, cores // world)
        spec = dict(model=model, data=str(data), cache=str(assets / "rpo-cache"), cases=cases,
                    global_batch=args.global_batch, max_length=max_length, max_prompt_length=max_length // 2,
                    steps=args.steps, warmup=args.warmup, threads=threads)
        started = time.perf_counter()
        ranks = _common.run_worker(__file__, spec, world_size=world, env=_common.benchmark_env(threads),
                                   timeout=3600)
        print(f"W={world}: {time.perf_counter() - started:.0f} s", flush=True)
        for case in cases:
            name, loss, global_contrast, micro, options = case
            per_rank = [r[name] for r in ranks]
            rows.append({"world_size": world, "case": name, "loss": loss, "global_contrast": global_contrast,
                         "micro_batches": micro, "recompute": options.get("recompute", "none"),
                         "kept_graphs": per_rank[0]["kept_graphs"] if global_contrast and micro > 1 else None,
                         "baseline": baseline_of(case), "threads_per_rank": threads,
                         "median_ms": max(r["median_ms"] for r in per_rank),  # the slowest rank
                         "min_ms": max(r["min_ms"] for r in per_rank),
                         "cpu_ms": max(r["cpu_ms"] for r in per_rank),
                         "peak_extra_mib": max(r["peak_extra_mib"] for r in per_rank),
                         "resident_mib": max(r["resident_mib"] for r in per_rank),
                         "tokens_per_step": sum(r["tokens_per_step"] for r in per_rank),
                         "step_ms_rank0": per_rank[0]["step_ms"], "step_cpu_ms_rank0": per_rank[0]["step_cpu_ms"]})
    for row in rows:
        baseline = next((r for r in rows if r["world_size"] == row["world_size"]
                         and r["case"] == row["baseline"]), None)
        if baseline is not None:
            row["time_vs_dpo"] = _common.ratio(row["median_ms"], baseline["median_ms"])
            row["min_time_vs_dpo"] = _common.ratio(row["min_ms"], baseline["min_ms"])
            row["cpu_time_vs_dpo"] = _common.ratio(row["cpu_ms"], baseline["cpu_ms"])
            # Step k of every case ran on the same batch k, back to back: the median of the per-step ratios is the
            # least noisy comparison.
            row["paired_cpu_time_vs_dpo"] = statistics.median(
                mine / theirs for mine, theirs in zip(row["step_cpu_ms_rank0"], baseline["step_cpu_ms_rank0"]))
            row["memory_vs_dpo"] = _common.ratio(row["peak_extra_mib"], baseline["peak_extra_mib"])

    loss_only = loss_call_times(args.global_batch)
    columns = [("W", "world_size", ""), ("case", "case", ""), ("kept graphs", "kept_graphs", ""),
               ("threads/rank", "threads_per_rank", ""),
               ("tokens/step", "tokens_per_step", ".0f"), ("median step ms", "median_ms", ".0f"),
               ("× DPO", "time_vs_dpo", ".2f"), ("fastest step ms", "min_ms", ".0f"),
               ("× DPO", "min_time_vs_dpo", ".2f"), ("CPU ms/step", "cpu_ms", ".0f"),
               ("× DPO", "cpu_time_vs_dpo", ".3f"), ("× DPO, paired steps", "paired_cpu_time_vs_dpo", ".3f"),
               ("step peak MiB", "peak_extra_mib", ".0f"),
               ("× DPO memory", "memory_vs_dpo", ".3f"), ("resident MiB", "resident_mib", ".0f")]
    machine = _common.machine_info("cpu")
    machine["torch_threads"] = ", ".join(f"W={w}: {max(1, cores // w)} per rank" for w in args.world_sizes)
    notes = [f"model: {model}; global batch {args.global_batch} pairs; rows of ≤{args.prompt_tokens} prompt + "
             f"≤{args.response_tokens} answer tokens; median of {args.steps} steps after {args.warmup}",
             f"loss alone (forward + backward, {args.global_batch} pairs, no model): dpo "
             f"{loss_only['dpo_loss_us']:.0f} µs, rpo {loss_only['rpo_loss_us']:.0f} µs"]
    for row in rows:
        if row["global_contrast"] and row["micro_batches"] > 1 and row.get("paired_cpu_time_vs_dpo") is not None:
            time_ok = row["paired_cpu_time_vs_dpo"] <= 1.05
            memory_ok = row["memory_vs_dpo"] is not None and row["memory_vs_dpo"] <= 1.1
            notes.append(f"goal ≤ 1.05× DPO time, ≤ 1.1× its memory, W={row['world_size']}, {row['case']}: "
                         f"{row['paired_cpu_time_vs_dpo']:.3f}× CPU time ({'met' if time_ok else 'NOT met'}), "
                         f"{row['memory_vs_dpo']:.2f}× step peak ({'met' if memory_ok else 'NOT met'})")
        if row["case"] == "rpo" and row.get("cpu_time_vs_dpo") is not None:
            paired = row["paired_cpu_time_vs_dpo"]
            notes.append(f"goal RPO ≤ 1.02× DPO, W={row['world_size']}: CPU time per step {paired:.3f}× (median of "
                         f"per-step ratios; {'met' if paired <= 1.02 else 'NOT met'}), medians "
                         f"{row['cpu_time_vs_dpo']:.3f}× CPU, {row['time_vs_dpo']:.2f}× wall, fastest step "
                         f"{row['min_time_vs_dpo']:.2f}×")
    _common.report(args.out, columns, rows, machine=machine, settings=vars(args) | {"model": model}, notes=notes,
                   loss_only=loss_only)
    return 0


def main(argv=None) -> int:
    return _common.benchmark_main(__doc__, add_arguments, run, worker=_worker, argv=argv)


if __name__ == "__main__":
    sys.exit(main())
