"""rpo.compat.megatron_cpu: each redirect in this process (megatron-core imported here, CUDA absent), the version
check, and that after apply() the CPU paths megatron-core takes work (causal masks, attention buffer, grad norm,
RNG tracker, optimizers' parameter classification, clipping). DDP, the optimizers' steps and dist_checkpointing
on 2 ranks are checked by test_megatron_models.py."""
from __future__ import annotations

import warnings

import pytest
import torch

@pytest.fixture(scope="module")
def compat():
    from rpo.compat import megatron_cpu

    if torch.cuda.is_available():
        pytest.skip("megatron_cpu only redirects when CUDA is absent")
    assert megatron_cpu.apply()
    return megatron_cpu


def test_megatron_cpu_is_idempotent_and_only_without_cuda(compat, monkeypatch):
    from megatron.core.optimizer import distrib_optimizer

    before = compat.patched_modules()
    init = distrib_optimizer.DistributedOptimizer.__init__
    assert compat.apply() and compat.patched_modules() == before
    assert distrib_optimizer.DistributedOptimizer.__init__ is init
    assert "megatron.core.tensor_parallel.random" in before and "megatron.core.utils" in before
    monkeypatch.setattr(compat, "_applied", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert compat.apply() is False


def test_torch_stand_in_allocates_on_cpu(compat):
    stand_in = compat.TORCH_ON_CPU
    assert stand_in.zeros(3, device="cuda").device.type == "cpu"
    assert stand_in.tensor([1.0], device=torch.device("cuda", 0)).device.type == "cpu"
    assert stand_in.empty(2, device=stand_in.cuda.current_device()).device.type == "cpu"
    assert stand_in.cuda.current_device() == "cpu"
    stream = stand_in.cuda.current_stream()
    stream.wait_stream(stand_in.cuda.default_stream())
    with stand_in.cuda.stream(stand_in.cuda.Stream()):
        stand_in.cuda.synchronize()
    assert stand_in.nn is torch.nn and stand_in.float32 is torch.float32


def test_causal_masks_built_on_cpu(compat):
    # transformer.utils.get_default_causal_mask / get_sliding_window_causal_mask use device="cuda".
    from megatron.core.transformer.utils import get_default_causal_mask, get_sliding_window_causal_mask

    causal = get_default_causal_mask(5)
    assert causal.device.type == "cpu" and torch.equal(causal, torch.ones(5, 5).triu(1).bool())
    window = get_sliding_window_causal_mask(5, 5, (1, 0))  # query sees itself and one token before
    q, k = torch.arange(5)[:, None], torch.arange(5)[None, :]
    assert torch.equal(window, ~((k <= q) & (k >= q - 1)))


def test_global_memory_buffer_and_l2_norm_on_cpu(compat):
    # utils.GlobalMemoryBuffer.get_tensor (attention scores) and local_multi_tensor_l2_norm (grad norm).
    from megatron.core.utils import GlobalMemoryBuffer, local_multi_tensor_l2_norm

    buf = GlobalMemoryBuffer().get_tensor((2, 3, 4), torch.float32, "mpu")
    assert buf.device.type == "cpu" and buf.shape == (2, 3, 4)
    tensors = [torch.randn(5), torch.randn(2, 3)]
    norm, _ = local_multi_tensor_l2_norm(0, None, [tensors], False)
    expected = torch.cat([t.flatten() for t in tensors]).double().norm()
    assert norm.device.type == "cpu" and abs(norm.item() - expected.item()) < 1e-5


def test_rng_tracker_forks_the_cpu_generator(compat):
    # tensor_parallel.random: CudaRNGStatesTracker.add/fork and model_parallel_cuda_manual_seed.
    from megatron.core.tensor_parallel import random as mp_random

    tracker = mp_random.CudaRNGStatesTracker()
    torch.manual_seed(7)
    tracker.add("stream", 123)
    outside_before = torch.rand(3)
    with tracker.fork("stream"):
        inside = torch.rand(4)
    outside_after = torch.rand(3)
    torch.manual_seed(7)
    assert torch.equal(torch.rand(3), outside_before) and torch.equal(torch.rand(3), outside_after)
    assert torch.equal(inside, torch.rand(4, generator=torch.Generator().manual_seed(123)))
    with tracker.fork("stream"):  # the forked stream continues where it stopped
        assert torch.equal(torch.rand(2), torch.rand(6, generator=torch.Generator().manual_seed(123))[4:])


def test_model_parallel_seed_seeds_cpu_generator(compat):
    from megatron.core import tensor_parallel

    tensor_parallel.model_parallel_cuda_manual_seed(11, tp_rank=0, ep_rank=0, etp_rank=0)
    drawn = torch.rand(3)
    torch.manual_seed(11)
    assert torch.equal(drawn, torch.rand(3))
    with tensor_parallel.get_cuda_rng_tracker().fork():  # "model-parallel-rng": seed + 2718 + tp_rank
        mp = torch.rand(3)
    assert torch.equal(mp, torch.rand(3, generator=torch.Generator().manual_seed(11 + 2718)))


def test_cuda_type_names_and_clip_grads(compat):
    # Float16Optimizer / DistributedOptimizer classify params by type(); clip_grad_by_total_norm_fp32 asserts it.
    from megatron.core.optimizer import clip_grads, optimizer

    x, other = torch.zeros(2), torch.zeros(2)
    with compat.cuda_type_names([x, x.bfloat16()]):
        assert x.type() == "torch.cuda.FloatTensor" and x.type(torch.float64).dtype == torch.float64
        assert other.type() == "torch.FloatTensor"  # only the tensors named are affected, not torch.Tensor.type
    assert x.type() == "torch.FloatTensor" and "type" not in x.__dict__
    bf16 = torch.zeros(2, dtype=torch.bfloat16)
    with compat.cuda_type_names([bf16]):
        assert bf16.type() == "torch.cuda.BFloat16Tensor"
    assert optimizer.clip_grad_by_total_norm_fp32 is clip_grads.clip_grad_by_total_norm_fp32
    params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))]
    grads = [torch.tensor([3.0, 0.0, 4.0]), torch.tensor([0.0, 0.0])]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    clip_grads.clip_grad_by_total_norm_fp32(params, max_norm=1.0, total_norm=5.0)
    assert torch.allclose(params[0].grad, grads[0] / (5.0 + 1e-6))
    assert all(p.grad.type() == "torch.FloatTensor" for p in params)


