"""Versioned JSON manifests of folders rpo writes (tokenised data sets): read one, or say why not.

Checkpoints verify theirs (format, checksum, file hashes) in rpo.train.checkpoint."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict


def read_manifest(path: Path, *, version_key: str, version: int, missing: str, label: str) -> Dict[str, Any]:
    """The JSON object at `path`; FileNotFoundError(`missing`) when there is none, ValueError naming `label` when
    its `version_key` is not `version` (a folder written by another format of rpo)."""
    if not path.is_file():
        raise FileNotFoundError(missing)
    manifest = json.loads(path.read_text())
    if manifest.get(version_key) != version:
        raise ValueError(f"{label}: {version_key} {manifest.get(version_key)}, expected {version}")
    return manifest
