"""Tests of the native contrast-matrix op (rpo.ops) against a float64 dense reference written here.

The reference below materialises the M × N matrices with plain float64 torch ops and differentiates them with
autograd; it shares no code with rpo.ops (nor with rpo.ops.reference, which is checked against it too).
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import rpo.ops
from rpo.ops import contrast_loss, contrast_loss_terms, reference

WEIGHTINGS = ["embedding", "uniform", "diagonal", "none"]
NORMALIZATIONS = ["row", "mean"]
SHAPES = {"square": (5, 5), "M!=N": (4, 7), "M=1": (1, 6), "N=1": (6, 1)}
# dtype -> tolerance relative to the reference's magnitude (issue 2: fp64 1e-10, fp32 1e-5, bf16 inputs 2e-2)
TOLERANCES = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2}
EMB_DIM = 16


def dense_reference_pair_losses(a, b, e=None, f=None, *, beta, margin=0.0, tau=0.5, alpha=0.8,
                                weighting="embedding", normalization="row", diag_offset=0):
    """M × N float64 matrix of softplus(−ω_ij (β (a_i − b_j) − margin)), straight from the definition."""
    a = a.double()
    b = b.double()
    num_rows, num_cols = a.shape[0], b.shape[0]
    if weighting == "embedding":
        e = e.double()
        f = f.double()
        cos = (e @ f.T) / (e.norm(dim=1)[:, None] * f.norm(dim=1)[None, :])
        logits = -(1.0 - cos) / tau
        unnormalised = torch.exp(logits - logits.max(dim=1, keepdim=True).values)
        weights = unnormalised / unnormalised.sum(dim=1, keepdim=True)
    elif weighting == "uniform":
        weights = torch.full((num_rows, num_cols), 1.0 / num_cols, dtype=torch.float64)
    elif weighting == "diagonal":
        weights = torch.full((num_rows, num_cols), (1.0 - alpha) / (num_cols - 1), dtype=torch.float64)
        for i in range(num_rows):
            weights[i, diag_offset + i] = alpha
    else:
        weights = torch.ones(num_rows, num_cols, dtype=torch.float64)
    if normalization == "mean" and weighting != "none":
        weights = weights * num_cols
    s = weights * (beta * (a[:, None] - b[None, :]) - margin)
    return torch.logaddexp(torch.zeros_like(s), -s)  # softplus(−s), exact in float64 for every s


def dense_reference_terms(a, b, e=None, f=None, *, loss_scale, **options):
    """(loss, dloss/da, dloss/db) in float64 with loss = loss_scale · Σ pair losses."""
    a64 = a.detach().double().requires_grad_()
    b64 = b.detach().double().requires_grad_()
    loss = loss_scale * dense_reference_pair_losses(a64, b64, e, f, **options).sum()
    grad_a, grad_b = torch.autograd.grad(loss, (a64, b64))
    return loss.detach(), grad_a, grad_b


def random_inputs(num_rows, num_cols, dtype, *, scale=2.0, emb_dtype=torch.float32, generator_seed=0):
    gen = torch.Generator().manual_seed(generator_seed)
    a = (scale * torch.randn(num_rows, generator=gen, dtype=torch.float64)).to(dtype)
    b = (scale * torch.randn(num_cols, generator=gen, dtype=torch.float64)).to(dtype)
    # Embeddings share a component so that cosines (and so weights) spread out instead of sitting near 0.
    shared = torch.randn(1, EMB_DIM, generator=gen, dtype=torch.float64)
    e = (shared + torch.randn(num_rows, EMB_DIM, generator=gen, dtype=torch.float64)).to(emb_dtype)
    f = (shared + torch.randn(num_cols, EMB_DIM, generator=gen, dtype=torch.float64)).to(emb_dtype)
    return a, b, e, f


def assert_close_scaled(actual, expected, tol, what):
    """|actual − expected| ≤ tol · max(|expected|) elementwise (relative to the tensor's magnitude)."""
    actual = actual.double()
    scale = expected.abs().max().item()
    err = (actual - expected).abs().max().item()
    assert err <= tol * max(scale, 1e-300), f"{what}: max error {err:.3e} vs scale {scale:.3e} (tol {tol:g})"


def legal_cases():
    for weighting in WEIGHTINGS:
        for normalization in NORMALIZATIONS:
            for shape_name, (m, n) in SHAPES.items():
                if weighting == "diagonal" and (m != n or m < 2):
                    continue
                for dtype in TOLERANCES:
                    yield pytest.param(weighting, normalization, m, n, dtype,
                                       id=f"{weighting}-{normalization}-{shape_name}-{str(dtype)[6:]}")


@pytest.fixture(scope="module", autouse=True)
def _extension_is_built():
    # `make test` builds the extension first: the native op, not the fallback, is what these tests check.
    assert rpo.ops.extension_available(), "rpo._C is not built: run `make install`"


# ---- values and gradients ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("weighting,normalization,num_rows,num_cols,dtype", list(legal_cases()))
def test_contrast_loss_matches_dense_reference(weighting, normalization, num_rows, num_cols, dtype):
    a, b, e, f = random_inputs(num_rows, num_cols, dtype)
    options = dict(beta=0.7, margin=0.3, tau=0.4, alpha=0.65, weighting=weighting)
    a_leaf = a.clone().requires_grad_()
    b_leaf = b.clone().requires_grad_()
    loss = contrast_loss(a_leaf, b_leaf, chosen_embeddings=e, rejected_embeddings=f,
                         weight_normalization=normalization, **options)
    grad_a, grad_b = torch.autograd.grad(loss, (a_leaf, b_leaf))
    assert loss.dtype == dtype and loss.shape == () and grad_a.dtype == dtype and grad_b.dtype == dtype

    ref_loss, ref_a, ref_b = dense_reference_terms(a, b, e, f, loss_scale=1.0 / (num_rows * num_cols),
                                                   normalization=normalization, **options)
    tol = TOLERANCES[dtype]
    assert_close_scaled(loss, ref_loss, tol, "loss")
    assert_close_scaled(grad_a, ref_a, tol, "grad chosen")
    assert_close_scaled(grad_b, ref_b, tol, "grad rejected")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("weighting", ["embedding", "diagonal"])
def test_many_slots_and_blocks(weighting, dtype):
    # CPU kernel layout at M = 128, N = 66536: 32 work slots of 4 rows, walked in cosine blocks of 3 rows
    # (1 MiB block budget), so slots span several blocks, including a partial one.
    num_rows, num_cols = (128, 66536) if weighting == "embedding" else (300, 300)
    a, b, e, f = random_inputs(num_rows, num_cols, dtype)
    e, f = e[:, :4].contiguous(), f[:, :4].contiguous()
    options = dict(beta=0.5, margin=0.1, tau=0.3, alpha=0.8, weighting=weighting, normalization="mean")
    loss, grad_a, grad_b = contrast_loss_terms(a, b, e, f, weight_normalization="mean", loss_scale=1e-3,
                                               **{k: v for k, v in options.items() if k != "normalization"})
    ref_loss, ref_a, ref_b = dense_reference_terms(a, b, e, f, loss_scale=1e-3, **options)
    tol = TOLERANCES[dtype]
    assert_close_scaled(loss, ref_loss, tol, "loss")
    assert_close_scaled(grad_a, ref_a, tol, "grad chosen")
    assert_close_scaled(grad_b, ref_b, tol, "grad rejected")


def test_low_precision_embeddings_are_accumulated_in_float32():
    a, b, e, f = random_inputs(6, 9, torch.float32, emb_dtype=torch.bfloat16)
    loss, grad_a, grad_b = contrast_loss_terms(a, b, e, f, beta=1.0, margin=0.0, tau=0.5, alpha=0.8,
                                               weighting="embedding", weight_normalization="row", loss_scale=1.0)
    ref_loss, ref_a, ref_b = dense_reference_terms(a, b, e.double(), f.double(), loss_scale=1.0, beta=1.0,
                                                   tau=0.5)
    assert_close_scaled(loss, ref_loss, 1e-5, "loss")
    assert_close_scaled(grad_a, ref_a, 1e-5, "grad chosen")
    assert_close_scaled(grad_b, ref_b, 1e-5, "grad rejected")


@pytest.mark.parametrize("dtype", list(TOLERANCES))
@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_extreme_scores_stay_finite_and_exact(weighting, dtype):
    # Scores of ±1e4 push |s| far beyond exp's range in both directions.
    a = torch.tensor([1e4, -1e4, 3.0, -2.0], dtype=dtype, requires_grad=True)
    b = torch.tensor([-1e4, 1e4, 0.5, 1e4], dtype=dtype, requires_grad=True)
    _, _, e, f = random_inputs(4, 4, dtype)
    options = dict(beta=0.5, margin=0.2, tau=0.5, alpha=0.6, weighting=weighting)
    loss = contrast_loss(a, b, chosen_embeddings=e, rejected_embeddings=f, **options)
    grad_a, grad_b = torch.autograd.grad(loss, (a, b))
    assert torch.isfinite(loss) and torch.isfinite(grad_a).all() and torch.isfinite(grad_b).all()
    ref_loss, ref_a, ref_b = dense_reference_terms(a, b, e, f, loss_scale=1 / 16, **options)
    tol = TOLERANCES[dtype]
    assert_close_scaled(loss, ref_loss, tol, "loss")
    assert_close_scaled(grad_a, ref_a, tol, "grad chosen")
    assert_close_scaled(grad_b, ref_b, tol, "grad rejected")


# ---- the terms primitive: diag_offset, loss_scale, compute_grad, empty inputs ------------------------------------

TERMS_IMPLEMENTATIONS = {"native": contrast_loss_terms, "reference": reference.contrast_loss_terms}


@pytest.mark.parametrize("implementation", list(TERMS_IMPLEMENTATIONS))
@pytest.mark.parametrize("weighting", WEIGHTINGS)
@pytest.mark.parametrize("normalization", NORMALIZATIONS)
def test_terms_diag_offset_and_loss_scale(implementation, weighting, normalization):
    # A slice of rows 2..4 of a 7 × 7 problem: the diagonal of local row i is column 2 + i, and the weights are
    # normalised over the 7 columns passed in.
    terms = TERMS_IMPLEMENTATIONS[implementation]
    a, b, e, f = random_inputs(3, 7, torch.float64)
    options = dict(beta=0.9, margin=-0.2, tau=0.6, alpha=0.7, weighting=weighting)
    loss, grad_a, grad_b = terms(a, b, e, f, weight_normalization=normalization, diag_offset=2, loss_scale=0.37,
                                 **options)
    ref_loss, ref_a, ref_b = dense_reference_terms(a, b, e, f, loss_scale=0.37, normalization=normalization,
                                                   diag_offset=2, **options)
    assert_close_scaled(loss, ref_loss, 1e-10, "loss")
    assert_close_scaled(grad_a, ref_a, 1e-10, "grad chosen")
    assert_close_scaled(grad_b, ref_b, 1e-10, "grad rejected")

    loss_only, empty_a, empty_b = terms(a, b, e, f, weight_normalization=normalization, diag_offset=2,
                                        loss_scale=0.37, compute_grad=False, **options)
    assert loss_only.item() == pytest.approx(loss.item(), rel=1e-12, abs=0)
    assert empty_a.numel() == 0 and empty_b.numel() == 0


@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_row_slices_with_diag_offset_add_up_to_the_full_loss(weighting):
    # The distributed path's use of the primitive: rows split over "ranks", all columns, diag_offset = first row.
    a, b, e, f = random_inputs(6, 6, torch.float64)
    options = dict(beta=0.4, margin=0.1, tau=0.5, alpha=0.8, weighting=weighting, weight_normalization="row")
    full = contrast_loss(a, b, chosen_embeddings=e, rejected_embeddings=f, **options)
    total = torch.zeros((), dtype=torch.float64)
    grad_b = torch.zeros(6, dtype=torch.float64)
    grads_a = []
    for start, stop in ((0, 2), (2, 2), (2, 6)):  # includes an empty slice
        loss, ga, gb = contrast_loss_terms(a[start:stop], b, e[start:stop], f, diag_offset=start,
                                           loss_scale=1 / 36, **options)
        total += loss
        grad_b += gb
        grads_a.append(ga)
    a_leaf = a.clone().requires_grad_()
    b_leaf = b.clone().requires_grad_()
    ref_a, ref_b = torch.autograd.grad(
        contrast_loss(a_leaf, b_leaf, chosen_embeddings=e, rejected_embeddings=f, **options), (a_leaf, b_leaf))
    assert total.item() == pytest.approx(full.item(), rel=1e-12)
    torch.testing.assert_close(torch.cat(grads_a), ref_a, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(grad_b, ref_b, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("implementation", list(TERMS_IMPLEMENTATIONS))
@pytest.mark.parametrize("num_rows,num_cols", [(0, 5), (4, 0), (0, 0)])
def test_terms_of_empty_inputs_are_zero(implementation, num_rows, num_cols):
    a, b, e, f = random_inputs(num_rows, num_cols, torch.float32)
    loss, grad_a, grad_b = TERMS_IMPLEMENTATIONS[implementation](
        a, b, e, f, beta=0.1, margin=0.0, tau=0.5, alpha=0.8, weighting="embedding", weight_normalization="row",
        loss_scale=1.0)
    assert loss.item() == 0.0 and loss.dtype == torch.float32
    assert grad_a.shape == (num_rows,) and grad_b.shape == (num_cols,)
    assert not grad_a.any() and not grad_b.any()


@pytest.mark.parametrize("weighting", WEIGHTINGS)
@pytest.mark.parametrize("normalization", NORMALIZATIONS)
def test_reference_module_matches_dense_reference(weighting, normalization):
    num_rows, num_cols = (5, 5) if weighting == "diagonal" else (4, 7)
    a, b, e, f = random_inputs(num_rows, num_cols, torch.float64)
    options = dict(beta=0.6, margin=0.25, tau=0.45, alpha=0.55, weighting=weighting)
    a_leaf = a.clone().requires_grad_()
    b_leaf = b.clone().requires_grad_()
    losses = reference.contrast_loss_matrix(a_leaf, b_leaf, e, f, weight_normalization=normalization, **options)
    grad_a, grad_b = torch.autograd.grad(losses.mean(), (a_leaf, b_leaf))
    ref_loss, ref_a, ref_b = dense_reference_terms(a, b, e, f, loss_scale=1 / (num_rows * num_cols),
                                                   normalization=normalization, **options)
    assert_close_scaled(losses.mean(), ref_loss, 1e-10, "loss")
    assert_close_scaled(grad_a, ref_a, 1e-10, "grad chosen")
    assert_close_scaled(grad_b, ref_b, 1e-10, "grad rejected")


def test_listing1_baseline_computes_the_same_loss():
    # The benchmark compares the op with this eager code: both must compute the same quantity.
    a, b, e, f = random_inputs(12, 9, torch.float64, emb_dtype=torch.float64)
    eager = reference.listing1_contrast_loss(a, b, e, f, beta=0.3, tau=0.5)
    ref_loss, _, _ = dense_reference_terms(a, b, e, f, loss_scale=1 / 108, beta=0.3, tau=0.5)
    assert eager.item() == pytest.approx(ref_loss.item(), rel=1e-12)


def test_results_are_deterministic():
    a, b, e, f = random_inputs(300, 257, torch.float32)
    kwargs = dict(beta=0.2, margin=0.0, tau=0.5, alpha=0.8, weighting="embedding", weight_normalization="row",
                  loss_scale=1.0)
    first = contrast_loss_terms(a, b, e, f, **kwargs)
    second = contrast_loss_terms(a, b, e, f, **kwargs)
    for x, y in zip(first, second):
        assert torch.equal(x, y)


# ---- torch integration: opcheck, gradcheck, torch.compile ----------------------------------------------------------

@pytest.mark.parametrize("weighting", WEIGHTINGS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_opcheck(weighting, dtype):
    num_rows, num_cols = (4, 4) if weighting == "diagonal" else (4, 3)
    a, b, e, f = random_inputs(num_rows, num_cols, dtype)
    code = rpo.ops.WEIGHTINGS[weighting]
    samples = [
        (a.clone().requires_grad_(), b.clone().requires_grad_(), e, f, 0.5, 0.1, 0.5, 0.7, code, 1, 0, 0.25, True),
        (a, b, e, f, 0.5, 0.1, 0.5, 0.7, code, 0, 0, 1.0, False),
    ]
    for args in samples:
        torch.library.opcheck(torch.ops.rpo.contrast_loss_terms.default, args)


@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_gradcheck_float64(weighting):
    num_rows, num_cols = (4, 4) if weighting == "diagonal" else (4, 3)
    a, b, e, f = random_inputs(num_rows, num_cols, torch.float64)

    def loss_fn(chosen, rejected):
        return contrast_loss(chosen, rejected, beta=0.8, weighting=weighting, chosen_embeddings=e,
                             rejected_embeddings=f, margin=0.1, weight_normalization="mean")

    assert torch.autograd.gradcheck(loss_fn, (a.requires_grad_(), b.requires_grad_()))


def test_double_backward_is_refused():
    a = torch.randn(3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    loss = contrast_loss(a, b, beta=0.5, weighting="uniform")
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, a, create_graph=True)


def test_torch_compile_fullgraph_matches_eager():
    a, b, e, f = random_inputs(7, 5, torch.float32)

    def loss_fn(chosen, rejected, chosen_emb, rejected_emb):
        return contrast_loss(chosen, rejected, beta=0.3, chosen_embeddings=chosen_emb,
                             rejected_embeddings=rejected_emb, margin=0.05)

    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, fullgraph=True)
    a_c, b_c = a.clone().requires_grad_(), b.clone().requires_grad_()
    loss_c = compiled(a_c, b_c, e, f)
    loss_c.backward()
    a_e, b_e = a.clone().requires_grad_(), b.clone().requires_grad_()
    loss_e = loss_fn(a_e, b_e, e, f)
    loss_e.backward()
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-6, atol=0)
    torch.testing.assert_close(a_c.grad, a_e.grad, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(b_c.grad, b_e.grad, rtol=1e-6, atol=1e-9)
    # Documented: the non-finite check inspects values and is skipped inside compiled code, so a NaN score
    # gives a NaN loss there (eager raises, see test_validation_errors).
    bad = a.clone()
    bad[2] = float("nan")
    assert torch.isnan(compiled(bad, b, e, f))


# ---- threads and memory ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("weighting", ["embedding", "uniform"])
def test_cpu_kernel_runs_on_more_than_one_thread(weighting):
    a, b, e, f = random_inputs(512, 512, torch.float32)
    kwargs = dict(beta=0.1, margin=0.0, tau=0.5, alpha=0.8, weighting=weighting, weight_normalization="row",
                  loss_scale=1.0)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = contrast_loss_terms(a, b, e, f, **kwargs)
        assert torch.ops.rpo._cpu_threads_used_last_call() == 1
        torch.set_num_threads(2)
        # Threads pull work slots dynamically; a thread that starts late may find none left, so try a few times.
        for _ in range(20):
            multi = contrast_loss_terms(a, b, e, f, **kwargs)
            threads_used = torch.ops.rpo._cpu_threads_used_last_call()  # distinct OS thread ids of the slots
            if threads_used == 2:
                break
        assert threads_used == 2
    finally:
        torch.set_num_threads(previous)
    # The work split does not depend on the thread count: the results are bitwise identical.
    for x, y in zip(single, multi):
        assert torch.equal(x, y)


MEMORY_SCRIPT = textwrap.dedent("""
    import json, re, torch, rpo.ops

    def status_kib(field):
        return int(re.search(field + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))

    def peak_extra_mib(work):
        base = status_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # resets VmHWM (peak RSS) to the current RSS
        work()
        return (status_kib("VmHWM") - base) / 1024

    torch.manual_seed(0)
    torch.set_num_threads(2)
    n, dim = 16384, 384
    a = torch.randn(n, requires_grad=True)
    b = torch.randn(n, requires_grad=True)
    e = torch.randn(n, dim)
    f = torch.randn(n, dim)
    warm = rpo.ops.contrast_loss(a[:64], b[:64], beta=0.1, chosen_embeddings=e[:64], rejected_embeddings=f[:64])
    warm.backward()
    a.grad = b.grad = None
    result = {}

    def op():
        loss = rpo.ops.contrast_loss(a, b, beta=0.1, chosen_embeddings=e, rejected_embeddings=f)
        loss.backward()
        result["loss"] = loss.item()
        result["grads_finite"] = bool(torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all())

    result["op_mib"] = peak_extra_mib(op)

    def control():  # what a quarter of one materialised float32 M x N matrix costs
        quarter = torch.empty(n, n // 4)
        quarter.fill_(1.0)
        del quarter

    result["control_mib"] = peak_extra_mib(control)
    print(json.dumps(result))
""")


def test_memory_at_16384_stays_far_below_one_matrix():
    # M = N = 16384, D = 384: one float32 M x N matrix is 1 GiB. Measured as the peak-RSS rise of a fresh process
    # (VmHWM after resetting it through /proc/self/clear_refs) during forward + backward.
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("this kernel does not allow resetting the peak RSS (/proc/self/clear_refs)")
    env = dict(os.environ, OMP_NUM_THREADS="2")
    proc = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    # The measurement sees materialisation: a quarter matrix (256 MiB) shows up in full.
    assert result["control_mib"] >= 240, result
    assert result["op_mib"] < 256, result
    assert result["grads_finite"] and 0 < result["loss"] < 1, result


# ---- fallback ----------------------------------------------------------------------------------------------------

FALLBACK_SCRIPT = textwrap.dedent("""
    import json, warnings, torch
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import rpo.ops
        a = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64, requires_grad=True)
        b = torch.tensor([0.25, 1.5], dtype=torch.float64, requires_grad=True)
        e = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]], dtype=torch.float64)
        f = torch.tensor([[1.0, 1.0], [-1.0, 0.5]], dtype=torch.float64)
        loss = rpo.ops.contrast_loss(a, b, beta=0.7, chosen_embeddings=e, rejected_embeddings=f, tau=0.3)
        loss.backward()
        terms = rpo.ops.contrast_loss_terms(a, b, e, f, beta=0.7, margin=0.0, tau=0.3, alpha=0.8,
                                            weighting="embedding", weight_normalization="row", loss_scale=1 / 6)
    print(json.dumps({"available": rpo.ops.extension_available(), "loss": loss.item(),
                      "grad_a": a.grad.tolist(), "grad_b": b.grad.tolist(), "terms_loss": terms[0].item(),
                      "warnings": [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]}))
""")


def test_fallback_without_extension_warns_once_and_matches_reference():
    env = dict(os.environ, RPO_DISABLE_EXTENSION="1")
    proc = subprocess.run([sys.executable, "-c", FALLBACK_SCRIPT], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["available"] is False
    assert len(result["warnings"]) == 1 and "rpo._C is unavailable" in result["warnings"][0]
    a = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    b = torch.tensor([0.25, 1.5], dtype=torch.float64)
    e = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]], dtype=torch.float64)
    f = torch.tensor([[1.0, 1.0], [-1.0, 0.5]], dtype=torch.float64)
    ref_loss, ref_a, ref_b = dense_reference_terms(a, b, e, f, loss_scale=1 / 6, beta=0.7, tau=0.3)
    assert result["loss"] == pytest.approx(ref_loss.item(), rel=1e-12)
    assert result["terms_loss"] == pytest.approx(ref_loss.item(), rel=1e-12)
    torch.testing.assert_close(torch.tensor(result["grad_a"], dtype=torch.float64), ref_a, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(torch.tensor(result["grad_b"], dtype=torch.float64), ref_b, rtol=1e-10, atol=1e-14)


# ---- validation --------------------------------------------------------------------------------------------------

def _call(**overrides):
    a, b, e, f = random_inputs(4, 4, torch.float32)
    kwargs = dict(chosen_scores=a, rejected_scores=b, beta=0.1, weighting="embedding", chosen_embeddings=e,
                  rejected_embeddings=f)
    kwargs.update(overrides)
    chosen = kwargs.pop("chosen_scores")
    rejected = kwargs.pop("rejected_scores")
    return contrast_loss(chosen, rejected, **kwargs)


def _nan_at(index, n=4):
    x = torch.randn(n)
    x[index] = float("nan")
    return x


def _inf_emb():
    x = torch.randn(4, EMB_DIM)
    x[1, 2] = float("inf")
    return x


VALIDATION_CASES = {
    "chosen not 1-D": (dict(chosen_scores=torch.randn(2, 2)), ValueError, r"chosen_scores must be 1-D.*\(2, 2\)"),
    "rejected not a tensor": (dict(rejected_scores=[1.0, 2.0]), TypeError, r"rejected_scores must be a torch.Tensor"),
    "integer scores": (dict(chosen_scores=torch.arange(4), rejected_scores=torch.arange(4)), TypeError,
                       r"chosen_scores must be float32, bfloat16 or float64"),
    "dtype mismatch": (dict(rejected_scores=torch.randn(4, dtype=torch.float64)), TypeError,
                       r"same dtype.*float32 and torch.float64"),
    "mixed devices": (dict(rejected_scores=torch.randn(4, device="meta")), ValueError,
                      r"mixed devices: chosen_scores on cpu, rejected_scores on meta"),
    "embedding on another device": (dict(rejected_embeddings=torch.randn(4, EMB_DIM, device="meta")), ValueError,
                                    r"mixed devices: rejected_embeddings on meta"),
    "embeddings missing": (dict(rejected_embeddings=None), ValueError,
                           r"weighting='embedding' needs.*rejected_embeddings is None"),
    "chosen embedding rows": (dict(chosen_embeddings=torch.randn(3, EMB_DIM)), ValueError,
                              r"chosen_embeddings has 3 rows but there are M=4"),
    "rejected embedding rows": (dict(rejected_embeddings=torch.randn(5, EMB_DIM)), ValueError,
                                r"rejected_embeddings has 5 rows but there are N=4"),
    "embedding dims": (dict(rejected_embeddings=torch.randn(4, EMB_DIM + 1)), ValueError,
                       r"embedding dims differ: chosen_embeddings has D=16, rejected_embeddings has D=17"),
    "embedding 1-D": (dict(chosen_embeddings=torch.randn(4)), ValueError, r"chosen_embeddings must be 2-D"),
    "diagonal not square": (dict(weighting="diagonal", rejected_scores=torch.randn(5)), ValueError,
                            r"weighting='diagonal' needs a square matrix.*M=4 chosen and N=5"),
    "diagonal M=1": (dict(weighting="diagonal", chosen_scores=torch.randn(1), rejected_scores=torch.randn(1)),
                     ValueError, r"weighting='diagonal' needs a square matrix with at least 2 pairs"),
    "tau zero": (dict(tau=0.0), ValueError, r"tau must be > 0, got 0.0"),
    "tau negative": (dict(tau=-1.0), ValueError, r"tau must be > 0"),
    "tau nan": (dict(tau=float("nan")), ValueError, r"tau must be finite"),
    "beta inf": (dict(beta=float("inf")), ValueError, r"beta must be finite"),
    "beta nan": (dict(beta=float("nan")), ValueError, r"beta must be finite"),
    "beta tensor": (dict(beta=torch.tensor(0.1)), TypeError, r"beta must be a real number"),
    "margin nan": (dict(margin=float("nan")), ValueError, r"margin must be finite"),
    "alpha above 1": (dict(alpha=1.5), ValueError, r"alpha must be in \[0, 1\], got 1.5"),
    "alpha below 0": (dict(alpha=-0.1), ValueError, r"alpha must be in \[0, 1\]"),
    "unknown weighting": (dict(weighting="cosine"), ValueError,
                          r"weighting must be one of 'embedding', 'uniform', 'diagonal', 'none'; got 'cosine'"),
    "unknown normalization": (dict(weight_normalization="sum"), ValueError,
                              r"weight_normalization must be one of 'row', 'mean'; got 'sum'"),
    "non-finite chosen": (dict(chosen_scores=_nan_at(0)), ValueError,
                          r"chosen_scores has a non-finite value \(nan\) at index 0"),
    "non-finite rejected": (dict(rejected_scores=_nan_at(3)), ValueError,
                            r"rejected_scores has a non-finite value \(nan\) at index 3"),
    "non-finite embedding": (dict(chosen_embeddings=_inf_emb()), ValueError,
                             r"chosen_embeddings has a non-finite value \(inf\) at row 1, column 2"),
    "M = 0": (dict(chosen_scores=torch.randn(0), chosen_embeddings=torch.randn(0, EMB_DIM)), ValueError,
              r"at least one chosen and one rejected score, got M=0"),
    "N = 0": (dict(weighting="uniform", rejected_scores=torch.randn(0)), ValueError,
              r"at least one chosen and one rejected score, got M=4 chosen and N=0"),
}


@pytest.mark.parametrize("case", list(VALIDATION_CASES))
def test_validation_errors(case):
    overrides, error, message = VALIDATION_CASES[case]
    with pytest.raises(error, match=message):
        _call(**overrides)


TERMS_VALIDATION_CASES = {
    "diag_offset too large": (dict(diag_offset=5), r"diag_offset=5 puts the diagonal of rows 0..1 outside the N=6"),
    "diag_offset negative": (dict(diag_offset=-1), r"diag_offset=-1"),
    "diagonal N=1": (dict(rejected_scores=torch.randn(1)), r"needs at least 2 columns, got N=1"),
    "loss_scale inf": (dict(loss_scale=float("inf")), r"loss_scale must be finite"),
}


@pytest.mark.parametrize("case", list(TERMS_VALIDATION_CASES))
def test_terms_validation_errors(case):
    overrides, message = TERMS_VALIDATION_CASES[case]
    kwargs = dict(chosen_scores=torch.randn(2), rejected_scores=torch.randn(6), beta=0.1, margin=0.0, tau=0.5,
                  alpha=0.8, weighting="diagonal", weight_normalization="row", diag_offset=4, loss_scale=1.0)
    kwargs.update(overrides)
    chosen, rejected = kwargs.pop("chosen_scores"), kwargs.pop("rejected_scores")
    with pytest.raises(ValueError, match=message):
        contrast_loss_terms(chosen, rejected, None, None, **kwargs)


def test_native_op_checks_its_arguments_too():
    # Direct torch.ops callers bypass the Python validation; the kernel's own checks still name the problem.
    a, b = torch.randn(3), torch.randn(3)
    with pytest.raises(RuntimeError, match="chosen must be 1-D"):
        torch.ops.rpo.contrast_loss_terms(a[None], b, None, None, 0.1, 0.0, 0.5, 0.8, 1, 0, 0, 1.0, True)
    with pytest.raises(RuntimeError, match="weighting must be 0 \\(embedding\\)"):
        torch.ops.rpo.contrast_loss_terms(a, b, None, None, 0.1, 0.0, 0.5, 0.8, 7, 0, 0, 1.0, True)
    with pytest.raises(RuntimeError, match="needs chosen_emb and rejected_emb"):
        torch.ops.rpo.contrast_loss_terms(a, b, None, None, 0.1, 0.0, 0.5, 0.8, 0, 0, 0, 1.0, True)
    with pytest.raises(RuntimeError, match="diag_offset"):
        torch.ops.rpo.contrast_loss_terms(a, b, None, None, 0.1, 0.0, 0.5, 0.8, 2, 0, 1, 1.0, True)


def test_process_group_delegates_to_the_global_contrast(monkeypatch):
    # With a process group the local shard may be empty or non-square, and validation happens collectively in
    # rpo.distributed (so bad input on one rank raises on every rank instead of hanging the others; covered by
    # tests/test_distributed.py): contrast_loss must delegate before validating anything locally.
    import rpo.distributed.contrast as distributed_contrast

    calls = []

    def recording(chosen, rejected, **kwargs):
        calls.append((chosen.shape[0], rejected.shape[0], kwargs))
        return torch.zeros(())

    monkeypatch.setattr(distributed_contrast, "global_contrast_loss", recording)
    group = object()
    contrast_loss(torch.randn(0), torch.randn(3), beta=0.2, weighting="diagonal", alpha=0.7, process_group=group)
    contrast_loss(torch.randn(3), torch.randn(1), beta=0.2, weighting="uniform", margin=0.5, process_group=group)
    assert [(m, n) for m, n, _ in calls] == [(0, 3), (3, 1)]
    assert calls[0][2]["process_group"] is group and calls[0][2]["alpha"] == 0.7
    assert calls[1][2]["margin"] == 0.5 and calls[1][2]["weighting"] == "uniform"
    contrast_loss(torch.randn(2), torch.randn(2), beta=0.2, tau=0.0, weighting="uniform", process_group=group)
    assert len(calls) == 3 and calls[2][2]["tau"] == 0.0
    with pytest.raises(ValueError, match="tau must be > 0"):  # without a group the same call fails locally
        contrast_loss(torch.randn(2), torch.randn(2), beta=0.2, tau=0.0, weighting="uniform")
