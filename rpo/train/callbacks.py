"""Hooks into the training loop. Every method is optional; each runs on every rank, in the order the callbacks
were given (the trainer's own run report first). `trainer` is the running rpo.train.Trainer.

    on_fit_start(trainer)              before the first step of fit() (after set-up and --resume)
    on_log(trainer, record)            a logged step: `record` is its metrics.jsonl object
    on_step_end(trainer, step, record) after each step and its checkpoint (`record` None if the step was not logged)
    on_loop_end(trainer)               the step loop ended, normally or by an exception (close bars, writers)
    on_fit_end(trainer, summary)       after the final checkpoint and final/, with the run summary
"""
from __future__ import annotations

from typing import Any, Dict, Optional


class Callback:
    def on_fit_start(self, trainer) -> None:
        pass

    def on_log(self, trainer, record: Dict[str, Any]) -> None:
        pass

    def on_step_end(self, trainer, step: int, record: Optional[Dict[str, Any]]) -> None:
        pass

    def on_loop_end(self, trainer) -> None:
        pass

    def on_fit_end(self, trainer, summary: Dict[str, Any]) -> None:
        pass
