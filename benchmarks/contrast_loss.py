"""Benchmark: the native contrast op vs the authors' eager (Listing-1 style) PyTorch code.

Forward + backward of the RPO loss with embedding weighting and row normalisation at M = N, D = 384, float32:
  op:    rpo.ops.contrast_loss (blocked, never materialises M x N)
  eager: rpo.ops.reference.listing1_contrast_loss (full distance/weight/logit matrices + autograd)
Reports the median wall time of forward + backward (op and eager iterations interleaved in one worker process,
so both see the same load on a shared machine) and the peak extra memory of one forward + backward, measured in
a fresh worker process per method and size: on CPU the peak-RSS rise (VmHWM after resetting it via
/proc/self/clear_refs), on CUDA torch.cuda.max_memory_allocated above the inputs. Prints a table and writes JSON.

    python benchmarks/contrast_loss.py                       # CPU, M = N in 512 2048 4096 8192
    python benchmarks/contrast_loss.py --device cuda --sizes 4096 16384 65536
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = REPO_ROOT / "benchmarks" / "results" / "contrast_loss.json"
METHODS = ("op", "eager")


def _status_kib(field: str) -> int:
    return int(re.search(field + r":\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def _make_inputs(size: int, dim: int, device: str):
    gen = torch.Generator().manual_seed(0)
    chosen = torch.randn(size, generator=gen).to(device).requires_grad_()
    rejected = torch.randn(size, generator=gen).to(device).requires_grad_()
    chosen_emb = torch.randn(size, dim, generator=gen).to(device)
    rejected_emb = torch.randn(size, dim, generator=gen).to(device)
    return chosen, rejected, chosen_emb, rejected_emb


def _step_fn(method: str, beta: float, tau: float):
    from rpo.ops import contrast_loss, reference

    def step(chosen, rejected, chosen_emb, rejected_emb):
        if method == "op":
            loss = contrast_loss(chosen, rejected, beta=beta, chosen_embeddings=chosen_emb,
                                 rejected_embeddings=rejected_emb, tau=tau)
        else:
            loss = reference.listing1_contrast_loss(chosen, rejected, chosen_emb, rejected_emb, beta=beta, tau=tau)
        loss.backward()
        chosen.grad = rejected.grad = None
        return loss.item()

    return step


def _peak_extra_mib(step, inputs, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step(*inputs)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    base = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
    step(*inputs)
    return (_status_kib("VmHWM") - base) / 1024


def memory_worker(method: str, size: int, dim: int, device: str) -> dict:
    """Peak extra memory of one forward + backward, in a process that ran nothing big before."""
    step = _step_fn(method, beta=0.1, tau=0.5)
    step(*_make_inputs(min(size, 64), dim, device))  # loads kernels / BLAS outside the measurement
    inputs = _make_inputs(size, dim, device)
    result = {"method": method, "size": size}
    try:
        result["peak_extra_mib"] = _peak_extra_mib(step, inputs, device)
    except torch.OutOfMemoryError as exc:  # eager at large sizes on a GPU
        result["error"] = f"out of memory: {str(exc).splitlines()[0]}"
    return result


def time_worker(size: int, dim: int, device: str, min_time: float, max_repeats: int) -> dict:
    """Median forward + backward time of each method, their iterations interleaved so that both see the same
    machine load (the 2-core machines this runs on are shared)."""
    steps = {method: _step_fn(method, beta=0.1, tau=0.5) for method in METHODS}
    inputs = _make_inputs(size, dim, device)
    times: dict[str, list[float]] = {method: [] for method in METHODS}
    failed: dict[str, str] = {}
    losses = {}
    for method, step in steps.items():  # warm-up, and the loss value for the record
        try:
            losses[method] = step(*inputs)
        except torch.OutOfMemoryError as exc:
            failed[method] = f"out of memory: {str(exc).splitlines()[0]}"
            if device == "cuda":
                torch.cuda.empty_cache()
    start_all = time.perf_counter()
    while True:
        for method, step in steps.items():
            if method in failed:
                continue
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            step(*inputs)
            if device == "cuda":
                torch.cuda.synchronize()
            times[method].append(time.perf_counter() - start)
        done = [len(t) for m, t in times.items() if m not in failed]
        if not done or min(done) >= max_repeats or (min(done) >= 3 and time.perf_counter() - start_all > min_time):
            break
    result = {}
    for method in METHODS:
        if method in failed:
            result[method] = {"error": failed[method]}
        else:
            result[method] = {"time_ms": 1e3 * statistics.median(times[method]), "loss": losses[method],
                              "times_ms": [round(1e3 * t, 2) for t in times[method]]}
    return result


def _run_worker(args, *worker_args: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", *worker_args, "--dim", str(args.dim), "--device", args.device,
           "--min-time", str(args.min_time), "--max-repeats", str(args.max_repeats)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT)
    if proc.returncode != 0:
        return {"error": f"worker failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(size: int, args) -> dict:
    timing = _run_worker(args, "time", str(size))
    row = {"device": args.device, "size": size}
    for method in METHODS:
        result = dict(timing.get(method, {"error": timing.get("error", "no timing")}))
        memory = _run_worker(args, "memory", str(size), method)
        if "error" in memory:
            result.setdefault("error", memory["error"])
        else:
            result["peak_extra_mib"] = memory["peak_extra_mib"]
        row[method] = result
    return row


def machine_description(device: str) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_average_1min": round(os.getloadavg()[0], 2),
            "torch": torch.__version__, "python": platform.python_version(),
            "date": datetime.date.today().isoformat()}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def format_table(rows: list[dict]) -> str:
    header = ("| device | M = N | op time (ms) | eager time (ms) | speed-up | op extra memory (MiB) "
              "| eager extra memory (MiB) | memory ratio |")
    lines = [header, "|" + " --- |" * 8]
    for row in rows:
        op, eager = row["op"], row["eager"]

        def fmt(result, key, spec):
            return "error" if "error" in result else format(result[key], spec)

        speedup = (f"{eager['time_ms'] / op['time_ms']:.1f}x"
                   if "error" not in op and "error" not in eager else "-")
        ratio = (f"{eager['peak_extra_mib'] / max(op['peak_extra_mib'], 1e-9):.0f}x"
                 if "error" not in op and "error" not in eager else "-")
        lines.append(f"| {row['device']} | {row['size']} | {fmt(op, 'time_ms', '.1f')} | "
                     f"{fmt(eager, 'time_ms', '.1f')} | {speedup} | {fmt(op, 'peak_extra_mib', '.1f')} | "
                     f"{fmt(eager, 'peak_extra_mib', '.1f')} | {ratio} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 2048, 4096, 8192], help="M = N values")
    parser.add_argument("--dim", type=int, default=384, help="embedding dimension D")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="JSON results file")
    parser.add_argument("--min-time", type=float, default=2.0, help="seconds of timed repeats per measurement")
    parser.add_argument("--max-repeats", type=int, default=20)
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)  # internal: "time SIZE" | "memory SIZE METHOD"
    args = parser.parse_args()

    if args.worker:
        kind, size = args.worker[0], int(args.worker[1])
        if kind == "time":
            result = time_worker(size, args.dim, args.device, args.min_time, args.max_repeats)
        else:
            result = memory_worker(args.worker[2], size, args.dim, args.device)
        print(json.dumps(result))
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False")

    import rpo.ops

    if not rpo.ops.extension_available():
        print("warning: rpo._C is not built; 'op' measures the pure-PyTorch fallback", file=sys.stderr)
    load_before = round(os.getloadavg()[0], 2)  # other processes on a shared machine skew wall times
    rows = []
    for size in args.sizes:
        row = measure(size, args)
        print(f"{args.device} M=N={size}: {row}", file=sys.stderr, flush=True)
        rows.append(row)
    table = format_table(rows)
    print(table)
    machine = machine_description(args.device)
    machine["load_average_1min_before"] = load_before
    print(f"\n{machine}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"machine": machine, "dim": args.dim, "dtype": "float32",
                                       "weighting": "embedding", "weight_normalization": "row", "rows": rows,
                                       "table": table}, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
