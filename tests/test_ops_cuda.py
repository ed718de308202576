"""The CUDA kernel of rpo::contrast_loss_terms against the float64 dense reference of tests/test_ops.py.

Runs only where torch sees a CUDA GPU (benchmarks/gpu_check.sh runs it on a lent H100/H200); everywhere else the
whole module is skipped. The reference (dense float64 matrices on the CPU, differentiated by autograd) and the
random inputs are tests/test_ops.py's, imported rather than repeated. Covered: every weighting × normalisation ×
dtype on the small shapes, partial CUDA tiles (columns not a multiple of 256, rows not a multiple of 16), the
embedding path's row blocks, CUDA vs the CPU kernel, opcheck, gradcheck, torch.compile, the current stream,
non-contiguous inputs, mixed-device errors and the extra memory at M = N = 16384.
"""
import pytest
import torch

import rpo.ops
from rpo.ops import contrast_loss, contrast_loss_terms
from test_ops import (NORMALIZATIONS, SHAPES, TOLERANCES, WEIGHTINGS, assert_close_scaled, dense_reference_terms,
                      random_inputs)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA GPU visible to torch: these tests run on a GPU machine "
                                       "(benchmarks/gpu_check.sh)")

DEVICE = "cuda"
# The CUDA binding computes the embedding cosines in row blocks of 2^25 float32 elements (csrc/cuda).
CUDA_BLOCK_ELEMENTS = 2**25


@pytest.fixture(scope="module", autouse=True)
def _cuda_kernel_is_built():
    # A CPU-only build would make every call here fail with a dispatch error; say what is wrong instead.
    assert rpo.ops.extension_available(), "rpo._C is not built on this machine"
    assert torch._C._dispatch_has_kernel_for_dispatch_key("rpo::contrast_loss_terms", "CUDA"), (
        "rpo._C was built without its CUDA kernel: rebuild with a CUDA torch and TORCH_CUDA_ARCH_LIST set")


def _on_device(*tensors):
    return [t.to(DEVICE) for t in tensors]


def _check_terms_against_reference(a, b, e, f, tol, **options):
    """contrast_loss_terms on CUDA vs the dense float64 reference computed on the CPU."""
    normalization = options.pop("normalization")
    loss_scale = options.pop("loss_scale")
    result = contrast_loss_terms(*_on_device(a, b, e, f), weight_normalization=normalization,
                                 loss_scale=loss_scale, **options)
    for tensor in result:
        assert tensor.device.type == "cuda" and tensor.dtype == a.dtype
    ref = dense_reference_terms(a, b, e, f, loss_scale=loss_scale, normalization=normalization, **options)
    for actual, expected, what in zip(result, ref, ("loss", "grad chosen", "grad rejected")):
        assert_close_scaled(actual.cpu(), expected, tol, what)


def legal_cases():
    for weighting in WEIGHTINGS:
        for normalization in NORMALIZATIONS:
            for shape_name, (m, n) in SHAPES.items():
                if weighting == "diagonal" and (m != n or m < 2):
                    continue
                for dtype in TOLERANCES:
                    yield pytest.param(weighting, normalization, m, n, dtype,
                                       id=f"{weighting}-{normalization}-{shape_name}-{str(dtype)[6:]}")


@pytest.mark.parametrize("weighting,normalization,num_rows,num_cols,dtype", list(legal_cases()))
def test_cuda_contrast_loss_matches_dense_reference(weighting, normalization, num_rows, num_cols, dtype):
    a, b, e, f = random_inputs(num_rows, num_cols, dtype)
    options = dict(beta=0.7, margin=0.3, tau=0.4, alpha=0.65, weighting=weighting)
    a_leaf, b_leaf = (t.to(DEVICE).requires_grad_() for t in (a, b))
    e_dev, f_dev = _on_device(e, f)
    loss = contrast_loss(a_leaf, b_leaf, chosen_embeddings=e_dev, rejected_embeddings=f_dev,
                         weight_normalization=normalization, **options)
    grad_a, grad_b = torch.autograd.grad(loss, (a_leaf, b_leaf))
    assert loss.device.type == "cuda" and loss.dtype == dtype and loss.shape == ()
    assert grad_a.device.type == "cuda" and grad_a.dtype == dtype and grad_b.dtype == dtype

    ref_loss, ref_a, ref_b = dense_reference_terms(a, b, e, f, loss_scale=1.0 / (num_rows * num_cols),
                                                   normalization=normalization, **options)
    tol = TOLERANCES[dtype]
    assert_close_scaled(loss.cpu(), ref_loss, tol, "loss")
    assert_close_scaled(grad_a.cpu(), ref_a, tol, "grad chosen")
    assert_close_scaled(grad_b.cpu(), ref_b, tol, "grad rejected")


