"""Per-sequence log-probabilities of response tokens from a (tensor-parallel) megatron GPTModel.

Batch: {input_ids [R, T], attention_mask [R, T] (1 = real token), loss_mask [R, T] bool}. loss_mask[r, t] is True
where input_ids[r, t] is a response token; its log-prob is log p(input_ids[r, t] | input_ids[r, <t]), so t ≥ 1.
All R rows (chosen then rejected) go through one forward.

Memory: the decoder's final hidden states are computed once; the response positions are gathered and pushed
through the output layer (this rank's vocabulary shard) in chunks of `chunk_size` tokens along the sequence, each
chunk's fp32 logits reduced at once to the target's log-prob with megatron's vocab-parallel cross-entropy
arithmetic, and freed. One autograd function does all chunks (`_ChunkedTokenLogProbs`): between forward and
backward it keeps the selected hidden states and two floats per token (max logit, Σexp), and its backward
recomputes each chunk's logits with one matmul and turns them into their gradient in place (the output weight's
gradient arrives once per backward, as megatron's DDP requires). Peak log-prob memory is O(chunk_size ×
padded_vocab / TP), never the whole batch's logits. Padded vocabulary columns are set to the float32 minimum
before the softmax, so they carry no probability.
With megatron sequence parallelism the decoder's output (T/TP positions per rank) is gathered along the sequence
first (rpo.models.gpt.hidden_states_with_mask), so the same positions and chunks are scored on every TP rank.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from rpo.models import gpt as gpt_lib

BATCH_KEYS = ("input_ids", "attention_mask", "loss_mask")
DEFAULT_CHUNK_SIZE = 1024


@dataclass
class SequenceLogProbs:
    sums: torch.Tensor  # [R] float32: Σ_t loss_mask · log p, differentiable
    counts: torch.Tensor  # [R] int64: response tokens per row
    token_logprobs: torch.Tensor | None  # [R, T] float32, 0 where loss_mask is False


def validate_batch(batch: Mapping[str, torch.Tensor], vocab_size: int):
    """Check a log-prob batch; returns (input_ids, attention_mask, loss_mask) with pad ids replaced by 0."""
    missing = [key for key in BATCH_KEYS if key not in batch]
    if missing:
        raise KeyError(f"batch is missing {missing} (needs {list(BATCH_KEYS)})")
    input_ids, attention_mask, loss_mask = (batch[key] for key in BATCH_KEYS)
    for key, value in zip(BATCH_KEYS, (input_ids, attention_mask, loss_mask)):
        if not isinstance(value, torch.Tensor) or value.dim() != 2:
            raise ValueError(f"batch[{key!r}] must be a 2-D tensor [rows, tokens], got "
                             f"{getattr(value, 'shape', type(value).__name__)}")
    if attention_mask.shape != input_ids.shape or loss_mask.shape != input_ids.shape:
        raise ValueError(f"input_ids {tuple(input_ids.shape)}, attention_mask {tuple(attention_mask.shape)} and "
                         f"loss_mask {tuple(loss_mask.shape)} must have the same shape")
    if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise ValueError(f"batch['input_ids'] must hold integer token ids, got dtype {input_ids.dtype}")
    if loss_mask.dtype != torch.bool:
        raise ValueError(f"batch['loss_mask'] must be a bool tensor, got dtype {loss_mask.dtype}")
    if input_ids.shape[1] < 2:
        raise ValueError(f"sequences need at least 2 tokens to score a response, got T={input_ids.shape[1]}")
    attended = attention_mask.bool()

    def rows(bad: torch.Tensor) -> list[int]:
        return bad.nonzero().flatten().tolist()[:10]

    if loss_mask[:, 0].any():
        raise ValueError(f"loss_mask[:, 0] is True in rows {rows(loss_mask[:, 0])}: the first token has no context")
    outside = (loss_mask & ~attended).any(dim=1)
    if outside.any():
        raise ValueError(f"loss_mask marks padding (attention_mask == 0) in rows {rows(outside)}")
    out_of_range = (attended & ((input_ids < 0) | (input_ids >= vocab_size))).any(dim=1)
    if out_of_range.any():
        raise ValueError(f"input_ids outside [0, {vocab_size}) at attended positions in rows {rows(out_of_range)}")
    # Padding ids (often -100 or a pad id) never influence attended positions; 0 keeps the embedding lookup valid.
    return input_ids.masked_fill(~attended, 0), attended.long(), loss_mask


def vocab_parallel_token_logprobs(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """log p(target) from this TP rank's vocabulary shard of the logits [..., padded_vocab/TP]; float32.

    Columns at global index ≥ vocab_size (padding) are excluded from the softmax.
    """
    from megatron.core import parallel_state, tensor_parallel

    width = logits.shape[-1]
    start = parallel_state.get_tensor_model_parallel_rank() * width
    valid = min(max(vocab_size - start, 0), width)
    logits = logits.float().contiguous()  # the cross-entropy views it as [-1, width]
    if valid < width:
        padding = torch.arange(width, device=logits.device) >= valid
        logits = logits.masked_fill(padding, torch.finfo(torch.float32).min)
    # vocab_parallel_cross_entropy overwrites its float32 input in place; `logits` is not used again.
    return -tensor_parallel.vocab_parallel_cross_entropy(logits, targets)


def token_logprobs_from_logits(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) from full-vocabulary logits [..., V] (one process holds the whole vocabulary); float32.

    logsumexp + gather: no second vocabulary-sized tensor (log_softmax would make one).
    """
    logits = logits.float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)


