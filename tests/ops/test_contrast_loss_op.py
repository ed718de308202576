"""Tests of the contrast-matrix op (rpo.ops) on every device, against a float64 dense reference written here.

The reference below materialises the M × N matrices with plain float64 torch ops on the CPU and differentiates
them with autograd; it shares no code with rpo.ops (nor with rpo.ops.reference, which is checked against it
too). Tests take the device as a parameter ("cpu", "cuda"); the CUDA cases skip, with the reason, where torch
sees no GPU (benchmarks/gpu_check.sh runs them on a GPU machine: `pytest tests/ops -k cuda`). Tests of one
backend's layout (CPU work slots and threads, CUDA tiles and streams) take only that device.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import rpo.ops
from rpo.ops import contrast_loss, contrast_loss_and_grads, reference

WEIGHTINGS = ["embedding", "uniform", "diagonal", "none"]
NORMALIZATIONS = ["row", "mean"]
SHAPES = {"square": (5, 5), "M!=N": (4, 7), "M=1": (1, 6), "N=1": (6, 1)}
# dtype -> tolerance relative to the reference's magnitude (issue 2: fp64 1e-10, fp32 1e-5, bf16 inputs 2e-2)
TOLERANCES = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2}
EMB_DIM = 16
# The CUDA binding computes the embedding cosines in row blocks of 2^25 float32 elements (csrc/cuda).
CUDA_BLOCK_ELEMENTS = 2**25

_NO_CUDA = pytest.mark.skipif(not torch.cuda.is_available(),
                              reason="no CUDA GPU visible to torch: the CUDA cases run on a GPU machine "
                                     "(benchmarks/gpu_check.sh)")
CPU = pytest.param("cpu", id="cpu")
CUDA = pytest.param("cuda", id="cuda", marks=_NO_CUDA)
DEVICES = [CPU, CUDA]


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


@pytest.fixture(autouse=True)
def _kernel_for_device(request):
    # A CPU-only build would make every CUDA case fail with a dispatch error; say what is wrong instead.
    params = getattr(request.node, "callspec", None)
    if params is not None and params.params.get("device") == "cuda":
        assert torch._C._dispatch_has_kernel_for_dispatch_key("rpo::contrast_loss_and_grads", "CUDA"), (
            "rpo._C was built without its CUDA kernel: rebuild with a CUDA torch and TORCH_CUDA_ARCH_LIST set")


def on_device(device, *tensors):
    return [t.to(device) for t in tensors]


def check_against_reference(device, a, b, e, f, tol, *, normalization, loss_scale, **options):
    """contrast_loss_and_grads on `device` vs the dense float64 reference computed on the CPU."""
    result = contrast_loss_and_grads(*on_device(device, a, b, e, f), weight_normalization=normalization,
                                     loss_scale=loss_scale, **options)
    for tensor in result:
        assert tensor.device.type == device and tensor.dtype == a.dtype
    ref = dense_reference_terms(a, b, e, f, loss_scale=loss_scale, normalization=normalization, **options)
    for actual, expected, what in zip(result, ref, ("loss", "grad chosen", "grad rejected")):
        assert_close_scaled(actual.cpu(), expected, tol, what)


# ---- values and gradients ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("weighting,normalization,num_rows,num_cols,dtype", list(legal_cases()))
def test_contrast_loss_matches_dense_reference(weighting, normalization, num_rows, num_cols, dtype, device):
    a, b, e, f = random_inputs(num_rows, num_cols, dtype)
    options = dict(beta=0.7, margin=0.3, tau=0.4, alpha=0.65, weighting=weighting)
    a_leaf, b_leaf = (t.to(device).requires_grad_() for t in (a, b))
    e_dev, f_dev = on_device(device, e, f)
    loss = contrast_loss(a_leaf, b_leaf, chosen_embeddings=e_dev, rejected_embeddings=f_dev,
                         weight_normalization=normalization, **options)
    grad_a, grad_b = torch.autograd.grad(loss, (a_leaf, b_leaf))
    assert loss.device.type == device and loss.dtype == dtype and loss.shape == ()
    assert grad_a.device.type == device and grad_a.dtype == dtype and grad_b.dtype == dtype

    ref_loss, ref_a, ref_b = dense_reference_terms(a, b, e, f, loss_scale=1.0 / (num_rows * num_cols),
                                                   normalization=normalization, **options)
    tol = TOLERANCES[dtype]
    assert_close_scaled(loss.cpu(), ref_loss, tol, "loss")
    assert_close_scaled(grad_a.cpu(), ref_a, tol, "grad chosen")
    assert_close_scaled(grad_b.cpu(), ref_b, tol, "grad rejected")


@pytest.mark.parametrize("device", [CPU])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("weighting", ["embedding", "diagonal"])
def test_many_slots_and_blocks(weighting, dtype, device, monkeypatch):
    # CPU kernel layout at M = 300, N = 1001 with a 3003-value block budget: 4 work slots of 75 rows, each
    # walked in cosine blocks of 3 rows, so the block loop, slot boundaries and per-slot column partials all
    # take part (the default blocks would hold these rows at once).
    monkeypatch.setenv("RPO_CPU_BLOCK_ELEMENTS", "3003")
    num_rows, num_cols = (300, 1001) if weighting == "embedding" else (300, 300)
    a, b, e, f = random_inputs(num_rows, num_cols, dtype)
    check_against_reference(device, a, b, e, f, TOLERANCES[dtype], beta=0.5, margin=0.1, tau=0.3, alpha=0.8,
                            weighting=weighting, normalization="mean", loss_scale=1e-3)


@pytest.mark.parametrize("device", [CUDA])
@pytest.mark.parametrize("dtype", list(TOLERANCES))
@pytest.mark.parametrize("weighting,num_rows,num_cols", [
    ("embedding", 37, 300),      # a partial 256-column tile and a partial 16-row CTA
    ("uniform", 1000, 1537),
    ("diagonal", 1000, 1000),    # the diagonal crosses CTA boundaries
    ("none", 33, 257),
    # Two row blocks of the embedding path: 2^25 / 120000 = 279 rows per block.
    ("embedding", 300, 120000),
])
def test_partial_tiles_and_row_blocks(weighting, num_rows, num_cols, dtype, device):
    if weighting == "embedding" and num_rows * num_cols > CUDA_BLOCK_ELEMENTS:
        assert CUDA_BLOCK_ELEMENTS // num_cols < num_rows  # the case really spans several blocks
    a, b, e, f = random_inputs(num_rows, num_cols, dtype, generator_seed=num_rows)
    check_against_reference(device, a, b, e, f, TOLERANCES[dtype], beta=0.5, margin=0.1, tau=0.3, alpha=0.8,
                            weighting=weighting, normalization="mean", loss_scale=1.0 / (num_rows * num_cols))


@pytest.mark.parametrize("device", DEVICES)
def test_low_precision_embeddings_are_accumulated_in_float32(device):
    a, b, e, f = random_inputs(6, 9, torch.float32, emb_dtype=torch.bfloat16)
    loss, grad_a, grad_b = contrast_loss_and_grads(*on_device(device, a, b, e, f), beta=1.0, margin=0.0, tau=0.5,
                                                   alpha=0.8, weighting="embedding", weight_normalization="row",
                                                   loss_scale=1.0)
    ref_loss, ref_a, ref_b = dense_reference_terms(a, b, e.double(), f.double(), loss_scale=1.0, beta=1.0,
                                                   tau=0.5)
    assert_close_scaled(loss.cpu(), ref_loss, 1e-5, "loss")
    assert_close_scaled(grad_a.cpu(), ref_a, 1e-5, "grad chosen")
    assert_close_scaled(grad_b.cpu(), ref_b, 1e-5, "grad rejected")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(TOLERANCES))
@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_extreme_scores_stay_finite_and_exact(weighting, dtype, device):
    # Scores of ±1e4 push |s| far beyond exp's range in both directions.
    a = torch.tensor([1e4, -1e4, 3.0, -2.0], dtype=dtype, device=device, requires_grad=True)
    b = torch.tensor([-1e4, 1e4, 0.5, 1e4], dtype=dtype, device=device, requires_grad=True)
    _, _, e, f = random_inputs(4, 4, dtype)
    options = dict(beta=0.5, margin=0.2, tau=0.5, alpha=0.6, weighting=weighting)
    loss = contrast_loss(a, b, chosen_embeddings=e.to(device), rejected_embeddings=f.to(device), **options)
    grad_a, grad_b = torch.autograd.grad(loss, (a, b))
    assert torch.isfinite(loss) and torch.isfinite(grad_a).all() and torch.isfinite(grad_b).all()
    ref_loss, ref_a, ref_b = dense_reference_terms(a.cpu(), b.cpu(), e, f, loss_scale=1 / 16, **options)
    tol = TOLERANCES[dtype]
    assert_close_scaled(loss.cpu(), ref_loss, tol, "loss")
    assert_close_scaled(grad_a.cpu(), ref_a, tol, "grad chosen")
    assert_close_scaled(grad_b.cpu(), ref_b, tol, "grad rejected")


# ---- the primitive: diag_offset, loss_scale, compute_grad, empty inputs -------------------------------------------

# (implementation, device): the native op on each device, and the pure-PyTorch reference.
IMPLEMENTATIONS = [pytest.param(contrast_loss_and_grads, "cpu", id="native-cpu"),
                   pytest.param(contrast_loss_and_grads, "cuda", id="native-cuda", marks=_NO_CUDA),
                   pytest.param(reference.contrast_loss_and_grads, "cpu", id="reference-cpu")]


@pytest.mark.parametrize("implementation,device", IMPLEMENTATIONS)
@pytest.mark.parametrize("weighting", WEIGHTINGS)
@pytest.mark.parametrize("normalization", NORMALIZATIONS)
def test_diag_offset_and_loss_scale(implementation, device, weighting, normalization):
    # A slice of rows 2..4 of a 7 × 7 problem: the diagonal of local row i is column 2 + i, and the weights are
    # normalised over the 7 columns passed in (the distributed path's use of the primitive).
    a, b, e, f = random_inputs(3, 7, torch.float64)
    options = dict(beta=0.9, margin=-0.2, tau=0.6, alpha=0.7, weighting=weighting)
    inputs = on_device(device, a, b, e, f)
    loss, grad_a, grad_b = implementation(*inputs, weight_normalization=normalization, diag_offset=2,
                                          loss_scale=0.37, **options)
    ref_loss, ref_a, ref_b = dense_reference_terms(a, b, e, f, loss_scale=0.37, normalization=normalization,
                                                   diag_offset=2, **options)
    assert_close_scaled(loss.cpu(), ref_loss, 1e-10, "loss")
    assert_close_scaled(grad_a.cpu(), ref_a, 1e-10, "grad chosen")
    assert_close_scaled(grad_b.cpu(), ref_b, 1e-10, "grad rejected")

    loss_only, empty_a, empty_b = implementation(*inputs, weight_normalization=normalization, diag_offset=2,
                                                 loss_scale=0.37, compute_grad=False, **options)
    assert loss_only.item() == pytest.approx(loss.item(), rel=1e-12, abs=0)
    assert empty_a.numel() == 0 and empty_b.numel() == 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_row_slices_with_diag_offset_add_up_to_the_full_loss(weighting, device):
    # The distributed path's use of the primitive: rows split over "ranks", all columns, diag_offset = first row.
    a, b, e, f = on_device(device, *random_inputs(6, 6, torch.float64))
    options = dict(beta=0.4, margin=0.1, tau=0.5, alpha=0.8, weighting=weighting, weight_normalization="row")
    full = contrast_loss(a, b, chosen_embeddings=e, rejected_embeddings=f, **options)
    total = torch.zeros((), dtype=torch.float64, device=device)
    grad_b = torch.zeros(6, dtype=torch.float64, device=device)
    grads_a = []
    for start, stop in ((0, 2), (2, 2), (2, 6)):  # includes an empty slice
        loss, ga, gb = contrast_loss_and_grads(a[start:stop], b, e[start:stop], f, diag_offset=start,
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


@pytest.mark.parametrize("implementation,device", IMPLEMENTATIONS)
@pytest.mark.parametrize("num_rows,num_cols", [(0, 5), (4, 0), (0, 0)])
def test_empty_inputs_give_zero_loss_and_grads(implementation, device, num_rows, num_cols):
    a, b, e, f = on_device(device, *random_inputs(num_rows, num_cols, torch.float32))
    loss, grad_a, grad_b = implementation(a, b, e, f, beta=0.1, margin=0.0, tau=0.5, alpha=0.8,
                                          weighting="embedding", weight_normalization="row", loss_scale=1.0)
    assert loss.item() == 0.0 and loss.dtype == torch.float32 and loss.device.type == device
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


def test_authors_baseline_computes_the_same_loss():
    # The benchmark compares the op with this eager code: both must compute the same quantity.
    a, b, e, f = random_inputs(12, 9, torch.float64, emb_dtype=torch.float64)
    eager = reference.authors_contrast_loss(a, b, e, f, beta=0.3, tau=0.5)
    ref_loss, _, _ = dense_reference_terms(a, b, e, f, loss_scale=1 / 108, beta=0.3, tau=0.5)
    assert eager.item() == pytest.approx(ref_loss.item(), rel=1e-12)


def test_results_are_deterministic():
    a, b, e, f = random_inputs(300, 257, torch.float32)
    kwargs = dict(beta=0.2, margin=0.0, tau=0.5, alpha=0.8, weighting="embedding", weight_normalization="row",
                  loss_scale=1.0)
    first = contrast_loss_and_grads(a, b, e, f, **kwargs)
    second = contrast_loss_and_grads(a, b, e, f, **kwargs)
    for x, y in zip(first, second):
        assert torch.equal(x, y)


@pytest.mark.parametrize("device", [CUDA])
@pytest.mark.parametrize("weighting", WEIGHTINGS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_cuda_agrees_with_cpu_kernel(weighting, dtype, device):
    # Two implementations of the same op (the CPU kernel is checked against the reference above) on a size where
    # the reference would be slow; float64 must agree to rounding, lower precisions to their tolerance.
    num_rows = num_cols = 2048
    a, b, e, f = random_inputs(num_rows, num_cols, dtype, generator_seed=7)
    kwargs = dict(beta=0.3, margin=0.05, tau=0.5, alpha=0.8, weighting=weighting, weight_normalization="row",
                  loss_scale=1.0 / (num_rows * num_cols))
    on_cpu = contrast_loss_and_grads(a, b, e, f, **kwargs)
    on_cuda = contrast_loss_and_grads(*on_device(device, a, b, e, f), **kwargs)
    tol = TOLERANCES[dtype]
    for x, y, what in zip(on_cuda, on_cpu, ("loss", "grad chosen", "grad rejected")):
        assert_close_scaled(x.cpu(), y.double(), tol, what)


# ---- full float32 cosines whatever the process's TF32 / matmul precision setting (issue 14) ----------------------

@pytest.fixture
def reduced_float32_matmul_precision():
    """Sets TF32 for cuBLAS and bfloat16 for oneDNN float32 matmuls process-wide (what a training script that
    calls torch.set_float32_matmul_precision("medium") does), restoring the previous settings after."""
    matmul_backends = (torch.backends.cuda.matmul, torch.backends.mkldnn.matmul)
    saved = [backend.fp32_precision for backend in matmul_backends]
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    torch.backends.mkldnn.matmul.fp32_precision = "bf16"
    yield
    for backend, precision in zip(matmul_backends, saved):
        backend.fp32_precision = precision


def _reduced_precision_changes_the_matmul(e, f):
    # Whether the setting has an effect on this GEMM here at all: TF32 needs an Ampere-or-newer GPU, bfloat16
    # matmuls on the CPU need AVX512-BF16/AMX (and oneDNN takes only large enough GEMMs); elsewhere float32
    # matmuls stay in full precision and the test has nothing to show.
    full = e @ f.T
    matmul_backend = torch.backends.cuda.matmul if e.is_cuda else torch.backends.mkldnn.matmul
    saved = matmul_backend.fp32_precision
    matmul_backend.fp32_precision = "tf32" if e.is_cuda else "bf16"
    try:
        return not torch.equal(e @ f.T, full)
    finally:
        matmul_backend.fp32_precision = saved


def _sentence_sized_inputs(device, dtype, num_rows, num_cols, dim=384):
    # D = 384 (a MiniLM sentence encoder): small GEMMs never take the reduced-precision paths.
    gen = torch.Generator().manual_seed(11)
    a, b = ((2 * torch.randn(n, generator=gen)).to(dtype) for n in (num_rows, num_cols))
    shared = torch.randn(1, dim, generator=gen)
    e, f = (shared + torch.randn(n, dim, generator=gen) for n in (num_rows, num_cols))
    return a, b, e, f, on_device(device, a, b, e, f)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cosines_are_full_float32_whatever_the_matmul_precision(device, dtype, request):
    a, b, e, f, inputs = _sentence_sized_inputs(device, dtype, 300, 257)
    if not _reduced_precision_changes_the_matmul(inputs[2], inputs[3]):
        pytest.skip(f"float32 matmuls on this {device} ignore the reduced-precision setting (no TF32/bf16 units)")
    kwargs = dict(beta=0.5, margin=0.0, tau=0.2, alpha=0.8, weighting="embedding", weight_normalization="row",
                  loss_scale=1.0 / (300 * 257))
    expected = contrast_loss_and_grads(*inputs, **kwargs)
    request.getfixturevalue("reduced_float32_matmul_precision")
    cuda_precision = torch.backends.cuda.matmul.fp32_precision
    mkldnn_precision = torch.backends.mkldnn.matmul.fp32_precision
    result = contrast_loss_and_grads(*inputs, **kwargs)
    # The CPU kernel is bitwise reproducible; CUDA's float atomics may reorder the last bits between calls.
    for x, y, what in zip(result, expected, ("loss", "grad chosen", "grad rejected")):
        if device == "cpu":
            assert torch.equal(x, y), what
        else:
            assert_close_scaled(x.cpu(), y.cpu().double(), 1e-6, what)
    ref = dense_reference_terms(a, b, e, f, loss_scale=kwargs["loss_scale"], beta=0.5, tau=0.2)
    for x, y, what in zip(result, ref, ("loss", "grad chosen", "grad rejected")):
        assert_close_scaled(x.cpu(), y, TOLERANCES[dtype], what)
    # The op restores the process's setting: it changes the precision of its own matmuls only.
    assert torch.backends.cuda.matmul.fp32_precision == cuda_precision == "tf32"
    assert torch.backends.mkldnn.matmul.fp32_precision == mkldnn_precision == "bf16"


@pytest.mark.parametrize("device", [CPU])
def test_legacy_precision_setting_is_restored(device):
    # torch.set_float32_matmul_precision (the legacy API most scripts call) must read back unchanged after the
    # op, including its cross-check of the legacy and per-backend settings (which raises when they disagree).
    a, b, e, f, _ = _sentence_sized_inputs(device, torch.float32, 200, 150)
    kwargs = dict(beta=0.5, margin=0.0, tau=0.5, alpha=0.8, weighting="embedding", weight_normalization="row",
                  loss_scale=1.0)
    expected = contrast_loss_and_grads(a, b, e, f, **kwargs)
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")  # TF32 for cuBLAS, bfloat16 for oneDNN
        result = contrast_loss_and_grads(a, b, e, f, **kwargs)
        assert torch.get_float32_matmul_precision() == "medium"
        assert torch.backends.cuda.matmul.allow_tf32
        assert torch.backends.mkldnn.matmul.fp32_precision == "bf16"
    finally:
        torch.set_float32_matmul_precision(previous)
    if _reduced_precision_changes_the_matmul(e, f):
        for x, y in zip(result, expected):
            assert torch.equal(x, y)


# ---- torch integration: opcheck, gradcheck, torch.compile ----------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("weighting", WEIGHTINGS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_opcheck(weighting, dtype, device):
    num_rows, num_cols = (4, 4) if weighting == "diagonal" else (4, 3)
    a, b, e, f = on_device(device, *random_inputs(num_rows, num_cols, dtype))
    samples = [
        (a.clone().requires_grad_(), b.clone().requires_grad_(), e, f, 0.5, 0.1, 0.5, 0.7, weighting, "mean", 0,
         0.25, True),
        (a, b, e, f, 0.5, 0.1, 0.5, 0.7, weighting, "row", 0, 1.0, False),
    ]
    for args in samples:
        torch.library.opcheck(torch.ops.rpo.contrast_loss_and_grads.default, args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_gradcheck_float64(weighting, device):
    num_rows, num_cols = (4, 4) if weighting == "diagonal" else (4, 3)
    a, b, e, f = on_device(device, *random_inputs(num_rows, num_cols, torch.float64))

    def loss_fn(chosen, rejected):
        return contrast_loss(chosen, rejected, beta=0.8, weighting=weighting, chosen_embeddings=e,
                             rejected_embeddings=f, margin=0.1, weight_normalization="mean")

    # CUDA's float atomics may reorder the last bits of the forward between calls; the backward is a product
    # with saved values, so only rounding-level non-determinism is tolerated (the CPU kernel is bitwise stable).
    nondet_tol = 1e-12 if device == "cuda" else 0.0
    assert torch.autograd.gradcheck(loss_fn, (a.requires_grad_(), b.requires_grad_()), nondet_tol=nondet_tol)


@pytest.mark.parametrize("device", DEVICES)
def test_double_backward_is_refused(device):
    a = torch.randn(3, dtype=torch.float64, device=device, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, device=device, requires_grad=True)
    loss = contrast_loss(a, b, beta=0.5, weighting="uniform")
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, a, create_graph=True)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph_matches_eager(device):
    a, b, e, f = on_device(device, *random_inputs(7, 5, torch.float32))

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
    # Float atomics make the last bits order-dependent on CUDA: float32 rounding there, tighter on the CPU.
    rtol, atol = (1e-5, 1e-8) if device == "cuda" else (1e-6, 1e-9)
    torch.testing.assert_close(loss_c, loss_e, rtol=rtol, atol=0)
    torch.testing.assert_close(a_c.grad, a_e.grad, rtol=rtol, atol=atol)
    torch.testing.assert_close(b_c.grad, b_e.grad, rtol=rtol, atol=atol)
    # Documented: the non-finite check inspects values and is skipped inside compiled code, so a NaN score
    # gives a NaN loss there (eager raises, see test_validation_errors).
    bad = a.clone()
    bad[2] = float("nan")
    assert torch.isnan(compiled(bad, b, e, f))


@pytest.mark.parametrize("device", [CUDA])
def test_runs_on_the_current_stream(device):
    # The kernels must be launched on torch's current stream, not the default one: the result computed inside a
    # side stream, with inputs produced on that stream, must equal the default-stream result.
    a, b, e, f = random_inputs(700, 900, torch.float32, generator_seed=3)
    kwargs = dict(beta=0.4, margin=0.0, tau=0.5, alpha=0.8, weighting="embedding", weight_normalization="row",
                  loss_scale=1.0 / (700 * 900))
    expected = contrast_loss_and_grads(*on_device(device, a, b, e, f), **kwargs)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        inputs = on_device(device, a, b, e, f)
        inputs = [t * 1.0 for t in inputs]  # produced by a kernel on the side stream
        result = contrast_loss_and_grads(*inputs, **kwargs)
    side.synchronize()
    for x, y, what in zip(result, expected, ("loss", "grad chosen", "grad rejected")):
        assert_close_scaled(x.cpu(), y.cpu().double(), 1e-5, what)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    a, b, e, f = random_inputs(64, 48, torch.float32, generator_seed=5)
    # Strided views of the same values: every second element of doubled tensors, embeddings transposed twice.
    a_strided = torch.stack([a, torch.zeros_like(a)], dim=1).to(device)[:, 0]
    b_strided = torch.stack([b, torch.zeros_like(b)], dim=1).to(device)[:, 0]
    e_strided = e.t().contiguous().to(device).t()
    f_strided = f.t().contiguous().to(device).t()
    assert not a_strided.is_contiguous() and not e_strided.is_contiguous()
    kwargs = dict(beta=0.6, margin=0.1, tau=0.5, alpha=0.8, weighting="embedding", weight_normalization="row",
                  loss_scale=1.0 / (64 * 48))
    result = contrast_loss_and_grads(a_strided, b_strided, e_strided, f_strided, **kwargs)
    ref = dense_reference_terms(a, b, e, f, loss_scale=kwargs["loss_scale"], beta=0.6, margin=0.1, tau=0.5,
                                weighting="embedding", normalization="row")
    for actual, expected, what in zip(result, ref, ("loss", "grad chosen", "grad rejected")):
        assert_close_scaled(actual.cpu(), expected, 1e-5, what)


@pytest.mark.parametrize("device", [CUDA])
def test_mixed_devices_are_refused(device):
    a, b, e, f = random_inputs(4, 4, torch.float32)
    with pytest.raises(ValueError, match="mixed devices"):
        contrast_loss(a.to(device), b, beta=0.1, weighting="uniform")
    with pytest.raises(ValueError, match="mixed devices"):
        contrast_loss(a.to(device), b.to(device), beta=0.1, chosen_embeddings=e, rejected_embeddings=f.to(device))


# ---- threads and memory ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", [CPU])
@pytest.mark.parametrize("weighting", ["embedding", "uniform"])
def test_kernel_runs_on_more_than_one_thread(weighting, device):
    # 2048 x 2048: 4 work slots of 2^20 pairs, long enough for a second thread to join on a loaded machine.
    a, b, e, f = random_inputs(2048, 2048, torch.float32)
    kwargs = dict(beta=0.1, margin=0.0, tau=0.5, alpha=0.8, weighting=weighting, weight_normalization="row",
                  loss_scale=1.0)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = contrast_loss_and_grads(a, b, e, f, **kwargs)
        assert torch.ops.rpo._cpu_threads_used_last_call() == 1
        torch.set_num_threads(2)
        # Threads pull work slots dynamically; a thread that starts late may find none left, so try a few times.
        for _ in range(20):
            multi = contrast_loss_and_grads(a, b, e, f, **kwargs)
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


@pytest.mark.parametrize("device", [CPU])
def test_memory_at_16384_stays_far_below_one_matrix(device):
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


@pytest.mark.parametrize("device", [CUDA])
def test_cuda_memory_at_16384_stays_far_below_one_matrix(device):
    # M = N = 16384, D = 384: one float32 M × N matrix is 1 GiB; the op may use one 128 MiB cosine block plus
    # vectors. Measured as the rise of torch's peak allocated CUDA memory during forward + backward.
    n, dim = 16384, 384
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, device=device, generator=generator, requires_grad=True)
    b = torch.randn(n, device=device, generator=generator, requires_grad=True)
    e = torch.randn(n, dim, device=device, generator=generator)
    f = torch.randn(n, dim, device=device, generator=generator)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    loss = contrast_loss(a, b, beta=0.1, chosen_embeddings=e, rejected_embeddings=f)
    loss.backward()
    torch.cuda.synchronize()
    extra_mib = (torch.cuda.max_memory_allocated() - before) / 2**20
    assert extra_mib < 256, f"peak extra CUDA memory {extra_mib:.1f} MiB"
    assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all() and 0 < loss.item() < 1


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
        terms = rpo.ops.contrast_loss_and_grads(a, b, e, f, beta=0.7, margin=0.0, tau=0.3, alpha=0.8,
                                                weighting="embedding", weight_normalization="row",
                                                loss_scale=1 / 6)
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


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("tensor", ["chosen_embeddings", "rejected_embeddings"])
def test_non_finite_embedding_found_by_the_cpu_kernel(tensor, value):
    # On the CPU the embeddings' finiteness is checked by the kernel while it computes their norms (a NaN loss),
    # and only then elementwise, to name the value. 800 x 600: the bad value lies in the last of 4 row slots or
    # in the last of 3 column-norm chunks.
    a, b, e, f = random_inputs(800, 600, torch.float32)
    row = 700 if tensor == "chosen_embeddings" else 590
    (e if tensor == "chosen_embeddings" else f)[row, 3] = value
    op_loss, _, _ = torch.ops.rpo.contrast_loss_and_grads(a, b, e, f, 0.1, 0.0, 0.5, 0.8, "embedding", "row", 0,
                                                          1.0, True)
    assert torch.isnan(op_loss)
    with pytest.raises(ValueError, match=rf"contrast_loss_and_grads: {tensor} has a non-finite value "
                                         rf"\({value}\) at row {row}, column 3 \(first of 1\)"):
        contrast_loss_and_grads(a, b, e, f, beta=0.1, margin=0.0, tau=0.5, alpha=0.8, weighting="embedding",
                                weight_normalization="row", loss_scale=1.0)


PRIMITIVE_VALIDATION_CASES = {
    "diag_offset too large": (dict(diag_offset=5), r"diag_offset=5 puts the diagonal of rows 0..1 outside the N=6"),
    "diag_offset negative": (dict(diag_offset=-1), r"diag_offset=-1"),
    "diagonal N=1": (dict(rejected_scores=torch.randn(1)), r"needs at least 2 columns, got N=1"),
    "loss_scale inf": (dict(loss_scale=float("inf")), r"loss_scale must be finite"),
}


@pytest.mark.parametrize("case", list(PRIMITIVE_VALIDATION_CASES))
def test_primitive_validation_errors(case):
    overrides, message = PRIMITIVE_VALIDATION_CASES[case]
    kwargs = dict(chosen_scores=torch.randn(2), rejected_scores=torch.randn(6), beta=0.1, margin=0.0, tau=0.5,
                  alpha=0.8, weighting="diagonal", weight_normalization="row", diag_offset=4, loss_scale=1.0)
    kwargs.update(overrides)
    chosen, rejected = kwargs.pop("chosen_scores"), kwargs.pop("rejected_scores")
    with pytest.raises(ValueError, match=message):
        contrast_loss_and_grads(chosen, rejected, None, None, **kwargs)


def test_native_op_checks_its_arguments_too():
    # Direct torch.ops callers bypass the Python validation; the kernel's own checks still name the problem.
    a, b = torch.randn(3), torch.randn(3)
    op = torch.ops.rpo.contrast_loss_and_grads
    with pytest.raises(RuntimeError, match="chosen must be 1-D"):
        op(a[None], b, None, None, 0.1, 0.0, 0.5, 0.8, "uniform", "row", 0, 1.0, True)
    with pytest.raises(RuntimeError, match="weighting must be 'embedding', 'uniform', 'diagonal' or 'none', got 'cos'"):
        op(a, b, None, None, 0.1, 0.0, 0.5, 0.8, "cos", "row", 0, 1.0, True)
    with pytest.raises(RuntimeError, match="weight_normalization must be 'row' or 'mean', got 'sum'"):
        op(a, b, None, None, 0.1, 0.0, 0.5, 0.8, "uniform", "sum", 0, 1.0, True)
    with pytest.raises(RuntimeError, match="needs chosen_emb and rejected_emb"):
        op(a, b, None, None, 0.1, 0.0, 0.5, 0.8, "embedding", "row", 0, 1.0, True)
    with pytest.raises(RuntimeError, match="diag_offset"):
        op(a, b, None, None, 0.1, 0.0, 0.5, 0.8, "diagonal", "row", 1, 1.0, True)


def test_contrast_loss_is_local_only():
    # rpo.ops is the leaf of the package: the global contrast over a process group lives in rpo.distributed
    # (rpo.distributed.global_contrast_loss), and rpo.losses picks the path; the op has no process_group.
    with pytest.raises(TypeError, match="process_group"):
        contrast_loss(torch.randn(3), torch.randn(3), beta=0.2, weighting="uniform", process_group=object())
    # The checks the global path shares are public and behave as the local op's.
    with pytest.raises(ValueError, match="rpo.distributed.global_contrast_loss: tau must be > 0"):
        rpo.ops.check_contrast_inputs("rpo.distributed.global_contrast_loss", torch.randn(0), torch.randn(3), None,
                                      None, beta=0.2, margin=0.0, tau=0.0, alpha=0.8, weighting="uniform",
                                      weight_normalization="row", allow_empty=True, diagonal_layout="global")
    args = rpo.ops.check_contrast_inputs("f", torch.randn(0), torch.randn(3), None, None, beta=1, margin=0,
                                         tau=0.5, alpha=0.8, weighting="diagonal", weight_normalization="mean",
                                         allow_empty=True, diagonal_layout="global", loss_scale=2)
    assert args == dict(beta=1.0, margin=0.0, tau=0.5, alpha=0.8, weighting="diagonal",
                        weight_normalization="mean", loss_scale=2.0)