@pytest.mark.parametrize("dtype", list(TOLERANCES))
@pytest.mark.parametrize("weighting,num_rows,num_cols", [
    ("embedding", 37, 300),      # a partial 256-column tile and a partial 16-row CTA
    ("uniform", 1000, 1537),
    ("diagonal", 1000, 1000),    # the diagonal crosses CTA boundaries
    ("none", 33, 257),
    # Two row blocks of the embedding path: 2^25 / 120000 = 279 rows per block.
    ("embedding", 300, 120000),
])
def test_cuda_partial_tiles_and_row_blocks(weighting, num_rows, num_cols, dtype):
    if weighting == "embedding" and num_rows * num_cols > CUDA_BLOCK_ELEMENTS:
        assert CUDA_BLOCK_ELEMENTS // num_cols < num_rows  # the case really spans several blocks
    a, b, e, f = random_inputs(num_rows, num_cols, dtype, generator_seed=num_rows)
    _check_terms_against_reference(a, b, e, f, TOLERANCES[dtype], beta=0.5, margin=0.1, tau=0.3, alpha=0.8,
                                   weighting=weighting, normalization="mean", loss_scale=1.0 / (num_rows * num_cols))


@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_cuda_extreme_scores_stay_finite_and_exact(weighting):
    a = torch.tensor([1e4, -1e4, 3.0, -2.0], dtype=torch.float32)
    b = torch.tensor([-1e4, 1e4, 0.5, 1e4], dtype=torch.float32)
    _, _, e, f = random_inputs(4, 4, torch.float32)
    _check_terms_against_reference(a, b, e, f, TOLERANCES[torch.float32], beta=0.5, margin=0.2, tau=0.5,
                                   alpha=0.6, weighting=weighting, normalization="row", loss_scale=1 / 16)


@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_cuda_diag_offset_and_row_slices(weighting):
    # The distributed path calls the primitive on row slices with diag_offset = the slice's first global row.
    a, b, e, f = random_inputs(3, 7, torch.float64)
    _check_terms_against_reference(a, b, e, f, TOLERANCES[torch.float64], beta=0.9, margin=-0.2, tau=0.6,
                                   alpha=0.7, weighting=weighting, normalization="row", diag_offset=2,
                                   loss_scale=0.37)


