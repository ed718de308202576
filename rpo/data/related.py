"""Related-prompt batches: lay an epoch's rows out so that each global batch holds prompts worth contrasting.

The contrast matrix learns from off-diagonal pairs only as much as their prompts are related; batches drawn at
random from a broad data set make almost every off-diagonal pair unrelated. ``similarity_order`` orders rows so
that runs of consecutive rows are leaves of a balanced bisection tree over the cached prompt embeddings (each node
split at a chunk boundary along a direction drawn from its rows' covariance, so a new seed or epoch gives other
groups); ``related_paired_layout`` / ``related_unpaired_layout`` fill each rank batch with one such group (its
rank's share of one group per global batch, so the global batch is related too) plus ``1 - fraction`` of randomly
drawn rows. Cost: O(rows x D) per tree level, log2(groups) levels, memory linear in the rows (no rows x rows
matrix); benchmarks/related_batching.py measures it at 170k rows.

``offdiagonal_cosine_sums`` / ``mean_offdiagonal_cosine`` give the mean prompt cosine of the off-diagonal pairs
of a (global) batch from per-rank sums (the caller all-reduces them), so users see what the batching did.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

BATCHINGS = ("random", "related")


def related_rows_per_batch(fraction: float, batch_size: int) -> int:
    """Rows of a rank batch of ``batch_size`` drawn as a related group at ``--related-fraction`` ``fraction``."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"related fraction must be in [0, 1], got {fraction}")
    return int(np.floor(fraction * batch_size + 0.5))


