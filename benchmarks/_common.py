"""Shared helpers of the benchmark scripts: machine description, timing, peak memory, tables, JSON, workers.

Peak memory
  CUDA: torch.cuda.max_memory_allocated() above what was allocated when the measurement started.
  CPU:  the rise of the process's peak resident set (VmHWM, reset through /proc/self/clear_refs) above the resident
        set when the measurement started. glibc keeps freed blocks mapped (its mmap threshold adapts upwards after
        frees), which would hide a later peak behind memory freed earlier; `limit_malloc_caching()` fixes the
        threshold at 128 KiB so large tensors go back to the OS when freed, and the resident set tracks live memory.
  Compare CPU numbers only with CPU numbers measured the same way (they include allocator and library overheads
  that max_memory_allocated does not see).

Each benchmark prints a table and writes JSON (machine, settings, rows) under benchmarks/results/ by default.
"""
from __future__ import annotations

import argparse
import ctypes
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
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results"
SHARED_DATA = REPO.parent / "shared" / "data"
MIB = 2**20

_M_TRIM_THRESHOLD = -1  # mallopt parameters (malloc.h)
_M_MMAP_THRESHOLD = -3


# ---- machine ---------------------------------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str | torch.device = "cpu") -> dict:
    """What a reader needs to compare numbers: CPU, cores, torch threads, torch/Python versions, GPU, date."""
    info = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    device = torch.device(device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    gpu_multiprocessors=props.multi_processor_count, cuda=torch.version.cuda)
    else:
        info["gpu"] = None
    return info


def describe_machine(info: Mapping[str, Any]) -> str:
    """One line for the table footer and the README."""
    gpu = f", GPU {info['gpu']}" if info.get("gpu") else ", no GPU"
    load = info.get("load_average_1min")
    load_text = f", 1-min load {load:.1f}" if load is not None else ""
    return (f"{info['cpu']} ({info['cores']} cores{gpu}), {info['torch_threads']} torch threads, torch "
            f"{info['torch']}, Python {info['python']}, {info['date']}{load_text}")


# ---- timing ----------------------------------------------------------------------------------------------------

