"""2-rank worker (gloo; started by tests/multirank.py) for tests/models/test_megatron_models.py.

One launch of 2 processes runs every distributed check, because each launch costs seconds of imports:
  phase TP=2 (DP=1): log-probs (chunked, full-logits and packed, with gradients) of a tiny LLaMA and Mistral,
    memory of the chunked path, HF export (round trip), megatron dist_checkpointing save, DDP + megatron SGD step
    with gradient clipping, DistributedOptimizer (Adam) step, frozen reference copy, each recompute mode (loss,
    gradients, saved activations, one DDP SGD step);
  phase TP=1 (DP=2): log-probs of each DP rank's rows, unpacked vs packed log-probs of the whole batch, each
    recompute mode, dist checkpoint (saved at TP=2) loaded at TP=1, DDP SGD step with the batch split over DP,
    bf16 model and its Float16Optimizer step.
The parent test builds the HF models and batch in `workdir`, computes the references and asserts on what the
workers write to `workdir/results-rank{r}.pt`. Nothing here asserts numbers; it only records them.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path


# ----------------------------------------------------------------------------------------------------------------
# Worker side.

def _batch(workdir: Path):
    import torch

    return torch.load(workdir / "batch.pt", weights_only=True)


def _rows(batch, rows):
    return {k: v[rows] for k, v in batch.items()}


def _grads(model) -> dict:
    from rpo.models import unwrap

    return {n: p.grad.detach().clone() for n, p in unwrap(model).named_parameters() if p.grad is not None}


def _mean_logprob_loss(out):
    return -(out.sums / out.counts).mean()


def _sgd_step(model, batch, lr: float, clip: float, dtype, rows=None):
    """DDP-wrap `model`, run megatron's no-pipelining schedule on `batch` (this rank's rows), take one
    megatron SGD step with gradient clipping. Returns (ddp_model, optimizer, loss, grad_norm)."""
    import torch
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from rpo.models import sequence_logprobs

    config = model.config
    ddp = DistributedDataParallel(config=config, module=model,
                                  ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True))
    config.finalize_model_grads_func = finalize_model_grads
    opt = get_megatron_optimizer(
        OptimizerConfig(optimizer="sgd", lr=lr, weight_decay=0.0, sgd_momentum=0.0, clip_grad=clip,
                        bf16=dtype == torch.bfloat16, params_dtype=dtype),
        [ddp])
    local = batch if rows is None else _rows(batch, rows)
    losses = []

    def forward_step(data_iterator, m):
        out = sequence_logprobs(m, next(data_iterator), chunk_size=7, return_token_logprobs=False)
        loss = _mean_logprob_loss(out)

        def loss_func(output):
            losses.append(output.detach().clone())
            return output, {"loss": output.detach().clone()}

        return loss, loss_func

    ddp.zero_grad_buffer()
    opt.zero_grad()
    get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter([local]), model=[ddp],
                                num_microbatches=1, seq_length=local["input_ids"].shape[1],
                                micro_batch_size=local["input_ids"].shape[0], forward_only=False)
    ok, grad_norm, _ = opt.step()
    return ddp, opt, float(losses[0]), float(grad_norm), bool(ok)


def _optimizer_class(opt) -> str:
    # get_megatron_optimizer wraps its optimizers in a ChainedOptimizer.
    inner = getattr(opt, "chained_optimizers", [opt])
    return type(inner[0]).__name__


def _vocab_tensor_stats(fn, width: int, hidden: int) -> tuple[int, int]:
    """Run fn() and backward; returns (largest tensor of shape [..., width] any op produced in forward or
    backward, total numel of such tensors autograd kept from forward for backward). The transposed output
    weight [hidden, width] is not activation memory and is skipped."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    largest, saved = [0], [0]

    def vocab_sized(t) -> bool:
        return isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[-1] == width and \
            tuple(t.shape) != (hidden, width)

    class Sizes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_leaves(out):
                if vocab_sized(t):
                    largest[0] = max(largest[0], t.numel())
            return out

    def pack(t):
        if vocab_sized(t):
            saved[0] += t.numel()
        return t

    with Sizes():
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = fn()
        out.sum().backward()
    return largest[0], saved[0]