def response_token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor,
                            token_logprobs: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
                            = token_logprobs_from_logits) -> torch.Tensor:
    """[R, T] float32: log p(input_ids[r, t] | input_ids[r, <t]) where loss_mask[r, t], else 0 (always 0 at t = 0).

    `logits` [R, T, V'] come from one forward of input_ids: position t − 1 predicts token t. `token_logprobs`
    maps (logits, targets) to log p(target): the full-vocabulary version by default, or
    `vocab_parallel_token_logprobs` for a tensor-parallel shard of the vocabulary.
    """
    logp = token_logprobs(logits[:, :-1], input_ids[:, 1:])
    return torch.cat([logp.new_zeros(logp.shape[0], 1), logp], dim=1) * loss_mask


class _ChunkedTokenLogProbs(torch.autograd.Function):
    """log p(target) of n selected positions through the (vocab-parallel) output layer, `chunk` tokens at a time.

    The arithmetic is megatron's vocab-parallel cross-entropy, op for op (max, subtract, exp, sum, log; the
    backward (softmax − onehot) · (−g) and the output layer's two matmuls), so the values are those of
    `output_layer` + `vocab_parallel_token_logprobs`. What differs is what is kept: per token only its max logit
    and Σexp (no [n, vocab] tensor between forward and backward), and the forward computes no softmax. The backward
    recomputes each chunk's logits (one matmul) and turns them into the logits' gradient in place. `hidden` must
    already be in the tensor-parallel region (its gradient here is this rank's vocabulary shard's part).
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, vocab_size: int, chunk: int):
        pieces, maxima, sums = [], [], []
        for start in range(0, hidden.shape[0], chunk):
            logits = _masked_logits(hidden[start:start + chunk], weight, vocab_size)
            target_logits, logits_max, sum_exp = _vocab_parallel_statistics(logits, targets[start:start + chunk])
            pieces.append(target_logits - torch.log(sum_exp))
            maxima.append(logits_max)
            sums.append(sum_exp)
        ctx.save_for_backward(hidden, weight, targets, torch.cat(maxima), torch.cat(sums))
        ctx.vocab_size, ctx.chunk = vocab_size, chunk
        return torch.cat(pieces)

    @staticmethod
    def backward(ctx, grad_logp):
        hidden, weight, targets, logits_max, sum_exp = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = None
        start_column, width = _vocab_shard(weight.shape[0])
        for start in range(0, hidden.shape[0], ctx.chunk):
            end = min(start + ctx.chunk, hidden.shape[0])
            softmax = _masked_logits(hidden[start:end], weight, ctx.vocab_size)
            softmax -= logits_max[start:end].unsqueeze(-1)
            torch.exp(softmax, out=softmax)
            softmax.div_(sum_exp[start:end].unsqueeze(-1))
            # megatron's _VocabParallelCrossEntropy.backward: (softmax − onehot) · dloss, dloss = −dlogp
            local = targets[start:end] - start_column
            mine = (local >= 0) & (local < width)
            rows = torch.arange(end - start, device=softmax.device)
            softmax[rows, local.clamp(0, width - 1)] -= mine.float()
            softmax.mul_(-grad_logp[start:end].unsqueeze(-1))
            grad_logits = softmax.to(weight.dtype)
            if grad_hidden is not None:
                grad_hidden[start:end] = grad_logits.matmul(weight)
            if ctx.needs_input_grad[1]:
                part = grad_logits.t().matmul(hidden[start:end])
                grad_weight = part if grad_weight is None else grad_weight.add_(part)
        return grad_hidden, grad_weight, None, None, None


def _vocab_shard(width: int) -> tuple[int, int]:
    """(first global vocabulary column, columns) of this tensor-parallel rank's `width`-column shard."""
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_rank() * width, width


