"""Global contrast over gloo ranks equals the single-process float64 loss on the concatenated batch.

Two launches (2 ranks, 3 ranks, through tests/multirank.py) run every case in distributed_workers.py; each
rank's loss, gradients and contrast/* metrics are compared here with dense float64 formulas written in this file
(not the library).
"""
from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

import distributed_workers as workers
from rpo.distributed import TwoPassContrast

TOLERANCE = dict(rtol=1e-9, atol=1e-9)


def reference_weights(rows, columns, *, dtype, weighting="embedding", chosen_embeddings=None,
                      rejected_embeddings=None, tau=0.5, alpha=0.8, weight_normalization="row"):
    """ω: embedding = row softmax of −(1 − cos)/τ; uniform 1/N; diagonal α on i = j, (1−α)/(N−1) elsewhere; none 1."""
    if weighting == "embedding":
        cosine = F.normalize(chosen_embeddings, dim=1) @ F.normalize(rejected_embeddings, dim=1).T
        weights = torch.softmax(-(1 - cosine) / tau, dim=1)
    elif weighting == "uniform":
        weights = torch.full((rows, columns), 1 / columns, dtype=dtype)
    elif weighting == "diagonal":
        weights = torch.full((rows, columns), (1 - alpha) / (columns - 1), dtype=dtype)
        weights.fill_diagonal_(alpha)
    else:
        weights = torch.ones(rows, columns, dtype=dtype)
    if weight_normalization == "mean" and weighting != "none":
        weights = weights * columns
    return weights


def reference_loss(chosen, rejected, *, beta, margin=0.0, **weight_options):
    """−1/(M·N) Σ_ij log σ(ω_ij (β(a_i − b_j) − margin)), dense, in the dtype of the inputs."""
    weights = reference_weights(chosen.shape[0], rejected.shape[0], dtype=chosen.dtype, **weight_options)
    logits = weights * (beta * (chosen[:, None] - rejected[None, :]) - margin)
    return -F.logsigmoid(logits).mean()


def reference_metrics(chosen, rejected, *, beta, margin=0.0, **weight_options):
    """The contrast/* metrics of the whole matrix, dense float64 (diagonal: pairs i = j, i < min(M, N)); the
    margins are reward margins β(a_i − b_j), without the loss's margin."""
    weights = reference_weights(chosen.shape[0], rejected.shape[0], dtype=torch.float64, **weight_options)
    diagonal = torch.eye(*weights.shape, dtype=torch.bool)
    difference = chosen[:, None] - rejected[None, :]
    row_distribution = weights / weights.sum(dim=1, keepdim=True)
    entropy = -(row_distribution * row_distribution.log()).nan_to_num().sum(dim=1)

    def mean(values, mask):
        return values[mask].double().mean() if mask.any() else torch.zeros((), dtype=torch.float64)

    return {
        "contrast/effective_beta": beta * weights.mean(),
        "contrast/diag_weight": mean(weights, diagonal),
        "contrast/diag_effective_beta": beta * mean(weights, diagonal),
        "contrast/offdiag_effective_beta": beta * mean(weights, ~diagonal),
        "contrast/diag_accuracy": mean(difference > 0, diagonal),
        "contrast/offdiag_accuracy": mean(difference > 0, ~diagonal),
        "contrast/diag_margin": beta * mean(difference, diagonal),
        "contrast/offdiag_margin": beta * mean(difference, ~diagonal),
        "contrast/effective_contrasts": entropy.exp().mean(),
    }


def reference_with_grads(chosen, rejected, **options):
    chosen = chosen.detach().double().requires_grad_(True)
    rejected = rejected.detach().double().requires_grad_(True)
    loss = reference_loss(chosen, rejected, **options)
    loss.backward()
    return loss.detach(), chosen.grad, rejected.grad


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return workers.launch(2, str(tmp_path_factory.mktemp("two_ranks")),
                          ["loss_cases", "special_cases", "model", "normalizations", "built_loss"])


@pytest.fixture(scope="module")
def three_ranks(tmp_path_factory):
    return workers.launch(3, str(tmp_path_factory.mktemp("three_ranks")),
                          ["loss_cases", "special_cases", "subgroups", "built_loss"])


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


