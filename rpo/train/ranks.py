"""Ranks that fail together: an error on any rank reaches every rank, and the launch ends with one line.

A rank that fails alone would leave the others blocked in their next collective (until the process-group timeout,
or with "Connection closed by peer" tracebacks when it exits). Two mechanisms prevent that:

- `together()` / `main_first()`: set-up steps taken together. Every rank raises — the failing rank its own
  exception, the others a `RankFailure` carrying its message (a user error when the original was one) — and the
  entry point prints it once.
- `FailureWatch`: for an error anywhere else (a disk that fills on rank 0 only, a bug on one rank, a signal on
  one rank during set-up) the failing rank publishes (exit code, one line) in the launch's key-value store (the
  c10d store the process group was made with) and waits until every other rank has seen it. Each rank polls the
  store from a watchdog thread: a rank blocked in a collective by the failure prints nothing (rank 0 prints the
  failing rank's line) and exits at once with the same code. The first failure wins; a rank that fails at the
  same time only acknowledges it.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import threading
import time
from typing import Iterator, Optional, Tuple, Type

import torch.distributed as dist

from rpo.train.config import ConfigError


class RankFailure(RuntimeError):
    """Another rank failed; the message is its error's."""

    def __init__(self, rank: int, kind: str, message: str):
        self.rank, self.kind = rank, kind
        super().__init__(message)


class UserRankFailure(RankFailure, ConfigError):
    """Another rank failed on the user's input (data, files, options); shown like a ConfigError."""


def user_error_types() -> Tuple[Type[BaseException], ...]:
    """Errors caused by the user's input: shown as one line, `prog: error: ...`, exit status 2."""
    from rpo.data import BadRowError
    from rpo.data.formats import EmptyDataError
    from rpo.losses import LossConfigError

    return (ConfigError, BadRowError, EmptyDataError, LossConfigError, FileNotFoundError)


def _distributed() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def _describe(error: Optional[BaseException]):
    if error is None:
        return None
    return (dist.get_rank(), isinstance(error, user_error_types()), type(error).__name__, str(error))


def _raise_first(outcomes, own: Optional[BaseException]) -> None:
    failed = [outcome for outcome in outcomes if outcome is not None]
    if not failed:
        return
    rank, user, kind, message = failed[0]
    if own is not None and rank == dist.get_rank():
        raise own
    raise (UserRankFailure if user else RankFailure)(rank, kind, message) from None


def _gather_outcomes(error: Optional[BaseException]) -> list:
    outcomes = [None] * dist.get_world_size()
    dist.all_gather_object(outcomes, _describe(error))
    return outcomes


@contextlib.contextmanager
def together() -> Iterator[None]:
    """Every rank runs the block; if it fails on any rank, every rank raises (the lowest failing rank's error).

    The block itself must not hold a collective that a failing rank could skip.
    """
    if not _distributed():
        yield
        return
    error = None
    try:
        yield
    except Exception as caught:  # noqa: BLE001 - shared with the other ranks, then re-raised
        error = caught
    _raise_first(_gather_outcomes(error), error)


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (it fills caches, converts models), then the other ranks.

    If rank 0 fails, the others do not run the block and raise its error; if another rank fails afterwards, every
    rank raises that error.
    """
    if not _distributed():
        yield
        return
    error = None
    if dist.get_rank() == 0:
        try:
            yield
        except Exception as caught:  # noqa: BLE001
            error = caught
        outcome = [_describe(error)]
        dist.broadcast_object_list(outcome, src=0)
        if error is not None:
            raise error
    else:
        outcome = [None]
        dist.broadcast_object_list(outcome, src=0)
        _raise_first(outcome, None)
        try:
            yield
        except Exception as caught:  # noqa: BLE001
            error = caught
    _raise_first(_gather_outcomes(error), error)


def barrier() -> None:
    if _distributed():
        dist.barrier()


# ================================================================================== failures outside set-up ===
logger = logging.getLogger("rpo.train")

POLL_S = 0.25  # how often a rank looks for another rank's failure
TAKEOVER_S = 5.0  # a failure seen by the watchdog: time left to the main thread to handle it itself (a failure
#                   raised on every rank at once), before the watchdog ends the process
ACK_TIMEOUT_S = 15.0  # how long the failing rank waits for every other rank to have seen its failure
_program = "rpo-train"
_generation = 0  # runs (Trainer set-ups) of this process: each has its own keys, so a failure ends only its run
_current: Optional["FailureWatch"] = None
_last_shared: Optional[Tuple[int, int, str]] = None  # the first failure of the last run that shared one


def set_program_name(prog: str) -> None:
    """The name rank 0 prints before a failure line (`PROG: error: ...`)."""
    global _program
    _program = prog


def program_name() -> str:
    return _program


def _store_clone():
    """A private handle on the launch's c10d store for one thread (None when there is none to share)."""
    try:
        store = dist.distributed_c10d._get_default_store()
        return store.clone()
    except Exception:  # noqa: BLE001 - no store (single process, another init method): nothing to share
        return None


