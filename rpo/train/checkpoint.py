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
ones. Re-saving a step that exists renames the old folder aside (``.old-step-…``) before the new one is renamed in,
and deletes it only then. Tensors go to safetensors, everything else to JSON: nothing is unpickled on load.

Verified: ``trainer.json`` records each file's size and SHA-256 (every rank hashes what it wrote) and a checksum
of its own content. `load_checkpoint` checks what a rank reads before using it; a checkpoint that fails (a flipped
bit, a truncated file, a missing rank file, unreadable JSON) raises `CheckpointDamaged` naming the file, and the
trainer's ``--resume`` falls back to the newest intact one. Hashing costs about 1 s per GB at save and at load
(each rank its own files, in parallel).

A run stopped by the divergence guard renames the checkpoint written just before the first skipped step (its
weights gave the non-finite numbers) to ``diverged-step-…``, so ``--resume`` continues from the last good one.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from rpo.train.exits import OutputWriteError

logger = logging.getLogger("rpo.train")

STEP_DIR = re.compile(r"^step-(\d{8})$")
FORMAT_VERSION = 2  # 2: file sizes and SHA-256 in trainer.json; 1 (unverified) is still read
READABLE_VERSIONS = (1, 2)
MANIFEST = "trainer.json"
_HASH_CHUNK = 16 << 20


class CheckpointDamaged(ValueError):
    """A checkpoint that fails verification or cannot be read; the message names the folder, file and problem."""

    def __init__(self, path: Path, problem: str):
        self.path, self.problem = Path(path), problem
        super().__init__(f"{self.path.name}: {problem}")


class CheckpointWriteError(OutputWriteError):
    """A checkpoint could not be written (disk full, ...): every rank raises it; the earlier ones are untouched."""


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


def _gather(value: Any) -> List[Any]:
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [value]
    gathered: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def _is_write_error(error: BaseException) -> bool:
    # safetensors reports a failed write (disk full, ...) as its own SafetensorError, not as an OSError.
    return isinstance(error, OSError) or type(error).__name__ == "SafetensorError"


def _together(what: str, work) -> Any:
    """Run `work()` on this rank; if it fails on any rank, every rank raises: CheckpointWriteError naming the first
    failing rank for a write error, else that rank's own exception there and RankFailure on the others."""
    from rpo.train.ranks import RankFailure

    result, outcome = None, None
    try:
        result = work()
    except Exception as error:  # noqa: BLE001 - shared with the other ranks below
        outcome = (_rank(), _is_write_error(error), type(error).__name__, " ".join(str(error).split()), error)
    failures = [o for o in _gather(None if outcome is None else outcome[:4]) if o is not None]
    if failures:
        rank, write_error, kind, message = failures[0]
        if write_error:
            raise CheckpointWriteError(f"could not write {what} (rank {rank}: {message}); the earlier checkpoints "
                                       f"are untouched") from (outcome[4] if outcome else None)
        if outcome is not None and outcome[0] == rank:
            raise outcome[4]
        raise RankFailure(rank, kind, message)
    return result


