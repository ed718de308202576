"""Worker processes for tests/train/test_kto_kl_trainer.py: kto steps whose reference model is not the policy,
so that KTO's reference point z (mismatched pairs, rpo.data.kto_pairs) is not 0.

Launched through tests/multirank.py (`start(world_size, workdir)`), reusing trainer_workers' assets,
`base_config` and `_record`. Besides the weights and history, every rank records the row order of each batch it
trained on and what each loss call computed (z, its pair count, this rank's mismatched log-probs); the test
asserts.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Dict

import trainer_workers as base

REFERENCE_MODEL = "tiny-llama-reference"
OTHER_VOCABULARY_MODEL = "tiny-llama-other-vocabulary"  # the reference with 8 more token rows
EXTRA_VOCABULARY = 8
# The reference: the policy with seeded noise on every weight, and a sharper output layer (logits x 2). On
# sequences the random model did not learn, a flatter policy gives them more log-probability than the sharper
# reference, so the mismatched pairs' mean log-ratio z is positive (the test checks z > 0 in float64).
NOISE_SEED, NOISE_SCALE, REFERENCE_LOGIT_SCALE = 1, 0.02, 2.0
UNPAIRED_DATA = f"unpaired{base.UNPAIRED_ROWS}.jsonl"


def build_assets(workdir: Path) -> Dict[str, Path]:
    """trainer_workers' assets plus the reference model (REFERENCE_MODEL, see above) under workdir."""
    import torch
    from transformers import AutoModelForCausalLM

    paths = base.build_assets(workdir)
    model = AutoModelForCausalLM.from_pretrained(paths["model"])
    generator = torch.Generator().manual_seed(NOISE_SEED)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(NOISE_SCALE * torch.randn(param.shape, generator=generator))
        model.lm_head.weight.mul_(REFERENCE_LOGIT_SCALE)
    paths["reference_model"] = workdir / REFERENCE_MODEL
    model.save_pretrained(paths["reference_model"])  # weights and config only: a reference needs no tokenizer
    model.resize_token_embeddings(model.config.vocab_size + EXTRA_VOCABULARY)
    paths["other_vocabulary_model"] = workdir / OTHER_VOCABULARY_MODEL
    model.save_pretrained(paths["other_vocabulary_model"])
    return paths


def start(world_size: int, workdir: Path):
    """Start `world_size` ranks running this world size's runs (RUNS); `.wait()` gives the result."""
    import multirank

    return multirank.start(Path(__file__).resolve(), world_size, args=[workdir], log_dir=Path(workdir) / "logs",
                           name=f"kto-kl-dp{world_size}")


class RecordedLoss:
    """The trainer's loss, recording per call the z it used (metric `kl`), `kl_pairs`, and the number and summed
    log-ratio of the mismatched pairs this rank passed."""

    def __init__(self, loss):
        self.loss = loss
        self.calls = []

    def __getattr__(self, name):  # the loss's declarations (uses_kl_pairs, needs_reference, ...)
        return getattr(self.loss, name)

    def __call__(self, **inputs):
        output = self.loss(**inputs)
        policy, reference = inputs["kl_policy_logps"], inputs["kl_reference_logps"]
        self.calls.append({"kl": float(output.metrics["kl"]), "kl_pairs": float(output.metrics["kl_pairs"]),
                           "rank_pairs": policy.numel(),
                           "rank_log_ratio_sum": float((policy.double() - reference.double()).sum())})
        return output


def _run_recorded(workdir: Path, name: str, **overrides) -> None:
    import torch.distributed as dist

    from rpo.train import Trainer

    trainer = Trainer(base.base_config(workdir, name, loss="kto", beta=0.1,
                                       reference_model=str(workdir / REFERENCE_MODEL),
                                       dataset=str(workdir / UNPAIRED_DATA), global_batch_size=base.UNPAIRED_ROWS,
                                       **overrides))
    trainer.setup()
    trainer.loss = RecordedLoss(trainer.loss)
    batches = []
    train_step = trainer.train_step

    def recorded_step(batch):
        batches.append({"row_ids": batch["row_ids"].tolist(), "num_chosen": batch["num_chosen"]})
        return train_step(batch)

    trainer.train_step = recorded_step
    summary = trainer.fit()
    base._record(workdir, name, trainer, summary)
    out = workdir / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}-rank{dist.get_rank()}.json").write_text(json.dumps({"batches": batches,
                                                                        "calls": trainer.loss.calls}))


def _record_reference_vocabulary_error(workdir: Path) -> None:
    """Set up with a --reference-model whose vocabulary is not the policy's; record the ConfigError's text."""
    from rpo.train import ConfigError, Trainer

    trainer = Trainer(base.base_config(workdir, "kto-other-vocabulary", loss="kto", beta=0.1,
                                       reference_model=str(workdir / OTHER_VOCABULARY_MODEL),
                                       dataset=str(workdir / UNPAIRED_DATA), global_batch_size=base.UNPAIRED_ROWS,
                                       micro_batch_size=base.UNPAIRED_ROWS))
    try:
        trainer.setup()
        message = None
    except ConfigError as error:
        message = str(error)
    out = workdir / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "kto-other-vocabulary.json").write_text(json.dumps({"error": message}))


def runs_dp1(workdir: Path) -> None:
    """One rank: the 12 unpaired examples in one micro-batch, and in two; then (last, as it fails in set-up) a
    reference of another vocabulary."""
    _run_recorded(workdir, "kto-kl-dp1", micro_batch_size=base.UNPAIRED_ROWS)
    _run_recorded(workdir, "kto-kl-dp1-accum", micro_batch_size=base.UNPAIRED_ROWS // 2)
    _record_reference_vocabulary_error(workdir)


def runs_dp2(workdir: Path) -> None:
    """Two ranks of 6 examples: one micro-batch per rank, and two."""
    _run_recorded(workdir, "kto-kl-dp2", micro_batch_size=base.UNPAIRED_ROWS // 2)
    _run_recorded(workdir, "kto-kl-dp2-accum", micro_batch_size=base.UNPAIRED_ROWS // 4)


RUNS = {1: runs_dp1, 2: runs_dp2}  # by world size (= data-parallel size: TP 1)


if __name__ == "__main__":
    import logging

    from rpo.models import teardown

    logging.basicConfig(level=logging.INFO, format=f"[rank {os.environ.get('RANK')}] %(name)s: %(message)s")
    RUNS[int(os.environ["WORLD_SIZE"])](Path(sys.argv[1]))
    teardown()