def _packing_case(model, batch, spec: dict, res: dict, prefix: str) -> None:
    """Packed log-probs (values and gradients) of the whole batch, beside the plan's padding numbers."""
    from rpo.models.packing import packed_sequence_logprobs, plan_packing

    plan = plan_packing(batch["attention_mask"], spec["pack_length"])
    model.zero_grad()
    packed = packed_sequence_logprobs(model, batch, plan, chunk_size=spec["chunk_size"])
    packed.sums.sum().backward()
    res[f"{prefix}/packed_token_logprobs"] = packed.token_logprobs.detach()
    res[f"{prefix}/packed_sums"] = packed.sums.detach()
    res[f"{prefix}/packed_counts"] = packed.counts
    res[f"{prefix}/packed_grads"] = _grads(model)
    res[f"{prefix}/packed_shape"] = (plan.packed_rows, plan.packed_length)
    res[f"{prefix}/padding"] = (plan.padding_fraction_unpacked, plan.padding_fraction_packed, plan.padding_removed)
    model.zero_grad()


def _recompute_case(workdir: Path, batch, spec: dict, res: dict, prefix: str, tp: int) -> None:
    """Loss, gradients and the elements autograd saved for backward, for each recompute mode (training mode);
    at TP=2 also the weights after one DDP + megatron SGD step."""
    import torch

    from rpo.models import gather_hf_state, load_policy, sequence_logprobs
    from rpo.models.gpt import RECOMPUTE_MODES

    for mode in RECOMPUTE_MODES:
        model, _, _ = load_policy(workdir / "llama", tp_size=tp, recompute=mode)
        model.train()
        saved = [0]

        def count(tensor):
            saved[0] += tensor.numel()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(count, lambda tensor: tensor):
            loss = _mean_logprob_loss(sequence_logprobs(model, batch, chunk_size=spec["chunk_size"],
                                                        return_token_logprobs=False))
        loss.backward()
        res[f"{prefix}/{mode}/loss"] = loss.detach()
        res[f"{prefix}/{mode}/grads"] = _grads(model)
        res[f"{prefix}/{mode}/saved_elements"] = saved[0]
        if tp == 2:
            model, _, _ = load_policy(workdir / "llama", tp_size=tp, recompute=mode)
            ddp, _, step_loss, grad_norm, ok = _sgd_step(model, batch, spec["lr"], spec["clip"], torch.float32)
            res[f"{prefix}/{mode}/sgd"] = (step_loss, grad_norm, ok)
            res[f"{prefix}/{mode}/stepped"] = gather_hf_state(ddp)


