"""Progress of long stages (model conversion, tokenisation, prompt embedding, ...): a tqdm bar, or log lines.

With ``progress=True`` (the trainer passes it on rank 0 only) a tqdm bar shows the stage; with ``progress=False``
a log line reports it at least every ``LOG_INTERVAL_S`` seconds, so a run without a bar (``--no-progress-bar``,
other ranks, a batch log) is never silent for longer than that.
"""
from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator

LOG_INTERVAL_S = 30.0


class StageProgress:
    """Counts the items of one stage: ``update(n)`` after each chunk, ``close()`` at the end."""

    def __init__(self, description: str, total: int, *, progress: bool, logger: logging.Logger, unit: str = "rows",
                 interval_s: float | None = None, clock: Callable[[], float] = time.monotonic):
        self.description, self.total, self.unit, self.logger, self.clock = description, total, unit, logger, clock
        self.interval_s = LOG_INTERVAL_S if interval_s is None else interval_s
        self.done = 0
        self.started = self.last_log = clock()
        self.bar = None
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=description, unit=unit, dynamic_ncols=True)

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = self.clock()
        if now - self.last_log >= self.interval_s:
            self.last_log = now
            self.logger.info("%s: %d of %d %s (%.0f s)", self.description, self.done, self.total, self.unit,
                             now - self.started)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> StageProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@contextlib.contextmanager
def datasets_progress_bars(enabled: bool) -> Iterator[None]:
    """``datasets``' own bars (e.g. of ``Dataset.map``) off inside the block when ``enabled`` is False; restored."""
    import datasets

    switch_off = not enabled and datasets.is_progress_bar_enabled()
    if switch_off:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if switch_off:
            datasets.enable_progress_bars()
