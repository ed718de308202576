"""Preemption and launcher death: what a rank does on SIGTERM / SIGINT, and how it ends when its launcher dies.

Schedulers (Slurm, Kubernetes) send SIGTERM some seconds before they kill a job; Ctrl-C sends SIGINT to every
process of the terminal's group. `StopSignals` turns the first such signal into a request that the step loop
honours at the end of the current step: the ranks agree on it in the step's one small all-reduce
(rpo.train.guard), save a checkpoint of that step (unless --no-save-on-signal) and stop with exit code 128 + the
signal number and one line. Outside the step loop (set-up) a signal stops the rank at once. A signal repeated
within `REPEAT_WINDOW_S` is the same request (torchrun forwards the terminal's SIGINT to ranks that already got
it); a later one abandons the current step and its save, except while a checkpoint is being written.

`exit_with_launcher` makes a rank of a multi-process launch get SIGTERM when its parent (torchrun, a test
launcher) dies (Linux parent-death signal), so an orphaned rank saves and stops instead of training on under
PID 1; a watchdog thread ends the process if it has not stopped `ORPHAN_GRACE_S` after that (a rank blocked in a
collective never returns to Python to act on a signal).
"""
from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import sys
import threading
import time
from typing import Iterator, Optional

from rpo.train.exits import SIGNAL_EXIT_BASE, Interrupted, signal_name

logger = logging.getLogger("rpo.train")

HANDLED = (signal.SIGTERM, signal.SIGINT)
REPEAT_WINDOW_S = 2.0
ORPHAN_GRACE_S = float(os.environ.get("RPO_ORPHAN_GRACE_S", "300"))
_PR_SET_PDEATHSIG = 1


class StopSignals:
    """SIGTERM / SIGINT handlers of a run (installed only from the main thread; a no-op elsewhere).

    Modes: `immediate` (set-up: raise Interrupted at once), `deferred` (the step loop: remember the signal and let
    the loop stop after the step), `saving` (writing the stop checkpoint: further signals wait for it).
    """

    def __init__(self):
        self.received = 0  # the first signal number received while deferred (0: none)
        self.received_at = 0.0
        self.mode = "immediate"
        self._previous = {}

    # --- installation ---------------------------------------------------------------------------------------
    def install(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread() and not self._previous:
            for signum in HANDLED:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    @contextlib.contextmanager
    def deferred(self) -> Iterator["StopSignals"]:
        """Within: a signal is remembered for the loop (see `pending`)."""
        self.mode = "deferred"
        try:
            yield self
        finally:
            self.mode = "immediate"

    @contextlib.contextmanager
    def saving(self) -> Iterator[None]:
        """Within: further signals do not interrupt the checkpoint being written."""
        mode, self.mode = self.mode, "saving"
        try:
            yield
        finally:
            self.mode = mode

    def pending(self) -> int:
        """The signal this rank received during the loop (0: none)."""
        return self.received

    # --- the handler ----------------------------------------------------------------------------------------
    def _handle(self, signum: int, frame) -> None:
        name = signal_name(signum)
        now = time.monotonic()
        if self.mode == "immediate":
            raise Interrupted(signum, f"stopped by {name} before training started; nothing saved")
        if not self.received:
            self.received, self.received_at = signum, now
            orphan = " (its launcher died)" if _orphaned() else ""
            if self.mode == "saving":
                logger.warning("%s received%s while outputs are written: finishing them first", name, orphan)
            else:
                logger.warning("%s received%s: stopping after the current step (a second signal abandons it)",
                               name, orphan)
            return
        if now - self.received_at < REPEAT_WINDOW_S:
            return  # the same request, forwarded by a launcher
        if self.mode == "saving":
            logger.warning("%s received while the stop checkpoint is written: finishing it first", name)
            return
        raise Interrupted(signum, f"stopped by a second {name}: the current step was abandoned and not saved")


# ======================================================================================= launcher death =====
_launcher_pid: Optional[int] = None
_armed = False  # the parent-death signal is set


def _orphaned() -> bool:
    return _launcher_pid is not None and os.getppid() != _launcher_pid


def launched_rank() -> bool:
    """Whether this process is a rank started by a launcher (torchrun and the like set RANK): only then does the
    parent's death end it (a single `nohup rpo-train` outlives the shell that started it)."""
    return "RANK" in os.environ


def exit_with_launcher() -> bool:
    """Get SIGTERM when the launcher (the parent process) dies, and end `ORPHAN_GRACE_S` later if still alive.
    Idempotent; returns whether the parent-death signal is set (Linux only)."""
    global _launcher_pid, _armed
    if not launched_rank() or _launcher_pid is not None:
        return _armed
    _launcher_pid = os.getppid()
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            _armed = libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) == 0
        except (OSError, AttributeError):
            _armed = False
    threading.Thread(target=_orphan_watchdog, name="rpo-orphan-watch", daemon=True).start()
    if os.getppid() != _launcher_pid:  # it died before the signal was armed
        os.kill(os.getpid(), signal.SIGTERM)
    return _armed


def _orphan_watchdog() -> None:
    while not _orphaned():
        time.sleep(1.0)
    if not _armed:
        os.kill(os.getpid(), signal.SIGTERM)  # no parent-death signal on this platform: ask the loop to stop
    time.sleep(ORPHAN_GRACE_S)
    print(f"rank {os.environ.get('RANK', '?')}: the launcher died and this rank did not stop within "
          f"{ORPHAN_GRACE_S:.0f} s (blocked in a collective?): exiting", file=sys.stderr, flush=True)
    os._exit(SIGNAL_EXIT_BASE + signal.SIGTERM)
