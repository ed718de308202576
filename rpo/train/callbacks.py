"""Hooks into the training loop. Every method is optional; each runs on every rank, in the order the callbacks
were given (the trainer's own run report first).

    on_fit_start(trainer)              before the first step of fit() (after set-up and --resume)
    on_log(trainer, record)            a logged step: `record` is its metrics.jsonl object
    on_step_end(trainer, step, record) after each step and its checkpoint (`record` None if the step was not logged)
    on_loop_end(trainer)               the step loop ended, normally or by an exception (close bars, writers)
    on_fit_end(trainer, summary)       after the final checkpoint and final/, with the run summary
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, Optional

if TYPE_CHECKING:
    from rpo.train.trainer import Trainer


class Callback:
    def on_fit_start(self, trainer: "Trainer") -> None:
        pass

    def on_log(self, trainer: "Trainer", record: Dict[str, Any]) -> None:
        pass

    def on_step_end(self, trainer: "Trainer", step: int, record: Optional[Dict[str, Any]]) -> None:
        pass

    def on_loop_end(self, trainer: "Trainer") -> None:
        pass

    def on_fit_end(self, trainer: "Trainer", summary: Dict[str, Any]) -> None:
        pass
