"""Resumable run checkpoints: model, optimiser, scheduler, RNG and data position, written atomically.

Layout of ``<output-dir>/checkpoints/step-00000120/`` (a shared filesystem across nodes, as Megatron assumes):

    trainer.json                    step, scheduler, topology, config (global rank 0)
    model-tp00.safetensors          this tensor-parallel rank's parameters (data-parallel rank 0 of each TP rank;
                                    DP replicas hold identical weights and optimiser state)
    optimizer-tp00.safetensors/.json  the optimiser state (tensors / the rest of the nested state); with the
                                    distributed optimizer one shard per data-parallel rank: optimizer-tp00-dp00
    rank-00000.safetensors/.json    per-rank RNG states and data position

Everything is written into ``.tmp-step-00000120`` first and renamed once every rank has finished (a rename is
atomic), so a run killed mid-save leaves no half checkpoint behind; ``latest_checkpoint`` only ever sees complete
ones. Tensors go to safetensors, everything else to JSON: nothing is unpickled on load.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from rpo.manifest import read_manifest

STEP_DIR = re.compile(r"^step-(\d{8})$")
FORMAT_VERSION = 1


# --- nested state <-> (JSON skeleton, tensors) ------------------------------------------------------------------
def flatten_state(obj: Any) -> Tuple[Any, Dict[str, torch.Tensor]]:
    """Split a nested state (dicts with any keys, lists, tuples, tensors, numpy arrays, scalars) into a JSON-able
    skeleton and a flat {key: tensor} dict for safetensors."""
    tensors: Dict[str, torch.Tensor] = {}

    def encode(value, path):
        if isinstance(value, torch.Tensor):
            key = f"t{len(tensors)}"
            # safetensors refuses views sharing storage; clone into an owned, contiguous CPU tensor.
            tensors[key] = value.detach().to("cpu", copy=True).contiguous()
            return {"__tensor__": key}
        if isinstance(value, np.ndarray):
            key = f"t{len(tensors)}"
            tensors[key] = torch.from_numpy(np.ascontiguousarray(value).copy())
            return {"__ndarray__": key}
        if isinstance(value, dict):
            return {"__dict__": [[encode(k, f"{path}.<key>"), encode(v, f"{path}.{k}")] for k, v in value.items()]}
        if isinstance(value, tuple):
            return {"__tuple__": [encode(v, f"{path}[{i}]") for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [encode(v, f"{path}[{i}]") for i, v in enumerate(value)]
        if isinstance(value, (bool, int, float, str)) or value is None:
            return value
        if isinstance(value, (np.integer, np.floating)):
            return value.item()
        raise TypeError(f"checkpoint: cannot store {type(value).__name__} at {path}")

    return encode(obj, "state"), tensors


def unflatten_state(skeleton: Any, tensors: Dict[str, torch.Tensor]) -> Any:
    def decode(value):
        if isinstance(value, dict):
            if "__tensor__" in value:
                return tensors[value["__tensor__"]]
            if "__ndarray__" in value:
                return tensors[value["__ndarray__"]].numpy()
            if "__dict__" in value:
                return {_hashable(decode(k)): decode(v) for k, v in value["__dict__"]}
            if "__tuple__" in value:
                return tuple(decode(v) for v in value["__tuple__"])
            raise ValueError(f"checkpoint: malformed entry {value!r}")
        if isinstance(value, list):
            return [decode(v) for v in value]
        return value

    return decode(skeleton)


def _hashable(key):
    return tuple(key) if isinstance(key, list) else key


def save_nested(state: Any, stem: Path) -> None:
    skeleton, tensors = flatten_state(state)
    save_file(tensors, str(stem.with_suffix(".safetensors")))
    stem.with_suffix(".json").write_text(json.dumps(skeleton))


def load_nested(stem: Path) -> Any:
    tensors = load_file(str(stem.with_suffix(".safetensors")))
    return unflatten_state(json.loads(stem.with_suffix(".json").read_text()), tensors)


# --- RNG -----------------------------------------------------------------------------------------------------
def rng_state() -> Dict[str, Any]:
    """Every generator a step can draw from: Python, NumPy, torch CPU/CUDA, Megatron's model-parallel tracker."""
    state: Dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(),
                             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    tracker = _megatron_rng_tracker()
    if tracker is not None:
        state["megatron"] = dict(tracker.get_states())
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    tracker = _megatron_rng_tracker()
    if tracker is not None and state.get("megatron"):
        tracker.set_states(state["megatron"])


