"""The seeded train / held-out split of a tokenised data set (the trainer's --eval-split-fraction).

One function decides which rows are held out, so the trainer and `rpo.evaluation` (--run-held-out) agree on
exactly the same rows for a given (rows, fraction, seed).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .tokenization import TokenizedPreferenceDataset


def held_out_rows(num_rows: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training rows, held-out rows), each sorted: round(num_rows x fraction) rows (at least one) held out.

    Raises ValueError naming --eval-split-fraction when nothing would be left to train on.
    """
    held_out = max(1, int(round(num_rows * fraction)))
    if held_out >= num_rows:
        raise ValueError(f"--eval-split-fraction {fraction} leaves no training rows out of {num_rows}")
    order = np.random.default_rng([seed, 1]).permutation(num_rows)
    return np.sort(order[held_out:]), np.sort(order[:held_out])


def select_rows(tokenized: TokenizedPreferenceDataset, rows: Sequence[int]) -> TokenizedPreferenceDataset:
    """The rows ``rows`` of ``tokenized`` (in that order), with its kind, padding and reports."""
    return TokenizedPreferenceDataset(tokenized.rows.select([int(i) for i in rows]), tokenized.kind,
                                      tokenized.pad_token_id, tokenized.report, tokenized.load_report)