def test_built_loss_over_the_group_equals_single_process(ranks):
    """The same cases through build_loss("rpo", global_contrast=True), the API the trainer calls: loss, gradients,
    global_loss, and the contrast/* metrics of the GLOBAL matrix on every rank (also on shards with M_r > N_r ≥ 2
    under diagonal weighting, which used to raise IndexError after the collectives)."""
    for case in workers.loss_cases():
        name = "built:" + case["name"]
        assert_matches_reference(ranks, name, case["split"], case_options(case))
        chosen, rejected, chosen_embeddings, rejected_embeddings = workers.global_batch(case["split"])
        expected = reference_metrics(chosen, rejected, chosen_embeddings=chosen_embeddings,
                                     rejected_embeddings=rejected_embeddings, **case_options(case))
        for rank, got in enumerate(ranks.case(name)):
            assert got["connected"] and got["global_loss_is_loss"], (name, rank)
            for metric, value in expected.items():
                torch.testing.assert_close(got["metrics"][metric].double(), value, rtol=1e-5, atol=1e-6,
                                           msg=f"{name}: {metric} on rank {rank}")


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


def test_bfloat16_global_loss_is_the_float32_one_rounded_once(ranks):
    """bfloat16 partial losses and column gradients are summed over the ranks in float32: the bfloat16 results
    are the float32 results on the same values, rounded once (they were rounded per rank before the sum)."""
    for rank, (half, single) in enumerate(zip(ranks.case("bfloat16"), ranks.case("bfloat16_as_float32"))):
        for key in ("loss", "grad_chosen", "grad_rejected"):
            assert single[key].dtype == torch.float32
            torch.testing.assert_close(half[key], single[key].to(torch.bfloat16), rtol=0, atol=0,
                                       msg=f"{key} on rank {rank}")


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
        shard_sizes = str(list(workers.SPLITS["paired_uneven"][len(ranks)]))
        assert ("needs every rank's answers in pairs (M_r == N_r); per rank (M_r, N_r): " + shard_sizes) in (
            errors["authors_diagonal_unpaired_shards"] or ""), f"rank {rank} did not raise"
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


@pytest.mark.parametrize("section", ["ddp", "two_pass_ddp", "two_pass_ddp_keep1", "two_pass_ddp_keep2"])
def test_ddp_gradients_equal_single_process(two_ranks, section):
    """Under DDP (which averages over W ranks) with the loss scaled by W, every rank's gradient is the full one;
    TwoPassContrast alike whether it re-runs both microbatches or keeps the first one's graph (with no_sync the
    last microbatch is re-run even when more graphs may be kept: torch DDP reduces the backward of a forward made
    outside no_sync)."""
    loss, grads = single_process_model_step()
    for rank, got in enumerate(two_ranks.case(section)):
        if section.startswith("two_pass_ddp_keep"):
            assert got["kept"] == (True, False)
        torch.testing.assert_close(got["loss"], loss, **TOLERANCE)
        for name, grad in grads.items():
            torch.testing.assert_close(got["grads"][name], grad, **TOLERANCE,
                                       msg=f"{section}: gradient of {name} on rank {rank}")


# ---- normalisations -------------------------------------------------------------------------------------------
def layout_model_step(loss, micro_batches):
    """Loss and parameter gradients of one process: the whole batch, or TwoPassContrast over micro-batches."""
    model = workers.make_model()
    if micro_batches == 1:
        pairs = workers.layout_batch()
        output = loss(**workers.layout_loss_inputs(pairs, model(pairs["chosen"]), model(pairs["rejected"])))
        output.loss.backward()
        return output.loss.detach(), workers.parameter_grads(model)
    per_micro_batch = workers.LAYOUT_PAIRS // micro_batches
    parts = [workers.layout_batch(k * per_micro_batch, per_micro_batch) for k in range(micro_batches)]
    whole = workers.layout_batch()

    def step_loss(chosen_scores, rejected_scores):
        return loss(**workers.layout_loss_inputs(whole, chosen_scores, rejected_scores)).loss

    two_pass = TwoPassContrast(lambda pairs: (model(pairs["chosen"]), model(pairs["rejected"])), step_loss)
    return two_pass.step(parts).loss, workers.parameter_grads(model)