@pytest.mark.parametrize("weighting", WEIGHTINGS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_cuda_agrees_with_cpu_kernel(weighting, dtype):
    # Two implementations of the same op (the CPU kernel is checked against the reference in test_ops.py) on a
    # size where the reference would be slow; float64 must agree to rounding, lower precisions to their tolerance.
    num_rows = num_cols = 2048
    a, b, e, f = random_inputs(num_rows, num_cols, dtype, generator_seed=7)
    kwargs = dict(beta=0.3, margin=0.05, tau=0.5, alpha=0.8, weighting=weighting, weight_normalization="row",
                  loss_scale=1.0 / (num_rows * num_cols))
    on_cpu = contrast_loss_terms(a, b, e, f, **kwargs)
    on_cuda = contrast_loss_terms(*_on_device(a, b, e, f), **kwargs)
    tol = TOLERANCES[dtype]
    for x, y, what in zip(on_cuda, on_cpu, ("loss", "grad chosen", "grad rejected")):
        assert_close_scaled(x.cpu(), y.double(), tol, what)


@pytest.mark.parametrize("weighting", WEIGHTINGS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_cuda_opcheck(weighting, dtype):
    num_rows, num_cols = (4, 4) if weighting == "diagonal" else (4, 3)
    a, b, e, f = _on_device(*random_inputs(num_rows, num_cols, dtype))
    code = rpo.ops.WEIGHTINGS[weighting]
    samples = [
        (a.clone().requires_grad_(), b.clone().requires_grad_(), e, f, 0.5, 0.1, 0.5, 0.7, code, 1, 0, 0.25, True),
        (a, b, e, f, 0.5, 0.1, 0.5, 0.7, code, 0, 0, 1.0, False),
    ]
    for args in samples:
        torch.library.opcheck(torch.ops.rpo.contrast_loss_terms.default, args)


@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_cuda_gradcheck_float64(weighting):
    num_rows, num_cols = (4, 4) if weighting == "diagonal" else (4, 3)
    a, b, e, f = _on_device(*random_inputs(num_rows, num_cols, torch.float64))

    def loss_fn(chosen, rejected):
        return contrast_loss(chosen, rejected, beta=0.8, weighting=weighting, chosen_embeddings=e,
                             rejected_embeddings=f, margin=0.1, weight_normalization="mean")

    # Float atomics may reorder the last bits of the forward between calls; the backward is a product with saved
    # values, so only rounding-level non-determinism is tolerated.
    assert torch.autograd.gradcheck(loss_fn, (a.requires_grad_(), b.requires_grad_()), nondet_tol=1e-12)


def test_cuda_torch_compile_fullgraph_matches_eager():
    a, b, e, f = _on_device(*random_inputs(7, 5, torch.float32))

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
    # Float atomics make the last bits order-dependent on CUDA: compare to float32 rounding, not bitwise.
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=0)
    torch.testing.assert_close(a_c.grad, a_e.grad, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(b_c.grad, b_e.grad, rtol=1e-5, atol=1e-8)


def test_cuda_runs_on_the_current_stream():
    # The kernels must be launched on torch's current stream, not the default one: the result computed inside a
    # side stream, with inputs produced on that stream, must equal the default-stream result.
    a, b, e, f = random_inputs(700, 900, torch.float32, generator_seed=3)
    kwargs = dict(beta=0.4, margin=0.0, tau=0.5, alpha=0.8, weighting="embedding", weight_normalization="row",
                  loss_scale=1.0 / (700 * 900))
    expected = contrast_loss_terms(*_on_device(a, b, e, f), **kwargs)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        inputs = _on_device(a, b, e, f)
        inputs = [t * 1.0 for t in inputs]  # produced by a kernel on the side stream
        result = contrast_loss_terms(*inputs, **kwargs)
    side.synchronize()
    for x, y, what in zip(result, expected, ("loss", "grad chosen", "grad rejected")):
        assert_close_scaled(x.cpu(), y.cpu().double(), 1e-5, what)


def test_cuda_non_contiguous_inputs():
    a, b, e, f = random_inputs(64, 48, torch.float32, generator_seed=5)
    # Strided views of the same values: every second element of doubled tensors, embeddings transposed twice.
    a_strided = torch.stack([a, torch.zeros_like(a)], dim=1).to(DEVICE)[:, 0]
    b_strided = torch.stack([b, torch.zeros_like(b)], dim=1).to(DEVICE)[:, 0]
    e_strided = e.t().contiguous().to(DEVICE).t()
    f_strided = f.t().contiguous().to(DEVICE).t()
    assert not a_strided.is_contiguous() and not e_strided.is_contiguous()
    kwargs = dict(beta=0.6, margin=0.1, tau=0.5, alpha=0.8, weighting="embedding", weight_normalization="row",
                  loss_scale=1.0 / (64 * 48))
    result = contrast_loss_terms(a_strided, b_strided, e_strided, f_strided, **kwargs)
    ref = dense_reference_terms(a, b, e, f, loss_scale=kwargs["loss_scale"], beta=0.6, margin=0.1, tau=0.5,
                                weighting="embedding", normalization="row")
    for actual, expected, what in zip(result, ref, ("loss", "grad chosen", "grad rejected")):
        assert_close_scaled(actual.cpu(), expected, 1e-5, what)


def test_cuda_mixed_devices_are_refused():
    a, b, e, f = random_inputs(4, 4, torch.float32)
    with pytest.raises(ValueError, match="mixed devices"):
        contrast_loss(a.to(DEVICE), b, beta=0.1, weighting="uniform")
    with pytest.raises(ValueError, match="mixed devices"):
        contrast_loss(a.to(DEVICE), b.to(DEVICE), beta=0.1, chosen_embeddings=e, rejected_embeddings=f.to(DEVICE))


def test_cuda_memory_at_16384_stays_far_below_one_matrix():
    # M = N = 16384, D = 384: one float32 M × N matrix is 1 GiB; the op may use one 128 MiB cosine block plus
    # vectors. Measured as the rise of torch's peak allocated CUDA memory during forward + backward.
    n, dim = 16384, 384
    generator = torch.Generator(device=DEVICE).manual_seed(0)
    a = torch.randn(n, device=DEVICE, generator=generator, requires_grad=True)
    b = torch.randn(n, device=DEVICE, generator=generator, requires_grad=True)
    e = torch.randn(n, dim, device=DEVICE, generator=generator)
    f = torch.randn(n, dim, device=DEVICE, generator=generator)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    loss = contrast_loss(a, b, beta=0.1, chosen_embeddings=e, rejected_embeddings=f)
    loss.backward()
    torch.cuda.synchronize()
    extra_mib = (torch.cuda.max_memory_allocated() - before) / 2**20
    assert extra_mib < 256, f"peak extra CUDA memory {extra_mib:.1f} MiB"
    assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all() and 0 < loss.item() < 1
