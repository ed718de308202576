"""The divergence guard: a step whose numbers are not usable is skipped; too many in a row stop the run.

A step is not applied when, on any rank,
  - a log-prob of the policy or the reference is not finite (a diverged model: the values reach the loss as 0,
    so every rank runs the same collectives, and the step's metrics are logged as NaN),
  - the loss is not finite (NaN is logged as NaN, never dropped: rpo.train.metrics.WeightedMean),
  - the global gradient norm (megatron-core's: the model-parallel norm over TP, after the data-parallel
    reduction) is not finite, or
  - the gradient norm is exactly 0 while the loss is above `VANISHED_LOSS`: the model's outputs no longer depend on
    its weights (what an enormous SGD step leaves: saturated softmaxes; every later update is zero).

The ranks agree in one small all-reduce per step, which also carries a stop signal (rpo.train.signals). More than
--max-skipped-steps such steps in a row, or a last step that is one, stop the run with `Diverged` (exit 3): one
line naming the step and the quantity; no final/ is exported and no checkpoint written in a skipped state.

Megatron-core's own checks do not fit here: DDP's `check_for_nan_in_grad` raises on the rank that sees a NaN
before the data-parallel reduction (the others then wait in that collective), and the mixed-precision optimizer's
found-inf skip exists only with an fp16 loss scaler. The guard uses megatron-core's global gradient norm instead.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from rpo.train.metrics import collective_device
from rpo.train.preflight import is_rank_zero

logger = logging.getLogger("rpo.train")

VANISHED_LOSS = 1e-3


@dataclass
class StepVerdict:
    """What the ranks agreed on for one step."""

    problem: Optional[str]  # why the update is not applied ("the loss is nan"), None for a good step
    signal: int  # a stop signal one of the ranks received (0: none)
    nonfinite_logps: bool = False  # the loss saw zeros in place of non-finite log-probs: its metrics mean nothing

    @property
    def update(self) -> bool:
        return self.problem is None


class DivergenceGuard:
    """Screens log-probs, judges each step (collective) and counts the skipped ones."""

    def __init__(self, max_skipped_steps: int, device: torch.device = torch.device("cpu")):
        self.max_skipped_steps = max_skipped_steps
        self.device = device
        self._nonfinite: Optional[torch.Tensor] = None  # this rank saw a non-finite log-prob since the last reset
        self.streak = 0  # skipped steps in a row
        self.first_bad_step: Optional[int] = None

    # --- within a step (local, no collective, no host sync) ---------------------------------------------------
    def screen(self, values: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """`values` with non-finite entries replaced by 0, remembering that there were some."""
        if values is None:
            return None
        finite = torch.isfinite(values)
        bad = ~finite.all()
        self._nonfinite = bad if self._nonfinite is None else self._nonfinite | bad
        return torch.where(finite, values, torch.zeros_like(values))

    def _take_local_flag(self) -> float:
        flag = self._nonfinite
        self._nonfinite = None
        return float(flag) if flag is not None else 0.0

    # --- at the end of a step (collective over every rank) ----------------------------------------------------
    def agree(self, signal: int = 0) -> tuple:
        """(some rank saw non-finite log-probs, the largest stop signal number of any rank): one all-reduce."""
        flags = torch.tensor([self._take_local_flag(), float(signal)], dtype=torch.float64,
                             device=collective_device())
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return bool(flags[0] > 0), int(flags[1])

    def judge(self, loss: Optional[float], grad_norm: float, signal: int = 0) -> StepVerdict:
        """Collective: the verdict on a step whose gradients are ready (before the update). `loss` and `grad_norm`
        are already the same on every rank (reduced over data-parallel ranks / the model-parallel norm)."""
        nonfinite_logps, signal = self.agree(signal)
        loss = float("nan") if loss is None else float(loss)
        problem = None
        if nonfinite_logps:
            problem = "a log-prob is not finite"
        elif not math.isfinite(loss):
            problem = f"the loss is {loss}"
        elif not math.isfinite(grad_norm):
            problem = f"the gradient norm is {grad_norm}"
        elif grad_norm == 0.0 and loss > VANISHED_LOSS:
            problem = (f"the gradient norm is 0 while the loss is {loss:.4g} (the model's outputs no longer depend "
                       f"on its weights)")
        return StepVerdict(problem, signal, nonfinite_logps)

    def record(self, step: int, verdict: StepVerdict) -> bool:
        """Count a judged step; True when the run must stop (too many skipped steps in a row)."""
        if verdict.update:
            self.streak, self.first_bad_step = 0, None
            return False
        self.streak += 1
        if self.first_bad_step is None:
            self.first_bad_step = step
        if is_rank_zero():
            logger.warning("step %d: %s: update skipped (%d in a row, --max-skipped-steps %d)", step,
                           verdict.problem, self.streak, self.max_skipped_steps)
        return self.streak > self.max_skipped_steps

    @property
    def in_bad_state(self) -> bool:
        """The last judged step was skipped: the weights are not known to be good (no checkpoint, no final/)."""
        return self.streak > 0

    def describe(self, step: int, problem: str, last_step: bool = False) -> str:
        """The first part of the line of a run the guard stops."""
        if self.streak > self.max_skipped_steps or not last_step:
            why = (f"{self.streak} step{'s' if self.streak != 1 else ''} in a row could not be applied, from step "
                   f"{self.first_bad_step}; --max-skipped-steps {self.max_skipped_steps}")
        else:
            why = "the last step could not be applied"
        return f"the run diverged at step {step}: {problem} ({why})"