def _normalized(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


# Dimensions of the space the bisection works in (MiniLM's are 384).
PRINCIPAL_DIMENSIONS = 64
COVARIANCE_BLOCK_ROWS = 4096


def _principal_components(x: np.ndarray, dimensions: int) -> torch.Tensor:
    """``x`` (float32 [n, D]) centred and projected on its top ``dimensions`` principal axes (D x D covariance,
    one eigendecomposition: linear in n)."""
    x = torch.from_numpy(x)
    if x.shape[1] <= dimensions:
        return x - x.mean(0)
    centred = x - x.mean(0)
    # Accumulated in float64 a block of rows at a time: exact enough for eigh, without a float64 copy of all rows.
    covariance = sum(block.T.double() @ block.double() for block in centred.split(COVARIANCE_BLOCK_ROWS))
    _, vectors = torch.linalg.eigh(covariance)
    return centred @ vectors[:, -dimensions:].float()


def similarity_order(vectors: np.ndarray, rng: np.random.Generator, units: Sequence[int]) -> np.ndarray:
    """A permutation of ``range(len(vectors))`` that puts similar rows next to each other.

    Balanced bisection, one tree level at a time for all nodes at once: a node of s rows is split along the
    direction C g (C its rows' covariance, g a Gaussian draw of ``rng``: one power-iteration step, so the split
    follows the node's main variation but differs between draws) at the largest unit of ``units`` (decreasing, each
    a multiple of the next) that is smaller than s, halving its number of units; a node of at most ``units[-1]``
    rows is a leaf. With ``len(vectors)`` a multiple of ``units[0]`` every run of ``units[k]`` consecutive rows of
    the result is one subtree.
    """
    units = [int(u) for u in units]
    if not units or min(units) < 1 or any(a % b for a, b in zip(units, units[1:])):
        raise ValueError(f"units must be decreasing positive multiples of one another, got {units}")
    n = len(vectors)
    order = np.arange(n)
    if n <= units[-1]:
        return order
    # Rows in the order of `order` (permuted along with it, one copy per level), in the top principal components
    # (the splits follow the main variation; fewer dimensions keep each level a few passes over the rows).
    x = _principal_components(_normalized(vectors), PRINCIPAL_DIMENSIONS)
    generator = torch.Generator().manual_seed(int(rng.integers(2**63 - 1)))
    bounds = np.array([0, n])  # node boundaries in `order`
    while True:
        sizes = np.diff(bounds)
        split = sizes > units[-1]
        if not split.any():
            return order
        node_of_row = torch.from_numpy(np.repeat(np.arange(len(sizes)), sizes))
        counts = torch.from_numpy(sizes).to(torch.float32)[:, None]
        mean = x.new_zeros(len(sizes), x.shape[1]).index_add_(0, node_of_row, x) / counts
        # One Gaussian g per level: u = (x - mean) g per row, v = (x - mean)^T u per node (C g, C the node's
        # covariance up to its size): each node's own data-weighted direction, a random one (another seed or epoch
        # gives other splits). More power-iteration steps made no purer groups on clustered data.
        draw = torch.randn(x.shape[1], generator=generator)
        u = x @ draw - (mean @ draw)[node_of_row]
        v = (x.new_zeros(mean.shape).index_add_(0, node_of_row, x * u[:, None])
             - mean * x.new_zeros(len(sizes)).index_add_(0, node_of_row, u)[:, None])
        projection = (x * v[node_of_row]).sum(1).numpy()
        projection[~split[node_of_row.numpy()]] = 0.0  # leaves keep their order (lexsort is stable)
        level_order = np.lexsort((projection, node_of_row.numpy()))
        order, x = order[level_order], x[torch.from_numpy(level_order)]
        cuts = []
        for node in np.flatnonzero(split):
            size = int(sizes[node])
            unit = next(u_ for u_ in units if u_ < size)  # exists: a split node has more than units[-1] rows
            cuts.append(bounds[node] + unit * (-(-size // unit) // 2))
        bounds = np.unique(np.concatenate([bounds, cuts]))


def related_paired_layout(embeddings: np.ndarray, used_rows: np.ndarray, world_size: int, batch_size: int,
                          fraction: float, rng: np.random.Generator) -> np.ndarray:
    """[global batches, ranks, batch_size] row ids of one paired epoch from its ``used_rows`` (each exactly once).

    The first ``k = related_rows_per_batch(fraction, batch_size)`` rows of every rank batch are one leaf of
    ``similarity_order`` over those rows (the global batch: ``world_size`` sibling leaves); the others are the
    rest of ``used_rows`` in their given (random) order. Global batches are then shuffled, and the rows inside
    each rank batch, so micro-batches mix related and random rows and an epoch does not sweep the embedding space.
    """
    global_size = world_size * batch_size
    if len(used_rows) % global_size:
        raise ValueError(f"{len(used_rows)} rows do not fill whole global batches of {global_size}")
    num_global = len(used_rows) // global_size
    k = related_rows_per_batch(fraction, batch_size)
    related, fill = used_rows[:num_global * world_size * k], used_rows[num_global * world_size * k:]
    related = related[similarity_order(embeddings[related], rng, (world_size * k, max(k, 1)))]
    related = related.reshape(num_global, world_size, k)[rng.permutation(num_global)]
    layout = np.concatenate([related, fill.reshape(num_global, world_size, batch_size - k)], axis=2)
    return rng.permuted(layout, axis=2)


def related_unpaired_layout(embeddings: np.ndarray, chosen_rows: np.ndarray, rejected_rows: np.ndarray,
                            chosen_counts: np.ndarray, rejected_counts: np.ndarray, world_size: int,
                            fraction: float, rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray]]:
    """(chosen, rejected) row ids of each rank batch (index = global batch x world_size + rank) of one unpaired
    epoch; batch b holds ``chosen_counts[b]`` of ``chosen_rows`` and ``rejected_counts[b]`` of ``rejected_rows``
    (every given row exactly once, the balance unchanged).

    A ``fraction`` of each batch's chosen and of its rejected rows are related: one ``similarity_order`` over the
    related chosen and rejected rows together, then its chosen rows dealt to the batches in order and its rejected
    rows likewise, so batch b's chosen and rejected rows come from the same region of the order.
    """
    chosen_counts, rejected_counts = np.asarray(chosen_counts), np.asarray(rejected_counts)
    if chosen_counts.sum() != len(chosen_rows) or rejected_counts.sum() != len(rejected_rows):
        raise ValueError("the batch counts must add up to the given chosen and rejected rows")
    num_batches = len(chosen_counts)
    if num_batches % world_size:
        raise ValueError(f"{num_batches} rank batches are not whole global batches of {world_size} ranks")
    related_chosen = np.floor(fraction * chosen_counts + 0.5).astype(int)
    related_rejected = np.floor(fraction * rejected_counts + 0.5).astype(int)
    num_related_chosen = int(related_chosen.sum())
    union = np.concatenate([chosen_rows[:num_related_chosen], rejected_rows[:related_rejected.sum()]])
    k = related_rows_per_batch(fraction, int(chosen_counts[0] + rejected_counts[0]))
    order = similarity_order(embeddings[union], rng, (world_size * max(k, 1), max(k, 1)))
    union, is_chosen = union[order], order < num_related_chosen  # the chosen rows come first in `union`

    def deal(rows: np.ndarray, counts: np.ndarray) -> list[np.ndarray]:
        return np.split(rows, np.cumsum(counts)[:-1])

    parts = [deal(union[is_chosen], related_chosen), deal(chosen_rows[num_related_chosen:],
                                                            chosen_counts - related_chosen),
             deal(union[~is_chosen], related_rejected), deal(rejected_rows[related_rejected.sum():],
                                                             rejected_counts - related_rejected)]
    batches = [(np.concatenate([parts[0][b], parts[1][b]]), np.concatenate([parts[2][b], parts[3][b]]))
               for b in range(num_batches)]
    global_order = rng.permutation(num_batches // world_size)
    shuffled = []
    for g in global_order:
        for r in range(world_size):
            chosen, rejected = batches[g * world_size + r]
            shuffled.append((rng.permutation(chosen), rng.permutation(rejected)))
    return shuffled


def offdiagonal_cosine_sums(chosen_embeddings: torch.Tensor, rejected_embeddings: torch.Tensor,
                            paired: bool) -> torch.Tensor:
    """float64 [2 D + 3]: the sums of the unit chosen and rejected prompt embeddings, the diagonal cosine sum
    (paired), M and N; add them over ranks and ``mean_offdiagonal_cosine`` gives the global batch's value."""
    chosen = torch.nn.functional.normalize(chosen_embeddings.detach().double(), dim=1)
    rejected = torch.nn.functional.normalize(rejected_embeddings.detach().double(), dim=1)
    diagonal = (chosen * rejected).sum() if paired else chosen.new_zeros(())
    return torch.cat([chosen.sum(0), rejected.sum(0),
                      torch.stack([diagonal, chosen.new_tensor(len(chosen)), chosen.new_tensor(len(rejected))])])


def mean_offdiagonal_cosine(sums: torch.Tensor, paired: bool) -> float:
    """Mean prompt cosine over the (global) contrast matrix's off-diagonal pairs from ``offdiagonal_cosine_sums``
    (summed over ranks): every chosen against every rejected answer but a row's own pair."""
    dim = (len(sums) - 3) // 2
    total = float(sums[:dim] @ sums[dim:2 * dim])
    diagonal, m, n = (float(value) for value in sums[2 * dim:])
    pairs = m * n - (m if paired else 0.0)
    return (total - diagonal) / pairs if pairs > 0 else float("nan")
