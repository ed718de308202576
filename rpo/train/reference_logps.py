"""The frozen reference's per-sequence log-probs, from one source chosen at set-up:

- a live model: a frozen copy of the policy's starting weights (the default) or --reference-model, run on every
  batch;
- a precomputed table (--precompute-reference): one pass over every row before training, cached on disk under
  <cache>/reference_logps/ keyed by the reference model and the tokenised rows; the model is then not kept.

`ReferenceLogps(batch, split)` answers the same on both: [R] float32 log-probs of the batch's sequences (chosen
rows first), on the trainer's device.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional

import numpy as np
import torch
import torch.distributed as dist

from rpo.models.packing import sequence_logps
from rpo.progress import StageProgress
from rpo.train.metrics import collective_device

logger = logging.getLogger("rpo.train")


class ReferenceLogps:
    """Reference log-probs of a batch: from `model` (live) or from `tables` ({split: [rows, response fields]})."""

    def __init__(self, *, model=None, tables: Optional[Dict[str, torch.Tensor]] = None,
                 device: torch.device = torch.device("cpu")):
        if (model is None) == (tables is None):
            raise ValueError("ReferenceLogps takes a model or precomputed tables, not both or neither")
        self.model = model
        self.tables = tables or {}
        self.device = device

    def __call__(self, batch: Mapping[str, Any], split: str = "train", packing=None) -> torch.Tensor:
        """`packing`: the batch's PackPlan for a live model (a precomputed table needs none)."""
        if self.model is not None:
            return sequence_logps(self.model, batch, grad=False, packing=packing)[0].detach()
        table = self.tables[split]
        row_ids, m = batch["row_ids"], batch["num_chosen"]
        if table.shape[1] == 2:  # paired: column 0 chosen, column 1 rejected
            values = torch.cat([table[row_ids[:m], 0], table[row_ids[m:], 1]])
        else:
            values = table[row_ids, 0]
        return values.to(self.device)


def precompute_reference_logps(datasets: Mapping[str, Any], *, load_model: Callable[[], Any], fingerprint: List[Any],
                               batch_size: int, cache_root: Path, dp_group, device: torch.device,
                               progress_bar: bool = True) -> ReferenceLogps:
    """Tables of every split in `datasets` ({split: (tokenized, source name)}): from the cache, or one pass now.

    Collective over the launch. `load_model()` gives the reference model, called only when a table is missing;
    `fingerprint` identifies it (model files, dtype, lengths) in the cache key.
    """
    model = None
    tables = {}
    for split, (tokenized, source) in datasets.items():
        path = _cache_file(cache_root, fingerprint, tokenized)
        # One decision for all ranks (a file appearing between two ranks' checks must not split them).
        decision = [path.is_file()]
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast_object_list(decision, src=0)
        if decision[0]:
            from safetensors.torch import load_file

            tables[split] = load_file(str(path))["logps"]
            if _rank() == 0:
                logger.info("reference log-probs of %s loaded from %s", source, path)
            continue
        model = model if model is not None else load_model()
        tables[split] = _compute_table(model, tokenized, source, path, batch_size, dp_group, progress_bar)
    return ReferenceLogps(tables=tables, device=device)


def _compute_table(model, tokenized, source: str, path: Path, batch_size: int, dp_group,
                   progress_bar: bool) -> torch.Tensor:
    from safetensors.torch import save_file

    from rpo.data import collate_preference_batch

    started = time.perf_counter()
    rows = len(tokenized)
    fields = tokenized.response_fields
    dp_rank, dp_size = _group_rank_size(dp_group)
    table = torch.zeros(rows, len(fields), dtype=torch.float64)
    mine = list(range(dp_rank, rows, dp_size))  # TP ranks of one DP rank share rows
    chunks = [mine[start:start + batch_size] for start in range(0, len(mine), batch_size)]
    with StageProgress(f"reference log-probs of {source}", len(chunks) * len(fields), unit="batches",
                       progress=progress_bar and _rank() == 0, logger=logger) as progress:
        for chunk in chunks:
            for f, field in enumerate(fields):
                sequences = [tokenized.sequence(i, field) for i in chunk]
                batch = collate_preference_batch(sequences, [], chunk, None, paired=False,
                                                 pad_token_id=tokenized.pad_token_id)
                logps, _ = sequence_logps(model, batch, grad=False)
                table[torch.as_tensor(chunk), f] = logps.double().cpu()
                progress.update(1)
    if dp_size > 1:  # every row was computed by exactly one DP rank
        table = table.to(collective_device(dp_group))
        dist.all_reduce(table, group=dp_group)
    table = table.float().cpu()
    if _rank() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp-{os.getpid()}")
        save_file({"logps": table.contiguous()}, str(tmp), metadata={"source": source})
        os.replace(tmp, path)
        logger.info("reference log-probs of %s: %d sequences in %.1f s, cached at %s", source, rows * len(fields),
                    time.perf_counter() - started, path)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
    return table


def _cache_file(cache_root: Path, fingerprint: List[Any], tokenized) -> Path:
    digest = hashlib.sha256()
    digest.update(json.dumps(fingerprint).encode())
    for field in tokenized.response_fields:
        for column in (f"{field}_input_ids", f"{field}_loss_mask"):
            for row in tokenized.rows[column]:
                digest.update(np.asarray(row, dtype=np.int64).tobytes())
                digest.update(b"|")
    return Path(cache_root) / "reference_logps" / f"{digest.hexdigest()[:32]}.safetensors"


def model_fingerprint(path: str) -> List[Any]:
    """Identity of a model for cache keys: a local folder's weight/config files (name, size, mtime), else the name."""
    folder = Path(path)
    if not folder.is_dir():
        return [str(path)]
    files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".json") and p.is_file())
    return [str(folder.resolve())] + [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _group_rank_size(group) -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1