@pytest.mark.parametrize("name", list(workers.LAYOUT_LOSSES))
def test_each_normalization_is_the_same_at_every_layout(two_ranks, name):
    """1 rank × 8 pairs == 2 ranks × 4 pairs (gloo) == 1 rank × 2 micro-batches × 4 pairs: loss and gradients,
    for each normalisation and for the authors' diagonal form (its diagonal part is separable: the ranks' losses
    differ, their row-weighted mean is the global loss)."""
    from rpo.losses import build_loss

    loss = build_loss("rpo", **workers.LAYOUT_LOSS_OPTIONS, **workers.LAYOUT_LOSSES[name])
    whole_loss, whole_grads = layout_model_step(loss, 1)
    micro_loss, micro_grads = layout_model_step(loss, 2)
    ranks = two_ranks.case(f"layout:{name}")
    ranks_loss = ranks[0]["global_loss"] + sum((got["loss"] - got["global_loss"]) / len(ranks) for got in ranks)
    for got in ranks:
        torch.testing.assert_close(got["global_loss"], ranks[0]["global_loss"], rtol=0, atol=0)
    for label, value in (("2 ranks", ranks_loss), ("2 micro-batches", micro_loss)):
        torch.testing.assert_close(value, whole_loss, **TOLERANCE, msg=f"{name}: loss of {label}")
    for parameter, grad in whole_grads.items():
        torch.testing.assert_close(sum(got["grads"][parameter] for got in ranks), grad, **TOLERANCE,
                                   msg=f"{name}: gradient of {parameter}, 2 ranks")
        torch.testing.assert_close(micro_grads[parameter], grad, **TOLERANCE,
                                   msg=f"{name}: gradient of {parameter}, 2 micro-batches")


def test_effective_beta_of_the_global_matrix_does_not_depend_on_its_size(two_ranks):
    """Mean effective β of a pair over global matrices of 8 and 64 columns (2 ranks): β with "mean", β/K with
    "reference_columns" (the per-GPU β of a K-pair matrix), β for the authors' diagonal form (no weight in the
    sigmoid), all within 1e-6; β/N with the paper's "row"."""
    expected = {"mean": workers.BETA, "reference_columns": workers.BETA / 4, "authors_diagonal": workers.BETA}
    for columns in (8, 64):
        for name in workers.LAYOUT_LOSSES:
            for rank, value in enumerate(two_ranks.case(f"effective_beta:{name}:{columns}")):
                target = expected.get(name, workers.BETA / columns)
                assert value.item() == pytest.approx(target, rel=1e-6), (name, columns, rank)


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


@pytest.mark.skipif(torch.cuda.is_available(), reason="the tracker holds CUDA states there, this model's dropout "
                    "draws from the CPU generator")
