"""Worker processes for tests/train/test_scale_options.py: Trainer runs with the scale options on 2 gloo ranks.

`python scale_workers.py CASES WORKDIR` (started by tests/multirank.py through `start`), on the assets of
trainer_workers.build_assets plus a tiny random Mistral (`build_mistral`). Workers only record (trainer_workers'
results/NAME.safetensors + .json); the test asserts.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Sequence

import trainer_workers as tw

MISTRAL_WINDOW = 8  # smaller than the batch's sequences (up to MAX_LENGTH = 48 tokens): the window matters
PACK_LENGTH = 2 * tw.MAX_LENGTH  # several sequences share a packed row
VARIED_DATA = "paired-varied.jsonl"
TOPOLOGIES = ((2, 1), (1, 2))  # (TP, DP) on 2 ranks
LOSSES = ("dpo", "rpo")  # rpo = rpo --global-contrast
# Each variant's options; "baseline" is the plain run the others must equal.
VARIANTS = {"baseline": {}, "selective": dict(recompute="selective"), "full": dict(recompute="full"),
            "packing": dict(packing=True, pack_length=PACK_LENGTH)}
MISTRAL_VARIANTS = ("baseline", "packing")
# --sequence-parallel (TP > 1 only), alone and with the other scale options; each equals the baseline at its TP.
SP_VARIANTS = {"sp": dict(sequence_parallel=True),
               "sp-packing": dict(sequence_parallel=True, packing=True, pack_length=PACK_LENGTH),
               "sp-selective": dict(sequence_parallel=True, recompute="selective"),
               "sp-full": dict(sequence_parallel=True, recompute="full")}
MISTRAL_SP_VARIANTS = ("sp",)
SP_DP2_VARIANTS = ("baseline", "sp")  # TP=2 x DP=2, a launch of 4 ranks
# Adam's first step is lr·g/(|g| + eps): a large eps keeps 1e-8 gradient differences (reduction order) at
# 1e-7 in the parameters, so the distributed optimizer can be held to 1e-5.
ADAMW = dict(optimizer="adamw", lr=1e-2, eps=1e-3)


def build_assets(workdir: Path) -> None:
    """trainer_workers' assets, a tiny Mistral, and VARIED_DATA: the 8 pairs with answers cut to different
    lengths (the shared data's answers all fill --max-length), so rows have padding for packing to remove."""
    import json

    tw.build_assets(workdir)
    build_mistral(workdir)
    rows = [json.loads(line) for line in (workdir / f"paired{tw.EQUIVALENCE_ROWS}.jsonl").read_text().splitlines()]
    for i, row in enumerate(rows):
        for key, chars in (("chosen", 6 + 10 * i), ("rejected", 70 - 8 * i)):
            row[key] = [dict(message, content=message["content"][:chars]) for message in row[key]]
    (workdir / VARIED_DATA).write_text("".join(json.dumps(row) + "\n" for row in rows))


def build_mistral(workdir: Path) -> Path:
    """A tiny random Mistral (sliding window, tied embeddings) with the tiny LLaMA's tokenizer."""
    import torch
    from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(workdir / "tiny-llama")
    config = MistralConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=tw.MAX_LENGTH,
                           rms_norm_eps=1e-6, rope_theta=20000.0, sliding_window=MISTRAL_WINDOW,
                           tie_word_embeddings=True, initializer_range=0.1, pad_token_id=tokenizer.pad_token_id,
                           bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(1)
    model = MistralForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
    path = workdir / "tiny-mistral"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def run_name(model: str, loss: str, variant: str, tp: int, dp: int) -> str:
    return f"{model}-{loss}-{variant}-tp{tp}dp{dp}"


def two_micro_batches(dp: int) -> int:
    return tw.EQUIVALENCE_ROWS // (2 * dp)


def case_equivalence(workdir: Path) -> None:
    """One SGD step per (topology, loss, variant), two micro-batches per rank (the two-pass path for rpo)."""
    for tp, dp in TOPOLOGIES:
        for loss in LOSSES:
            for model, variants in (("llama", VARIANTS), ("mistral", MISTRAL_VARIANTS)):
                for variant in variants:
                    tw._run(workdir, run_name(model, loss, variant, tp, dp), model=str(workdir / f"tiny-{model}"),
                            dataset=str(workdir / VARIED_DATA), tensor_parallel=tp,
                            micro_batch_size=two_micro_batches(dp), **tw.LOSSES[loss], **VARIANTS[variant])


def case_sequence_parallel(workdir: Path) -> None:
    """The SP variants of case_equivalence at TP=2, DP=1 (its baselines are theirs)."""
    for loss in LOSSES:
        for model, variants in (("llama", tuple(SP_VARIANTS)), ("mistral", MISTRAL_SP_VARIANTS)):
            for variant in variants:
                tw._run(workdir, run_name(model, loss, variant, 2, 1), model=str(workdir / f"tiny-{model}"),
                        dataset=str(workdir / VARIED_DATA), tensor_parallel=2, micro_batch_size=two_micro_batches(1),
                        **tw.LOSSES[loss], **SP_VARIANTS[variant])


def case_sequence_parallel_dp2(workdir: Path) -> None:
    """4 ranks: baseline and --sequence-parallel at TP=2 x DP=2, two micro-batches per rank."""
    for loss in LOSSES:
        for variant in SP_DP2_VARIANTS:
            tw._run(workdir, run_name("llama", loss, variant, 2, 2), dataset=str(workdir / VARIED_DATA),
                    tensor_parallel=2, micro_batch_size=two_micro_batches(2), **tw.LOSSES[loss],
                    **{**VARIANTS, **SP_VARIANTS}[variant])


# The global contrast's micro-batches: by default (and on these tiny models) every graph is kept from the scoring
# forward to the backward; "-rerun" runs today's two-pass path (--keep-graphs 0: every micro-batch re-run).
KEPT_VARIANTS = ("baseline", "selective", "full", "packing")
KEPT_SP_VARIANTS = ("sp", "sp-full")
FOUR_MICRO_BATCHES = ("auto", "bound2", "memory3", "rerun")  # TP=1/DP=2, 4 micro-batches per rank
FOUR_MICRO_BATCH_OPTIONS = {"auto": {}, "bound2": dict(keep_graphs=2), "memory3": {}, "rerun": dict(keep_graphs=0)}


def rerun(variant: str) -> str:
    return f"{variant}-rerun"


def case_kept_graphs(workdir: Path) -> None:
    """rpo --global-contrast with every micro-batch re-run (--keep-graphs 0), beside case_equivalence's and
    case_sequence_parallel's runs, which keep the graphs; and 4 micro-batches per rank with graphs kept by default,
    up to --keep-graphs 2, as a memory budget of 3 graphs allows (the plan's arithmetic), and none."""
    for tp, dp in TOPOLOGIES:
        for variant in KEPT_VARIANTS:
            tw._run(workdir, run_name("llama", "rpo", rerun(variant), tp, dp), dataset=str(workdir / VARIED_DATA),
                    tensor_parallel=tp, micro_batch_size=two_micro_batches(dp), keep_graphs=0, **tw.LOSSES["rpo"],
                    **VARIANTS[variant])
    for variant in KEPT_SP_VARIANTS:
        tw._run(workdir, run_name("llama", "rpo", rerun(variant), 2, 1), dataset=str(workdir / VARIED_DATA),
                tensor_parallel=2, micro_batch_size=two_micro_batches(1), keep_graphs=0, **tw.LOSSES["rpo"],
                **SP_VARIANTS[variant])
    from rpo.train import scale

    device_memory = scale.device_memory_bytes
    for label in FOUR_MICRO_BATCHES:
        options = dict(dataset=str(workdir / VARIED_DATA), tensor_parallel=1, micro_batch_size=1,
                       **tw.LOSSES["rpo"], **FOUR_MICRO_BATCH_OPTIONS[label])
        if label == "memory3":
            scale.device_memory_bytes = lambda device, options=options: memory_for_graphs(workdir, 3, options)
        try:
            tw._run(workdir, f"llama-rpo-4mb-{label}-tp1dp2", **options)
        finally:
            scale.device_memory_bytes = device_memory


def memory_for_graphs(workdir: Path, graphs: float, options: dict) -> float:
    """Device memory in which the memory plan of this run fits `graphs` + 1/2 micro-batches' activations (so
    exactly floor(graphs) graphs are kept)."""
    from transformers import AutoConfig

    from rpo.models.memory_plan import plan_from_train_config
    from rpo.train import scale

    config = tw.base_config(workdir, "plan", **options)
    plan = plan_from_train_config(config, AutoConfig.from_pretrained(config.model), world_size=2,
                                  needs_reference=True, device="cpu")
    step = (graphs + 0.5) * plan.activations + plan.logprob_chunk + plan.working
    assert step > plan.optimizer_step  # the graphs decide, not the optimizer step
    return (plan.persistent + plan.overhead + step) / scale.KEPT_GRAPHS_MEMORY_FRACTION


def case_distributed_optimizer(workdir: Path) -> None:
    """One AdamW step with and without --distributed-optimizer at TP=1, DP=2, for dpo and rpo --global-contrast."""
    for loss in LOSSES:
        for variant, extra in (("adamw", {}), ("distributed", dict(distributed_optimizer=True))):
            tw._run(workdir, run_name("llama", loss, variant, 1, 2), micro_batch_size=two_micro_batches(2),
                    **tw.LOSSES[loss], **ADAMW, **extra)


# The SIGKILL + --resume check of trainer_workers (6 steps, checkpoints every 2, killed after step 3), with AdamW
# sharded by the distributed optimizer, in bfloat16 so that the sharded fp32 master weights must be restored too.
RESUME = dict(optimizer="adamw", lr=3e-3, distributed_optimizer=True, dtype="bfloat16", save_final=True)


def case_resume_reference(workdir: Path) -> None:
    from rpo.train import Trainer

    trainer = Trainer(tw._resume_config(workdir, "distopt-resume-reference", **RESUME))
    tw._record(workdir, "distopt-resume-reference", trainer, trainer.fit())


def case_resume_killed(workdir: Path) -> None:
    from rpo.train import Trainer

    Trainer(tw._resume_config(workdir, "distopt-resume", **RESUME), callbacks=[tw.KillAt(3)]).fit()


def case_resume_continue(workdir: Path) -> None:
    from rpo.train import Trainer

    trainer = Trainer(tw._resume_config(workdir, "distopt-resume", resume="latest", **RESUME))
    tw._record(workdir, "distopt-resume", trainer, trainer.fit())


def start(cases: Sequence[str], workdir: Path, world_size: int = 2):
    import multirank

    return multirank.start(Path(__file__).resolve(), world_size, args=[",".join(cases), workdir],
                           log_dir=Path(workdir) / "logs", name="+".join(cases))


def main(cases: str, workdir: str) -> None:
    import logging

    from rpo.models import teardown

    logging.basicConfig(level=logging.INFO, format=f"[rank {os.environ.get('RANK')}] %(name)s: %(message)s")
    for case in cases.split(","):
        globals()[f"case_{case}"](Path(workdir))
    teardown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
