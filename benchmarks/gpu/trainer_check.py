"""GPU check, stage "trainer": the trainer on one GPU (NCCL group of one rank), bf16 with fp32 master weights.

    python benchmarks/gpu/trainer_check.py RESULT.json          # run by benchmarks/gpu_check.sh

Model: SmolLM2-135M-Instruct's architecture and tokenizer with random weights (no weights travel, see
check_common.py); prompt embeddings from all-MiniLM-L6-v2's architecture with random weights. Data: 64 rows of the
shared paired data. Cases, each a `rpo.train.Trainer(...).fit()` of a few steps, 16 pairs per step in 2
micro-batches of 8 (so `rpo --global-contrast` takes the two-pass path):
  dpo, rpo (per-micro-batch matrix), rpo --global-contrast;
  dpo in float32 on the same first batch: the step-1 log-probs (computed with the initial weights) of bf16 vs fp32;
  rpo --global-contrast with each scale option the trainer has (recompute, distributed optimizer, packing), its
  first loss against the baseline's; an option the trainer lacks is recorded as "not available" (the dry run
  runs all of them in one combined case).
Per case: tokens/s, step time, peak GPU memory, MFU (check_common.train_flops_per_token). A failing case is
recorded and the next one runs. With GPU_CHECK_DRY_RUN=1 (a CPU): a 2-layer LLaMA, 4 pairs, 1-2 steps, float32.
"""
from __future__ import annotations

import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import check_common as cc  # noqa: E402

import torch  # noqa: E402

BF16_LOGPS_RTOL = 1e-2  # relative: bf16 has 8 mantissa bits; a sum over ~100 tokens averages its rounding
# The scale issue's options on one GPU: TrainConfig field -> [(value, other options it needs)].
SCALE_OPTIONS = {
    "recompute": [("selective", {}), ("full", {})],
    "distributed_optimizer": [(True, {"optimizer": "adamw"})],  # megatron's DistributedOptimizer: Adam only
    "packing": [(True, {})],
}


def sizes() -> dict:
    if cc.dry_run():
        return dict(global_batch_size=4, micro_batch_size=2, max_length=64, max_prompt_length=32, steps=2,
                    dtype="auto")
    return dict(global_batch_size=16, micro_batch_size=8, max_length=256, max_prompt_length=128, steps=4,
                dtype="bfloat16")


def run_case(result, name, workdir, base, *, reference_forward=True, **options):
    """fit() one configuration; record its figures (or its error) under `name`; return its metrics records."""
    from transformers import AutoConfig

    from rpo.train import TrainConfig, Trainer

    size = sizes()
    before = cc.reset_peak_memory()
    try:
        config = TrainConfig(**{**base, "output_dir": str(workdir / name.replace(" ", "_")), **options})
        trainer = Trainer(config)
        trainer.fit()
        records = cc.read_metrics(config.output_dir)
        figures = cc.step_figures(records, AutoConfig.from_pretrained(base["model"]),
                                  reference_forward=reference_forward, pairs_per_step=size["global_batch_size"])
        result.case(name, "passed", **figures, peak_memory_gib=cc.peak_memory_gib(),
                    allocated_before_gib=before / 2**30, dtype=str(trainer.dtype))
        return records
    except Exception as error:  # noqa: BLE001 - one case's failure is recorded; the next case runs
        traceback.print_exc()
        result.case(name, "failed", error=f"{type(error).__name__}: {error}")
        return None
    finally:
        trainer = None
        cc.release_memory()


def compare_logps(result, bf16_records, fp32_records):
    if not bf16_records or not fp32_records:
        result.case("logps bf16 vs fp32", "failed", error="a run it compares failed")
        return
    first_bf16, first_fp32 = bf16_records[0], fp32_records[0]
    keys = sorted(k for k in first_fp32 if k.startswith("logps/") and k in first_bf16)
    differences = {k: cc.relative_difference(first_bf16[k], first_fp32[k]) for k in keys}
    within = bool(keys) and all(d <= BF16_LOGPS_RTOL for d in differences.values())
    result.case("logps bf16 vs fp32", "passed" if within else "failed", tolerance=BF16_LOGPS_RTOL,
                relative_difference=differences, bf16={k: first_bf16[k] for k in keys},
                fp32={k: first_fp32[k] for k in keys})


def main(argv=None) -> int:
    from rpo.models.parallel import teardown
    from rpo.train import TrainConfig

    result, workdir, tiny, model, embedder = cc.start_stage("trainer", __doc__, "trainer-", argv)
    size = sizes()
    base = dict(model=str(model), dataset=str(cc.assets_dir() / cc.PAIRED_DATA), embedding_model=str(embedder),
                cache_dir=str(workdir / "cache"), dtype=size["dtype"], global_batch_size=size["global_batch_size"],
                micro_batch_size=size["micro_batch_size"], max_length=size["max_length"],
                max_prompt_length=size["max_prompt_length"], max_steps=size["steps"], optimizer="rmsprop",
                lr=1e-6, eval_split_fraction=0.0, save_every=0, save_final=False, progress_bar=False, seed=0)
    result.data["settings"] = {k: v for k, v in base.items() if k not in ("model", "dataset", "embedding_model",
                                                                          "cache_dir")}
    result.data["model"] = "SmolLM2-135M architecture, random weights" if not tiny else "2-layer LLaMA (dry run)"
    result.data["world_size"] = 1
    result.data["versions"] = cc.package_versions("torch", "megatron-core", "transformers", "datasets",
                                                  "sentence-transformers")
    try:
        dpo = run_case(result, "dpo", workdir, base, loss="dpo")
        run_case(result, "rpo", workdir, base, loss="rpo")
        baseline = run_case(result, "rpo --global-contrast", workdir, base, loss="rpo", global_contrast=True)
        fp32 = run_case(result, "dpo float32", workdir, base, loss="dpo", dtype="float32", max_steps=1)
        compare_logps(result, dpo, fp32)
        fields = set(TrainConfig.field_names())
        variants = {}  # case name -> options
        for option, values in SCALE_OPTIONS.items():
            if option not in fields:
                result.case(f"rpo --global-contrast {option}", "not available",
                            reason=f"TrainConfig has no field {option!r}")
                continue
            for value, needs in values:
                variants[f"rpo --global-contrast {option}={value}"] = {option: value, **needs}
        if tiny and variants:  # dry run: every option's code path in one run (a valid combination)
            combined = {key: value for options in variants.values() for key, value in options.items()}
            variants = {"rpo --global-contrast " + " ".join(f"{k}={v}" for k, v in combined.items()): combined}
        for name, options in variants.items():
            # The first loss is computed before any update: it must not depend on the option.
            records = run_case(result, name, workdir, base, loss="rpo", global_contrast=True, max_steps=2,
                               **options)
            if records and baseline:
                result.data["cases"][name]["first_loss_vs_baseline"] = cc.relative_difference(
                    records[0]["loss"], baseline[0]["loss"])
        import torch.distributed as dist

        result.data["backend"] = dist.get_backend() if dist.is_initialized() else None
    finally:
        teardown()
    return result.exit_code()


if __name__ == "__main__":
    sys.exit(main())
