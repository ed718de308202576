"""torch.distributed + megatron-core parallel state: tensor parallelism of size TP, data parallelism of world/TP.

Works under torchrun (reads RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT / LOCAL_RANK) and, when no launcher
set those, as a single process (world size 1). The backend is NCCL with CUDA and gloo without.
"""
from __future__ import annotations

import os
import random
import socket
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from rpo.compat import megatron_cpu

_owns_process_group = False


@dataclass(frozen=True)
class ParallelInfo:
    world_size: int
    rank: int
    tp_size: int
    tp_rank: int
    dp_size: int
    dp_rank: int
    ep_size: int = 1
    ep_rank: int = 0


_EPHEMERAL_RANGE_FILE = "/proc/sys/net/ipv4/ip_local_port_range"
_LOWEST_CHOSEN_PORT = 10000
_ports_handed_out: set[int] = set()


def _ephemeral_port_range() -> tuple[int, int]:
    try:
        with open(_EPHEMERAL_RANGE_FILE) as f:
            low, high = (int(field) for field in f.read().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now, for a local rendezvous, below the kernel's ephemeral range.

    Why below: the port is released before the rank that listens on it binds it. A port the kernel picked for
    bind(0) is an ephemeral one, and in that gap the kernel may give it to any outgoing connection (gloo opens
    many; concurrent launches then failed with EADDRINUSE). Below the range only another explicit choice can
    take it; candidates are drawn from the OS's randomness (not the seeded `random`, which every rank and
    process would replay) and this process never hands the same port out twice.
    """
    low, _ = _ephemeral_port_range()
    draw = random.SystemRandom()
    if low - _LOWEST_CHOSEN_PORT >= 1000:
        for _ in range(200):
            port = draw.randrange(_LOWEST_CHOSEN_PORT, low)
            if port not in _ports_handed_out and _bindable(port):
                _ports_handed_out.add(port)
                return port
    while True:  # an unusual ephemeral range (or all tries taken): the kernel's choice
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _ports_handed_out:
            _ports_handed_out.add(port)
            return port


def init_distributed(backend: str | None = None, timeout_minutes: int = 30) -> None:
    """Initialise the default process group if nobody has (torchrun env, or a single local process)."""
    global _owns_process_group
    if dist.is_initialized():
        return
    cuda = torch.cuda.is_available()
    backend = backend or ("nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    timeout = timedelta(minutes=timeout_minutes)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend=backend, timeout=timeout)
    else:
        dist.init_process_group(backend=backend, init_method=f"tcp://127.0.0.1:{free_port()}",
                                rank=0, world_size=1, timeout=timeout)
    _owns_process_group = True


def set_seed(seed: int) -> None:
    """Seed Python, NumPy, torch and megatron's RNG tracker (its TP-rank-dependent model-parallel stream).

    Megatron's convention: the default generator gets `seed` on every rank; the tracker's "model-parallel-rng"
    gets `seed + 2718 + tp_rank` (dropout inside TP regions, TP layer init). On CPU the tracker follows the CPU
    generator (see rpo.compat.megatron_cpu).
    """
    from megatron.core import tensor_parallel

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def init_parallel(tp_size: int = 1, seed: int = 1234, backend: str | None = None,
                  expert_parallel: int = 1) -> ParallelInfo:
    """Initialise torch.distributed (if needed) and megatron's parallel state with TP = tp_size, DP = world/TP,
    and (mixture-of-experts models) experts sharded over `expert_parallel` of the DP ranks (megatron's expert
    model parallelism, EP; experts keep the TP sharding of the dense layers).

    Calling it again with the same sizes is a no-op apart from re-seeding; other sizes re-initialise megatron's
    groups (the process group is kept).
    """
    from megatron.core import parallel_state

    # The one place megatron-core's CUDA assumptions are redirected (a no-op with CUDA): every rpo use of
    # megatron-core starts here.
    megatron_cpu.apply()
    if not torch.cuda.is_available():
        # Denormals make CPU matmuls orders of magnitude slower on near-zero gradients (house rule).
        torch.set_flush_denormal(True)
    if not isinstance(tp_size, int) or tp_size < 1:
        raise ValueError(f"tp_size must be a positive integer, got {tp_size!r}")
    init_distributed(backend)
    world = dist.get_world_size()
    if world % tp_size:
        raise ValueError(f"tp_size={tp_size} does not divide the world size {world}")
    if not isinstance(expert_parallel, int) or expert_parallel < 1:
        raise ValueError(f"expert_parallel must be a positive integer, got {expert_parallel!r}")
    if (world // tp_size) % expert_parallel:
        raise ValueError(f"expert parallelism {expert_parallel} must divide the data-parallel size "
                         f"{world // tp_size} (world {world} / tensor-parallel {tp_size})")
    if parallel_state.model_parallel_is_initialized():
        if (parallel_state.get_tensor_model_parallel_world_size(),
                parallel_state.get_expert_model_parallel_world_size()) != (tp_size, expert_parallel):
            parallel_state.destroy_model_parallel()
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp_size,
                                                 expert_model_parallel_size=expert_parallel)
    set_seed(seed)
    return parallel_info()


def parallel_info() -> ParallelInfo:
    from megatron.core import parallel_state

    return ParallelInfo(
        world_size=dist.get_world_size(),
        rank=dist.get_rank(),
        tp_size=parallel_state.get_tensor_model_parallel_world_size(),
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        dp_size=parallel_state.get_data_parallel_world_size(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        ep_size=parallel_state.get_expert_model_parallel_world_size(),
        ep_rank=parallel_state.get_expert_model_parallel_rank(),
    )


def teardown() -> None:
    """Destroy megatron's groups and, if this module created it, the default process group."""
    global _owns_process_group
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if _owns_process_group and dist.is_initialized():
        dist.destroy_process_group()
    _owns_process_group = False