def _megatron_rng_tracker():
    try:
        from megatron.core import tensor_parallel
    except ImportError:
        return None
    tracker = tensor_parallel.get_cuda_rng_tracker()
    return tracker if getattr(tracker, "states_", None) else None


# --- save / load ---------------------------------------------------------------------------------------------
def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_checkpoint(root: Path, step: int, *, trainer_state: Dict[str, Any], model_state: Optional[Dict[str, Any]],
                    optimizer_state: Any, rank_state: Dict[str, Any], tp_rank: int, keep: int = 0,
                    dp_rank: Optional[int] = None) -> Path:
    """Collective: every rank calls it. Ranks that hold a unique copy pass model_state/optimizer_state (others
    None); every rank passes its own rank_state; global rank 0's trainer_state is written. `dp_rank`: the
    optimizer state is this data-parallel rank's shard (the distributed optimizer: every rank passes its own)."""
    root = Path(root)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    _barrier()
    if model_state is not None:
        save_file({k: v.detach().to("cpu", copy=True).contiguous() for k, v in model_state.items()},
                  str(tmp / f"model-tp{tp_rank:02d}.safetensors"))
    if optimizer_state is not None:
        save_nested(optimizer_state, tmp / _optimizer_stem(tp_rank, dp_rank))
    save_nested(rank_state, tmp / f"rank-{_rank():05d}")
    _barrier()
    if _rank() == 0:
        (tmp / "trainer.json").write_text(json.dumps({"format": FORMAT_VERSION, **trainer_state}, indent=1))
        _fsync_dir(tmp)
        if final.exists():  # a re-save of the same step (e.g. after a resume): replace it whole
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        if keep > 0:
            for old in list_checkpoints(root)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def _fsync_dir(path: Path) -> None:
    for file in path.iterdir() if path.is_dir() else []:
        if file.is_file():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def list_checkpoints(root: Path):
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name)), key=lambda p: p.name)


def latest_checkpoint(root: Path) -> Optional[Path]:
    found = list_checkpoints(root)
    return found[-1] if found else None


def remove_partial_checkpoints(root: Path) -> None:
    """Leftovers of a run killed while saving (never complete; safe to delete). Call on one rank."""
    root = Path(root)
    if root.is_dir():
        for partial in root.glob(".tmp-step-*"):
            shutil.rmtree(partial, ignore_errors=True)


def load_trainer_state(path: Path) -> Dict[str, Any]:
    path = Path(path)
    return read_manifest(path / "trainer.json", version_key="format", version=FORMAT_VERSION,
                         label=f"--resume {path}: checkpoint",
                         missing=f"--resume {path}: not a checkpoint folder (no trainer.json)")


def load_model_state(path: Path, tp_rank: int) -> Dict[str, torch.Tensor]:
    return load_file(str(Path(path) / f"model-tp{tp_rank:02d}.safetensors"))


def _optimizer_stem(tp_rank: int, dp_rank: Optional[int]) -> str:
    return f"optimizer-tp{tp_rank:02d}" + ("" if dp_rank is None else f"-dp{dp_rank:02d}")


def load_optimizer_state(path: Path, tp_rank: int, dp_rank: Optional[int] = None) -> Any:
    """The optimizer state of a TP rank, or (`dp_rank` given) its data-parallel shard."""
    return load_nested(Path(path) / _optimizer_stem(tp_rank, dp_rank))


def load_rank_state(path: Path, rank: int) -> Dict[str, Any]:
    stem = Path(path) / f"rank-{rank:05d}"
    if not stem.with_suffix(".json").is_file():
        raise FileNotFoundError(f"--resume {path}: no state for rank {rank}; resume with the same number of "
                                f"processes and --tensor-parallel as the run that wrote it")
    return load_nested(stem)
