"""Shared pytest setup for the whole suite (kept generic: every test module may rely on it).

- Hugging Face runs offline (no hub look-ups: they hang on machines without network).
- Denormal floats are flushed on CPU (the house rule before any training-like work).
- Fixtures for the repository paths and the real data in ../shared/data.
"""
import os
from pathlib import Path

for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[_var] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_flush_denormal(True)

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA_DIR = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The checkout's root directory."""
    return REPO_ROOT


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """../shared/data: the real paired.jsonl and unpaired.jsonl (200 rows each)."""
    return SHARED_DATA_DIR


@pytest.fixture
def seeded() -> int:
    """Seeds torch's global RNG with 0 for a test that draws random inputs; returns the seed."""
    torch.manual_seed(0)
    return 0
