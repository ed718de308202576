"""Global contrast loss vs data-parallel world size: time, memory and bytes communicated per step.

Spawns W CPU ranks (gloo, FileStore) for each W in --world-sizes. Every rank holds --per-rank chosen and rejected
answers (paired, "embedding" weighting, D-dim prompt embeddings) and runs, per step, forward + backward of
  local:  rpo.ops.contrast_loss on its own shard only (the authors' per-GPU M_r × N_r matrix), and
  global: rpo.distributed.global_contrast_loss over the W ranks (local rows × all W·N_r columns, plus the
          collectives).
Time: median over --steps steps, the slowest rank. Memory: growth of the peak RSS of a rank over all steps
(max over ranks). Communication: the sizes of the tensors passed to each collective, counted by wrapping
torch.distributed's functions (received bytes of the all-gathers, buffer bytes of the all-reduce).

    .venv/bin/python benchmarks/global_contrast.py [--world-sizes 1 2 4] [--per-rank 64 1024] [--out PATH]
"""
from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "results" / "global_contrast.json"


class CollectiveBytes:
    """Counts the bytes of the tensors rpo.distributed hands to the collectives while active."""

    def __init__(self):
        self.gathered = 0  # bytes received by this rank from all-gathers (the output tensors)
        self.all_reduced = 0  # bytes of the all-reduced buffers
        self.collectives = 0

    def _counted(self, function, kind):
        def counted(tensor, *args, **kwargs):
            setattr(self, kind, getattr(self, kind) + tensor.numel() * tensor.element_size())
            self.collectives += 1
            return function(tensor, *args, **kwargs)
        return counted

    def __enter__(self):
        import rpo.distributed.global_contrast as global_contrast
        self.module = global_contrast
        self.gather, self.all_reduce = global_contrast._all_gather_single, dist.all_reduce
        global_contrast._all_gather_single = self._counted(self.gather, "gathered")
        dist.all_reduce = self._counted(self.all_reduce, "all_reduced")
        return self

    def __exit__(self, *exc):
        self.module._all_gather_single, dist.all_reduce = self.gather, self.all_reduce


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _inputs(per_rank, dim, rank, dtype):
    generator = torch.Generator().manual_seed(rank)
    chosen = torch.randn(per_rank, generator=generator, dtype=dtype)
    rejected = torch.randn(per_rank, generator=generator, dtype=dtype)
    embeddings = torch.randn(per_rank, dim, generator=generator, dtype=torch.float32)
    return chosen, rejected, embeddings


def _time_steps(loss_fn, chosen, rejected, steps):
    times = []
    for _ in range(steps):
        chosen_leaf = chosen.clone().requires_grad_(True)
        rejected_leaf = rejected.clone().requires_grad_(True)
        start = time.perf_counter()
        loss = loss_fn(chosen_leaf, rejected_leaf)
        loss.backward()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _worker(rank, world_size, store_path, out_path, per_rank_sizes, dim, steps, beta):
    torch.set_num_threads(1)  # the ranks share the machine's cores
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world_size), rank=rank,
                            world_size=world_size, timeout=datetime.timedelta(seconds=300))
    from rpo.distributed import global_contrast_loss
    from rpo.ops import contrast_loss

    group = dist.group.WORLD
    rows = []
    for per_rank in per_rank_sizes:
        chosen, rejected, embeddings = _inputs(per_rank, dim, rank, torch.float32)
        options = dict(beta=beta, weighting="embedding", chosen_embeddings=embeddings,
                       rejected_embeddings=embeddings, tau=0.5)
        row = {"world_size": world_size, "per_rank": per_rank, "global_batch": per_rank * world_size}
        local_loss = functools.partial(contrast_loss, **options)
        global_loss = functools.partial(global_contrast_loss, process_group=group, **options)
        for mode, loss_fn in (("local", local_loss), ("global", global_loss)):
            _time_steps(loss_fn, chosen, rejected, 2)  # warm-up
            dist.barrier(group)
            rss_before = _peak_rss_bytes()
            with CollectiveBytes() as traffic:
                seconds = _time_steps(loss_fn, chosen, rejected, steps)
            stats = torch.tensor([seconds, _peak_rss_bytes() - rss_before], dtype=torch.float64)
            dist.all_reduce(stats, op=dist.ReduceOp.MAX, group=group)  # slowest rank, largest growth
            row[f"{mode}_ms"] = stats[0].item() * 1e3
            row[f"{mode}_peak_rss_growth_mib"] = stats[1].item() / 2**20
            if mode == "global":
                row["gathered_bytes_per_step"] = traffic.gathered // steps
                row["all_reduced_bytes_per_step"] = traffic.all_reduced // steps
                row["collectives_per_step"] = traffic.collectives // steps
        rows.append(row)
    dist.destroy_process_group()
    if rank == 0:
        with open(out_path, "w") as handle:
            json.dump(rows, handle)


def _machine() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    from rpo.ops import extension_available

    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "backend": "gloo", "rpo_extension": extension_available(), "date": datetime.date.today().isoformat(),
            # other work on the machine skews the timings: record how busy it was
            "load_average_1min_after": round(os.getloadavg()[0], 2)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--per-rank", type=int, nargs="+", default=[64, 1024],
                        help="chosen (= rejected) answers per rank")
    parser.add_argument("--dim", type=int, default=384, help="prompt-embedding width (all-MiniLM-L6-v2: 384)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for world_size in args.world_sizes:
            out_path = os.path.join(tmp, f"w{world_size}.json")
            mp.spawn(_worker, nprocs=world_size, args=(world_size, os.path.join(tmp, f"store{world_size}"),
                                                       out_path, args.per_rank, args.dim, args.steps, args.beta))
            with open(out_path) as handle:
                rows += json.load(handle)

    header = ("W", "per rank", "global", "local ms", "global ms", "local RSS+ MiB", "global RSS+ MiB",
              "gathered KiB", "all-reduced KiB", "collectives")
    print(" | ".join(header))
    for row in sorted(rows, key=lambda r: (r["per_rank"], r["world_size"])):
        print(" | ".join([str(row["world_size"]), str(row["per_rank"]), str(row["global_batch"]),
                          f"{row['local_ms']:.2f}", f"{row['global_ms']:.2f}",
                          f"{row['local_peak_rss_growth_mib']:.1f}", f"{row['global_peak_rss_growth_mib']:.1f}",
                          f"{row['gathered_bytes_per_step'] / 1024:.1f}",
                          f"{row['all_reduced_bytes_per_step'] / 1024:.1f}", str(row["collectives_per_step"])]))
    machine = _machine()
    print(f"machine: {machine}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine, "settings": {k: v for k, v in vars(args).items()
                                                                      if k != "out"}, "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
