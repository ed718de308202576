"""2-rank worker (gloo, TP=2; started by tests/multirank.py) for tests/models/test_sequence_parallel.py.

For a tiny LLaMA and a tiny Mistral (window smaller than the sequence), on a batch whose length is odd (so the
sequence-parallel forward pads it to a multiple of TP): log-probs and the gradients megatron's DDP holds after
`finalize_model_grads`, with and without sequence parallelism, for the padded batch and packed rows, with full
recomputation, through GPTModel's own full-logits forward and through the frozen reference copy. It only records
(results-rank{r}.pt); the test asserts.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

TP = 2


def _shard_rows(model) -> list:
    """Positions (first dim) the input of every norm of the decoder holds on this rank, from forward hooks."""
    import torch

    from rpo.models.local_layers import RMSNorm

    seen: list = []
    handles = [module.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
               for module in model.modules() if isinstance(module, (torch.nn.RMSNorm, RMSNorm))]
    return seen, handles


def _case(workdir: Path, kind: str, batch, spec: dict, *, sp: bool, recompute: str = "none", packed: bool = False):
    import torch
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed import finalize_model_grads

    from rpo.models import load_policy, packed_sequence_logprobs, reference_model, sequence_logprobs
    from rpo.models.logprobs import sequence_logprobs_full_logits

    model, _, _ = load_policy(workdir / kind, tp_size=TP, recompute=recompute, sequence_parallel=sp)
    reference = reference_model(model)
    ddp = DistributedDataParallel(config=model.config, module=model,
                                  ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True))
    ddp.train()
    ddp.zero_grad_buffer()
    rows, handles = _shard_rows(model)
    if packed:
        out = packed_sequence_logprobs(ddp, batch, spec["pack_length"], chunk_size=spec["chunk_size"])
    else:
        out = sequence_logprobs(ddp, batch, chunk_size=spec["chunk_size"])
    for handle in handles:
        handle.remove()
    loss = -(out.sums / out.counts).mean()
    loss.backward()
    finalize_model_grads([ddp])  # DP all-reduce, and the TP sum of the sequence-parallel norm weights' gradients
    result = {"token_logprobs": out.token_logprobs.detach(), "loss": loss.detach(), "norm_rows": sorted(set(rows)),
              "grads": {name: param.main_grad.detach().clone() for name, param in model.named_parameters()},
              "sequence_parallel_params": sorted(name for name, param in model.named_parameters()
                                                 if getattr(param, "sequence_parallel", False))}
    if not packed and recompute == "none":
        with torch.no_grad():
            result["reference_token_logprobs"] = sequence_logprobs(reference, batch).token_logprobs
            model.eval()
            result["full_logits_token_logprobs"] = sequence_logprobs_full_logits(model, batch).token_logprobs
    return result


def main(workdir: Path) -> None:
    import torch
    import torch.distributed as dist

    from rpo.models import init_parallel, teardown

    spec = json.loads((workdir / "spec.json").read_text())
    batch = torch.load(workdir / "batch.pt", weights_only=True)
    init_parallel(TP)
    res: dict = {}
    try:
        for kind in ("llama", "mistral"):
            for variant, options in (("baseline", {}), ("packed", dict(packed=True))):
                res[f"{kind}/{variant}"] = _case(workdir, kind, batch, spec, sp=False, **options)
                res[f"{kind}/{variant}/sp"] = _case(workdir, kind, batch, spec, sp=True, **options)
        res["llama/full/sp"] = _case(workdir, "llama", batch, spec, sp=True, recompute="full")
        torch.save(res, workdir / f"results-rank{dist.get_rank()}.pt")
    finally:
        teardown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
