"""Optimiser and learning-rate schedule over Megatron-core DDP's gradient buffers.

A torch optimiser (RMSprop, the paper's; AdamW; SGD) wrapped by megatron-core's `FP32Optimizer` (float32 runs) or
`Float16OptimizerWithFloat16Params` (bfloat16 runs: the wrapper keeps fp32 master weights, steps them with the fp32
`main_grad` that DDP accumulates, and copies back to the bf16 model); with --distributed-optimizer,
megatron-core's `DistributedOptimizer` (AdamW; its state and the fp32 main parameters sharded over the
data-parallel group, gradients reduce-scattered, parameters all-gathered after the step). Megatron-core computes
the global gradient norm the model-parallel way (tensor-parallel duplicates such as norm weights counted once,
summed over the model-parallel group) and clips by it. The schedule is a linear warmup then constant or cosine, as a torch
`LambdaLR` on the inner optimiser.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import warnings
from typing import Any, Dict, List

import torch

from rpo.train.config import TrainConfig

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.optimizer.optimizer import FP32Optimizer, Float16OptimizerWithFloat16Params

logger = logging.getLogger(__name__)


def _param_groups(model: torch.nn.Module, weight_decay: float) -> List[Dict[str, Any]]:
    # Norm weights and biases (1-D) take no weight decay, as in Megatron-LM and most LLM recipes.
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.dim() <= 1 else decay).append(param)
    # The extra keys identify the groups when megatron-core's optimiser wrapper reloads a state dict.
    megatron_keys = dict(lr_mult=1.0, is_expert_parallel=False, is_decoupled_lr=False)
    groups = [{"params": decay, "weight_decay": weight_decay, "wd_mult": 1.0, **megatron_keys},
              {"params": no_decay, "weight_decay": 0.0, "wd_mult": 0.0, **megatron_keys}]
    return [group for group in groups if group["params"]]


def _torch_optimizer(config: TrainConfig, groups) -> torch.optim.Optimizer:
    if config.optimizer == "rmsprop":
        return torch.optim.RMSprop(groups, lr=config.lr, alpha=config.rmsprop_alpha, eps=config.eps,
                                   momentum=config.momentum)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr, betas=(config.adam_beta1, config.adam_beta2), eps=config.eps)
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum)
    raise ValueError(f"--optimizer: unknown optimiser {config.optimizer!r}")


def lr_factor(update: int, *, warmup_steps: int, total_steps: int, schedule: str, min_lr_ratio: float) -> float:
    """Multiplier of the peak lr for the `update`-th optimiser update (1-based).

    Warmup: update k < warmup uses k / warmup (never 0, so no update is wasted). Cosine: from the first update after
    the warmup (factor 1) down towards min_lr_ratio, reached just after the last update.
    """
    if warmup_steps > 0 and update <= warmup_steps:
        return update / warmup_steps
    if schedule == "constant":
        return 1.0
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, max(0.0, (update - warmup_steps - 1) / decay_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class TrainOptimizer:
    """The step the trainer calls after DDP's gradient sync: grads in, clipped update out, schedule advanced."""

    def __init__(self, config: TrainConfig, model: torch.nn.Module, *, bf16: bool, total_steps: int):
        self.config = config
        self.sharded = config.distributed_optimizer
        build = _distributed_optimizer if self.sharded else _replicated_optimizer
        self.megatron_optimizer = build(config, model, bf16=bf16)
        inner = self.inner = self.megatron_optimizer.optimizer
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            inner, lambda index: lr_factor(index + 1, warmup_steps=config.warmup_steps, total_steps=total_steps,
                                           schedule=config.lr_schedule, min_lr_ratio=config.min_lr_ratio))
        self.skipped_updates = 0

    @property
    def lr(self) -> float:
        """The learning rate the next update uses."""
        return self.inner.param_groups[0]["lr"]

    def zero_grad(self) -> None:
        self.megatron_optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def prepare(self) -> float:
        """Gradients ready for the update (main grads, clipped); returns the global gradient norm before clipping
        (megatron-core's model-parallel norm: every rank gets the same value)."""
        optimizer = self.megatron_optimizer
        optimizer.prepare_grads()  # main_grad -> .grad (and fp32 masters for bf16)
        if self.config.expert_parallel > 1:
            # Experts differ between expert-parallel ranks: megatron-core's norm over the model-parallel group
            # would miss the other ranks' experts (rpo.models.moe.expert_parallel_grad_norm).
            from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

            from rpo.models.moe import expert_parallel_grad_norm

            grad_norm = expert_parallel_grad_norm(optimizer)
            if self.config.grad_clip > 0 and math.isfinite(grad_norm):
                clip_grad_by_total_norm_fp32(optimizer.get_parameters(), self.config.grad_clip, grad_norm)
            return grad_norm
        if self.config.grad_clip > 0:
            return float(optimizer.clip_grad_norm(self.config.grad_clip))
        return float(optimizer.get_grad_norm())

    @torch.no_grad()
    def finish(self, update: bool) -> None:
        """Apply the prepared update, or skip it (counted in `skipped_updates`); the schedule advances either way."""
        if update:
            self.megatron_optimizer.step_with_ready_grads()
        else:
            self.skipped_updates += 1
        self.scheduler.step()

    def step(self) -> float:
        """Clip and apply the update; a non-finite gradient norm skips it. Returns the norm before clipping."""
        grad_norm = self.prepare()
        self.finish(update=math.isfinite(grad_norm))
        return grad_norm

    def rebuild_schedule(self) -> None:
        """After loading a checkpoint of another schedule (--allow-schedule-change): the peak lr and the schedule
        of this run's config from the loaded position on (the next update uses the new schedule's value)."""
        scheduler = self.scheduler
        scheduler.base_lrs = [self.config.lr for _ in self.inner.param_groups]
        factors = [fn(scheduler.last_epoch) for fn in scheduler.lr_lambdas]
        for group, base, factor in zip(self.inner.param_groups, scheduler.base_lrs, factors):
            group["lr"] = base * factor
        scheduler._last_lr = [group["lr"] for group in self.inner.param_groups]

    def state_dict(self) -> Dict[str, Any]:
        """With --distributed-optimizer: this data-parallel rank's shard (each rank saves its own)."""
        if self.sharded:
            # megatron's DistributedOptimizer.state_dict() leaves the sharded tensors out: the torch AdamW's state
            # over this rank's fp32 main-parameter shards, and the shards themselves (bf16 runs' master weights).
            optimizer = {"inner": self.inner.state_dict(), "main_params": self._main_params()}
        else:
            optimizer = self.megatron_optimizer.state_dict()
        return {"optimizer": optimizer, "scheduler": self.scheduler.state_dict(),
                "skipped_updates": self.skipped_updates}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if self.sharded:
            self.inner.load_state_dict(state["optimizer"]["inner"])
            saved = state["optimizer"]["main_params"]
            mine = self._main_params()
            if [tuple(p.shape) for p in saved] != [tuple(p.shape) for p in mine]:
                raise ValueError("--resume: the checkpointed optimizer shards do not match this launch's "
                                 "(same processes, --tensor-parallel and model needed)")
            with torch.no_grad():
                for param, value in zip(mine, saved):
                    param.copy_(value)
        else:
            self.megatron_optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.skipped_updates = state["skipped_updates"]

    def _main_params(self) -> List[torch.Tensor]:
        return [param for group in self.inner.param_groups for param in group["params"]]


