"""Global contrast over gloo ranks equals the single-process float64 loss on the concatenated batch.

Two launches (2 ranks, 3 ranks) run every case in tests/distributed_workers.py; each rank's loss and gradients
are compared here with a dense float64 formula written in this file (not the library).
"""
from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

import distributed_workers as workers
from rpo.distributed import TwoPassContrast

TOLERANCE = dict(rtol=1e-9, atol=1e-9)


def reference_loss(chosen, rejected, *, beta, weighting="embedding", chosen_embeddings=None,
                   rejected_embeddings=None, tau=0.5, alpha=0.8, weight_normalization="row", margin=0.0):
    """−1/(M·N) Σ_ij log σ(ω_ij (β(a_i − b_j) − margin)), dense, in the dtype of the inputs."""
    rows, columns = chosen.shape[0], rejected.shape[0]
    if weighting == "embedding":
        cosine = F.normalize(chosen_embeddings, dim=1) @ F.normalize(rejected_embeddings, dim=1).T
        weights = torch.softmax(-(1 - cosine) / tau, dim=1)
    elif weighting == "uniform":
        weights = torch.full((rows, columns), 1 / columns, dtype=chosen.dtype)
    elif weighting == "diagonal":
        weights = torch.full((rows, columns), (1 - alpha) / (columns - 1), dtype=chosen.dtype)
        weights.fill_diagonal_(alpha)
    else:
        weights = torch.ones(rows, columns, dtype=chosen.dtype)
    if weight_normalization == "mean" and weighting != "none":
        weights = weights * columns
    logits = weights * (beta * (chosen[:, None] - rejected[None, :]) - margin)
    return -F.logsigmoid(logits).mean()


def reference_with_grads(chosen, rejected, **options):
    chosen = chosen.detach().double().requires_grad_(True)
    rejected = rejected.detach().double().requires_grad_(True)
    loss = reference_loss(chosen, rejected, **options)
    loss.backward()
    return loss.detach(), chosen.grad, rejected.grad


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return workers.launch(2, str(tmp_path_factory.mktemp("two_ranks")),
                          ["loss_cases", "special_cases", "model", "public_api"])


@pytest.fixture(scope="module")
def three_ranks(tmp_path_factory):
    return workers.launch(3, str(tmp_path_factory.mktemp("three_ranks")),
                          ["loss_cases", "special_cases", "subgroups", "public_api"])


@pytest.fixture(params=[2, 3], ids=["2ranks", "3ranks"])
def ranks(request, two_ranks, three_ranks):
    return {2: two_ranks, 3: three_ranks}[request.param]


def assert_matches_reference(ranks, name, split, options, *, tolerance=TOLERANCE):
    """Every rank's loss is the global loss; its gradients are the global ones restricted to its shard."""
    chosen, rejected, chosen_embeddings, rejected_embeddings = workers.global_batch(split)
    loss, grad_chosen, grad_rejected = reference_with_grads(
        chosen, rejected, chosen_embeddings=chosen_embeddings, rejected_embeddings=rejected_embeddings, **options)
    sizes = workers.SPLITS[split][len(ranks)]
    for rank, got in enumerate(ranks.case(name)):
        rows, columns = workers.shard_slices(sizes, rank)
        torch.testing.assert_close(got["loss"].double(), loss, **tolerance, msg=f"{name}: loss on rank {rank}")
        torch.testing.assert_close(got["grad_chosen"].double(), grad_chosen[rows], **tolerance,
                                   msg=f"{name}: d loss / d chosen on rank {rank}")
        torch.testing.assert_close(got["grad_rejected"].double(), grad_rejected[columns], **tolerance,
                                   msg=f"{name}: d loss / d rejected on rank {rank}")


def case_options(case):
    return {k: case[k] for k in ("beta", "weighting", "weight_normalization", "tau", "alpha", "margin")}


@pytest.mark.parametrize("case", workers.loss_cases(), ids=lambda case: case["name"])
def test_global_loss_equals_single_process(ranks, case):
    """rpo.distributed.global_contrast_loss on every split, weighting and normalisation."""
    assert_matches_reference(ranks, case["name"], case["split"], case_options(case))
    # Empty shards too: the loss stays in the graph so every rank can call backward.
    assert all(got["connected"] for got in ranks.case(case["name"]))


