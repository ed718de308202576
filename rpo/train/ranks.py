"""Set-up steps that ranks take together, so that an error on any rank reaches every rank.

A rank that fails alone would leave the others blocked in their next collective. Here a failure is shared
instead: every rank raises — the failing rank its own exception, the others a `RankFailure` carrying its message
(a `UserError` when the original was one) — and the entry point prints it once.
"""
from __future__ import annotations

import contextlib
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