SCHEDULE_OPTIONS = ("lr", "lr_schedule", "warmup_steps", "min_lr_ratio")


def learning_rates(config: TrainConfig, total_steps: int, updates: range) -> List[float]:
    """The learning rate of each update in `updates` (1-based) under `config`'s schedule."""
    return [config.lr * lr_factor(u, warmup_steps=config.warmup_steps, total_steps=total_steps,
                                  schedule=config.lr_schedule, min_lr_ratio=config.min_lr_ratio) for u in updates]


def schedule_change(saved: Dict[str, Any], saved_total: int, config: TrainConfig, total_steps: int,
                    step: int) -> List[str]:
    """What differs between a checkpointed run's schedule and this run's, as "--option OLD ..., now NEW" texts,
    when it changes the learning rate of an update after `step`; [] when the remaining updates keep their rates
    (e.g. a longer run with the constant schedule)."""
    old = dataclasses.replace(config, **{name: saved[name] for name in SCHEDULE_OPTIONS if name in saved})
    remaining = range(step + 1, max(total_steps, step) + 1)
    if learning_rates(old, saved_total, remaining) == learning_rates(config, total_steps, remaining):
        return []
    changes = [f"--{name.replace('_', '-')} {getattr(old, name)!r} in the checkpointed run, now "
               f"{getattr(config, name)!r}" for name in SCHEDULE_OPTIONS if getattr(old, name) != getattr(config, name)]
    if saved_total != total_steps:
        if saved.get("max_steps") != config.max_steps:
            changes.append(f"--max-steps {saved.get('max_steps')} in the checkpointed run ({saved_total} steps), now "
                           f"{config.max_steps} ({total_steps} steps)")
        else:
            changes.append(f"--epochs {saved.get('epochs')} in the checkpointed run ({saved_total} steps), now "
                           f"{config.epochs} ({total_steps} steps)")
    return changes


def _replicated_optimizer(config: TrainConfig, model: torch.nn.Module, *, bf16: bool):
    """Our torch optimiser (every DP rank holds all of its state) in megatron-core's fp32 or bf16 wrapper."""
    inner = _torch_optimizer(config, _param_groups(model, config.weight_decay))
    megatron_config = OptimizerConfig(
        optimizer="sgd" if config.optimizer == "sgd" else "adam",  # only read for defaults we do not use
        lr=config.lr, weight_decay=config.weight_decay, bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32, clip_grad=config.grad_clip,
        log_num_zeros_in_grad=False)
    if bf16:
        # bf16 needs no loss scaling (same exponent range as fp32): grad_scaler=None.
        return Float16OptimizerWithFloat16Params(inner, megatron_config, None, _no_init)
    return FP32Optimizer(inner, megatron_config, _no_init)


def _distributed_optimizer(config: TrainConfig, model: torch.nn.Module, *, bf16: bool):
    """megatron-core's DistributedOptimizer over `model` (megatron DDP built with use_distributed_optimizer=True):
    it builds the AdamW over this rank's shard of the fp32 main parameters (1-D parameters without weight decay, as
    _param_groups) and all-gathers the updated parameters after each step."""
    from megatron.core.optimizer import get_megatron_optimizer

    if config.optimizer != "adamw":  # rpo.train.scale.check_scale_options names the option first
        raise ValueError(f"the distributed optimizer supports adamw only, got {config.optimizer!r}")
    megatron_config = OptimizerConfig(
        optimizer="adam", lr=config.lr, weight_decay=config.weight_decay, adam_beta1=config.adam_beta1,
        adam_beta2=config.adam_beta2, adam_eps=config.eps, bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32, clip_grad=config.grad_clip,
        log_num_zeros_in_grad=False, use_distributed_optimizer=True)
    return get_megatron_optimizer(megatron_config, [model])


def _no_init(optimizer, config=None):
    # torch optimisers create their state lazily on the first step and load_state_dict accepts a fresh one.
    return None
