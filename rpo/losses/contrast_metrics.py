"""The contrast/* metrics of a contrast matrix, computed by row blocks (never the whole M×N matrix at once).

Each block of ROW_BLOCK rows × all N columns contributes sums (weights, wins, margins, row entropies, counts);
the metrics are ratios of the sums. For a global contrast the block is this rank's rows × the gathered global
columns and the sums are all-reduced over the process group, so every rank reports the metrics of the global
matrix (every rank takes part in the all-reduce, also with 0 rows).

    contrast/effective_beta          β · mean ω_ij over all M·N pairs (the β an average pair sees)
    contrast/diag_weight             mean ω_ii (pairs i = j: the same prompt for paired data)
    contrast/diag_effective_beta     β · mean ω_ii
    contrast/offdiag_effective_beta  β · mean ω_ij over i ≠ j
    contrast/diag_accuracy           fraction of pairs i = j with a_i > b_i
    contrast/offdiag_accuracy        fraction of pairs i ≠ j with a_i > b_j
    contrast/diag_margin             mean β(a_i − b_i)
    contrast/offdiag_margin          mean β(a_i − b_j) over i ≠ j
    contrast/effective_contrasts     mean over rows of exp(H_i), H_i the entropy of row i's weights ω_i·/Σ_j ω_ij:
                                     how many columns a row effectively contrasts with (N for uniform weights)

a, b are the scores the contrast matrix compares (rpo: log-ratios ρ); a set with no pairs reports 0.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.distributed as dist

from rpo.ops import reference

ROW_BLOCK = 256  # rows per block: a block holds ROW_BLOCK × N values per quantity

# Positions in the sums vector.
_PAIRS, _DIAG_PAIRS, _WEIGHT, _DIAG_WEIGHT, _OFFDIAG_WINS, _DIAG_WINS, _OFFDIAG_MARGIN, _DIAG_MARGIN, \
    _ROW_CONTRASTS, _ROWS = range(10)
_NUM_SUMS = 10


def contrast_sums(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor, *, weighting: str,
                  weight_normalization: str, weight_scale: float = 1.0,
                  chosen_embeddings: Optional[torch.Tensor] = None,
                  rejected_embeddings: Optional[torch.Tensor] = None, tau: float = 0.5, alpha: float = 0.8,
                  diag_offset: int = 0) -> torch.Tensor:
    """The float64 sums of the rows `chosen_scores` [M] × the columns `rejected_scores` [N].

    Row i's diagonal is column diag_offset + i (its global row index for a rank's block of a global matrix).
    ω is the op's weight (`rpo.ops.reference.pair_weights`) times `weight_scale`.
    """
    sums = torch.zeros(_NUM_SUMS, dtype=torch.float64, device=chosen_scores.device)
    rows, columns = chosen_scores.shape[0], rejected_scores.shape[0]
    if rows == 0 or columns == 0:
        return sums
    dtype = reference.accumulate_dtype(chosen_scores.dtype)
    chosen, rejected = chosen_scores.detach().to(dtype), rejected_scores.detach().to(dtype)
    column_index = torch.arange(columns, device=chosen.device)
    embedding = weighting == "embedding"
    for start in range(0, rows, ROW_BLOCK):
        stop = min(rows, start + ROW_BLOCK)
        weights = reference.pair_weights(
            stop - start, columns, weighting=weighting, weight_normalization=weight_normalization,
            chosen_embeddings=chosen_embeddings[start:stop].detach() if embedding else None,
            rejected_embeddings=rejected_embeddings.detach() if embedding else None, tau=tau, alpha=alpha,
            diag_offset=diag_offset + start, dtype=dtype, device=chosen.device) * weight_scale
        row_index = diag_offset + torch.arange(start, stop, device=chosen.device)
        diagonal = column_index[None, :] == row_index[:, None]
        differences = chosen[start:stop, None] - rejected[None, :]
        wins = differences > 0
        probabilities = weights / weights.sum(dim=1, keepdim=True)
        entropy = -torch.xlogy(probabilities, probabilities).sum(dim=1)
        sums += torch.stack([
            torch.tensor(float(weights.numel()), dtype=dtype, device=chosen.device),
            diagonal.sum().to(dtype),
            weights.sum(),
            weights[diagonal].sum(),
            (wins & ~diagonal).sum().to(dtype),
            (wins & diagonal).sum().to(dtype),
            differences[~diagonal].sum(),
            differences[diagonal].sum(),
            entropy.exp().sum(),
            torch.tensor(float(stop - start), dtype=dtype, device=chosen.device),
        ]).to(torch.float64)
    return sums


def all_reduce_sums(sums: torch.Tensor, process_group) -> torch.Tensor:
    """The sums of the global matrix from every rank's row-block sums (a collective: every rank must call it)."""
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=process_group)
    return sums


def contrast_metrics(sums: torch.Tensor, beta: float) -> Dict[str, torch.Tensor]:
    """The contrast/* metrics (float32, 0-dim) from `contrast_sums` (see the module docstring)."""
    def ratio(numerator, denominator):
        # Denominators are counts: an empty set (count 0, sum 0) gives 0, without a device sync.
        return numerator / denominator.clamp_min(1.0)

    pairs, diag_pairs = sums[_PAIRS], sums[_DIAG_PAIRS]
    offdiag_pairs = pairs - diag_pairs
    metrics = {
        "contrast/effective_beta": beta * ratio(sums[_WEIGHT], pairs),
        "contrast/diag_weight": ratio(sums[_DIAG_WEIGHT], diag_pairs),
        "contrast/diag_effective_beta": beta * ratio(sums[_DIAG_WEIGHT], diag_pairs),
        "contrast/offdiag_effective_beta": beta * ratio(sums[_WEIGHT] - sums[_DIAG_WEIGHT], offdiag_pairs),
        "contrast/diag_accuracy": ratio(sums[_DIAG_WINS], diag_pairs),
        "contrast/offdiag_accuracy": ratio(sums[_OFFDIAG_WINS], offdiag_pairs),
        "contrast/diag_margin": beta * ratio(sums[_DIAG_MARGIN], diag_pairs),
        "contrast/offdiag_margin": beta * ratio(sums[_OFFDIAG_MARGIN], offdiag_pairs),
        "contrast/effective_contrasts": ratio(sums[_ROW_CONTRASTS], sums[_ROWS]),
    }
    return {name: value.float() for name, value in metrics.items()}
