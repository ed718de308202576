"""The scale options (config group "scale"): their cross-option checks and what the trainer derives from them.

--recompute goes to the policy's megatron TransformerConfig (rpo.models.gpt.recompute_settings); --packing to the
log-prob calls of policy and reference (rpo.models.packing); --distributed-optimizer to megatron's DDP config and
optimiser (rpo.train.optim); --sequence-parallel to the TransformerConfig of policy and reference
(rpo.models.gpt.build_gpt_model: norms that take it, the sequence padded to a multiple of TP and gathered before
the log-probs; the trainer's finalize_model_grads sums the norm gradients over TP); --plan / --gpu-memory-gb to
rpo.models.memory_plan.
"""
from __future__ import annotations

from typing import Optional

from rpo.train.config import ConfigError, TrainConfig, build_training_loss

# megatron-core's DistributedOptimizer asserts torch's Adam/AdamW (or TE/apex FusedAdam): its checkpointing of the
# sharded state knows only Adam's state (exp_avg, exp_avg_sq).
DISTRIBUTED_OPTIMIZERS = ("adamw",)


def check_scale_options(config: TrainConfig) -> None:
    """Combinations of the scale options with the others; ConfigError naming the option."""
    if config.pack_length is not None and not config.packing:
        raise ConfigError(f"--pack-length {config.pack_length} applies with --packing only")
    if config.packing and config.pack_length is not None and config.pack_length < config.max_length:
        raise ConfigError(f"--pack-length ({config.pack_length}) must be at least --max-length "
                          f"({config.max_length}): a sequence is never split over packed rows")
    if config.distributed_optimizer and config.optimizer not in DISTRIBUTED_OPTIMIZERS:
        raise ConfigError(f"--distributed-optimizer: megatron-core's DistributedOptimizer supports only Adam-type "
                          f"optimisers; use --optimizer adamw (got --optimizer {config.optimizer})")
    if config.sequence_parallel and config.tensor_parallel < 2:
        raise ConfigError(f"--sequence-parallel splits the sequence over the tensor-parallel group: it needs "
                          f"--tensor-parallel > 1 (got {config.tensor_parallel})")
    if config.expert_parallel > 1:
        # Checkpoints and the sharded optimizer keep one copy per tensor-parallel rank; with expert parallelism the
        # data-parallel ranks hold different experts (not yet written or sharded per expert-parallel rank).
        if (config.save_every or config.resume) and not config.plan:
            raise ConfigError(f"--expert-parallel {config.expert_parallel}: resumable checkpoints (--save-every, "
                              f"--resume) do not keep each expert-parallel rank's experts yet; pass --save-every 0 "
                              f"(final/ is written whole)")
        if config.distributed_optimizer:
            raise ConfigError(f"--expert-parallel {config.expert_parallel} with --distributed-optimizer is not "
                              f"supported yet (megatron-core builds a second optimizer for the expert parameters)")
        # Every forward of an expert-parallel model is collective (its all-to-all token exchange): phases in which
        # the data-parallel ranks run different numbers of forwards would hang.
        if config.precompute_reference:
            raise ConfigError(f"--expert-parallel {config.expert_parallel} with --precompute-reference is not "
                              f"supported (the data-parallel ranks score different numbers of rows, and every "
                              f"expert-parallel forward needs all of them)")
        if build_training_loss(config).uses_kl_pairs:
            raise ConfigError(f"--expert-parallel {config.expert_parallel} with --loss {config.loss} is not supported "
                              f"(its KL reference pairs are scored in as many forwards as each rank has pairs, and "
                              f"every expert-parallel forward needs all data-parallel ranks)")
    for name in ("plan_gpus", "gpu_memory_gb"):
        if getattr(config, name) is not None and not config.plan:
            raise ConfigError(f"--{name.replace('_', '-')} applies with --plan only")


def pack_length(config: TrainConfig) -> Optional[int]:
    """The longest packed row with --packing (default --max-length), else None (no packing)."""
    if not config.packing:
        return None
    return config.pack_length or config.max_length


def memory_plan(config: TrainConfig):
    """--plan: the estimated per-GPU memory of this run (rpo.models.memory_plan, planned for CUDA GPUs) for
    --plan-gpus GPUs (default: this launch's processes); nothing is trained, only the model's config is read."""
    from rpo.models.memory_plan import plan_from_train_config
    from rpo.models.policy_and_reference import load_hf_config
    from rpo.train import preflight

    model_path = (preflight.resolve_model_path(config.model, "--model") if config.model
                  else preflight.default_model_path())
    gpus = config.plan_gpus or preflight.launch_world_size()
    try:
        return plan_from_train_config(config, load_hf_config(model_path, config.trust_remote_code), world_size=gpus,
                                      needs_reference=build_training_loss(config).needs_reference,
                                      gpu_memory_gb=config.gpu_memory_gb)
    except ValueError as error:  # e.g. a tensor-parallel size that does not divide the heads or the GPUs
        raise ConfigError(f"--plan: {error}") from None


