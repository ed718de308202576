"""2-rank worker (gloo; started by tests/multirank.py) for tests/models/test_model_families.py.

One launch runs every family (Qwen2, Qwen3, Gemma 3, Mixtral, Qwen3-MoE) at each layout, because each launch
costs seconds of imports:
  TP=2 (DP=1): every rank scores the whole batch, unpacked and packed, without (dense models) and with megatron's
    sequence parallelism (which megatron's MoE layer needs at TP > 1 in training); the model is exported to an
    HF folder;
  TP=1, DP=2, and for MoE models also EP=2 (the experts split over the two ranks, tokens exchanged by
    all-to-all): rank r scores rows r, r+2, ... (unequal token counts per rank), unpacked and packed; MoE models
    are exported from EP=2.
The parent test builds the HF models and the batch in `workdir`, computes the float64 references and asserts on
what the workers write to `workdir/results-rank{r}.pt`. Nothing here asserts numbers; it only records them.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def _score(model, batch, pack_length: int, res: dict, prefix: str) -> None:
    import torch

    from rpo.models import sequence_logprobs
    from rpo.models.packing import packed_sequence_logprobs, plan_packing

    with torch.no_grad():
        unpacked = sequence_logprobs(model, batch, chunk_size=37)
        plan = plan_packing(batch["attention_mask"], pack_length)
        packed = packed_sequence_logprobs(model, batch, plan, chunk_size=37)
    res[f"{prefix}/sums"] = unpacked.sums
    res[f"{prefix}/token_logprobs"] = unpacked.token_logprobs
    res[f"{prefix}/packed_sums"] = packed.sums
    res[f"{prefix}/packed_token_logprobs"] = packed.token_logprobs
    res[f"{prefix}/packed_shape"] = (plan.packed_rows, plan.packed_length)


def main(workdir: Path) -> None:
    import torch
    import torch.distributed as dist

    from rpo.models import init_parallel, load_policy, save_hf, teardown
    from rpo.models.architectures import MOE_MODEL_TYPES

    spec = json.loads((workdir / "spec.json").read_text())
    batch = torch.load(workdir / "batch.pt", weights_only=True)
    res: dict = {}
    try:
        init_parallel(2)
        for kind in spec["families"]:
            moe = json.loads((workdir / kind / "config.json").read_text())["model_type"] in MOE_MODEL_TYPES
            if not moe:
                model, cfg, _ = load_policy(workdir / kind, tp_size=2)
                _score(model, batch, spec["pack_length"], res, f"tp2/{kind}")
            model, cfg, _ = load_policy(workdir / kind, tp_size=2, sequence_parallel=True)
            _score(model, batch, spec["pack_length"], res, f"tp2sp/{kind}")
            save_hf(model, cfg, workdir / f"export-tp2-{kind}", tokenizer_src=workdir / kind)
        rank = dist.get_rank()
        rows = list(range(rank, batch["input_ids"].shape[0], 2))
        mine = {k: v[rows] for k, v in batch.items()}
        res["dp2/rows"] = torch.tensor(rows)
        for kind in spec["families"]:
            moe = json.loads((workdir / kind / "config.json").read_text())["model_type"] in MOE_MODEL_TYPES
            for ep in (1, 2) if moe else (1,):
                prefix = f"{'ep2' if ep == 2 else 'dp2'}/{kind}"
                info = init_parallel(1, expert_parallel=ep)
                model, cfg, _ = load_policy(workdir / kind, tp_size=1)
                res[f"{prefix}/ep"] = (info.ep_size, sum(1 for n, _ in model.named_parameters()
                                                         if "local_experts" in n and n.endswith("linear_fc1.weight")))
                _score(model, mine, spec["pack_length"], res, prefix)
                if ep == 2:
                    save_hf(model, cfg, workdir / f"export-ep2-{kind}", tokenizer_src=workdir / kind)
        torch.save(res, workdir / f"results-rank{dist.get_rank()}.pt")
    finally:
        teardown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
