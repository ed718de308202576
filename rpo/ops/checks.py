"""Argument checks of the contrast-matrix op, shared by the local op (`rpo.ops`) and the global path
(`rpo.distributed`): one place, so both raise the same clear errors naming the argument, index or row.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch

# The op's `weighting` and `weight_normalization` choices; the strings are passed as they are to the C++ op,
# which parses them itself (csrc/contrast_loss.cpp), so no integer codes are mirrored between the languages.
WEIGHTINGS = ("embedding", "uniform", "diagonal", "none")
WEIGHT_NORMALIZATIONS = ("row", "mean")
SCORE_DTYPES = (torch.float32, torch.bfloat16, torch.float64)
DIAGONAL_LAYOUTS = ("square", "offset", "global")


def _check_number(fn: str, name: str, value, *, positive: bool = False, unit_interval: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{fn}: {name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{fn}: {name} must be finite, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{fn}: {name} must be > 0, got {value}")
    if unit_interval and not 0.0 <= value <= 1.0:
        raise ValueError(f"{fn}: {name} must be in [0, 1], got {value}")
    return value


def _check_choice(fn: str, name: str, value, choices: tuple) -> str:
    if not isinstance(value, str) or value not in choices:
        valid = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{fn}: {name} must be one of {valid}; got {value!r}")
    return value


def _check_finite_values(fn: str, name: str, tensor: torch.Tensor) -> None:
    # Inspects values (a device sync on GPU); skipped while torch.compile traces. A finite sum (one cheap
    # reduction) proves every value finite: a NaN or an infinity makes the sum non-finite. Only a non-finite sum
    # (bad values, or finite ones whose sum overflows) needs the elementwise check, which names the first bad one.
    if bool(torch.isfinite(tensor.sum())):
        return
    finite = torch.isfinite(tensor)
    if not bool(finite.all()):
        bad = (~finite).nonzero()[0].tolist()
        where = f"index {bad[0]}" if tensor.dim() == 1 else f"row {bad[0]}, column {bad[1]}"
        raise ValueError(f"{fn}: {name} has a non-finite value ({tensor[tuple(bad)].item()}) at {where} "
                         f"(first of {int((~finite).sum())})")


def _check_scores(fn: str, chosen_scores, rejected_scores, allow_empty: bool) -> None:
    for name, scores in (("chosen_scores", chosen_scores), ("rejected_scores", rejected_scores)):
        if not isinstance(scores, torch.Tensor):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(scores).__name__}")
        if scores.dim() != 1:
            raise ValueError(f"{fn}: {name} must be 1-D (one score per answer), got shape {tuple(scores.shape)}")
        if scores.dtype not in SCORE_DTYPES:
            raise TypeError(f"{fn}: {name} must be float32, bfloat16 or float64, got {scores.dtype}")
    if chosen_scores.dtype != rejected_scores.dtype:
        raise TypeError(f"{fn}: chosen_scores and rejected_scores must have the same dtype, got "
                        f"{chosen_scores.dtype} and {rejected_scores.dtype}")
    if chosen_scores.device != rejected_scores.device:
        raise ValueError(f"{fn}: mixed devices: chosen_scores on {chosen_scores.device}, rejected_scores on "
                         f"{rejected_scores.device}")
    num_rows, num_cols = chosen_scores.shape[0], rejected_scores.shape[0]
    if not allow_empty and (num_rows == 0 or num_cols == 0):
        raise ValueError(f"{fn}: needs at least one chosen and one rejected score, got M={num_rows} chosen and "
                         f"N={num_cols} rejected")


def _check_embeddings(fn: str, chosen_scores, rejected_scores, chosen_embeddings, rejected_embeddings) -> None:
    for name, emb, rows, rows_name in (("chosen_embeddings", chosen_embeddings, chosen_scores.shape[0], "M"),
                                       ("rejected_embeddings", rejected_embeddings, rejected_scores.shape[0], "N")):
        if emb is None:
            raise ValueError(f"{fn}: weighting='embedding' needs chosen_embeddings and rejected_embeddings; "
                             f"{name} is None")
        if not isinstance(emb, torch.Tensor):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(emb).__name__}")
        if emb.dim() != 2:
            raise ValueError(f"{fn}: {name} must be 2-D [{rows_name}, D], got shape {tuple(emb.shape)}")
        if not emb.is_floating_point():
            raise TypeError(f"{fn}: {name} must be floating point, got {emb.dtype}")
        if emb.shape[0] != rows:
            raise ValueError(f"{fn}: {name} has {emb.shape[0]} rows but there are {rows_name}={rows} "
                             f"{'chosen' if rows_name == 'M' else 'rejected'} scores")
        if emb.device != chosen_scores.device:
            raise ValueError(f"{fn}: mixed devices: {name} on {emb.device}, scores on {chosen_scores.device}")
    if chosen_embeddings.shape[1] != rejected_embeddings.shape[1]:
        raise ValueError(f"{fn}: embedding dims differ: chosen_embeddings has D={chosen_embeddings.shape[1]}, "
                         f"rejected_embeddings has D={rejected_embeddings.shape[1]}")


def _check_diagonal(fn: str, num_rows: int, num_cols: int, diag_offset, diagonal_layout: str) -> None:
    if diagonal_layout == "square" and (num_rows != num_cols or num_rows < 2):
        raise ValueError(f"{fn}: weighting='diagonal' needs a square matrix with at least 2 pairs (paired data), "
                         f"got M={num_rows} chosen and N={num_cols} rejected")
    if diagonal_layout == "offset" and num_rows > 0:
        if num_cols < 2:
            raise ValueError(f"{fn}: weighting='diagonal' needs at least 2 columns, got N={num_cols}")
        if isinstance(diag_offset, bool) or not isinstance(diag_offset, int):
            raise TypeError(f"{fn}: diag_offset must be an int, got {type(diag_offset).__name__}")
        if diag_offset < 0 or diag_offset + num_rows > num_cols:
            raise ValueError(f"{fn}: diag_offset={diag_offset} puts the diagonal of rows 0..{num_rows - 1} "
                             f"outside the N={num_cols} columns")


def check_embedding_values(fn: str, chosen_embeddings: torch.Tensor, rejected_embeddings: torch.Tensor) -> None:
    """Raises ValueError naming the first non-finite embedding value (tensor, row, column); skipped while
    torch.compile traces."""
    if not torch.compiler.is_compiling():
        _check_finite_values(fn, "chosen_embeddings", chosen_embeddings)
        _check_finite_values(fn, "rejected_embeddings", rejected_embeddings)


def check_contrast_inputs(fn: str, chosen_scores, rejected_scores, chosen_embeddings, rejected_embeddings, *, beta,
                          margin, tau, alpha, weighting, weight_normalization, diag_offset: int = 0,
                          allow_empty: bool, diagonal_layout: str, loss_scale: Optional[float] = None,
                          embedding_values: bool = True) -> dict:
    """Checks every argument of the op; raises TypeError/ValueError naming `fn` and the argument.

    Returns the op's scalar arguments as plain Python values: beta, margin, tau, alpha (floats), weighting and
    weight_normalization (the validated strings) and loss_scale (a float, only when given).
    diagonal_layout: "square" (contrast_loss: M = N >= 2), "offset" (contrast_loss_and_grads: row i's diagonal
    is column diag_offset + i) or "global" (a rank's shard of a distributed matrix: the caller checks the
    global shape). embedding_values=False leaves out the finiteness check of the embeddings' values, for a
    caller that runs `check_embedding_values` itself when the op's loss is not finite.
    """
    if diagonal_layout not in DIAGONAL_LAYOUTS:
        raise ValueError(f"{fn}: diagonal_layout must be one of {DIAGONAL_LAYOUTS}, got {diagonal_layout!r}")
    _check_scores(fn, chosen_scores, rejected_scores, allow_empty)
    args = dict(beta=_check_number(fn, "beta", beta), margin=_check_number(fn, "margin", margin),
                tau=_check_number(fn, "tau", tau, positive=True),
                alpha=_check_number(fn, "alpha", alpha, unit_interval=True),
                weighting=_check_choice(fn, "weighting", weighting, WEIGHTINGS),
                weight_normalization=_check_choice(fn, "weight_normalization", weight_normalization,
                                                   WEIGHT_NORMALIZATIONS))
    if loss_scale is not None:
        args["loss_scale"] = _check_number(fn, "loss_scale", loss_scale)
    if weighting == "embedding":
        _check_embeddings(fn, chosen_scores, rejected_scores, chosen_embeddings, rejected_embeddings)
    if weighting == "diagonal":
        _check_diagonal(fn, chosen_scores.shape[0], rejected_scores.shape[0], diag_offset, diagonal_layout)

    if not torch.compiler.is_compiling():
        _check_finite_values(fn, "chosen_scores", chosen_scores)
        _check_finite_values(fn, "rejected_scores", rejected_scores)
    if weighting == "embedding" and embedding_values:
        check_embedding_values(fn, chosen_embeddings, rejected_embeddings)
    return args
