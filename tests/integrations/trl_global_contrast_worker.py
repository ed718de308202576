"""One rank of a TRL RPOTrainer step with the global contrast (launched by tests/multirank.py, 1 or 2 ranks).

    python trl_global_contrast_worker.py OUT_DIR

All ranks build the same tiny float64 LLaMA, reference and 8-pair data set; each rank's batch is 8 / WORLD_SIZE
pairs (accelerate shards the data), so every launch covers the same 8 pairs in one optimiser step. The loss
"rpo+0.5*dpo" has a global part (the contrast over the ranks) and a separable part (DPO, a mean over the rank's
pairs). Each rank saves, just before the optimiser step (after accelerate/DDP averaged the gradients), the
gradients and TRL's logged metrics to OUT_DIR/rank{R}-of-{W}.pt. The test runs the 1-process case in its own
process with `train_one_step`.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import trl_tiny  # noqa: E402

LOSS = "rpo+0.5*dpo"


def train_one_step(out_dir: Path, world: int) -> dict:
    """One optimiser step of RPOTrainer with the global contrast; the averaged gradients and the logged metrics."""
    from transformers import TrainerCallback

    from rpo.integrations.trl import RPOTrainer

    saved = {}

    class SaveAveragedGradients(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            saved["gradients"] = trl_tiny.gradients(model)

    args = trl_tiny.dpo_config(out_dir / "trainer", per_device_train_batch_size=trl_tiny.PAIRS // world)
    trainer = RPOTrainer(trl_tiny.tiny_llama(0), ref_model=trl_tiny.tiny_llama(1), args=args,
                         train_dataset=trl_tiny.preference_dataset(), processing_class=trl_tiny.tiny_tokenizer(),
                         loss=LOSS, global_contrast=True, embedding_cache_dir=str(out_dir / "embeddings"),
                         callbacks=[SaveAveragedGradients()])
    assert trainer.accelerator.num_processes == world, (trainer.accelerator.num_processes, world)
    assert (trainer.contrast_group is not None) == (world > 1), (world, trainer.contrast_group)
    trainer.train()
    logged = next(entry for entry in trainer.state.log_history if "rewards/accuracies" in entry)
    return {"gradients": saved["gradients"], "logged": logged}


def main(out_dir: Path) -> None:
    torch.set_flush_denormal(True)
    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.save(train_one_step(out_dir, world), out_dir / f"rank{rank}-of-{world}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