class FailureWatch:
    """Shares the first fatal failure of any rank of a run with all the others (see the module docstring).

    The store may live in rank 0's process (a plain launch; torchrun keeps it in its agent): rank 0 leaves last,
    so that no rank talks to a store that is gone. The failing rank waits for every other rank's acknowledgement,
    then marks the failure done; rank 0, when it is not the failing rank, waits for that mark before it exits.
    """

    def __init__(self, generation: int):
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.key = f"rpo/failures/{generation}"
        self.ack_key = f"rpo/failures/{generation}/acks"
        self.done_key = f"rpo/failures/{generation}/done"
        self._main_store = _store_clone()
        self._thread_store = _store_clone()
        self._stop = threading.Event()
        self._lock = threading.Lock()  # whoever holds it (main thread or watchdog) ends this process's run
        self._handled_by_main = threading.Event()
        self._thread = None
        if self._main_store is not None and self._thread_store is not None:
            self._thread = threading.Thread(target=self._watch, name="rpo-failure-watch", daemon=True)
            self._thread.start()

    # --- the failing rank (main thread) -------------------------------------------------------------------
    def share(self, code: int, line: str) -> Tuple[int, int, str]:
        """Publish this rank's failure unless another rank's came first; wait until every rank has seen the first
        one. Returns (rank, exit code, line) of the first failure."""
        self._handled_by_main.set()
        self.close()  # this rank's watchdog makes no store call from here on
        first = (self.rank, code, line)
        if self._main_store is None:
            return first
        store = self._main_store
        with self._lock:
            payload = json.dumps({"rank": self.rank, "code": code, "line": line})
            try:
                current = store.compare_set(self.key, "", payload)
                current = current.decode() if isinstance(current, bytes) else current
                if current != payload:  # another rank failed first: acknowledge it
                    info = json.loads(current)
                    first = (info["rank"], info["code"], info["line"])
                    store.add(self.ack_key, 1)
                    if self.rank == 0:
                        self._wait_until_done(store)
                else:
                    self._wait_for_acks()
                    store.set(self.done_key, "1")
            except Exception as error:  # noqa: BLE001 - the store went away: nothing left to wait for
                logger.debug("failure watch: store unavailable (%s)", error)
        return first

    def _wait_for_acks(self) -> None:
        deadline = time.monotonic() + ACK_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._main_store.add(self.ack_key, 0) >= self.world - 1:
                return
            time.sleep(POLL_S / 2)

    def _wait_until_done(self, store) -> None:
        """Rank 0 (whose process may hold the store): until the failing rank has read its acknowledgements."""
        deadline = time.monotonic() + ACK_TIMEOUT_S
        while time.monotonic() < deadline and not store.check([self.done_key]):
            time.sleep(POLL_S / 2)

    # --- the other ranks (watchdog thread) ----------------------------------------------------------------
    def _watch(self) -> None:
        store = self._thread_store
        try:
            while not self._stop.wait(POLL_S):
                if not store.check([self.key]):
                    continue
                info = json.loads(store.get(self.key))
                if info["rank"] == self.rank or self._stop.is_set():
                    return
                # Another rank failed. If this rank fails too (an error raised on every rank), its main thread
                # reports it; otherwise this rank is blocked (or soon will be) in a collective: end it here.
                if self._handled_by_main.wait(TAKEOVER_S) or not self._lock.acquire(blocking=False):
                    return
                store.add(self.ack_key, 1)
                if self.rank == 0:
                    print(f"{_program}: {info['line']}", file=sys.stderr, flush=True)
                    self._wait_until_done(store)
                sys.stdout.flush()  # log handlers flush each record; no logging.shutdown(): it takes their locks
                os._exit(int(info["code"]))
        except Exception as error:  # noqa: BLE001 - the store went away: stop watching
            logger.debug("failure watch stopped: %s", error)

    def close(self) -> None:
        """Stop watching; returns once the watchdog makes no more store calls."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=POLL_S + 5.0)


def start_failure_watch() -> Optional[FailureWatch]:
    """Start watching for other ranks' failures (a no-op on one process). Called once per run, on every rank."""
    global _current, _generation, _last_shared
    stop_failure_watch()
    _last_shared = None
    if not _distributed():
        return None
    _generation += 1
    _current = FailureWatch(_generation)
    return _current


def share_failure(code: int, line: str) -> Tuple[int, int, str]:
    """(rank, exit code, line) of the run's first failure, after every rank has seen it: shared now if the run
    watches for failures, or the one shared earlier (Trainer.fit shares before the command reports), else this
    rank's own."""
    global _current, _last_shared
    watch, _current = _current, None
    if watch is not None:
        _last_shared = watch.share(code, line)
        return _last_shared
    shared, _last_shared = _last_shared, None
    return shared or (dist.get_rank() if _distributed() else 0, code, line)


def forget_failures() -> None:
    """Start a new run's bookkeeping (the command calls it first)."""
    global _last_shared
    stop_failure_watch()
    _last_shared = None


def stop_failure_watch() -> None:
    global _current
    if _current is not None:
        _current.close()
        _current = None
