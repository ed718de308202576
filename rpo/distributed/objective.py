"""The data-parallel objective: what each rank back-propagates so that the gradients a data-parallel wrapper
averages over W ranks are those of the loss of the global batch (docs/global-contrast.md). Both trainers (the
Megatron one and RPOTrainer in TRL) use it.

A loss splits into a global part (`LossOutput.global_loss`: a quantity of the whole global batch, the same on
every rank, each rank holding the derivatives through its own sequences; a contrast over the group) and a
separable rest, a mean over this call's rows. Summed over the ranks, the per-rank gradients of the global part
already make the full gradient, so it weighs W; the separable rest of a call over `rows` of the step's
`rows_global` rows weighs rows · W / rows_global. A token mean (sft) is written as a row mean by its loss
(`chosen_tokens_per_row`), so the same rule holds for it.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


def data_parallel_loss_scale(process_group: Optional[dist.ProcessGroup]) -> int:
    """The factor W by which a DP wrapper that *averages* gradients divides their sum: the group size (torch DDP,
    Megatron-core DDP unless `calculate_per_token_loss`); 1 for `process_group=None`. Use 1 with a wrapper that
    sums gradients."""
    if process_group is None:
        return 1
    return dist.get_world_size(process_group)


def data_parallel_objective(loss: torch.Tensor, global_loss: Optional[torch.Tensor], *, rows: int,
                            rows_global: int, world: int) -> torch.Tensor:
    """What to back-propagate for a loss of `rows` of the step's `rows_global` rows (chosen + rejected sequences,
    over every micro-batch and rank) under a wrapper averaging over `world` ranks (`data_parallel_loss_scale`).

    `global_loss` is the global part of `loss` (None when nothing is global); log `loss`, not the objective.
    """
    separable = loss if global_loss is None else loss - global_loss
    objective = separable * (rows * world / rows_global)
    return objective if global_loss is None else objective + global_loss * world
