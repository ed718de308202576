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


def print_memory_plan(config: TrainConfig) -> None:
    """--plan: check the options, print the plan's table on rank 0."""
    import os

    check_scale_options(config)
    text = memory_plan(config).format_plan()
    if os.environ.get("RANK", "0") == "0":
        print(text, flush=True)
