"""Related-prompt batches (rpo.data.related, PreferenceBatcher(batching="related")): the random batcher's
guarantees (every row once per epoch, the same rows sit out, determinism, rank-disjointness, exact resume, the
unpaired balance) for paired and unpaired data at 1 and 2 ranks; the groups found on clustered embeddings; the
off-diagonal cosine from per-rank sums against a dense float64 computation."""
from __future__ import annotations

import datasets
import numpy as np
import pytest
import torch

from rpo.data import PreferenceBatcher, TokenizedPreferenceDataset
from rpo.data.related import (mean_offdiagonal_cosine, offdiagonal_cosine_sums, related_rows_per_batch,
                              similarity_order)
from rpo.data.tokenization import TokenizeReport


def clustered(clusters: int, per_cluster: int, dim: int = 24, noise: float = 0.05, seed: int = 0):
    """(embeddings, cluster labels): tight clusters around random unit centres, rows shuffled."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim))
    labels = rng.permutation(np.repeat(np.arange(clusters), per_cluster))
    vectors = centres[labels] / np.linalg.norm(centres[labels], axis=1, keepdims=True)
    return (vectors + noise * rng.standard_normal(vectors.shape)).astype(np.float32), labels


def synthetic_dataset(rows: int, paired: bool, chosen_rows: int | None = None) -> TokenizedPreferenceDataset:
    """Token columns only: what the batcher reads."""
    ids = [[1, 1000 + r] for r in range(rows)]
    mask = [[False, True]] * rows
    if paired:
        columns = {"chosen_input_ids": ids, "chosen_loss_mask": mask, "rejected_input_ids": ids,
                   "rejected_loss_mask": mask}
    else:
        chosen_rows = rows // 2 if chosen_rows is None else chosen_rows
        labels = np.random.default_rng(1).permutation([True] * chosen_rows + [False] * (rows - chosen_rows))
        columns = {"completion_input_ids": ids, "completion_loss_mask": mask, "label": labels.tolist()}
    return TokenizedPreferenceDataset(datasets.Dataset.from_dict(columns), "paired" if paired else "unpaired", 0,
                                      TokenizeReport(rows, rows * (1 + paired), 0, 0, 0, False, 1, 2))


def epoch_batches(batcher: PreferenceBatcher, epoch: int) -> list[tuple[list[int], list[int]]]:
    batcher.set_epoch(epoch)
    return [(b["row_ids"][:b["num_chosen"]].tolist(), b["row_ids"][b["num_chosen"]:].tolist()) for b in batcher]


# ------------------------------------------------------------------------------------------ the ordering

def test_similarity_order_runs_are_the_clusters():
    vectors, labels = clustered(clusters=8, per_cluster=16, noise=0.002)  # clusters ~ points: any split is clean
    for seed in range(3):
        order = similarity_order(vectors, np.random.default_rng(seed), (16, 4))
        assert sorted(order.tolist()) == list(range(128))
        runs = labels[order].reshape(8, 16)
        assert all(len(set(run)) == 1 for run in runs), runs  # every 16-row subtree is one whole cluster


def test_similarity_order_leaves_other_draws_and_partial_units():
    vectors, _ = clustered(clusters=4, per_cluster=25, noise=0.5)
    first = similarity_order(vectors, np.random.default_rng(0), (8,))
    assert sorted(first.tolist()) == list(range(100))  # 100 is not a multiple of 8: a partial leaf, no row lost
    assert not np.array_equal(first, similarity_order(vectors, np.random.default_rng(1), (8,)))
    assert np.array_equal(first, similarity_order(vectors, np.random.default_rng(0), (8,)))
    with pytest.raises(ValueError, match="multiples"):
        similarity_order(vectors, np.random.default_rng(0), (6, 4))


# ------------------------------------------------------------------------------------ paired batches

@pytest.mark.parametrize("world_size", [1, 2])
def test_paired_related_batches_keep_the_batcher_guarantees(world_size):
    vectors, labels = clustered(clusters=10, per_cluster=21, seed=3)  # 210 rows; 210 % 16 = 2 sit out per epoch
    data, table = synthetic_dataset(210, paired=True), torch.from_numpy(vectors)
    make = lambda rank, seed=7, batching="related": PreferenceBatcher(  # noqa: E731
        data, table, 8 // world_size, rank=rank, world_size=world_size, seed=seed, batching=batching,
        related_fraction=0.75)
    for epoch in (0, 1):
        related = [epoch_batches(make(r), epoch) for r in range(world_size)]
        random = [epoch_batches(make(r, batching="random"), epoch) for r in range(world_size)]
        rows = [row for rank in related for chosen, rejected in rank for row in chosen]
        assert all(chosen == rejected for rank in related for chosen, rejected in rank)  # pairs stay pairs
        assert len(rows) == len(set(rows)) == 26 * 8  # every used row exactly once, ranks disjoint
        # The same rows sit the epoch out as with random batches (one leftover rule).
        assert set(rows) == {row for rank in random for chosen, _ in rank for row in chosen}
        assert [epoch_batches(make(r), epoch) for r in range(world_size)] == related  # deterministic
        # 6 of a global batch's 8 pairs (0.75) are one related group: mostly one cluster (a group may straddle
        # two: the clusters are not multiples of 6), against ~2 of a cluster in random batches.
        def rows_of_top_cluster(per_rank):
            return np.mean([np.bincount(labels[[row for rank in per_rank for row in rank[i][0]]]).max()
                            for i in range(len(per_rank[0]))])
        assert rows_of_top_cluster(related) >= 4.5 > 3 > rows_of_top_cluster(random)
    assert epoch_batches(make(0), 0) != epoch_batches(make(0), 1)
    assert epoch_batches(make(0), 0) != epoch_batches(make(0, seed=8), 0)


def test_related_batches_raise_the_offdiagonal_cosine():
    vectors, labels = clustered(clusters=20, per_cluster=16, noise=0.3, seed=5)
    data, table = synthetic_dataset(320, paired=True), torch.from_numpy(vectors)

    def mean_cosine(batches) -> float:
        values = []
        for rows in batches:
            unit = torch.nn.functional.normalize(table[rows].double(), dim=1)
            values.append(float((unit @ unit.T)[~torch.eye(len(rows), dtype=torch.bool)].mean()))
        return float(np.mean(values))

    def batcher_cosine(batching: str) -> float:
        batcher = PreferenceBatcher(data, table, 8, seed=0, batching=batching, related_fraction=1.0)
        return mean_cosine([b["row_ids"][:b["num_chosen"]] for b in batcher])

    # The best possible: every batch half of one true cluster.
    oracle = mean_cosine(np.argsort(labels, kind="stable").reshape(40, 8))
    random = batcher_cosine("random")
    assert batcher_cosine("related") - random > 0.6 * (oracle - random) > 0.15


def test_resume_continues_related_batches_exactly():
    vectors, _ = clustered(clusters=6, per_cluster=20, seed=2)
    data, table = synthetic_dataset(120, paired=True), torch.from_numpy(vectors)
    make = lambda fraction=0.5: PreferenceBatcher(data, table, 16, seed=3, batching="related",  # noqa: E731
                                                  related_fraction=fraction)
    straight = make()
    reference = [b["row_ids"].tolist() for _ in range(2) for b in straight]  # two epochs of 7 batches
    for stop in (3, 7, 9):
        first, seen = make(), []
        for batch in first:
            seen.append(batch["row_ids"].tolist())
            if len(seen) == stop:
                break
        if len(seen) < stop:  # the stop lies in the second epoch
            for batch in first:
                seen.append(batch["row_ids"].tolist())
                if len(seen) == stop:
                    break
        resumed = make()
        resumed.load_state_dict(first.state_dict())
        while len(seen) < len(reference):
            seen.extend(b["row_ids"].tolist() for b in resumed)
        assert seen == reference, stop
    with pytest.raises(ValueError, match="saved batching=related but this batcher has batching=random"):
        PreferenceBatcher(data, table, 16, seed=3).load_state_dict(make().state_dict())
    with pytest.raises(ValueError, match="saved related_fraction=0.5 but this batcher has related_fraction=0.25"):
        make(0.25).load_state_dict(make().state_dict())
    old_checkpoint = {k: v for k, v in PreferenceBatcher(data, table, 16, seed=3).state_dict().items()
                      if k not in ("batching", "related_fraction")}
    PreferenceBatcher(data, table, 16, seed=3).load_state_dict(old_checkpoint)  # saved before the option: random


# ---------------------------------------------------------------------------------- unpaired batches

@pytest.mark.parametrize("world_size", [1, 2])
def test_unpaired_related_batches_keep_the_balance_and_every_row(world_size):
    vectors, clusters = clustered(clusters=8, per_cluster=25, seed=4)  # 200 rows, 107 chosen / 93 rejected
    data, table = synthetic_dataset(200, paired=False, chosen_rows=107), torch.from_numpy(vectors)
    labels = np.asarray(data.rows["label"])
    make = lambda rank, batching="related": PreferenceBatcher(  # noqa: E731
        data, table, 8 // world_size, rank=rank, world_size=world_size, seed=0, batching=batching,
        related_fraction=1.0)
    related = [epoch_batches(make(r), 0) for r in range(world_size)]
    random = [epoch_batches(make(r, "random"), 0) for r in range(world_size)]
    for rank in related:
        for chosen, rejected in rank:
            assert labels[chosen].all() and not labels[rejected].any()
    counts = lambda per_rank: sorted((len(c), len(r)) for rank in per_rank for c, r in rank)  # noqa: E731
    assert counts(related) == counts(random)  # the same chosen/rejected balance per batch
    rows = [row for rank in related for c, r in rank for row in c + r]
    assert sorted(rows) == list(range(200))  # 200 = 25 batches of 8: every row, once
    # Chosen and rejected answers of a global batch share prompts' clusters far more often than at random.
    def cross_cluster_match(per_rank):
        matches = []
        for index in range(len(per_rank[0])):
            chosen = [row for rank in per_rank for row in rank[index][0]]
            rejected = [row for rank in per_rank for row in rank[index][1]]
            matches.append(np.mean(clusters[chosen][:, None] == clusters[rejected][None, :]))
        return float(np.mean(matches))
    assert cross_cluster_match(related) > cross_cluster_match(random) + 0.3
    assert [epoch_batches(make(r), 0) for r in range(world_size)] == related


# ----------------------------------------------------------------------------------- options and metric

def test_related_batching_options_are_checked():
    vectors, _ = clustered(clusters=2, per_cluster=20)
    data, table = synthetic_dataset(40, paired=True), torch.from_numpy(vectors)
    with pytest.raises(ValueError, match="pass them"):
        PreferenceBatcher(data, None, 4, batching="related")
    with pytest.raises(ValueError, match="fewer than 2 rows"):
        PreferenceBatcher(data, table, 4, batching="related", related_fraction=0.1)
    with pytest.raises(ValueError, match="batching must be one of random, related"):
        PreferenceBatcher(data, table, 4, batching="clustered")
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        related_rows_per_batch(1.5, 4)
    assert related_rows_per_batch(0.5, 5) == 3 and related_rows_per_batch(0.0, 8) == 0


@pytest.mark.parametrize("paired", [True, False])
def test_offdiagonal_cosine_from_rank_sums_equals_the_dense_global_value(paired):
    generator = torch.Generator().manual_seed(0)
    ranks = [(torch.randn(m, 16, generator=generator), torch.randn(n, 16, generator=generator))
             for m, n in ((3, 3), (4, 4)) if True]
    if paired:
        ranks = [(chosen, chosen) for chosen, _ in ranks]
    total = sum(offdiagonal_cosine_sums(c, r, paired) for c, r in ranks)
    chosen = torch.nn.functional.normalize(torch.cat([c for c, _ in ranks]).double(), dim=1)
    rejected = torch.nn.functional.normalize(torch.cat([r for _, r in ranks]).double(), dim=1)
    cosines = chosen @ rejected.T
    off = ~torch.eye(len(chosen), dtype=torch.bool) if paired else torch.ones_like(cosines, dtype=torch.bool)
    assert mean_offdiagonal_cosine(total, paired) == pytest.approx(float(cosines[off].mean()), abs=1e-12)