def test_public_contrast_loss_with_process_group(ranks):
    """The same cases through rpo.ops.contrast_loss(process_group=...), the API users call."""
    for case in workers.loss_cases():
        assert_matches_reference(ranks, "public:" + case["name"], case["split"], case_options(case))
        assert all(got["connected"] for got in ranks.case("public:" + case["name"]))


UNPAIRED_OPTIONS = dict(beta=workers.BETA, weighting="embedding", weight_normalization="row", tau=0.75, margin=0.0)


def test_rank_without_grad_still_matches(ranks):
    """Rank 0 evaluates under no_grad while the others train: same global loss, exact grads on the others."""
    chosen, rejected, chosen_embeddings, rejected_embeddings = workers.global_batch("unpaired")
    loss, grad_chosen, grad_rejected = reference_with_grads(
        chosen, rejected, chosen_embeddings=chosen_embeddings, rejected_embeddings=rejected_embeddings,
        **UNPAIRED_OPTIONS)
    sizes = workers.SPLITS["unpaired"][len(ranks)]
    for rank, got in enumerate(ranks.case("rank0_no_grad")):
        torch.testing.assert_close(got["loss"], loss, **TOLERANCE)
        assert got["requires_grad"] == (rank != 0)
        if rank != 0:
            rows, columns = workers.shard_slices(sizes, rank)
            torch.testing.assert_close(got["grad_chosen"], grad_chosen[rows], **TOLERANCE)
            torch.testing.assert_close(got["grad_rejected"], grad_rejected[columns], **TOLERANCE)


def test_bfloat16_scores(ranks):
    for got in ranks.case("bfloat16"):
        assert got["grad_chosen"].dtype == torch.bfloat16
        assert got["loss"].dtype == torch.bfloat16
    # bfloat16 keeps ~3 significant digits of the inputs and of the returned values.
    assert_matches_reference(ranks, "bfloat16", "unpaired", UNPAIRED_OPTIONS, tolerance=dict(rtol=3e-2, atol=3e-3))


def test_inconsistent_global_batch_raises_on_every_rank(ranks):
    for rank, errors in enumerate(ranks.case("errors")):
        assert errors["diagonal_non_square"] is not None, f"rank {rank} did not raise"
        assert "square" in errors["diagonal_non_square"] and "per-rank chosen [3, 1" in errors["diagonal_non_square"]
        assert errors["embedding_width_mismatch"] is not None, f"rank {rank} did not raise"
        assert "embedding dim differs" in errors["embedding_width_mismatch"]
        if rank == len(ranks) - 1:
            assert "chosen_scores has a non-finite value (nan) at index 1" in errors["nan_on_last_rank"]
        else:
            assert f"rank(s) [{len(ranks) - 1}] of the process group rejected" in errors["nan_on_last_rank"]
    assert_matches_reference(ranks, "after_errors", "unpaired", UNPAIRED_OPTIONS)


def test_data_parallel_subgroups(three_ranks):
    """Groups {0} (one rank) and {1, 2} run side by side; offsets come from the group rank, not the world rank."""
    for got in three_ranks.case("subgroup"):
        chosen, rejected, chosen_embeddings, rejected_embeddings = workers.global_batch("unpaired", seed=got["seed"])
        loss, grad_chosen, grad_rejected = reference_with_grads(
            chosen[:4], rejected[:3], chosen_embeddings=chosen_embeddings[:4],
            rejected_embeddings=rejected_embeddings[:3], beta=workers.BETA, tau=0.75)
        rows, columns = workers.shard_slices(got["group_sizes"], got["group_rank"])
        torch.testing.assert_close(got["loss"], loss, **TOLERANCE)
        torch.testing.assert_close(got["grad_chosen"], grad_chosen[rows], **TOLERANCE)
        torch.testing.assert_close(got["grad_rejected"], grad_rejected[columns], **TOLERANCE)


