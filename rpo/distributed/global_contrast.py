"""Global contrast: one M×N contrast matrix across the ranks of a data-parallel group.

Rows (chosen answers) stay on their rank. Columns (rejected scores and, for "embedding" weighting, their prompt
embeddings) are all-gathered, so every row is normalised over the global columns and the loss is the one of the
concatenated global batch (ranks in group-rank order, each rank's rows/columns in local order):

    L = 1/(M·N) Σ_{i<M, j<N} softplus(−ω_ij (β(a_i − b_j) − margin)),   M = Σ_r M_r, N = Σ_r N_r.

Every rank computes its row block (local rows × global columns) with `rpo.ops.contrast_loss_and_grads`, which
also returns the block's gradients, in at least float32 (bfloat16 scores are widened first, so partial sums are
never rounded to bfloat16 before they are added up). The partial losses and the column gradients are summed in one all-reduce inside
the forward, so the backward is local: it needs no collective and a rank that never calls backward cannot hang the
others. Each rank's backward yields the exact partial derivatives of the global L w.r.t. its own scores.

Collectives per call (every rank takes part in each, including ranks with 0 rows and/or 0 columns):
  1. all-gather of a small int64 header per rank (M_r, N_r, embedding dim, needs-grad, dtypes, input error),
  2. all-gather of the columns, padded to the largest N_r: [N_max, 1 + D] per rank (score + embedding),
  3. all-reduce of [partial loss, ∂L_r/∂b for all N columns] (1 + N values; just the loss when no rank needs
     gradients), after which each rank keeps the slice of its own columns.
An all-reduce + slice is used instead of a reduce-scatter because the column gradients are N scalars and the
loss needs an all-reduce anyway: one collective instead of two, and it works on every gloo version.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.distributed as dist

from rpo.ops import check_contrast_inputs, contrast_loss_and_grads

# Dtypes a header can name; anything else is reported as "unsupported" by the op's own validation.
_HEADER_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
_NO_TENSOR = -1
# torch 2.13 renamed all_gather_into_tensor (now deprecated) to all_gather_single; older torch has only the former.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_HEADER_FIELDS = ("chosen rows", "rejected columns", "embedding dim", "needs grad", "score dtype",
                  "embedding dtype", "input error")


def _dtype_code(tensor) -> int:
    if not isinstance(tensor, torch.Tensor):
        return _NO_TENSOR
    return _HEADER_DTYPES.index(tensor.dtype) if tensor.dtype in _HEADER_DTYPES else len(_HEADER_DTYPES)


def _header_device(chosen_scores, group) -> torch.device:
    if isinstance(chosen_scores, torch.Tensor):
        return chosen_scores.device
    # Invalid input on this rank: the header must still reach the collective on a device the backend accepts.
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _exchange_headers(chosen_scores, rejected_scores, rejected_embeddings, needs_grad, local_error, group):
    """All-gather (M_r, N_r, D_r, needs_grad_r, dtypes, input error) and check they agree across ranks.

    All ranks see the same table, so they all raise together (instead of one rank raising and the others
    hanging in the next collective) when any rank's input was invalid or the shards are inconsistent.
    """
    if local_error is None:
        embedding_dim = rejected_embeddings.shape[1] if rejected_embeddings is not None else 0
        header = [chosen_scores.shape[0], rejected_scores.shape[0], embedding_dim, int(needs_grad),
                  _dtype_code(chosen_scores), _dtype_code(rejected_embeddings), 0]
    else:
        header = [0, 0, 0, 0, _NO_TENSOR, _NO_TENSOR, 1]
    header = torch.tensor(header, dtype=torch.int64, device=_header_device(chosen_scores, group))
    world_size = dist.get_world_size(group)
    table = torch.empty(world_size * header.numel(), dtype=torch.int64, device=header.device)
    _all_gather_single(table, header, group=group)
    shards = [dict(zip(_HEADER_FIELDS, values)) for values in table.view(world_size, -1).tolist()]

    failed = [rank for rank, shard in enumerate(shards) if shard["input error"]]
    if local_error is not None:
        raise local_error
    if failed:
        raise ValueError(f"global contrast: rank(s) {failed} of the process group rejected their inputs (their "
                         f"error says why); no rank computes the loss")
    for field in ("score dtype", "embedding dtype", "embedding dim"):
        values = [shard[field] for shard in shards]
        if len(set(values)) > 1:
            shown = [_HEADER_DTYPES[v] if "dtype" in field and 0 <= v < len(_HEADER_DTYPES) else v for v in values]
            raise ValueError(f"global contrast: {field} differs across the ranks of the process group "
                             f"(per rank: {shown}); every rank must pass the same dtypes and embedding width")
    return shards


def _gather_columns(rejected_scores, rejected_embeddings, shards, group):
    """All-gather the columns (score and embedding per rejected answer), padded to the largest shard."""
    column_counts = [shard["rejected columns"] for shard in shards]
    max_columns = max(column_counts)
    embedding_dim = shards[0]["embedding dim"]
    payload_dtype = rejected_scores.dtype
    if rejected_embeddings is not None:
        payload_dtype = torch.promote_types(payload_dtype, rejected_embeddings.dtype)
    payload = torch.zeros(max_columns, 1 + embedding_dim, dtype=payload_dtype, device=rejected_scores.device)
    local_columns = rejected_scores.shape[0]
    payload[:local_columns, 0] = rejected_scores.detach()
    if rejected_embeddings is not None:
        payload[:local_columns, 1:] = rejected_embeddings.detach()
    gathered = torch.empty(len(shards) * max_columns, 1 + embedding_dim, dtype=payload_dtype, device=payload.device)
    _all_gather_single(gathered, payload, group=group)
    columns = torch.cat([gathered[r * max_columns: r * max_columns + count] for r, count in enumerate(column_counts)])
    global_scores = columns[:, 0].to(rejected_scores.dtype)
    global_embeddings = columns[:, 1:].to(rejected_embeddings.dtype) if rejected_embeddings is not None else None
    return global_scores, global_embeddings


@dataclass(frozen=True)
class GlobalColumns:
    """What one rank sees of the global matrix: every rank's columns and where its own rows and columns sit.

    rejected_scores [N] (detached, score dtype) and rejected_embeddings [N, D] (None unless "embedding"
    weighting) are all ranks' columns in group-rank order; this rank's rows are the global rows
    row_offset .. row_offset + M_r - 1 (so row i's diagonal is global column row_offset + i); its columns
    start at column_offset. global_rows is M = Σ_r M_r; shard_sizes the (M_r, N_r) of every rank (the same
    table on every rank, so a check on it passes or fails on all ranks together).
    """

    rejected_scores: torch.Tensor
    rejected_embeddings: Optional[torch.Tensor]
    row_offset: int
    column_offset: int
    global_rows: int
    shard_sizes: Tuple[Tuple[int, int], ...]


def _check_global_batch(shards, weighting):
    global_rows = sum(shard["chosen rows"] for shard in shards)
    global_columns = sum(shard["rejected columns"] for shard in shards)
    if global_rows == 0 or global_columns == 0:
        raise ValueError(f"global contrast: the global batch has {global_rows} chosen and {global_columns} "
                         f"rejected answers over {len(shards)} ranks; it needs at least one of each")
    if weighting == "diagonal" and (global_rows != global_columns or global_columns < 2):
        raise ValueError(f"global contrast: weighting='diagonal' needs a square global matrix with at least 2 "
                         f"pairs, got {global_rows} chosen × {global_columns} rejected "
                         f"(per-rank chosen {[shard['chosen rows'] for shard in shards]}, "
                         f"rejected {[shard['rejected columns'] for shard in shards]})")


def _global_loss_and_local_grads(chosen_scores, rejected_scores, chosen_embeddings, columns, options, shards, group):
    global_columns = columns.rejected_scores.shape[0]
    any_needs_grad = any(shard["needs grad"] for shard in shards)
    # The op computes bfloat16 scores in float32 anyway; handing it float32 copies returns float32 partial loss
    # and column gradients, which are then summed over the ranks in float32 and rounded once at the end.
    compute_dtype = torch.promote_types(chosen_scores.dtype, torch.float32)
    loss, grad_chosen, grad_global_rejected = contrast_loss_and_grads(
        chosen_scores.detach().to(compute_dtype), columns.rejected_scores.to(compute_dtype),
        chosen_embeddings.detach() if chosen_embeddings is not None else None, columns.rejected_embeddings,
        diag_offset=columns.row_offset, loss_scale=1.0 / (columns.global_rows * global_columns),
        compute_grad=any_needs_grad, **options)

    reduced = torch.zeros(1 + (global_columns if any_needs_grad else 0), dtype=compute_dtype,
                          device=chosen_scores.device)
    reduced[0] = loss
    if any_needs_grad:
        reduced[1:] = grad_global_rejected
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM, group=group)
    global_loss = reduced[0].to(chosen_scores.dtype)
    if not any_needs_grad:
        return global_loss, None, None
    local_columns = rejected_scores.shape[0]
    grad_rejected = reduced[1 + columns.column_offset: 1 + columns.column_offset + local_columns]
    return global_loss, grad_chosen.to(chosen_scores.dtype), grad_rejected.to(rejected_scores.dtype)


class _GlobalContrastLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, chosen_scores, rejected_scores, chosen_embeddings, columns, options, shards, group):
        loss, grad_chosen, grad_rejected = _global_loss_and_local_grads(
            chosen_scores, rejected_scores, chosen_embeddings, columns, options, shards, group)
        if grad_chosen is not None:
            ctx.save_for_backward(grad_chosen, grad_rejected)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        grad_chosen, grad_rejected = ctx.saved_tensors
        # Embeddings get no gradient (they come from a frozen sentence encoder); None counts as zero.
        return grad_loss * grad_chosen, grad_loss * grad_rejected, None, None, None, None, None


def global_contrast_loss_and_columns(
        chosen_scores: torch.Tensor, rejected_scores: torch.Tensor, *, beta: float,
        process_group: Optional[dist.ProcessGroup], weighting: str = "embedding",
        chosen_embeddings: Optional[torch.Tensor] = None, rejected_embeddings: Optional[torch.Tensor] = None,
        tau: float = 0.5, alpha: float = 0.8, weight_normalization: str = "row",
        margin: float = 0.0) -> Tuple[torch.Tensor, GlobalColumns]:
    """`global_contrast_loss` and the gathered `GlobalColumns` it contrasted this rank's rows with.

    For statistics of the global matrix (rpo.losses' contrast/* metrics) without gathering the columns twice.
    """
    if process_group is None:
        raise ValueError("global_contrast_loss: process_group is None; use rpo.ops.contrast_loss for one process")
    local_error = None
    try:
        # "global": the diagonal's shape is checked on the global sizes (below); locally it is any M_r × N_r.
        check_contrast_inputs("rpo.distributed.global_contrast_loss", chosen_scores, rejected_scores,
                              chosen_embeddings, rejected_embeddings, beta=beta, margin=margin, tau=tau, alpha=alpha,
                              weighting=weighting, weight_normalization=weight_normalization, allow_empty=True,
                              diagonal_layout="global")
    except (TypeError, ValueError) as error:
        local_error = error
    if weighting != "embedding":
        chosen_embeddings = rejected_embeddings = None
    needs_grad = local_error is None and torch.is_grad_enabled() and (
        chosen_scores.requires_grad or rejected_scores.requires_grad)
    shards = _exchange_headers(chosen_scores, rejected_scores, rejected_embeddings, needs_grad, local_error,
                               process_group)
    _check_global_batch(shards, weighting)
    rank = dist.get_rank(process_group)
    global_scores, global_embeddings = _gather_columns(rejected_scores, rejected_embeddings, shards, process_group)
    columns = GlobalColumns(
        rejected_scores=global_scores, rejected_embeddings=global_embeddings,
        row_offset=sum(shard["chosen rows"] for shard in shards[:rank]),
        column_offset=sum(shard["rejected columns"] for shard in shards[:rank]),
        global_rows=sum(shard["chosen rows"] for shard in shards),
        shard_sizes=tuple((shard["chosen rows"], shard["rejected columns"]) for shard in shards))
    options = dict(beta=beta, margin=margin, tau=tau, alpha=alpha, weighting=weighting,
                   weight_normalization=weight_normalization)
    loss = _GlobalContrastLoss.apply(chosen_scores, rejected_scores, chosen_embeddings, columns, options, shards,
                                     process_group)
    return loss, columns


def global_contrast_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor, *, beta: float,
                         process_group: Optional[dist.ProcessGroup], weighting: str = "embedding",
                         chosen_embeddings: Optional[torch.Tensor] = None,
                         rejected_embeddings: Optional[torch.Tensor] = None, tau: float = 0.5, alpha: float = 0.8,
                         weight_normalization: str = "row", margin: float = 0.0) -> torch.Tensor:
    """Contrast loss of the global batch over `process_group` (the data-parallel group only).

    Same keywords and semantics as `rpo.ops.contrast_loss` (the local loss). Each rank passes its own M_r chosen
    and N_r rejected scores (M_r, N_r may differ between ranks and may be 0; every rank must call this,
    collectively, in the same order). Returns the global loss, identical on every rank; its backward gives this
    rank the exact partial derivatives of the global loss w.r.t. its own scores. Embeddings get no gradient.
    "diagonal" weighting needs Σ M_r = Σ N_r; the diagonal is taken in global (concatenated) index order.
    Invalid input on any rank raises on every rank. For the gradient seen by the optimizer under a DP wrapper
    that averages gradients, multiply this loss by `data_parallel_loss_scale(process_group)` before backward.
    """
    loss, _ = global_contrast_loss_and_columns(
        chosen_scores, rejected_scores, beta=beta, process_group=process_group, weighting=weighting,
        chosen_embeddings=chosen_embeddings, rejected_embeddings=rejected_embeddings, tau=tau, alpha=alpha,
        weight_normalization=weight_normalization, margin=margin)
    return loss
