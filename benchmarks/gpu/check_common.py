"""What the GPU check's Python stages share: the carried assets, random-weight models built from their configs,
timing/memory figures, model FLOPs for MFU, and the stage result file.

The GPU machine has no registry and no network, and only 64 MiB travel with a call, so no model weights travel:
`benchmarks/gpu/assets.py` (run by `make gpu-wheels`) stages the configs and tokenizers of SmolLM2-135M-Instruct
and all-MiniLM-L6-v2 and 64 rows of the shared paired data, and the stages build models with random weights
(fixed seeds) from those configs. Systems figures (speed, memory, numerics of bf16 vs fp32) do not need trained
weights.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import time
from pathlib import Path
from typing import Any, Dict, Optional

import torch

SMOLLM2_DIR = "smollm2-135m"  # config + tokenizer of SmolLM2-135M-Instruct (the embedded default)
MINILM_DIR = "minilm-l6"  # SentenceTransformer folder of all-MiniLM-L6-v2 without its weights
PAIRED_DATA = "paired.jsonl"

# Dense bf16 tensor-core peaks from the vendors' datasheets (TFLOP/s, no sparsity), by device-name substring.
BF16_PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4, "GH200": 989.4, "B200": 2250.0, "A100": 312.0,
                    "L40S": 362.1, "L4": 121.0, "A10": 125.0}

# Sizes for the dry run on a CPU: the same code paths, seconds instead of minutes.
TINY_LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16)
TINY_BERT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)


def dry_run() -> bool:
    return os.environ.get("GPU_CHECK_DRY_RUN") == "1"


def device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def workdir(prefix: str) -> Path:
    """A scratch folder inside the script's GPU_CHECK_WORK (removed at its end), else in the system's temp."""
    import tempfile

    return Path(tempfile.mkdtemp(prefix=prefix, dir=os.environ.get("GPU_CHECK_WORK")))


def assets_dir() -> Path:
    folder = Path(os.environ.get("GPU_CHECK_ASSETS", ".gpu-bundle/assets"))
    missing = [name for name in (SMOLLM2_DIR, MINILM_DIR, PAIRED_DATA) if not (folder / name).exists()]
    if missing:
        raise SystemExit(f"GPU_CHECK_ASSETS={folder} lacks {missing}: run `make gpu-wheels` (or "
                         f"`python benchmarks/gpu/assets.py {folder}`) and carry the folder")
    return folder


def random_llama(folder: Path, *, seed: int = 0, **overrides) -> Path:
    """A LLaMA with SmolLM2's tokenizer and random weights (bf16 on disk) as an HF folder; SmolLM2-135M's
    architecture unless `overrides` change it (e.g. a 1B-class shape)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    source = assets_dir() / SMOLLM2_DIR
    config = LlamaConfig.from_pretrained(source)
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    with torch.device(device()):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(source).save_pretrained(folder)
    del model
    release_memory()
    return folder


def random_sentence_transformer(folder: Path, *, seed: int = 0, **overrides) -> Path:
    """all-MiniLM-L6-v2's SentenceTransformer folder (tokenizer, pooling, normalisation) with random BERT weights."""
    from transformers import BertConfig, BertModel

    shutil.copytree(assets_dir() / MINILM_DIR, folder)
    config = BertConfig.from_pretrained(folder)
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(folder)
    return folder


def llama_matmul_params(config) -> int:
    """Parameters that take part in matrix products per token: the transformer layers and the output layer
    (the embedding lookup is not a product; a tied output layer still is one)."""
    hidden, layers, ffn = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    q_out = config.num_attention_heads * head_dim
    kv_out = config.num_key_value_heads * head_dim
    per_layer = hidden * q_out + 2 * hidden * kv_out + q_out * hidden + 3 * hidden * ffn
    return layers * per_layer + config.vocab_size * hidden


