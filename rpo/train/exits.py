"""How a training run that stops tells its launcher and its user: exit codes, and the one line each failure prints.

    0    the run finished (final/ written if asked for)
    1    a bug: rpo failed unexpectedly (the failing rank prints the traceback, rank 0 one line)
    2    an error in the user's input: options, data, model folder, a checkpoint that cannot be resumed
    3    the run diverged (non-finite loss or gradient, or a vanished gradient): no final/, checkpoints kept
    4    an output could not be written (disk full, no permission, I/O error): the last checkpoint kept
    128+N  stopped by signal N (130 Ctrl-C / SIGINT, 143 SIGTERM): a checkpoint of the last step was saved
           unless --no-save-on-signal (or the step was abandoned by a second signal)

`describe_failure` turns an exception into (exit code, the line rank 0 prints after `PROG: `); every rank of a
launch exits with the same code (rpo.train.ranks shares the first failure with the others).
"""
from __future__ import annotations

import errno
import signal
from typing import Optional, Tuple

EXIT_OK = 0
EXIT_BUG = 1
EXIT_USAGE = 2
EXIT_DIVERGED = 3
EXIT_WRITE_FAILED = 4
SIGNAL_EXIT_BASE = 128

# OSError numbers that mean "the storage refused the write", not a bug: reported in one line, exit 4.
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EACCES, errno.EPERM,
                          errno.EFBIG})


class RunStopped(Exception):
    """A run that stops on purpose (not a bug); `exit_code` is what the command exits with."""

    exit_code = EXIT_BUG


class Diverged(RunStopped):
    """The divergence guard stopped the run (rpo.train.guard)."""

    exit_code = EXIT_DIVERGED


class OutputWriteError(RunStopped):
    """A run output (checkpoint, metrics, final/) could not be written; the message names the path and the cause."""

    exit_code = EXIT_WRITE_FAILED


class Interrupted(KeyboardInterrupt):
    """SIGINT / SIGTERM stopped the run (rpo.train.signals). Like KeyboardInterrupt it is no `Exception`, so code
    that catches `Exception` does not swallow it. The message says what was saved."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum
        self.exit_code = SIGNAL_EXIT_BASE + signum


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def write_error_errno(error: BaseException) -> Optional[int]:
    """The errno of a storage refusal (disk full, read-only, ...) in `error` or its cause, else None."""
    seen = 0
    while error is not None and seen < 5:
        if isinstance(error, OSError) and error.errno in WRITE_ERRNOS:
            return error.errno
        error = error.__cause__ or error.__context__
        seen += 1
    return None


def describe_failure(error: BaseException, rank: int = 0) -> Tuple[int, str, bool]:
    """(exit code, the line after `PROG: `, whether it is a bug whose traceback the failing rank should print)."""
    from rpo.train.ranks import RankFailure, user_error_types

    if isinstance(error, Interrupted):
        return error.exit_code, one_line(error), False
    if isinstance(error, RunStopped):
        return error.exit_code, f"error: {one_line(error)}", False
    if isinstance(error, user_error_types()):
        return EXIT_USAGE, f"error: {one_line(error)}", False
    if isinstance(error, KeyboardInterrupt):  # Ctrl-C before rpo's handlers were installed
        return SIGNAL_EXIT_BASE + signal.SIGINT, "interrupted (SIGINT) before training started; nothing saved", False
    if write_error_errno(error) is not None:
        return EXIT_WRITE_FAILED, f"error: could not write: {one_line(error)}", False
    if isinstance(error, RankFailure):
        return EXIT_BUG, f"error: rank {error.rank} failed: {error.kind}: {one_line(error)} (traceback in its log)", \
            False
    return EXIT_BUG, f"error: rank {rank} failed: {type(error).__name__}: {one_line(error)} (traceback in its log; " \
        f"please report it)", True