def phase_tp2(workdir: Path, spec: dict, res: dict) -> None:
    import torch
    from megatron.core import dist_checkpointing

    from rpo.models import (
        forward_hidden_states, init_parallel, load_policy, reference_model, save_hf, sequence_logprobs,
        sequence_logprobs_full_logits, unwrap,
    )
    from rpo.models.logprobs import logprobs_from_hidden

    init_parallel(2)
    batch = _batch(workdir)
    for kind in ("llama", "mistral"):
        model, cfg, _ = load_policy(workdir / kind, tp_size=2)
        chunked = sequence_logprobs(model, batch, chunk_size=spec["chunk_size"])
        chunked.sums.sum().backward()
        grads_chunked = _grads(model)
        model.zero_grad()
        full = sequence_logprobs_full_logits(model, batch)
        full.sums.sum().backward()
        res[f"tp2/{kind}/token_logprobs"] = chunked.token_logprobs.detach()
        res[f"tp2/{kind}/sums"] = chunked.sums.detach()
        res[f"tp2/{kind}/counts"] = chunked.counts
        res[f"tp2/{kind}/full_token_logprobs"] = full.token_logprobs.detach()
        res[f"tp2/{kind}/grads_chunked"] = grads_chunked
        res[f"tp2/{kind}/grads_full"] = _grads(model)
        _packing_case(model, batch, spec, res, f"tp2/{kind}")
        save_hf(model, cfg, workdir / f"export-tp2-{kind}", tokenizer_src=workdir / kind)

    # Memory of the chunked path: the largest tensor autograd keeps, from hidden states onwards.
    model, cfg, _ = load_policy(workdir / "llama", tp_size=2)
    ids, am, lm = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
    with torch.no_grad():
        hidden = forward_hidden_states(model, ids, am)
    hidden.requires_grad_(True)
    width, hidden_size = unwrap(model).output_layer.weight.shape
    res["mem/chunk_size"] = 4
    res["mem/chunked"] = _vocab_tensor_stats(
        lambda: logprobs_from_hidden(model, hidden, ids, lm, chunk_size=4).sums, width, hidden_size)
    res["mem/unchunked"] = _vocab_tensor_stats(
        lambda: logprobs_from_hidden(model, hidden, ids, lm, chunk_size=10**9).sums, width, hidden_size)
    res["mem/padded_vocab_per_rank"] = unwrap(model).output_layer.weight.shape[0]
    res["mem/response_tokens"] = int(lm[:, 1:].sum())

    # megatron dist_checkpointing (its CPU redirects), saved at TP=2, loaded at TP=1 in the next phase.
    (workdir / "ckpt-llama-tp2").mkdir(exist_ok=True)
    dist_checkpointing.save(model.sharded_state_dict(), str(workdir / "ckpt-llama-tp2"))

    # DDP + megatron SGD with clipping, TP=2, DP=1, whole batch (a fresh model: no stale .grad from above).
    model, cfg, _ = load_policy(workdir / "llama", tp_size=2)
    ddp, opt, loss, grad_norm, ok = _sgd_step(model, batch, spec["lr"], spec["clip"], torch.float32)
    res["sgd_tp2/loss"], res["sgd_tp2/grad_norm"], res["sgd_tp2/ok"] = loss, grad_norm, ok
    save_hf(ddp, cfg, workdir / "export-sgd-tp2", tokenizer_src=workdir / "llama")

    # Frozen reference copy of the stepped policy: same shards, no grad, same log-probs.
    ref = reference_model(ddp)
    policy_params = dict(unwrap(ddp).named_parameters())
    res["ref/params_equal"] = all(torch.equal(p, policy_params[n]) for n, p in ref.named_parameters())
    res["ref/requires_grad"] = any(p.requires_grad for p in ref.parameters())
    res["ref/training"] = ref.training
    res["ref/policy_params_share_storage"] = any(
        p.data_ptr() == policy_params[n].data_ptr() for n, p in ref.named_parameters())
    with torch.no_grad():
        res["ref/logprob_max_diff"] = float((sequence_logprobs(ref, batch).token_logprobs
                                            - sequence_logprobs(ddp, batch).token_logprobs).abs().max())

    # DistributedOptimizer (Adam): built while CPU tensors report torch.cuda.* type names.
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    model, cfg, _ = load_policy(workdir / "llama", tp_size=2)
    ddp = DistributedDataParallel(config=model.config, module=model, ddp_config=DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=True))
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-3, weight_decay=0.0, clip_grad=0.0,
                                                 use_distributed_optimizer=True), [ddp])
    res["distopt/class"] = _optimizer_class(opt)
    # The CUDA type names were lent to the parameters only while the optimizer was built.
    res["distopt/param_types"] = sorted({p.type() for p in unwrap(ddp).parameters()})

    _recompute_case(workdir, batch, spec, res, "tp2/recompute", tp=2)


