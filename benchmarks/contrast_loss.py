"""Benchmark: the native contrast op vs one GEMM of the same cosines vs the authors' eager PyTorch code.

Forward + backward of the RPO loss with embedding weighting and row normalisation at M = N, D = 384, float32:
  op:    rpo.ops.contrast_loss + backward (blocked, never materialises M x N)
  gemm:  torch.mm(chosen_embeddings, rejected_embeddings.T) alone: the cosines' dot products, which the op must
         compute too; the physical floor of the op (issue 11 asks for the op within 1.2x of it)
  eager: rpo.ops.reference.authors_contrast_loss + backward (the authors' Listing 1: full distance, weight and
         logit matrices, autograd)
Times: the median (and minimum) of forward + backward, the three methods' iterations interleaved in one worker
process so that all see the same load on a shared machine. Extra memory: the peak above the inputs of one call,
measured in a fresh worker process per method and size (CPU: peak-RSS rise; CUDA: max_memory_allocated).
Prints a table and writes JSON (benchmarks/results/contrast_loss.json by default).

    python benchmarks/contrast_loss.py                       # CPU, M = N in 512 2048 4096 8192
    python benchmarks/contrast_loss.py --device cuda --sizes 4096 16384 65536
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

METHODS = ("op", "gemm", "eager")
BETA, TAU = 0.1, 0.5


def _inputs(size: int, dim: int, device: str):
    gen = torch.Generator().manual_seed(0)
    chosen = torch.randn(size, generator=gen).to(device).requires_grad_()
    rejected = torch.randn(size, generator=gen).to(device).requires_grad_()
    chosen_emb = torch.randn(size, dim, generator=gen).to(device)
    rejected_emb = torch.randn(size, dim, generator=gen).to(device)
    return chosen, rejected, chosen_emb, rejected_emb


def _step(method: str):
    from rpo.ops import contrast_loss, reference

    def step(chosen, rejected, chosen_emb, rejected_emb):
        if method == "gemm":
            torch.mm(chosen_emb, rejected_emb.T)
            return None
        if method == "op":
            loss = contrast_loss(chosen, rejected, beta=BETA, chosen_embeddings=chosen_emb,
                                 rejected_embeddings=rejected_emb, tau=TAU)
        else:
            loss = reference.authors_contrast_loss(chosen, rejected, chosen_emb, rejected_emb, beta=BETA, tau=TAU)
        loss.backward()
        chosen.grad = rejected.grad = None
        return loss.item()

    return step


def _time_methods(spec: dict) -> dict:
    """Interleaved repeats of every method until each has `min_repeats` and `min_time` seconds have passed."""
    device = spec["device"]
    inputs = _inputs(spec["size"], spec["dim"], device)
    steps = {method: _step(method) for method in spec["methods"]}
    seconds: dict[str, list[float]] = {method: [] for method in steps}
    errors = {}
    for method, step in steps.items():  # warm-up (kernels, BLAS, allocator) outside the measurement
        try:
            step(*inputs)
        except torch.OutOfMemoryError as exc:
            errors[method] = f"out of memory: {str(exc).splitlines()[0]}"
            if device == "cuda":
                torch.cuda.empty_cache()
    start_all = time.perf_counter()
    while True:
        for method, step in steps.items():
            if method not in errors:
                seconds[method] += _common.time_repeated(lambda: step(*inputs), repeat=1, warmup=0, device=device)
        counts = [len(seconds[m]) for m in steps if m not in errors]
        if not counts or min(counts) >= spec["max_repeats"] or (
                min(counts) >= spec["min_repeats"] and time.perf_counter() - start_all > spec["min_time"]):
            break
    return {method: ({"error": errors[method]} if method in errors else _common.timing_summary(seconds[method]))
            for method in steps}


def _peak_memory(spec: dict) -> dict:
    """Peak extra memory of one call of one method, in a process that ran nothing big before."""
    device, method = spec["device"], spec["method"]
    _common.limit_malloc_caching()
    step = _step(method)
    step(*_inputs(64, spec["dim"], device))  # loads kernels and BLAS outside the measurement
    inputs = _inputs(spec["size"], spec["dim"], device)
    try:
        with _common.PeakMemory(device) as peak:
            step(*inputs)
    except torch.OutOfMemoryError as exc:  # eager at large sizes on a GPU
        return {"error": f"out of memory: {str(exc).splitlines()[0]}"}
    return {"peak_extra_mib": peak.peak_bytes / _common.MIB}


def worker(spec: dict) -> dict:
    return _time_methods(spec) if spec["kind"] == "time" else _peak_memory(spec)


def measure(size: int, args) -> dict:
    base = {"size": size, "dim": args.dim, "device": args.device}
    env = _common.benchmark_env(threads=args.threads)
    timing = _common.run_worker(Path(__file__), dict(base, kind="time", methods=list(METHODS),
                                                     min_time=args.min_time, min_repeats=args.min_repeats,
                                                     max_repeats=args.max_repeats), env=env)[0]
    row = {"device": args.device, "M = N": size}
    for method in METHODS:
        memory = _common.run_worker(Path(__file__), dict(base, kind="memory", method=method), env=env)[0]
        result = {**timing[method], **memory}
        row[f"{method} ms"] = result.get("median_ms")
        row[f"{method} min ms"] = result.get("min_ms")
        row[f"{method} MiB"] = result.get("peak_extra_mib")
        if "error" in result:
            row[f"{method} error"] = result["error"]
    row["op / gemm"] = _common.ratio(row["op ms"], row["gemm ms"])
    row["op / gemm (min)"] = _common.ratio(row["op min ms"], row["gemm min ms"])
    row["eager / op"] = _common.ratio(row["eager ms"], row["op ms"])
    return row


COLUMNS = [("device", "device", ""), ("M = N", "M = N", "d"), ("op (ms)", "op ms", ".1f"),
           ("GEMM (ms)", "gemm ms", ".1f"), ("op / GEMM", "op / gemm", ".2f"),
           ("op / GEMM, fastest runs", "op / gemm (min)", ".2f"), ("eager (ms)", "eager ms", ".1f"),
           ("eager / op", "eager / op", ".1f"), ("op extra MiB", "op MiB", ".1f"),
           ("GEMM extra MiB", "gemm MiB", ".1f"), ("eager extra MiB", "eager MiB", ".1f")]


def add_arguments(parser) -> None:
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 2048, 4096, 8192], help="M = N values")
    parser.add_argument("--dim", type=int, default=384, help="embedding dimension D")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads of the workers (default: all)")
    parser.add_argument("--output", "--out", type=Path, default=_common.default_output("contrast_loss"),
                        help="JSON results file")
    parser.add_argument("--min-time", type=float, default=3.0, help="seconds of timed repeats per size")
    parser.add_argument("--min-repeats", type=int, default=5)
    parser.add_argument("--max-repeats", type=int, default=30)


def run(args, parser) -> int:
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False")
    import rpo.ops

    if not rpo.ops.extension_available():
        parser.error("rpo._C is not built (make install): 'op' would measure the pure-PyTorch fallback")
    machine = _common.machine_info(args.device)  # load average before the run: other processes skew wall times
    rows = []
    for size in args.sizes:
        rows.append(measure(size, args))
        print(f"{args.device} M=N={size}: {rows[-1]}", flush=True)
    machine["load_average_1min_after"] = _common.machine_info(args.device)["load_average_1min"]
    _common.report(args.output, COLUMNS, rows, machine=machine,
                   settings=dict(dim=args.dim, dtype="float32", weighting="embedding", weight_normalization="row",
                                 beta=BETA, tau=TAU, threads=args.threads, min_time=args.min_time),
                   notes=["op and eager: forward + backward; GEMM: torch.mm of the same cosines' dot products "
                          "(the op's floor); times are medians of interleaved runs"])
    return 0


def main(argv=None) -> int:
    return _common.benchmark_main(__doc__, add_arguments, run, worker=worker, argv=argv)


if __name__ == "__main__":
    raise SystemExit(main())