def train_flops_per_token(config, mean_sequence: float, *, reference_forward: bool) -> float:
    """Model FLOPs per token of a preference step: the policy's forward + backward (6 P + 12 L d s) and, with a
    live reference model, its forward (2 P + 4 L d s); P = llama_matmul_params, d = attention width, s = mean
    sequence length. Work repeated by recomputation or the two-pass global contrast is not counted (MFU, not
    hardware FLOPs)."""
    params = llama_matmul_params(config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    attention = config.num_hidden_layers * config.num_attention_heads * head_dim * mean_sequence
    flops = 6 * params + 12 * attention
    if reference_forward:
        flops += 2 * params + 4 * attention
    return flops


def bf16_peak_flops() -> Optional[float]:
    """Peak dense bf16 FLOP/s of this GPU (GPU_CHECK_PEAK_TFLOPS overrides), None on a CPU or an unknown card."""
    if os.environ.get("GPU_CHECK_PEAK_TFLOPS"):
        return float(os.environ["GPU_CHECK_PEAK_TFLOPS"]) * 1e12
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, tflops in BF16_PEAK_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


def reset_peak_memory() -> int:
    """Start a peak-memory window; returns the bytes allocated now (0 on a CPU: peaks are GPU-only here)."""
    if not torch.cuda.is_available():
        return 0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def peak_memory_gib() -> Optional[float]:
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


def release_memory() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def read_metrics(run_dir: Path) -> list[Dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def step_figures(records: list[Dict[str, Any]], config, *, reference_forward: bool, pairs_per_step: int) -> dict:
    """Speed figures of a run's logged steps: the first step (warm-up: kernel selection, allocator growth) is
    left out when there are more."""
    timed = records[1:] if len(records) > 1 else records
    step_time = statistics.median(r["step_time"] for r in timed)
    tokens_per_s = statistics.median(r["tokens_per_s"] for r in timed)
    mean_sequence = tokens_per_s * step_time / (2 * pairs_per_step)  # chosen + rejected sequences per pair
    flops_per_token = train_flops_per_token(config, mean_sequence, reference_forward=reference_forward)
    peak = bf16_peak_flops()
    return {"steps": len(records), "step_time_s": step_time, "tokens_per_s": tokens_per_s,
            "mean_sequence_tokens": mean_sequence, "model_tflops_per_s": tokens_per_s * flops_per_token / 1e12,
            "mfu": tokens_per_s * flops_per_token / peak if peak else None,
            "loss": [r["loss"] for r in records]}


def package_versions(*names: str) -> Dict[str, Optional[str]]:
    import importlib.metadata

    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def relative_difference(value: float, reference: float) -> float:
    return abs(value - reference) / max(abs(reference), 1e-30)


def finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


class StageResult:
    """The JSON a stage leaves for summary.json: a status and its figures, written even when a case fails."""

    def __init__(self, path: Path, stage: str):
        self.path, self.started = Path(path), time.perf_counter()
        self.data: Dict[str, Any] = {"stage": stage, "dry_run": dry_run(), "device": str(device()),
                                     "device_name": torch.cuda.get_device_name() if torch.cuda.is_available()
                                     else None, "cases": {}}

    def case(self, name: str, status: str, **figures) -> None:
        self.data["cases"][name] = {"status": status, **figures}
        print(f"[{self.data['stage']}] {name}: {status} {json.dumps(figures, default=str)}", flush=True)
        self.write()

    def write(self) -> None:
        self.data["seconds"] = time.perf_counter() - self.started
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=2, default=str) + "\n")

    def exit_code(self) -> int:
        """0 when no case failed ("not available" options are not failures)."""
        self.write()
        return int(any(case["status"] == "failed" for case in self.data["cases"].values()))


def start_stage(name: str, doc: str, workdir_prefix: str, argv=None):
    """A trainer stage's common start: its result file from the command line, quiet logging, a work folder (the
    rpo cache inside), and the random SmolLM2-shaped LLaMA and MiniLM-shaped embedder (tiny ones in a dry run).
    Returns (StageResult, work folder, dry run?, model folder, embedder folder)."""
    import argparse
    import logging
    import os

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("result", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if not torch.cuda.is_available():
        torch.set_flush_denormal(True)
    result = StageResult(args.result, name)
    folder = workdir(workdir_prefix)
    os.environ.setdefault("RPO_CACHE_DIR", str(folder / "cache"))
    tiny = dry_run()
    model = random_llama(folder / "model", **(TINY_LLAMA if tiny else {}))
    embedder = random_sentence_transformer(folder / "embedder", **(TINY_BERT if tiny else {}))
    return result, folder, tiny, model, embedder