def phase_tp1(workdir: Path, spec: dict, res: dict) -> None:
    import torch
    from megatron.core import dist_checkpointing

    from rpo.models import build_gpt_model, init_parallel, load_hf_config, load_policy, save_hf, sequence_logprobs

    info = init_parallel(1)
    batch = _batch(workdir)
    rows_total = batch["input_ids"].shape[0]
    mine = list(range(info.dp_rank, rows_total, info.dp_size))
    res["tp1/rows"] = torch.tensor(mine)
    for kind in ("llama", "mistral"):
        model, cfg, _ = load_policy(workdir / kind, tp_size=1)
        with torch.no_grad():
            res[f"tp1/{kind}/token_logprobs"] = sequence_logprobs(model, _rows(batch, mine)).token_logprobs
        unpacked = sequence_logprobs(model, batch, chunk_size=spec["chunk_size"])
        unpacked.sums.sum().backward()
        res[f"tp1/{kind}/token_logprobs_all"] = unpacked.token_logprobs.detach()
        res[f"tp1/{kind}/grads_all"] = _grads(model)
        _packing_case(model, batch, spec, res, f"tp1/{kind}")

    _recompute_case(workdir, batch, spec, res, "tp1/recompute", tp=1)

    # dist checkpoint written at TP=2, loaded into a TP=1 model (resharding).
    cfg = load_hf_config(workdir / "llama")
    model = build_gpt_model(cfg, initialize=False)
    state = dist_checkpointing.load(model.sharded_state_dict(), str(workdir / "ckpt-llama-tp2"))
    model.load_state_dict(state, strict=False)
    with torch.no_grad():
        res["ckpt_tp1/token_logprobs"] = sequence_logprobs(model, _rows(batch, mine)).token_logprobs

    # DDP over DP=2: each rank its half of the rows, gradients averaged by megatron's DDP (gloo all-reduce).
    half = rows_total // info.dp_size
    model, cfg, _ = load_policy(workdir / "llama", tp_size=1)
    ddp, _, loss, grad_norm, ok = _sgd_step(model, batch, spec["lr"], spec["clip"], torch.float32,
                                            rows=list(range(info.dp_rank * half, (info.dp_rank + 1) * half)))
    res["sgd_dp2/loss"], res["sgd_dp2/grad_norm"], res["sgd_dp2/ok"] = loss, grad_norm, ok
    save_hf(ddp, cfg, workdir / "export-sgd-dp2", tokenizer_src=workdir / "llama")

    # bf16 parameters: log-probs, and megatron's Float16OptimizerWithFloat16Params (fp32 main params).
    model, cfg, _ = load_policy(workdir / "llama", tp_size=1, dtype="bf16")
    res["bf16/param_dtype"] = str(next(model.parameters()).dtype)
    with torch.no_grad():
        res["bf16/token_logprobs"] = sequence_logprobs(model, _rows(batch, mine)).token_logprobs
    ddp, opt, loss, grad_norm, ok = _sgd_step(model, batch, spec["lr_bf16"], 0.0, torch.bfloat16,
                                              rows=list(range(info.dp_rank * half, (info.dp_rank + 1) * half)))
    res["bf16/optimizer"] = _optimizer_class(opt)
    save_hf(ddp, cfg, workdir / "export-sgd-bf16", tokenizer_src=workdir / "llama")


def main(workdir: Path) -> None:
    import torch
    import torch.distributed as dist

    from rpo.models import teardown

    spec = json.loads((workdir / "spec.json").read_text())
    res: dict = {}
    try:
        start = time.time()
        phase_tp2(workdir, spec, res)
        res["time/tp2"] = time.time() - start
        phase_tp1(workdir, spec, res)
        res["time/tp1"] = time.time() - start - res["time/tp2"]
        torch.save(res, workdir / f"results-rank{dist.get_rank()}.pt")
    finally:
        teardown()


if __name__ == "__main__":  # dist_checkpointing starts a spawn-context Manager: this guard is required
    main(Path(sys.argv[1]))
