"""Worker processes for tests/train/test_one_objective.py: every loss of the matrix, 3 SGD steps, on the layouts
one launch can run (1 process: one and two micro-batches; 2 processes: DP=2 with and without --packing, or TP=2
with and without --sequence-parallel).

Launched through tests/multirank.py (`start(world_size, layouts, workdir)`), reusing the assets of
kto_kl_workers (trainer_workers' tiny LLaMA and data, and a reference model that differs from the policy, so
that no loss starts at its value for equal models). Workers only record (weights and metrics); the test asserts.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import kto_kl_workers
import trainer_workers as base

STEPS = 3
PAIRED, UNPAIRED = f"paired{base.EQUIVALENCE_ROWS}.jsonl", f"unpaired{base.UNPAIRED_ROWS}.jsonl"

# The losses of the matrix: (options, data). "--global-contrast" with its defaults and with each normalisation;
# the per-micro-batch rpo; separable losses (a row mean, a token mean) alone and beside a global contrast; KTO
# with its KL reference point and rpo's global matrix on unpaired data.
GLOBAL = dict(loss="rpo", global_contrast=True)
LOSSES = {
    "rpo-global": (GLOBAL, PAIRED),
    "rpo-global-row": (dict(GLOBAL, weight_normalization="row"), PAIRED),
    "rpo-global-mean": (dict(GLOBAL, weight_normalization="mean"), PAIRED),
    "rpo-global-reference4": (dict(GLOBAL, weight_normalization="reference_columns", normalization_columns=4),
                              PAIRED),
    "rpo-local": (dict(loss="rpo"), PAIRED),
    "dpo": (dict(loss="dpo"), PAIRED),
    "sft": (dict(loss="sft"), PAIRED),
    "rpo+dpo": (dict(GLOBAL, loss="rpo+0.5*dpo"), PAIRED),
    "rpo+sft": (dict(GLOBAL, loss="rpo+0.2*sft"), PAIRED),
    "kto-kl-unpaired": (dict(loss="kto"), UNPAIRED),
    "rpo-global-unpaired": (GLOBAL, UNPAIRED),
}

# layout -> (world size, TrainConfig options besides the batch sizes, micro-batches per rank)
LAYOUTS = {
    "1x1": (1, {}, 1),
    "1x2": (1, {}, 2),
    "dp2": (2, {}, 1),
    "dp2-packing": (2, dict(packing=True), 1),
    "tp2": (2, dict(tensor_parallel=2), 1),
    "tp2-sp": (2, dict(tensor_parallel=2, sequence_parallel=True), 1),
}


# Runs that also export final/, for rpo-eval to read what they trained with.
EXPORTED = {("rpo-global-unpaired", "1x1"), ("rpo+sft", "1x1")}


def rows_of(data: str) -> int:
    return base.UNPAIRED_ROWS if data == UNPAIRED else base.EQUIVALENCE_ROWS


def config_overrides(loss: str, layout: str) -> dict:
    options, data = LOSSES[loss]
    world, extra, micro_batches = LAYOUTS[layout]
    dp = world // extra.get("tensor_parallel", 1)
    rows = rows_of(data)
    return dict(options, **extra, dataset=None, global_batch_size=rows, micro_batch_size=rows // (dp * micro_batches),
                max_steps=STEPS, save_final=(loss, layout) in EXPORTED)


def start(world_size: int, layouts, workdir: Path):
    import multirank

    return multirank.start(Path(__file__).resolve(), world_size, args=[",".join(layouts), workdir],
                           log_dir=Path(workdir) / "logs", name="objective-" + "+".join(layouts))


def main(layouts: str, workdir: str) -> None:
    import logging

    from rpo.models import teardown
    from rpo.train import Trainer

    logging.basicConfig(level=logging.WARNING, format=f"[rank {os.environ.get('RANK')}] %(name)s: %(message)s")
    workdir = Path(workdir)
    for layout in layouts.split(","):
        for loss in LOSSES:
            name = f"{loss}-{layout}"
            overrides = config_overrides(loss, layout)
            overrides["dataset"] = str(workdir / LOSSES[loss][1])
            config = base.base_config(workdir, name, reference_model=str(workdir / kto_kl_workers.REFERENCE_MODEL),
                                      **overrides)
            trainer = Trainer(config)
            base._record(workdir, name, trainer, trainer.fit())
    teardown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