def _masked_logits(hidden: torch.Tensor, weight: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """float32 logits [n, V/TP] of this rank's shard; padded vocabulary columns at the float32 minimum."""
    logits = hidden.matmul(weight.t()).float()
    start, width = _vocab_shard(weight.shape[0])
    valid = min(max(vocab_size - start, 0), width)
    if valid < width:
        logits[:, valid:] = torch.finfo(torch.float32).min
    return logits


def _vocab_parallel_statistics(logits: torch.Tensor, targets: torch.Tensor):
    """(target logit − max, max, Σ exp(logit − max)) over the whole vocabulary (all-reduced over TP), as megatron's
    vocab-parallel cross-entropy computes them; overwrites `logits`."""
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    tensor_parallel = parallel_state.get_tensor_model_parallel_world_size() > 1
    logits_max = logits.max(dim=-1)[0]
    if tensor_parallel:
        torch.distributed.all_reduce(logits_max, op=torch.distributed.ReduceOp.MAX, group=group)
    logits -= logits_max.unsqueeze(-1)
    start, width = _vocab_shard(logits.shape[-1])
    local = targets - start
    mine = (local >= 0) & (local < width)
    target_logits = logits[torch.arange(logits.shape[0], device=logits.device), local.clamp(0, width - 1)]
    target_logits = torch.where(mine, target_logits, torch.zeros_like(target_logits))
    torch.exp(logits, out=logits)
    sum_exp = logits.sum(dim=-1)
    if tensor_parallel:
        torch.distributed.all_reduce(target_logits, group=group)
        torch.distributed.all_reduce(sum_exp, group=group)
    return target_logits, logits_max, sum_exp


def logprobs_from_hidden(model, hidden: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor,
                         chunk_size: int = DEFAULT_CHUNK_SIZE, return_token_logprobs: bool = True
                         ) -> SequenceLogProbs:
    """Response-token log-probs from final hidden states [T, R, h] (see module docstring for the chunking)."""
    from megatron.core import parallel_state, tensor_parallel

    if chunk_size < 1:
        raise ValueError(f"chunk_size must be ≥ 1, got {chunk_size}")
    gpt = gpt_lib.unwrap(model)
    vocab_size = gpt_lib.model_info(gpt).vocab_size
    weight = gpt_lib.output_weight(gpt)
    weight = weight if weight is not None else gpt.output_layer.weight
    rows = input_ids.shape[0]
    scored = loss_mask[:, 1:].t()  # [T-1, R]: position t+1 is predicted from hidden state t
    selected = hidden[:-1][scored].to(weight.dtype)  # [n, h], in sequence order
    targets = input_ids[:, 1:].t()[scored]
    if selected.shape[0] == 0:
        logp = hidden.new_zeros(0, dtype=torch.float32)
    else:
        if parallel_state.get_tensor_model_parallel_world_size() > 1 and torch.is_grad_enabled():
            # As the output layer (ColumnParallelLinear) does: the states are replicated over TP, so the
            # gradient of each rank's vocabulary shard is summed over TP in backward.
            selected = tensor_parallel.copy_to_tensor_model_parallel_region(selected)
        logp = _ChunkedTokenLogProbs.apply(selected, weight, targets, vocab_size, chunk_size)
    per_token = torch.zeros(scored.shape, dtype=torch.float32, device=hidden.device).masked_scatter(scored, logp)
    token_logprobs = None
    if return_token_logprobs:
        token_logprobs = torch.cat([per_token.new_zeros(rows, 1), per_token.t()], dim=1)
    return SequenceLogProbs(sums=per_token.sum(dim=0), counts=loss_mask.sum(dim=1), token_logprobs=token_logprobs)


def _on_device(model, tensor: torch.Tensor) -> torch.Tensor:
    device = next(gpt_lib.unwrap(model).parameters()).device
    return tensor.to(device)


def sequence_logprobs(model, batch: Mapping[str, torch.Tensor], chunk_size: int = DEFAULT_CHUNK_SIZE,
                      return_token_logprobs: bool = True) -> SequenceLogProbs:
    """Per-sequence sums and counts of response-token log-probs; one forward of all rows, chunked logits.

    `model` is a GPTModel built by rpo.models (optionally wrapped in megatron DDP / Float16Module). Every TP rank
    of a group passes the same batch and gets the same result.
    """
    info = gpt_lib.model_info(model)
    input_ids, attention_mask, loss_mask = (_on_device(model, t) for t in validate_batch(batch, info.vocab_size))
    hidden = gpt_lib.forward_hidden_states(model, input_ids, attention_mask)
    return logprobs_from_hidden(model, hidden, input_ids, loss_mask, chunk_size, return_token_logprobs)


def sequence_logprobs_full_logits(model, batch: Mapping[str, torch.Tensor]) -> SequenceLogProbs:
    """Reference path: GPTModel's own forward to full logits [R, T, padded_vocab/TP], no chunking.

    Materialises the whole batch's logits; meant for tests and debugging.
    """
    info = gpt_lib.model_info(model)
    input_ids, attention_mask, loss_mask = (_on_device(model, t) for t in validate_batch(batch, info.vocab_size))
    logits = gpt_lib.full_logits(model, input_ids, attention_mask)
    per_token = response_token_logprobs(
        logits, input_ids, loss_mask,
        lambda shard, targets: vocab_parallel_token_logprobs(shard, targets, info.vocab_size))
    return SequenceLogProbs(sums=per_token.sum(dim=1), counts=loss_mask.sum(dim=1), token_logprobs=per_token)


def concat_batches(*batches: Mapping[str, torch.Tensor], pad_token_id: int = 0) -> dict[str, torch.Tensor]:
    """Stack batches row-wise (e.g. chosen then rejected), right-padding each to the longest T."""
    if not batches:
        raise ValueError("concat_batches needs at least one batch")
    length = max(b["input_ids"].shape[1] for b in batches)
    out = {}
    for key in BATCH_KEYS:
        fill = pad_token_id if key == "input_ids" else 0
        parts = []
        for i, b in enumerate(batches):
            if key not in b:
                raise KeyError(f"batch {i} is missing {key!r}")
            t = b[key]
            parts.append(torch.nn.functional.pad(t, (0, length - t.shape[1]), value=fill))
        out[key] = torch.cat(parts, dim=0)
    return out