def kept_graphs_line(config: TrainConfig, plan) -> Optional[str]:
    """--plan's line on the global contrast's kept graphs (None unless a global loss spans several micro-batches
    per rank)."""
    micro_batches = config.batch_layout(plan.settings.data_parallel)
    if micro_batches < 2 or not build_training_loss(config).is_global:
        return None
    bound = "" if config.keep_graphs is None else f", --keep-graphs {config.keep_graphs}"
    head = f"  global contrast over {micro_batches} micro-batches per GPU{bound}: "
    if plan.shape.is_moe and (config.moe_aux_loss_coeff is None or config.moe_aux_loss_coeff > 0):
        return head + "a mixture-of-experts model keeps no graph (each micro-batch re-run: the load-balancing " \
                      "loss's gradient follows the latest forward)"
    if config.gpu_memory_gb is None:
        return head + ("graphs kept: as many as fit in the GPU's memory (pass --gpu-memory-gb to see how many); "
                       f"each holds {plan.activations / 2**30:.2f} GiB of activations")
    kept = kept_graph_count(plan, micro_batches, config.gpu_memory_gb * 2**30, config.keep_graphs)
    peak = plan.persistent + plan.overhead + max(max(kept, 1) * plan.activations + plan.logprob_chunk + plan.working,
                                                 plan.optimizer_step)
    return head + (f"graphs of {kept} kept (one forward each), {micro_batches - kept} re-run (a second forward "
                   f"each); peak with them {peak / 2**30:.2f} GiB")


def print_memory_plan(config: TrainConfig) -> None:
    """--plan: check the options, print the plan's table on rank 0."""
    import os

    check_scale_options(config)
    plan = memory_plan(config)
    try:
        extra = kept_graphs_line(config, plan)
    except ConfigError as error:  # the batch layout does not divide: the trainer would refuse it too
        extra = f"  {error}"
    text = plan.format_plan() + (f"\n{extra}" if extra else "")
    if os.environ.get("RANK", "0") == "0":
        print(text, flush=True)


# The plan models neither fragmentation nor allocator caching: graphs are kept within this share of the memory.
KEPT_GRAPHS_MEMORY_FRACTION = 0.9


def kept_graph_count(plan, micro_batches: int, memory_bytes: Optional[float], bound: Optional[int] = None) -> int:
    """How many of a rank's `micro_batches` keep their autograd graph from the scoring forward to the backward in
    the global contrast's step (rpo.distributed.TwoPassContrast's `keep_graphs`); the rest are re-run.

    The most micro-batches k whose activations (`plan.activations` each, a rpo.models.memory_plan.MemoryPlan of one
    micro-batch) fit, with the rest of the plan's peak, in KEPT_GRAPHS_MEMORY_FRACTION of `memory_bytes`:
    persistent + overhead + max(k·activations + log-prob chunk + working, optimizer step). At least 1 (one graph
    is what any accumulated step holds), at most `bound` (--keep-graphs) when given; `memory_bytes` None: no
    memory limit.
    """
    if micro_batches < 1:
        raise ValueError(f"micro_batches must be ≥ 1, got {micro_batches}")
    fit = micro_batches
    if memory_bytes is not None:
        budget = KEPT_GRAPHS_MEMORY_FRACTION * memory_bytes
        fixed = plan.persistent + plan.overhead
        fit = 1
        while fit < micro_batches and fixed + max((fit + 1) * plan.activations + plan.logprob_chunk + plan.working,
                                                  plan.optimizer_step) <= budget:
            fit += 1
    return fit if bound is None else min(fit, bound)


def device_memory_bytes(device) -> float:
    """Memory one rank may plan with: the GPU's, or on a CPU the host's physical memory shared by the processes
    of this node (LOCAL_WORLD_SIZE)."""
    import os

    import torch

    if device.type == "cuda":
        return float(torch.cuda.get_device_properties(device).total_memory)
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / local


def kept_graphs(config: TrainConfig, hf_config, *, world_size: int, micro_batches: int, needs_reference: bool,
                device) -> int:
    """The trainer's `keep_graphs` for a global contrast over `micro_batches` per rank: kept_graph_count of this
    run's plan on this device (the smallest over the launch: tensor-parallel ranks must run the same passes)."""
    import torch
    import torch.distributed as dist

    from rpo.models.memory_plan import plan_from_train_config

    try:
        plan = plan_from_train_config(config, hf_config, world_size=world_size, needs_reference=needs_reference,
                                      device=device.type)
    except ValueError:  # a model the plan does not know: one graph, what any accumulated step holds
        count = min(1, micro_batches if config.keep_graphs is None else config.keep_graphs)
    else:
        count = kept_graph_count(plan, micro_batches, device_memory_bytes(device), config.keep_graphs)
    if dist.is_initialized() and dist.get_world_size() > 1:
        value = torch.tensor([count], dtype=torch.int64, device=device)
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
        count = int(value.item())
    return count