def test_clipping_scales_the_gradients_in_place_with_megatrons_values(compat):
    # local_multi_tensor_scale allocates src * scale and copies it back; in place it is one pass, same values.
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads

    assert clip_grads.multi_tensor_scale_impl is compat._scale_in_place
    grads = [torch.randn(1000, generator=torch.Generator().manual_seed(k)) for k in range(3)]
    expected = [g.clone() for g in grads]
    utils.local_multi_tensor_scale(None, None, [expected, expected], 0.37)
    storages = [g.data_ptr() for g in grads]
    compat._scale_in_place(None, None, [grads, grads], 0.37)
    assert [g.data_ptr() for g in grads] == storages
    assert all(torch.equal(g, e) for g, e in zip(grads, expected))
    target = [torch.zeros(1000) for _ in grads]
    compat._scale_in_place(None, None, [grads, target], 2.0)
    assert all(torch.equal(t, g * 2.0) for t, g in zip(target, grads))


def test_float16_optimizer_classifies_cpu_params_then_forgets(compat):
    """Float16OptimizerWithFloat16Params on CPU parameters: bf16 ones get fp32 main copies, fp32 ones are kept
    as they are; afterwards no parameter still reports a CUDA type name."""
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params

    torch.manual_seed(0)
    half, full = torch.nn.Parameter(torch.randn(3).bfloat16()), torch.nn.Parameter(torch.randn(2))
    sgd = torch.optim.SGD([half, full], lr=0.1)
    opt = Float16OptimizerWithFloat16Params(sgd, OptimizerConfig(optimizer="sgd", lr=0.1, bf16=True), None,
                                            lambda optimizer: None)
    assert opt.float16_groups[0] == [half] and opt.fp32_from_fp32_groups[0] == [full]
    (main,) = opt.fp32_from_float16_groups[0]
    assert main.dtype == torch.float32 and torch.equal(main, half.float())
    assert half.type() == "torch.BFloat16Tensor" and full.type() == "torch.FloatTensor"
    assert "type" not in half.__dict__ and "type" not in full.__dict__


def test_every_listed_module_is_redirected_with_a_reason(compat):
    """On a checked version every listed module exists and uses torch (no stale entry), and each says why."""
    if compat.megatron_core_version() not in compat.CHECKED_VERSIONS:
        pytest.skip(f"megatron-core {compat.megatron_core_version()} is not a checked version")
    assert compat.patched_modules() == list(compat.TORCH_REDIRECTED_MODULES)
    assert all(reason.strip() for reason in compat.TORCH_REDIRECTED_MODULES.values())
    import megatron.core.utils

    assert megatron.core.utils.torch is compat.TORCH_ON_CPU and megatron.core.utils.torch.nn is torch.nn


def test_unknown_megatron_core_version_warns(compat):
    with pytest.warns(RuntimeWarning, match=r"megatron-core 0\.1\.0 has not been checked for CPU use"):
        assert compat.check_version("0.1.0") is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for version in compat.CHECKED_VERSIONS:
            assert compat.check_version(version) is True


def test_apply_checks_the_installed_version(compat, monkeypatch):
    monkeypatch.setattr(compat, "_applied", False)
    monkeypatch.setattr(compat, "_patched_modules", [])
    monkeypatch.setattr(compat, "megatron_core_version", lambda: "99.0.0")
    with pytest.warns(RuntimeWarning, match="megatron-core 99.0.0 has not been checked"):
        assert compat.apply()
    # Modules already redirected (by the fixture) are not redirected twice.
    assert compat.patched_modules() == []
