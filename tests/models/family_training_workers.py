"""2-rank worker (gloo; started by tests/multirank.py) for tests/models/test_family_training.py.

`rpo --global-contrast` (rows normalised, SGD lr 1, fp32, 2 steps of 4 pairs) of every family through
rpo.train.Trainer, at TP=2 (MoE: with sequence parallelism, which megatron's MoE layer needs at TP > 1) and at
TP=1 × DP=2 (MoE: the experts split over the two ranks, --expert-parallel 2), plus Mixtral at DP=2 × EP=2 with two
micro-batches per rank (gradient accumulation, so the two-pass global contrast) and Gemma 3 at TP=2 with sequence
parallelism. Each rank records the batches its
steps received (the inputs of the float64 reference); rank 0 records the weights after step 1 and after the run,
and the logged history. The parent test builds the assets, computes the references and asserts.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS / "train"))  # trainer_workers: the tiny tokenizer and data of the trainer tests

import trainer_workers  # noqa: E402

BATCH_PAIRS = 4
BATCH_KEYS = ("input_ids", "attention_mask", "loss_mask", "chosen_embeddings", "rejected_embeddings", "num_chosen",
              "num_rejected", "row_ids", "paired")


def build_assets(workdir: Path, families) -> None:
    """The trainer tests' tokenizer and data, and one tiny model of each family with that vocabulary."""
    from transformers import AutoTokenizer

    from tiny_hf_models import tiny_hf_model

    trainer_workers.build_assets(workdir)
    tokenizer = AutoTokenizer.from_pretrained(workdir / "tiny-llama")
    ids = (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
    for seed, kind in enumerate(families, start=21):
        model = tiny_hf_model(kind, seed, vocab=len(tokenizer), special_ids=ids)
        model.save_pretrained(workdir / kind)
        tokenizer.save_pretrained(workdir / kind)


def runs(families, moe_families):
    """(name, family, options) of every run of the launch."""
    out = []
    for kind in families:
        moe = kind in moe_families
        out.append((f"{kind}-tp2", kind, dict(tensor_parallel=2, sequence_parallel=moe,
                                              micro_batch_size=BATCH_PAIRS)))
        out.append((f"{kind}-dp2", kind, dict(tensor_parallel=1, expert_parallel=2 if moe else 1,
                                              micro_batch_size=BATCH_PAIRS // 2, save_final=True)))
    out.append(("mixtral-dp2-accum", "mixtral", dict(tensor_parallel=1, expert_parallel=2, micro_batch_size=1,
                                                     max_steps=1)))
    # Gemma 3 with sequence parallelism: its (1 + w) norms, post-norms and q/k norms on sequence shards.
    out.append(("gemma3-tp2sp", "gemma3", dict(tensor_parallel=2, sequence_parallel=True,
                                               micro_batch_size=BATCH_PAIRS, max_steps=1)))
    return out


def main(workdir: Path) -> None:
    import torch
    import torch.distributed as dist
    from safetensors.torch import save_file

    from rpo.models import gather_hf_state, teardown
    from rpo.train import Trainer

    spec = json.loads((workdir / "spec.json").read_text())

    class RecordingTrainer(Trainer):
        """Keeps each step's rank batch (what the reference needs to know of the data order)."""

        def train_step(self, batch):
            self.seen = getattr(self, "seen", [])
            self.seen.append({**{key: batch[key] for key in BATCH_KEYS}, "accumulation": self.accumulation})
            return super().train_step(batch)

    class AfterStepOne:
        def __init__(self, name):
            self.name = name

        def on_step_end(self, trainer, step, record):
            if step == 1:
                state = gather_hf_state(trainer.policy)  # collective
                if dist.get_rank() == 0:
                    save_file({k: v.contiguous() for k, v in state.items()},
                              str(workdir / "results" / f"{self.name}-step1.safetensors"))

    (workdir / "results").mkdir(exist_ok=True)
    try:
        for name, kind, options in runs(spec["families"], spec["moe_families"]):
            config = trainer_workers.base_config(
                workdir, name, model=str(workdir / kind), dataset=str(workdir / "paired8.jsonl"),
                global_batch_size=BATCH_PAIRS, **{"max_steps": 2, **trainer_workers.RPO, **options})
            trainer = RecordingTrainer(config, callbacks=[AfterStepOne(name)])
            summary = trainer.fit()
            torch.save(trainer.seen, workdir / "results" / f"{name}-batches-rank{dist.get_rank()}.pt")
            state = gather_hf_state(trainer.policy)
            if dist.get_rank() == 0:
                save_file({k: v.contiguous() for k, v in state.items()},
                          str(workdir / "results" / f"{name}-end.safetensors"))
                (workdir / "results" / f"{name}.json").write_text(json.dumps(
                    {"history": trainer.history, "final_model": summary["final_model"]}, default=str))
    finally:
        teardown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