def test_two_pass_replays_megatron_rng_tracker_states():
    """Dropout drawn from megatron's model-parallel RNG tracker, as megatron's attention dropout is (inside
    get_cuda_rng_tracker().fork()): pass 2 sees pass 1's masks when the tracker is passed, and not without it."""
    from megatron.core import tensor_parallel

    from rpo.compat import megatron_cpu

    megatron_cpu.apply()  # without CUDA the tracker's named states are CPU generator states
    tracker = tensor_parallel.get_cuda_rng_tracker()
    microbatches = workers.model_batch()[0] + workers.model_batch()[1]
    options = dict(workers.MODEL_LOSS_OPTIONS)

    def tracked_scores(model, microbatch):
        with tracker.fork():
            return workers.model_scores(model, microbatch)

    def fresh_model():
        tracker.reset()
        tracker.add("model-parallel-rng", 321)
        torch.manual_seed(5)  # the default generator: the same in both passes either way
        return workers.make_model(dropout=0.5)

    model = fresh_model()
    scores = [tracked_scores(model, mb) for mb in microbatches]
    loss = reference_loss(torch.cat([c for c, _ in scores]), torch.cat([r for _, r in scores]),
                          chosen_embeddings=torch.cat([mb["chosen_embeddings"] for mb in microbatches]),
                          rejected_embeddings=torch.cat([mb["rejected_embeddings"] for mb in microbatches]),
                          **options)
    loss.backward()
    expected = workers.parameter_grads(model)
    after_reference = tracker.get_states()["model-parallel-rng"]

    for trackers in ([tracker], []):
        model = fresh_model()
        two_pass = TwoPassContrast(functools.partial(tracked_scores, model),
                                   functools.partial(reference_loss, **options), embedding_fn=workers.model_embeddings,
                                   rng_state_trackers=trackers)
        step = two_pass.step(microbatches)
        torch.testing.assert_close(step.loss, loss.detach(), **TOLERANCE)  # pass 1 draws what the reference drew
        differences = [(model.get_parameter(name).grad - grad).abs().max().item() for name, grad in expected.items()]
        if trackers:
            assert max(differences) < 1e-12
            # the tracker ends where pass 1 left it, as the default generator does
            assert torch.equal(tracker.get_states()["model-parallel-rng"], after_reference)
        else:
            assert max(differences) > 1e-3  # other masks in pass 2: the gradient of another forward


@pytest.mark.parametrize("keep_graphs", [0, 1, 2, 3, 5])
def test_kept_graphs_give_the_same_step(keep_graphs):
    """With dropout: keeping the first k microbatches' graphs (one forward each) and re-running the others gives
    the loss and gradients of one grad-enabled forward per microbatch, for every k; score_fn runs once per kept
    microbatch and twice per re-run one; the RNG ends where the forwards left it."""
    microbatches = workers.model_batch()[0] + workers.model_batch()[1]  # 4 microbatches
    options = dict(workers.MODEL_LOSS_OPTIONS)
    model = workers.make_model(dropout=0.5)
    torch.manual_seed(11)
    scores = [workers.model_scores(model, mb) for mb in microbatches]
    after_forwards = torch.get_rng_state()
    loss = reference_loss(torch.cat([c for c, _ in scores]), torch.cat([r for _, r in scores]),
                          chosen_embeddings=torch.cat([mb["chosen_embeddings"] for mb in microbatches]),
                          rejected_embeddings=torch.cat([mb["rejected_embeddings"] for mb in microbatches]),
                          **options)
    (2.0 * loss).backward()
    expected = workers.parameter_grads(model)

    model = workers.make_model(dropout=0.5)
    calls = []

    def counted_scores(microbatch):
        calls.append(next(i for i, mb in enumerate(microbatches) if mb is microbatch))
        return workers.model_scores(model, microbatch)

    torch.manual_seed(11)
    two_pass = TwoPassContrast(counted_scores, functools.partial(reference_loss, **options),
                               embedding_fn=workers.model_embeddings, loss_scale=2.0, keep_graphs=keep_graphs)
    step = two_pass.step(microbatches)
    kept = min(keep_graphs, len(microbatches))
    assert step.kept == tuple(i < kept for i in range(len(microbatches)))
    assert calls == list(range(len(microbatches))) + list(range(kept, len(microbatches)))
    assert torch.equal(torch.get_rng_state(), after_forwards)
    torch.testing.assert_close(step.loss, loss.detach(), rtol=0, atol=0)
    for name, grad in expected.items():
        torch.testing.assert_close(model.get_parameter(name).grad, grad, rtol=0, atol=1e-14, msg=name)


def test_kept_graphs_option_is_checked():
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="keep_graphs must be an integer ≥ 0"):
            TwoPassContrast(lambda mb: mb, reference_loss, keep_graphs=bad)
    frozen = torch.ones(2)  # no trainable parameter: a kept graph has nothing to back-propagate into
    with pytest.raises(ValueError, match=r"scores of microbatch 0 do not require grad in pass 1"):
        TwoPassContrast(lambda mb: (frozen * 1, frozen * 2), functools.partial(reference_loss, beta=1.0,
                        weighting="uniform"), keep_graphs=1).step(["a"])


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