# ---- model-level checks: two-pass microbatches and DDP ---------------------------------------------------------
def single_process_model_step():
    """Loss and parameter gradients of one process holding the whole batch (all ranks' microbatches)."""
    model = workers.make_model()
    microbatches = [mb for rank_microbatches in workers.model_batch() for mb in rank_microbatches]

    def cat(key):
        return torch.cat([mb[key] for mb in microbatches])

    loss = reference_loss(model(cat("chosen")), model(cat("rejected")), chosen_embeddings=cat("chosen_embeddings"),
                          rejected_embeddings=cat("rejected_embeddings"), **workers.MODEL_LOSS_OPTIONS)
    loss.backward()
    return loss.detach(), workers.parameter_grads(model)


def test_two_pass_two_ranks_two_microbatches(two_ranks):
    loss, grads = single_process_model_step()
    # Without a DP wrapper each rank holds the gradient through its own sequences; their sum is the full gradient.
    two_pass = two_ranks.case("two_pass")
    for name, grad in grads.items():
        summed = sum(got["grads"][name] for got in two_pass)
        torch.testing.assert_close(summed, grad, **TOLERANCE, msg=f"two-pass gradient of {name}")
    model = workers.make_model()
    for rank, got in enumerate(two_pass):
        torch.testing.assert_close(got["loss"], loss, **TOLERANCE)
        local = workers.model_batch()[rank]
        torch.testing.assert_close(got["chosen_scores"],
                                   model(torch.cat([mb["chosen"] for mb in local])).detach(), **TOLERANCE)


@pytest.mark.parametrize("section", ["ddp", "two_pass_ddp"])
def test_ddp_gradients_equal_single_process(two_ranks, section):
    """Under DDP (which averages over W ranks) with the loss scaled by W, every rank's gradient is the full one."""
    loss, grads = single_process_model_step()
    for rank, got in enumerate(two_ranks.case(section)):
        torch.testing.assert_close(got["loss"], loss, **TOLERANCE)
        for name, grad in grads.items():
            torch.testing.assert_close(got["grads"][name], grad, **TOLERANCE,
                                       msg=f"{section}: gradient of {name} on rank {rank}")


# ---- TwoPassContrast in one process ----------------------------------------------------------------------------
def test_two_pass_replays_dropout_masks():
    """Pass 2 must see pass 1's dropout masks: compare with one grad-enabled forward per microbatch, same seed."""
    microbatches = workers.model_batch()[0] + workers.model_batch()[1]
    options = dict(workers.MODEL_LOSS_OPTIONS)

    model = workers.make_model(dropout=0.5)
    torch.manual_seed(123)
    scores = [workers.model_scores(model, mb) for mb in microbatches]
    loss = reference_loss(torch.cat([c for c, _ in scores]), torch.cat([r for _, r in scores]),
                          chosen_embeddings=torch.cat([mb["chosen_embeddings"] for mb in microbatches]),
                          rejected_embeddings=torch.cat([mb["rejected_embeddings"] for mb in microbatches]),
                          **options)
    loss.backward()
    expected = workers.parameter_grads(model)

    model = workers.make_model(dropout=0.5)
    torch.manual_seed(123)
    two_pass = TwoPassContrast(functools.partial(workers.model_scores, model),
                               functools.partial(reference_loss, **options), embedding_fn=workers.model_embeddings,
                               loss_scale=3.0)
    step = two_pass.step(microbatches)
    torch.testing.assert_close(step.loss, loss.detach(), **TOLERANCE)
    for name, grad in expected.items():
        torch.testing.assert_close(model.get_parameter(name).grad, 3.0 * grad, **TOLERANCE, msg=name)


def test_two_pass_rejects_inconsistent_score_fn():
    calls = []

    def score_fn(microbatch):
        calls.append(microbatch)
        rows = 3 if len(calls) <= 2 else 2  # pass 2 returns fewer scores than pass 1
        parameter = torch.ones((), requires_grad=True)
        return parameter * torch.arange(rows, dtype=torch.float64), parameter * torch.ones(2, dtype=torch.float64)

    two_pass = TwoPassContrast(score_fn, functools.partial(reference_loss, beta=1.0, weighting="uniform"))
    with pytest.raises(ValueError, match=r"chosen scores of microbatch 0 have shape \(2,\) in pass 2 but \(3,\)"):
        two_pass.step(["a", "b"])
    with pytest.raises(ValueError, match="rejected_scores of microbatch 0 .* must be a 1-D tensor"):
        TwoPassContrast(lambda mb: (torch.zeros(2), torch.zeros(2, 1)), reference_loss).step(["a"])
