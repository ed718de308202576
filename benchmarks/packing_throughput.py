"""Training throughput with and without --packing on the same batches of the shared data.

Two rpo.train.Trainer cases (benchmarks/trainer_step.py's worker), identical but for --packing: the same model,
the rows of ../shared/data/paired.jsonl (--data) tokenised at --max-length (prompt ≤ --max-length / 2), the same
seed and so the same global batches, cut into micro-batches of --micro-batch pairs per rank. One process per rank
builds both trainers and runs their steps interleaved (step k of both, in a rotating order, on batch k), so slow
phases of a shared machine hit both alike. Float32, --loss (default dpo), --optimizer (default rmsprop),
--recompute (default none) on both, reference model in memory. Memory: two trainers in one process (SmolLM2-135M
with RMSprop: about 2.2 GB each) plus one micro-batch's activations (about 2 GB per pair at 512 tokens).

Unpacked, each micro-batch's forward is [rows, its longest row] (right padding); packed, its sequences go into
rows of up to --pack-length tokens (default --max-length) with a block-diagonal causal mask (rpo.models.packing).
Reported per case: non-padding tokens per step (the same for both), token slots of the forwards, the share of
them that is padding, the trainer's packing/padding_removed (1 − packed slots / unpacked slots), wall and CPU
time per step (medians over --steps after --warmup), tokens/s = tokens per step / median step time (and per
CPU second: the stable measure on a shared machine) and the rise of the peak resident set during a step.
packed ÷ unpacked: tokens/s, tokens per CPU-s and the median over steps of the per-step CPU-time ratio
(unpacked ÷ packed, on the same batch).

First, without a model (tokenizer only, seconds): the padding that packing removes over one epoch of the data at
each micro-batch size of --padding-micro-batches (--padding-only: this table only), since it grows with the
number of sequences a micro-batch packs.

    make bench-packing      # or: .venv/bin/python benchmarks/packing_throughput.py [--model smollm2|tiny|PATH]
                            #        [--max-length 512] [--global-batch 4] [--micro-batch 2] [--steps 3]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Iterable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402
import scale_memory  # noqa: E402

HERE = Path(__file__).resolve().parent


def padding_share(tokens: float, slots: float) -> float | None:
    """The share of `slots` token positions that hold padding (None without slots)."""
    return None if not slots else 1.0 - tokens / slots


def packing_slots(attention_masks: Iterable[torch.Tensor], pack_length: int) -> dict:
    """Token slots of the forwards of these micro-batches (their [rows, T] attention masks, right-padded),
    unpacked ([rows, T] each) and packed (rpo.models.plan_packing into rows of ≤ pack_length), and their tokens."""
    from rpo.models.packing import plan_packing

    tokens = unpacked = packed = 0
    for mask in attention_masks:
        plan = plan_packing(mask, pack_length)
        tokens += int(mask.sum())
        unpacked += mask.numel()
        packed += plan.packed_rows * plan.packed_length
    return {"tokens": tokens, "unpacked_slots": unpacked, "packed_slots": packed,
            "padding_removed": 1.0 - packed / unpacked if unpacked else None}


def padding_by_micro_batch(args: argparse.Namespace, model: str) -> list[dict]:
    """Over one epoch of the data in the trainer's shuffled batches (tokenizer only, no model): the padding that
    --packing removes at each micro-batch size of --padding-micro-batches (one batch of that many pairs = one
    micro-batch: the trainer's micro-batches are slices of the same shuffled order)."""
    from transformers import AutoTokenizer

    from rpo.data import PreferenceBatcher, load_preference_dataset, tokenize_preference_dataset

    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenized = tokenize_preference_dataset(load_preference_dataset(str(args.data)), tokenizer,
                                            max_prompt_length=args.max_length // 2, max_length=args.max_length,
                                            progress=False)
    rows = []
    for pairs in args.padding_micro_batches:
        masks = (batch["attention_mask"] for batch in PreferenceBatcher(tokenized, None, pairs, 0, 1, 0))
        slots = packing_slots(masks, args.pack_length or args.max_length)
        rows.append({"micro_batch_pairs": pairs, **slots,
                     "padding_share_unpacked": padding_share(slots["tokens"], slots["unpacked_slots"]),
                     "padding_share_packed": padding_share(slots["tokens"], slots["packed_slots"])})
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2", help="smollm2 (the embedded default), tiny, or an HF folder")
    parser.add_argument("--data", type=Path, default=_common.SHARED_DATA / "paired.jsonl")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--pack-length", type=int, default=None, help="--pack-length of the packed case "
                        "(default: --max-length)")
    parser.add_argument("--global-batch", type=int, default=4, help="pairs per optimizer step over all ranks")
    parser.add_argument("--micro-batch", type=int, default=2, help="pairs per micro-batch (forward) per rank")
    parser.add_argument("--world-size", type=int, default=1, help="gloo data-parallel ranks")
    parser.add_argument("--loss", default="dpo")
    parser.add_argument("--optimizer", default="rmsprop", choices=["rmsprop", "adamw", "sgd"])
    parser.add_argument("--recompute", default="none", choices=["none", "selective", "full"],
                        help="both cases (full lowers the memory at 512 tokens a lot, at about one more forward)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per case")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads over all ranks")
    parser.add_argument("--timeout", type=float, default=7200)
    parser.add_argument("--padding-micro-batches", type=int, nargs="*", default=[1, 2, 4, 8],
                        help="micro-batch sizes (pairs) of the model-free padding table over one epoch")
    parser.add_argument("--padding-only", action="store_true", help="only the padding table: no training")
    parser.add_argument("--out", type=Path, default=_common.default_output("packing_throughput"))


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    world = args.world_size
    rank_batch, remainder = divmod(args.global_batch, world)
    if remainder or rank_batch % args.micro_batch:
        parser.error(f"--global-batch {args.global_batch} must split into {world} rank(s) of whole micro-batches "
                     f"of --micro-batch {args.micro_batch} pairs")
    model = scale_memory.model_folder(args.model)
    padding_rows = padding_by_micro_batch(args, model)
    padding_columns = [("micro-batch pairs", "micro_batch_pairs", ""), ("tokens/epoch", "tokens", ""),
                       ("unpacked slots", "unpacked_slots", ""), ("packed slots", "packed_slots", ""),
                       ("padding share unpacked", "padding_share_unpacked", ".3f"),
                       ("padding share packed", "padding_share_packed", ".3f"),
                       ("padding removed", "padding_removed", ".3f")]
    print(f"padding over one epoch of {args.data.name} at --max-length {args.max_length}, --pack-length "
          f"{args.pack_length or args.max_length}, per micro-batch size (no model):")
    print(_common.format_table(padding_columns, padding_rows))
    if args.padding_only:
        return 0
    threads = max(1, args.threads // world)
    micro = rank_batch // args.micro_batch
    common = dict(recompute=args.recompute)
    packed = dict(common, packing=True, **({"pack_length": args.pack_length} if args.pack_length else {}))
    cases = [("unpacked", args.loss, False, micro, common), ("packed", args.loss, False, micro, packed)]
    spec = dict(model=model, data=str(args.data), cache=str(_common.cache_root() / "rpo-cache"), cases=cases,
                global_batch=args.global_batch, max_length=args.max_length, max_prompt_length=args.max_length // 2,
                steps=args.steps, warmup=args.warmup, threads=threads, optimizer=args.optimizer)
    started = time.perf_counter()
    ranks = _common.run_worker(HERE / "trainer_step.py", spec, world_size=world, env=_common.benchmark_env(threads),
                               timeout=args.timeout)
    wall = time.perf_counter() - started
    rows = []
    for name, *_ in cases:
        per_rank = [r[name] for r in ranks]
        tokens = sum(r["tokens_per_step"] for r in per_rank)
        slots = sum(r["slots_per_step"] for r in per_rank)
        removed = per_rank[0]["padding_removed"]  # reduced over the ranks by the trainer
        forward_slots = slots if removed is None else slots * (1.0 - removed)
        median_ms = max(r["median_ms"] for r in per_rank)  # the slowest rank
        cpu_ms = max(r["cpu_ms"] for r in per_rank)
        rows.append({"case": name, "tokens_per_step": tokens, "slots_per_step": forward_slots,
                     "padding_share": padding_share(tokens, forward_slots), "padding_removed": removed,
                     "median_ms": median_ms, "tokens_per_s": tokens / (median_ms / 1e3), "cpu_ms": cpu_ms,
                     "tokens_per_cpu_s": tokens / (cpu_ms / 1e3),
                     "peak_extra_mib": max(r["peak_extra_mib"] for r in per_rank),
                     "peak_rss_mib": max(r["peak_rss_mib"] for r in per_rank),
                     "step_cpu_ms_rank0": per_rank[0]["step_cpu_ms"], "step_ms_rank0": per_rank[0]["step_ms"]})
    unpacked, packed_row = rows
    packed_row["speed_vs_unpacked"] = _common.ratio(packed_row["tokens_per_s"], unpacked["tokens_per_s"])
    packed_row["cpu_speed_vs_unpacked"] = _common.ratio(packed_row["tokens_per_cpu_s"], unpacked["tokens_per_cpu_s"])
    packed_row["paired_cpu_speedup"] = statistics.median(
        theirs / mine for mine, theirs in zip(packed_row["step_cpu_ms_rank0"], unpacked["step_cpu_ms_rank0"]))
    for row in rows:
        row.setdefault("speed_vs_unpacked", 1.0)
        row.setdefault("cpu_speed_vs_unpacked", 1.0)
        row.setdefault("paired_cpu_speedup", 1.0)
    columns = [("case", "case", ""), ("tokens/step", "tokens_per_step", ".0f"),
               ("token slots/step", "slots_per_step", ".0f"), ("padding share", "padding_share", ".3f"),
               ("padding removed", "padding_removed", ".3f"), ("median step ms", "median_ms", ".0f"),
               ("tokens/s", "tokens_per_s", ".1f"), ("× unpacked", "speed_vs_unpacked", ".2f"),
               ("CPU ms/step", "cpu_ms", ".0f"), ("tokens/CPU-s", "tokens_per_cpu_s", ".1f"),
               ("× unpacked", "cpu_speed_vs_unpacked", ".2f"),
               ("× unpacked, paired steps", "paired_cpu_speedup", ".2f"),
               ("step peak MiB", "peak_extra_mib", ".0f"), ("peak RSS MiB", "peak_rss_mib", ".0f")]
    machine = _common.machine_info("cpu")
    machine["torch_threads"] = f"{threads} per rank, {world} rank(s)"
    notes = [f"model {model}; {args.data.name} at --max-length {args.max_length} (prompt ≤ {args.max_length // 2}), "
             f"--pack-length {args.pack_length or args.max_length}; global batch {args.global_batch} pairs, "
             f"{args.micro_batch} per micro-batch, W = {world}; --loss {args.loss}, {args.optimizer}, --recompute "
             f"{args.recompute}, float32, reference kept; median of {args.steps} steps after {args.warmup}; "
             f"{wall:.0f} s in all",
             f"packing: {packed_row['speed_vs_unpacked']:.2f}× the tokens/s (wall), "
             f"{packed_row['cpu_speed_vs_unpacked']:.2f}× per CPU second, {packed_row['paired_cpu_speedup']:.2f}× "
             f"(median of per-step CPU-time ratios), {packed_row['padding_removed']:.1%} of the token slots removed"]
    _common.report(args.out, columns, rows, machine=machine, settings=vars(args) | {"model": model}, notes=notes,
                   padding_by_micro_batch=padding_rows)
    return 0


def main(argv=None) -> int:
    return _common.benchmark_main(__doc__, add_arguments, run, argv=argv)


if __name__ == "__main__":
    sys.exit(main())