def file_digest(path: Path) -> Dict[str, Any]:
    """{"bytes": size, "sha256": hex digest} of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return {"bytes": Path(path).stat().st_size, "sha256": digest.hexdigest()}


def _manifest_checksum(manifest: Dict[str, Any]) -> str:
    body = {key: value for key, value in manifest.items() if key != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def save_checkpoint(root: Path, step: int, *, trainer_state: Dict[str, Any], model_state: Optional[Dict[str, Any]],
                    optimizer_state: Any, rank_state: Dict[str, Any], tp_rank: int,
                    dp_rank: Optional[int] = None) -> Path:
    """Collective: every rank calls it. Ranks that hold a unique copy pass model_state/optimizer_state (others
    None); every rank passes its own rank_state; global rank 0's trainer_state is written. `dp_rank`: the
    optimizer state is this data-parallel rank's shard (the distributed optimizer: every rank passes its own).

    A failure on any rank (disk full, ...) raises CheckpointWriteError on every rank and leaves no partial folder;
    older checkpoints are never touched. Deleting old checkpoints is `prune_checkpoints`'s job."""
    root = Path(root)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    what = f"the checkpoint of step {step} in {root}"

    def prepare():
        if _rank() == 0:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()

    def write() -> Dict[str, Dict[str, Any]]:
        names = []
        if model_state is not None:
            name = f"model-tp{tp_rank:02d}.safetensors"
            save_file({k: v.detach().to("cpu", copy=True).contiguous() for k, v in model_state.items()},
                      str(tmp / name))
            names.append(name)
        if optimizer_state is not None:
            stem = _optimizer_stem(tp_rank, dp_rank)
            save_nested(optimizer_state, tmp / stem)
            names += [stem + ".safetensors", stem + ".json"]
        stem = f"rank-{_rank():05d}"
        save_nested(rank_state, tmp / stem)
        names += [stem + ".safetensors", stem + ".json"]
        return {name: file_digest(tmp / name) for name in names}

    def commit():
        if _rank() != 0:
            return
        manifest = {"format": FORMAT_VERSION, **trainer_state, "files": files}
        manifest["checksum"] = _manifest_checksum(manifest)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        _fsync_dir(tmp)
        replace_folder(tmp, final)
        _fsync_dir(root)

    try:
        _together(what, prepare)
        files: Dict[str, Dict[str, Any]] = {}
        for digests in _gather(_together(what, write)):
            files.update(digests)
        _together(what, commit)
    except BaseException:
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def replace_folder(new: Path, final: Path) -> None:
    """Rename `new` to `final`; an existing `final` is renamed aside first and deleted only after (a crash in
    between leaves it as .old-…, which `remove_partial_checkpoints` restores)."""
    aside = final.with_name(f".old-{final.name}")
    if final.exists():
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(final, aside)
    os.replace(new, final)
    shutil.rmtree(aside, ignore_errors=True)


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


def list_checkpoints(root: Path) -> List[Path]:
    """The complete checkpoints under `root`, oldest first (not partial, set-aside or diverged ones)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name)), key=lambda p: p.name)


def latest_checkpoint(root: Path) -> Optional[Path]:
    found = list_checkpoints(root)
    return found[-1] if found else None


def checkpoint_step(path: Path) -> int:
    return int(Path(path).name.rsplit("-", 1)[-1])


def remove_partial_checkpoints(root: Path) -> None:
    """Leftovers of a run killed while saving: partial .tmp-* folders are deleted; an .old-step-* folder (killed
    while replacing that step) is restored when its step folder is missing, else deleted. Call on one rank."""
    root = Path(root)
    if not root.is_dir():
        return
    for partial in root.glob(".tmp-step-*"):
        shutil.rmtree(partial, ignore_errors=True)
    for aside in root.glob(".old-step-*"):
        final = root / aside.name[len(".old-"):]
        if final.exists():
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(aside, final)


def prune_checkpoints(root: Path, keep: int) -> List[Path]:
    """Delete all but the newest `keep` checkpoints (keep 0: delete none); returns the deleted folders. One rank."""
    if keep <= 0:
        return []
    old = list_checkpoints(root)[:-keep]
    for path in old:
        shutil.rmtree(path, ignore_errors=True)
    return old


def mark_diverged(path: Path) -> Path:
    """Rename a checkpoint whose weights produced non-finite numbers to diverged-step-…, out of --resume's way."""
    path = Path(path)
    target = path.with_name(f"diverged-{path.name}")
    shutil.rmtree(target, ignore_errors=True)
    os.replace(path, target)
    return target