def synchronize(device: str | torch.device = "cpu") -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_repeated(fn: Callable[[], Any], *, repeat: int, warmup: int = 1,
                  device: str | torch.device = "cpu") -> list[float]:
    """Seconds of each of `repeat` calls of fn after `warmup` untimed calls (device work included)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    seconds = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return seconds


def timing_summary(seconds: Sequence[float]) -> dict:
    """Median, min and quartiles in milliseconds (the median is what the tables show)."""
    ms = sorted(s * 1e3 for s in seconds)
    quartiles = statistics.quantiles(ms, n=4) if len(ms) >= 2 else [ms[0]] * 3
    return {"median_ms": statistics.median(ms), "min_ms": ms[0], "p25_ms": quartiles[0], "p75_ms": quartiles[2],
            "runs": len(ms)}


# ---- peak memory -----------------------------------------------------------------------------------------------

def limit_malloc_caching(threshold_bytes: int = 128 * 1024) -> bool:
    """Make glibc return large freed blocks to the OS at once (see the module docstring); False if not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, threshold_bytes) == 1
        return ok and libc.mallopt(_M_TRIM_THRESHOLD, threshold_bytes) == 1
    except (OSError, AttributeError):
        return False


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        match = re.search(rf"^{field}:\s+(\d+) kB", handle.read(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {field}")
    return int(match.group(1))


def cpu_peak_reset_supported() -> bool:
    return os.access("/proc/self/clear_refs", os.W_OK)


def reset_cpu_peak() -> None:
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # 5: reset the peak resident set size (VmHWM) to the current one


class PeakMemory:
    """Context manager: `peak_bytes` = the peak memory inside the block above what was in use at its start.

        with PeakMemory("cpu") as mem:
            step()
        mem.peak_bytes, mem.start_bytes
    """

    def __init__(self, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.start_bytes = 0
        self.peak_bytes = 0

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_bytes = torch.cuda.memory_allocated(self.device)
        else:
            if not cpu_peak_reset_supported():
                raise RuntimeError("CPU peak memory needs a writable /proc/self/clear_refs (Linux >= 4.0)")
            reset_cpu_peak()
            self.start_bytes = _status_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self.start_bytes
        else:
            self.peak_bytes = _status_kib("VmHWM") * 1024 - self.start_bytes


def resident_bytes(device: str | torch.device = "cpu") -> int:
    """Memory in use now: resident set on CPU, allocated tensors on CUDA."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    return _status_kib("VmRSS") * 1024


# ---- tables and JSON -------------------------------------------------------------------------------------------

def format_table(columns: Sequence[tuple[str, str, str]], rows: Iterable[Mapping[str, Any]]) -> str:
    """Markdown table. columns: (header, row key, format spec such as '.2f' or '' for str())."""
    lines = ["| " + " | ".join(header for header, _, _ in columns) + " |",
             "|" + "|".join(" --- " for _ in columns) + "|"]
    for row in rows:
        cells = []
        for _, key, spec in columns:
            value = row.get(key)
            if value is None:
                cells.append("–")
            elif isinstance(value, (int, float)) and spec:
                cells.append(format(value, spec))
            else:
                cells.append(str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def default_output(name: str) -> Path:
    return RESULTS_DIR / f"{name}.json"


def write_results(path: Path, *, machine: Mapping[str, Any], settings: Mapping[str, Any],
                  rows: Sequence[Mapping[str, Any]], **extra: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"machine": dict(machine), "settings": _jsonable(settings), "rows": list(rows), **extra}
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path


def _jsonable(settings: Mapping[str, Any]) -> dict:
    return {key: (str(value) if isinstance(value, Path) else value) for key, value in settings.items()}


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


# ---- worker processes ------------------------------------------------------------------------------------------

def benchmark_env(threads: int | None = None, **extra: str) -> dict:
    """Environment for worker processes: offline Hugging Face, fixed thread count, repo importable."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    env.update(extra)
    return env


def run_logged(what: str, command: Sequence[str], log: Path, timeout: float, *, cwd: Path, env: Mapping[str, str],
               label: str) -> tuple[float, str | None]:
    """Run `command` with its output in `log` (headed by the command): (seconds, None) when it succeeded, else
    (seconds, why) naming the log; a timeout is noted in the log as `[label] timed out after N s` (exit 124)."""
    started = time.perf_counter()
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        out.write("$ " + " ".join(command) + "\n")
        out.flush()
        try:
            rc = subprocess.run(list(command), cwd=cwd, env=dict(env), stdout=out, stderr=subprocess.STDOUT,
                                timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            out.write(f"\n[{label}] timed out after {timeout:.0f} s\n")
            rc = 124
    return time.perf_counter() - started, (None if rc == 0 else f"{what} exited {rc}: see {log}")


def run_worker(script: Path | str, spec: Mapping[str, Any], *, world_size: int = 1, python: str = sys.executable,
               env: Mapping[str, str] | None = None, timeout: float = 1800, log_dir: Path | None = None
               ) -> list[dict]:
    """Run `python script --worker SPEC.json RESULT.json` in `world_size` fresh processes; returns their results.

    Each process gets torchrun's variables (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), so
    torch.distributed's env:// initialisation works, and writes its own RESULT.json (list index = rank). A fresh
    process per measurement keeps peak-memory numbers independent of what ran before.
    """
    import tempfile

    from rpo.models.parallel import free_port

    base_env = dict(env or benchmark_env())
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="rpo-bench-") as tmp:
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(json.dumps(_jsonable(spec)))
        processes, results, logs = [], [], []
        for rank in range(world_size):
            rank_env = dict(base_env, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                            LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            result_path = Path(tmp) / f"result-{rank}.json"
            log_path = Path(tmp) / f"log-{rank}.txt"
            handle = open(log_path, "w")
            processes.append((subprocess.Popen([python, str(script), "--worker", str(spec_path), str(result_path)],
                                               env=rank_env, stdout=handle, stderr=subprocess.STDOUT),
                              handle, result_path, log_path))
        deadline = time.monotonic() + timeout
        failed = []
        for process, handle, result_path, log_path in processes:
            try:
                code = process.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                for other, *_ in processes:
                    other.kill()
                code = "timeout"
            handle.close()
            text = log_path.read_text()
            logs.append(text)
            if code != 0 or not result_path.is_file():
                failed.append((code, text))
            else:
                results.append(json.loads(result_path.read_text()))
        if log_dir is not None:
            log_dir.mkdir(parents=True, exist_ok=True)
            for rank, text in enumerate(logs):
                (log_dir / f"{Path(script).stem}-rank{rank}.log").write_text(text)
        if failed:
            code, text = failed[0]
            tail = "\n".join(text.splitlines()[-40:])
            raise RuntimeError(f"worker {Path(script).name} {dict(spec)} failed (exit {code}):\n{tail}")
        return results


def benchmark_main(description: str, add_arguments: Callable[[argparse.ArgumentParser], None],
                   run: Callable[[argparse.Namespace, argparse.ArgumentParser], int | None],
                   worker: Callable[[dict], Mapping[str, Any]] | None = None,
                   argv: Sequence[str] | None = None) -> int:
    """The entry point of a benchmark script: `main = lambda argv=None: benchmark_main(__doc__, ...)`.

    With `--worker SPEC RESULT` (a process started by run_worker) it runs `worker(spec)` and writes its result;
    otherwise it parses the script's options (`add_arguments(parser)`, its docstring as help) and returns
    `run(args, parser)` (None counts as 0).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if worker is not None:
        io = worker_io(argv)
        if io is not None:
            spec, result_path = io
            write_worker_result(result_path, worker(spec))
            return 0
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv), parser) or 0


def report(out: Path, columns: Sequence[tuple[str, str, str]], rows: Sequence[Mapping[str, Any]], *,
           machine: Mapping[str, Any], settings: Mapping[str, Any], notes: Sequence[str] = (),
           **extra: Any) -> Path:
    """Print the table, the machine line and `notes`; write the JSON results to `out`; returns its path."""
    print()
    print(format_table(columns, rows))
    print(f"\nmachine: {describe_machine(machine)}")
    for note in notes:
        print(note)
    path = write_results(out, machine=machine, settings=settings, rows=rows, **extra)
    print(f"wrote {path}")
    return path


def worker_io(argv: Sequence[str]) -> tuple[dict, Path] | None:
    """(spec, result path) when argv is `--worker SPEC RESULT`, else None."""
    if len(argv) == 3 and argv[0] == "--worker":
        return json.loads(Path(argv[1]).read_text()), Path(argv[2])
    return None


def write_worker_result(path: Path, result: Mapping[str, Any]) -> None:
    Path(path).write_text(json.dumps(dict(result), default=str))


# ---- shared assets ---------------------------------------------------------------------------------------------

def smollm2_folder() -> Path:
    """The embedded SmolLM2-135M-Instruct as an HF folder (converted from the packaged GGUF once, cached)."""
    from rpo.models.default_model import default_model_path

    return Path(default_model_path())


def tiny_llama_folder(root: Path, *, hidden: int = 128, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                      intermediate: int = 256, max_positions: int = 2048, seed: int = 0) -> Path:
    """A random tiny LLaMA with SmolLM2's tokenizer (vocabulary 49152) as an HF folder under root (cached by shape).

    Only the transformer is tiny: the embedding and output layer keep the real 49k vocabulary, which is what
    decides the memory of the log-prob path.
    """
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    name = f"tiny-llama-h{hidden}-l{layers}-a{heads}-kv{kv_heads}-f{intermediate}-s{seed}"
    folder = Path(root) / name
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return folder
    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_folder()))
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=max_positions, rms_norm_eps=1e-5, tie_word_embeddings=True,
                         initializer_range=0.02, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    staging = folder.with_name(folder.name + f".tmp-{os.getpid()}")
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    os.replace(staging, folder)
    return folder


def short_paired_subset(root: Path, rows: int, *, prompt_tokens: int, response_tokens: int) -> Path:
    """The first `rows` rows of ../shared/data/paired.jsonl, shortened so that no library needs to truncate.

    Each row keeps its last user message cut to its first `prompt_tokens` tokens and its answers cut to their
    first `response_tokens` tokens (SmolLM2's tokenizer, decoded back to text). Libraries truncate differently
    (rpo: prompt from the left, answer from the right; TRL: prompt + answer from the right), so comparisons feed
    both the same short rows and a max_length above every row.
    """
    from transformers import AutoTokenizer

    path = Path(root) / f"paired-{rows}-p{prompt_tokens}-r{response_tokens}.jsonl"
    if path.is_file():
        return path
    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_folder()))

    def head(text: str, tokens: int) -> str:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:tokens]
        return tokenizer.decode(ids).strip()

    source = SHARED_DATA / "paired.jsonl"
    out = []
    for line in source.read_text().splitlines()[:rows]:
        row = json.loads(line)
        user = [m for m in row["prompt"] if m["role"] == "user"][-1]
        out.append({"prompt": [{"role": "user", "content": head(user["content"], prompt_tokens)}],
                    "chosen": [{"role": "assistant", "content": head(row["chosen"][0]["content"], response_tokens)}],
                    "rejected": [{"role": "assistant",
                                  "content": head(row["rejected"][0]["content"], response_tokens)}]})
    if len(out) < rows:
        raise ValueError(f"{source} has {len(out)} rows, fewer than the {rows} asked for")
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(path.name + f".tmp-{os.getpid()}")
    staging.write_text("".join(json.dumps(row) + "\n" for row in out))
    os.replace(staging, path)
    return path


def cache_root() -> Path:
    """Benchmark assets (tiny models, data slices, embedding caches): benchmarks/results/.cache (git-ignored)."""
    return RESULTS_DIR / ".cache"
