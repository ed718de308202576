"""megatron-core on a machine without CUDA: every CUDA assumption it makes, redirected in this one module.

megatron-core targets GPUs; a handful of its calls assume CUDA even when the model lives on the CPU (measured in
../shared/MEGATRON-CPU-NOTES.md). `apply()` redirects exactly those calls, and only when CUDA is absent, so the
same code runs unchanged on GPU clusters. It is applied from one place, `rpo.models.init_parallel` (every
megatron-core use in rpo starts there), and is idempotent.

Three kinds of redirect:
- a "torch on CPU" stand-in installed as the global name `torch` inside the listed megatron-core modules only:
  tensor factories given `device="cuda"` (or `torch.cuda.current_device()`) allocate on the CPU, and the few
  `torch.cuda` calls those modules make (current_device, synchronize, streams, RNG get/set/seed, empty_cache)
  act on the CPU. Everything else is the real torch.
- the CUDA RNG state helpers of `tensor_parallel.random` replaced by CPU-generator versions.
- while megatron-core's optimizers classify parameters by `tensor.type()` names ("torch.cuda.FloatTensor", ...),
  the parameters being classified (and only they) report those names; `torch.Tensor.type` itself is untouched.

The module names and call sites are those of the versions in CHECKED_VERSIONS; on any other version `apply()`
warns, since a moved call would surface as "Found no NVIDIA driver" deep inside megatron-core.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.metadata
import logging
import types
import warnings
from typing import Iterable

import torch

logger = logging.getLogger(__name__)

# megatron-core versions whose CUDA assumptions were listed and checked: 0.16.1 by the test suite here
# (tests/models/test_megatron_cpu.py and the multi-rank model tests), 0.19.2 by the measurements in
# MEGATRON-CPU-NOTES.md (the same paths, plus grad sync's unconditional torch.cuda.current_stream()).
CHECKED_VERSIONS = ("0.16.1", "0.19.2")

# Tensor factories whose `device=` argument is redirected.
_FACTORIES = frozenset(
    "tensor as_tensor zeros ones empty full arange rand randn randint eye linspace "
    "zeros_like ones_like empty_like full_like".split()
)

# megatron-core module -> the calls in it that assume CUDA (these get the CPU stand-in for `torch`).
TORCH_REDIRECTED_MODULES = {
    # CudaRNGStatesTracker.add (torch.cuda.get_rng_state / manual_seed) and model_parallel_cuda_manual_seed
    # (torch.cuda.manual_seed): the tracker and the default seed act on the CPU generator instead.
    "megatron.core.tensor_parallel.random": "CudaRNGStatesTracker.add, model_parallel_cuda_manual_seed",
    # ColumnParallelLinear / RowParallelLinear / VocabParallelEmbedding allocate with
    # device=torch.cuda.current_device() (GPU init, sequence-parallel gather buffers).
    "megatron.core.tensor_parallel.layers": "parallel layers' torch.cuda.current_device() allocations",
    # _gather_along_*_dim / _reduce_scatter_along_first_dim allocate their output on the CUDA device.
    "megatron.core.tensor_parallel.mappings": "gather/scatter output buffers on torch.cuda.current_device()",
    "megatron.core.tensor_parallel.utils": "split/gather helpers allocating on torch.cuda.current_device()",
    "megatron.core.tensor_parallel.data": "broadcast_data sizes/flat buffers on device='cuda'",
    # RotaryEmbedding.get_emb moves inv_freq to torch.cuda.current_device() on the first forward.
    "megatron.core.models.common.embeddings.rotary_pos_embedding": "RotaryEmbedding.get_emb inv_freq move",
    # get_default_causal_mask / get_sliding_window_causal_mask build the mask on device="cuda".
    "megatron.core.transformer.utils": "get_default_causal_mask, get_sliding_window_causal_mask",
    # GlobalMemoryBuffer.get_tensor (attention's QK^T buffer) and local_multi_tensor_l2_norm (grad norm).
    "megatron.core.utils": "GlobalMemoryBuffer.get_tensor, local_multi_tensor_l2_norm",
    # MegatronOptimizer / Float16Optimizer flags (found_inf, _scale_one, dummy overflow buffers).
    "megatron.core.optimizer.optimizer": "optimizer flag tensors on device='cuda'",
    # get_grad_norm_fp32 / clip_grad_by_total_norm_fp32 / count_zeros_fp32 scratch tensors.
    "megatron.core.optimizer.clip_grads": "grad-norm and clipping scratch tensors on device='cuda'",
    "megatron.core.optimizer.grad_scaler": "loss-scale tensors on device='cuda'",
    "megatron.core.optimizer.distrib_optimizer": "sharded main-param buffers on torch.cuda.current_device()",
    # _ParamAndGradBuffer allocations, and (0.19.x) grad sync's unconditional torch.cuda.current_stream().
    "megatron.core.distributed.param_and_grad_buffer": "grad/param buffers, communication streams",
    "megatron.core.distributed.distributed_data_parallel": "torch.cuda.Stream, synchronize, empty_cache",
    # forward_backward_no_pipelining allocates its token counter on device="cuda".
    "megatron.core.pipeline_parallel.schedules": "total_num_tokens counter on device='cuda'",
    # Mixture of experts (megatron-core's MoELayer with the all-to-all dispatcher): the dispatcher creates a
    # torch.cuda.Stream for its device-to-host copies and compares torch.cuda.current_stream() with it; the
    # router moves its CPU-initialised weight to torch.cuda.current_device() on the first forward.
    "megatron.core.transformer.moe.token_dispatcher": "MoEAlltoAllTokenDispatcher's torch.cuda.Stream and "
                                                      "current_stream",
    "megatron.core.transformer.moe.router": "Router.gating's move of the weight to torch.cuda.current_device()",
    "megatron.core.transformer.moe.moe_utils": "aux-loss tracker buffers on device='cuda'",
    # dist_checkpointing save/load: torch.cuda.synchronize() and small flag tensors on CUDA.
    "megatron.core.dist_checkpointing.strategies.filesystem_async": "torch.cuda.synchronize in the writer",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver": "verify/failure flags on CUDA",
    "megatron.core.dist_checkpointing.strategies.async_utils": "is_alive/call_idx flags, synchronize",
    "megatron.core.dist_checkpointing.strategies.fully_parallel": "torch.cuda.synchronize around exchange",
    "megatron.core.dist_checkpointing.exchange_utils": "exchange buffers with device='cuda'",
    "megatron.core.dist_checkpointing.tensor_aware_state_dict": "torch.cuda.synchronize",
}

_applied = False
_patched_modules: list[str] = []


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare int is a CUDA device index in torch's factories.
    return isinstance(device, int) and not isinstance(device, bool)


def _on_cpu(factory):
    @functools.wraps(factory)
    def wrapper(*args, **kwargs):
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        return factory(*args, **kwargs)

    return wrapper


class CpuEvent:
    """Stands in for torch.cuda.Event: CPU work is done when it is issued, so an event is always complete (the MoE
    all-to-all dispatcher synchronizes on the event its device-to-host stream recorded)."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def wait(self, *args, **kwargs):
        pass

    def query(self):
        return True