# --- verified reading ------------------------------------------------------------------------------------------
def load_trainer_state(path: Path) -> Dict[str, Any]:
    """trainer.json of a checkpoint, checked: readable JSON, a known format, its own checksum (format 2)."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        if not path.is_dir():
            raise FileNotFoundError(f"--resume {path}: no such checkpoint folder")
        # trainer.json is written last, before the folder is renamed in: a folder without it is damaged.
        raise CheckpointDamaged(path, f"{MANIFEST} is missing (not a complete checkpoint)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointDamaged(path, f"{MANIFEST} cannot be read ({error})") from None
    if not isinstance(manifest, dict) or manifest.get("format") not in READABLE_VERSIONS:
        version = manifest.get("format") if isinstance(manifest, dict) else None
        raise CheckpointDamaged(path, f"{MANIFEST}: unknown checkpoint format {version!r} (this rpo reads "
                                      f"{', '.join(map(str, READABLE_VERSIONS))})")
    if manifest["format"] >= 2 and manifest.get("checksum") != _manifest_checksum(manifest):
        raise CheckpointDamaged(path, f"{MANIFEST} does not match its checksum (changed after it was written)")
    return manifest


def verify_file(path: Path, name: str, manifest: Dict[str, Any]) -> Path:
    """The checkpoint file `name`, after checking it against the manifest's size and SHA-256."""
    file = Path(path) / name
    if not file.is_file():
        raise CheckpointDamaged(path, f"{name} is missing")
    if manifest.get("format", 1) < 2:
        return file  # written before checksums were recorded
    expected = manifest["files"].get(name)
    if expected is None:
        raise CheckpointDamaged(path, f"{name} is not listed in {MANIFEST}")
    size = file.stat().st_size
    if size != expected["bytes"]:
        raise CheckpointDamaged(path, f"{name} has {size} bytes, {expected['bytes']} were written (truncated or "
                                      f"replaced)")
    if file_digest(file)["sha256"] != expected["sha256"]:
        raise CheckpointDamaged(path, f"{name}: SHA-256 differs from the one recorded at save (its bytes changed)")
    return file


def _read(path: Path, what: str, read):
    try:
        return read()
    except CheckpointDamaged:
        raise
    except Exception as error:  # noqa: BLE001 - an unreadable file of an old-format checkpoint
        raise CheckpointDamaged(path, f"{what} cannot be read ({type(error).__name__}: "
                                      f"{' '.join(str(error).split())})") from None


def load_checkpoint(path: Path, *, rank: int, tp_rank: int, optimizer_shard: Optional[int] = None
                    ) -> Dict[str, Any]:
    """What one rank needs from a checkpoint, verified: {"trainer": trainer.json, "model": its TP rank's
    parameters, "optimizer": its optimizer state (or DP shard), "rank": its RNG / data / log state}.

    Raises CheckpointDamaged (a file fails its check or cannot be read), FileNotFoundError (no checkpoint there,
    or no state for this rank: another launch size)."""
    path = Path(path)
    manifest = load_trainer_state(path)
    rank_stem = f"rank-{rank:05d}"
    if not (path / f"{rank_stem}.json").is_file() and manifest.get("format", 1) >= 2 \
            and f"{rank_stem}.json" not in manifest["files"]:
        raise FileNotFoundError(f"--resume {path}: no state for rank {rank}; resume with the same number of "
                                f"processes and --tensor-parallel as the run that wrote it")
    model_name = f"model-tp{tp_rank:02d}.safetensors"
    model = _read(path, model_name, lambda: load_file(str(verify_file(path, model_name, manifest))))
    optimizer_stem = _optimizer_stem(tp_rank, optimizer_shard)
    optimizer = _read(path, optimizer_stem, lambda: _load_nested_verified(path, optimizer_stem, manifest))
    rank_state = _read(path, rank_stem, lambda: _load_nested_verified(path, rank_stem, manifest))
    return {"trainer": manifest, "model": model, "optimizer": optimizer, "rank": rank_state}


def _load_nested_verified(path: Path, stem: str, manifest: Dict[str, Any]) -> Any:
    tensors = load_file(str(verify_file(path, stem + ".safetensors", manifest)))
    return unflatten_state(json.loads(verify_file(path, stem + ".json", manifest).read_text()), tensors)


def load_model_state(path: Path, tp_rank: int) -> Dict[str, torch.Tensor]:
    """A TP rank's parameters, verified."""
    manifest = load_trainer_state(path)
    return load_file(str(verify_file(path, f"model-tp{tp_rank:02d}.safetensors", manifest)))


def _optimizer_stem(tp_rank: int, dp_rank: Optional[int]) -> str:
    return f"optimizer-tp{tp_rank:02d}" + ("" if dp_rank is None else f"-dp{dp_rank:02d}")