class CpuStream:
    """Stands in for torch.cuda.Stream: CPU work is already ordered, so every stream operation is a no-op."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, *args, **kwargs):
        return CpuEvent()

    def synchronize(self):
        pass

    def query(self):
        return True


class _CudaOnCpu:
    """The `torch.cuda` seen by redirected modules: the calls megatron-core makes, acting on the CPU."""

    @staticmethod
    def current_device():
        return "cpu"

    @staticmethod
    def synchronize(*args, **kwargs):
        pass

    @staticmethod
    def empty_cache():
        pass

    @staticmethod
    def current_stream(*args, **kwargs):
        return CpuStream()

    default_stream = current_stream
    Stream = CpuStream
    Event = CpuEvent

    @staticmethod
    def stream(*args, **kwargs):
        return contextlib.nullcontext()

    @staticmethod
    def get_rng_state(*args, **kwargs):
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(new_state, *args, **kwargs):
        torch.set_rng_state(new_state)

    @staticmethod
    def manual_seed(seed):
        torch.manual_seed(seed)

    def __getattr__(self, name):
        return getattr(torch.cuda, name)


class TorchOnCpu:
    """The `torch` seen by redirected modules: real torch, but CUDA allocations land on the CPU."""

    cuda = _CudaOnCpu()

    def __getattr__(self, name):
        attr = getattr(torch, name)
        if name in _FACTORIES:
            attr = _on_cpu(attr)
        # Cache on the instance so hot paths (attention buffers) do not re-wrap per call.
        setattr(self, name, attr)
        return attr


TORCH_ON_CPU = TorchOnCpu()


def _cpu_get_rng_state(*args, clone: bool = False, **kwargs):
    # Replaces tensor_parallel.random._get_cuda_rng_state (CudaRNGStatesTracker.fork, checkpointing).
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state, *args, **kwargs):
    # Replaces tensor_parallel.random._set_cuda_rng_state (CudaRNGStatesTracker.add/fork).
    torch.set_rng_state(new_state)


def _cuda_named_type(self, dtype=None, non_blocking=False, **kwargs):
    # Tensor.type() with no argument names the type; with one it converts, which stays the real thing.
    if dtype is None and not kwargs:
        return torch.Tensor.type(self).replace("torch.", "torch.cuda.", 1)
    return torch.Tensor.type(self, dtype, non_blocking, **kwargs)


@contextlib.contextmanager
def cuda_type_names(tensors: Iterable[torch.Tensor]):
    """While active, these CPU tensors (only they) answer `tensor.type()` with their "torch.cuda.*" name.

    An instance attribute shadows the Tensor.type method for the given tensors; every other tensor, and
    torch.Tensor.type itself, stay as they are.
    """
    tagged = []
    for tensor in tensors:
        if tensor is not None and tensor.device.type == "cpu" and "type" not in tensor.__dict__:
            tensor.type = types.MethodType(_cuda_named_type, tensor)
            tagged.append(tensor)
    try:
        yield
    finally:
        for tensor in tagged:
            del tensor.type


def _optimizer_params(optimizer) -> list[torch.Tensor]:
    return [p for group in getattr(optimizer, "param_groups", ()) for p in group["params"]]


def _classifying_params_as_cuda(init):
    # Float16OptimizerWithFloat16Params.__init__ and DistributedOptimizer.__init__(self, optimizer, ...) sort
    # the torch optimizer's parameters by param.type() in {"torch.cuda.FloatTensor", "torch.cuda.HalfTensor",
    # "torch.cuda.BFloat16Tensor"} and reject anything else.
    if getattr(init, "_rpo_megatron_cpu", False):
        return init

    @functools.wraps(init)
    def wrapper(self, *args, **kwargs):
        optimizer = kwargs["optimizer"] if "optimizer" in kwargs else (args[0] if args else None)
        with cuda_type_names(_optimizer_params(optimizer)):
            return init(self, *args, **kwargs)

    wrapper._rpo_megatron_cpu = True
    return wrapper


def _grads_named_as_cuda(clip):
    # clip_grad_by_total_norm_fp32(parameters, ...) asserts param.grad.type() == "torch.cuda.FloatTensor"
    # (only reached when clipping triggers).
    if getattr(clip, "_rpo_megatron_cpu", False):
        return clip

    @functools.wraps(clip)
    def wrapper(parameters, *args, **kwargs):
        params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
        with cuda_type_names([p.grad for p in params]):
            return clip(params, *args, **kwargs)

    wrapper._rpo_megatron_cpu = True
    return wrapper


def _host_copy_of_cpu_tensors(move):
    # MoEAlltoAllTokenDispatcher turns its all-to-all split sizes into numpy arrays with
    # moe_utils.maybe_move_tensor_to_cpu(..., as_numpy=True), which converts CUDA tensors only: on the CPU the
    # sizes stay tensors and torch.distributed.all_to_all_single rejects them ("incompatible function arguments").
    if getattr(move, "_rpo_megatron_cpu", False):
        return move

    @functools.wraps(move)
    def wrapper(tensor, as_numpy=False, record_stream=False):
        if as_numpy and torch.is_tensor(tensor) and tensor.device.type == "cpu":
            return tensor.numpy()
        return move(tensor, as_numpy=as_numpy, record_stream=record_stream)

    wrapper._rpo_megatron_cpu = True
    return wrapper


def _patch_moe_host_copies():
    moe_utils = _import("megatron.core.transformer.moe.moe_utils")
    original = getattr(moe_utils, "maybe_move_tensor_to_cpu", None) if moe_utils is not None else None
    if original is None:
        return
    wrapped = _host_copy_of_cpu_tensors(original)
    for name in ("megatron.core.transformer.moe.moe_utils", "megatron.core.transformer.moe.token_dispatcher"):
        module = _import(name)
        if module is not None and getattr(module, "maybe_move_tensor_to_cpu", None) is original:
            module.maybe_move_tensor_to_cpu = wrapped


def _import(name):
    try:
        return importlib.import_module(name)
    except ImportError:  # the module moved or is absent in this megatron-core version
        logger.debug("megatron_cpu: %s not importable, not redirected", name)
        return None


def _patch_type_checks():
    optimizer = _import("megatron.core.optimizer.optimizer")
    distrib = _import("megatron.core.optimizer.distrib_optimizer")
    for module, cls_name in ((optimizer, "Float16OptimizerWithFloat16Params"), (distrib, "DistributedOptimizer")):
        cls = getattr(module, cls_name, None) if module is not None else None
        if cls is not None:
            cls.__init__ = _classifying_params_as_cuda(cls.__init__)
    # clip_grad_by_total_norm_fp32 is imported by name into other optimizer modules: replace every binding.
    clip_grads = _import("megatron.core.optimizer.clip_grads")
    original = getattr(clip_grads, "clip_grad_by_total_norm_fp32", None) if clip_grads is not None else None
    if original is not None:
        wrapped = _grads_named_as_cuda(original)
        for name in ("megatron.core.optimizer.clip_grads", "megatron.core.optimizer.optimizer",
                     "megatron.core.optimizer.distrib_optimizer", "megatron.core.optimizer"):
            module = _import(name)
            if module is not None and getattr(module, "clip_grad_by_total_norm_fp32", None) is original:
                module.clip_grad_by_total_norm_fp32 = wrapped


def _scale_in_place(chunk_size, noop_flag, tensor_lists, scale):
    """megatron's local_multi_tensor_scale (dst.copy_(src * scale)) without a temporary per tensor when src is dst
    (gradient clipping scales the gradients in place): the same values, one pass instead of an allocation and two."""
    for src, dst in zip(tensor_lists[0], tensor_lists[1]):
        if src is dst:
            dst.mul_(scale)
        else:
            dst.copy_(src * scale)


def _patch_local_scale():
    # Without apex / Transformer Engine (always on a CPU) clip_grads falls back to local_multi_tensor_scale.
    clip_grads = _import("megatron.core.optimizer.clip_grads")
    utils = _import("megatron.core.utils")
    local = getattr(utils, "local_multi_tensor_scale", None) if utils is not None else None
    if clip_grads is not None and local is not None and getattr(clip_grads, "multi_tensor_scale_impl", None) is local:
        clip_grads.multi_tensor_scale_impl = _scale_in_place


def megatron_core_version() -> str:
    return importlib.metadata.version("megatron-core")


def check_version(version: str | None = None) -> bool:
    """True for a version in CHECKED_VERSIONS; otherwise warns (RuntimeWarning) and returns False."""
    version = version or megatron_core_version()
    if version in CHECKED_VERSIONS:
        return True
    warnings.warn(f"megatron-core {version} has not been checked for CPU use (checked: "
                  f"{', '.join(CHECKED_VERSIONS)}); rpo.compat.megatron_cpu may miss a CUDA assumption of this "
                  f"version (it would fail with 'Found no NVIDIA driver' or a cuda device error)",
                  RuntimeWarning, stacklevel=3)
    return False


def apply(force: bool = False) -> bool:
    """Install the redirects when CUDA is absent (or `force`). Returns whether they are active."""
    global _applied
    if _applied:
        return True
    if torch.cuda.is_available() and not force:
        return False
    check_version()
    for name in TORCH_REDIRECTED_MODULES:
        module = _import(name)
        if module is not None and getattr(module, "torch", None) is torch:
            module.torch = TORCH_ON_CPU
            _patched_modules.append(name)
    random = _import("megatron.core.tensor_parallel.random")
    random._get_cuda_rng_state = _cpu_get_rng_state
    random._set_cuda_rng_state = _cpu_set_rng_state
    _patch_type_checks()
    _patch_moe_host_copies()
    _patch_local_scale()
    _applied = True
    logger.debug("megatron_cpu: redirected %d megatron-core modules to the CPU", len(_patched_modules))
    return True


def is_applied() -> bool:
    return _applied


def patched_modules() -> list[str]:
    """Names of the megatron-core modules whose `torch` is the CPU stand-in."""
    return list(_patched_modules)
