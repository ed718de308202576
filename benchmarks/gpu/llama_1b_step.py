"""GPU check, stage "llama_1b": a 1B-class LLaMA (random weights, built from the config below), optimiser steps
of `rpo --global-contrast` in bf16 without and with activation recomputation, each in a fresh process so that
its peak memory is its own: tokens/s, MFU, peak memory, and the trainer's `--plan` estimate (rpo.train.scale.memory_plan)
beside the measured peak.

    python benchmarks/gpu/llama_1b_step.py RESULT.json          # run by benchmarks/gpu_check.sh

The shape is Llama-3.2-1B's (d 2048, 16 layers, 32 heads, 8 KV heads, FFN 8192) with SmolLM2's 49152-token
vocabulary: 1.07 B parameters. 8 pairs per step, one micro-batch, up to 512 tokens; 2 steps, the second timed.
The recompute case runs only where TrainConfig has `recompute` ("not available" otherwise).
With GPU_CHECK_DRY_RUN=1 (a CPU): a 2-layer LLaMA, 2 pairs, float32, the first case only.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import check_common as cc  # noqa: E402

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, head_dim=64, max_position_embeddings=2048)
CASES = {"no recomputation": {}, "full recomputation": {"recompute": "full"}}
CASE_TIMEOUT_S = 100 * int(os.environ.get("GPU_CHECK_LIMIT_SCALE", "4" if cc.dry_run() else "1"))


def base_options(model: str, embedder: str, workdir: Path) -> dict:
    tiny = cc.dry_run()
    return dict(model=model, dataset=str(cc.assets_dir() / cc.PAIRED_DATA), embedding_model=embedder,
                cache_dir=str(workdir / "cache"), loss="rpo", global_contrast=True,
                dtype="auto" if tiny else "bfloat16", global_batch_size=2 if tiny else 8,
                micro_batch_size=2 if tiny else 8, max_length=64 if tiny else 512,
                max_prompt_length=32 if tiny else 256, max_steps=2, optimizer="rmsprop", lr=1e-6,
                eval_split_fraction=0.0, save_every=0, save_final=False, progress_bar=False, seed=0)


def run_one(options: dict) -> dict:
    """Inside the case's own process: fit() and the figures of its logged steps."""
    from transformers import AutoConfig

    from rpo.models.parallel import teardown
    from rpo.train import Trainer, TrainConfig

    logging.basicConfig(level=logging.WARNING)
    if not torch.cuda.is_available():
        torch.set_flush_denormal(True)
    config = TrainConfig(**options)
    cc.reset_peak_memory()
    try:
        Trainer(config).fit()
    finally:
        teardown()
    records = cc.read_metrics(config.output_dir)
    model_config = AutoConfig.from_pretrained(options["model"])
    figures = cc.step_figures(records, model_config, reference_forward=True,
                              pairs_per_step=options["global_batch_size"])
    figures["parameters"] = sum(p.numel() for p in _parameter_shapes(model_config))
    figures["peak_memory_gib"] = cc.peak_memory_gib()
    figures["plan"] = plan_beside(config, figures["peak_memory_gib"])
    return figures


def plan_beside(config, measured_gib):
    """The trainer's --plan estimate of this run's per-GPU peak (rpo.train.scale.memory_plan) beside the measured
    peak (allocated bytes, GPU only)."""
    try:
        from rpo.train.scale import memory_plan
    except ImportError as error:
        return {"status": "not available", "reason": str(error)}
    plan = memory_plan(config)
    estimate = plan.peak_bytes / 2**30
    return {"status": "passed", "estimated_peak_gib": estimate, "measured_peak_gib": measured_gib,
            "estimate_over_measured": estimate / measured_gib if measured_gib else None,
            "activations_by_recompute_gib": {mode: value / 2**30
                                             for mode, value in plan.activations_by_recompute.items()}}


def _parameter_shapes(model_config):
    """Parameter tensors of the HF model, on the meta device (no memory)."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        return list(LlamaForCausalLM(model_config).parameters())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("result", type=Path)
    parser.add_argument("--case-options", type=Path, help=argparse.SUPPRESS)  # internal: one case's process
    args = parser.parse_args(argv)
    if args.case_options:
        figures = run_one(json.loads(args.case_options.read_text()))
        args.result.write_text(json.dumps(figures, default=str))
        return 0

    from rpo.train import TrainConfig

    result = cc.StageResult(args.result, "llama_1b")
    workdir = cc.workdir("llama-")
    shape = cc.TINY_LLAMA if cc.dry_run() else LLAMA_1B
    model = cc.random_llama(workdir / "model", seed=1, **shape)
    embedder = cc.random_sentence_transformer(workdir / "embedder", **(cc.TINY_BERT if cc.dry_run() else {}))
    result.data["shape"] = shape
    fields = set(TrainConfig.field_names())
    for index, (name, extra) in enumerate(CASES.items()):
        if cc.dry_run() and index > 0:
            # The same code path as the first case (the option itself is tried by the trainer stage).
            result.case(name, "skipped", reason="dry run: the first case only")
            continue
        missing = [key for key in extra if key not in fields]
        if missing:
            result.case(name, "not available", reason=f"TrainConfig has no field {missing[0]!r}")
            continue
        options = {**base_options(str(model), str(embedder), workdir), **extra,
                   "output_dir": str(workdir / name.replace(" ", "_"))}
        spec, out = workdir / f"{len(result.data['cases'])}.json", workdir / f"{len(result.data['cases'])}.out"
        spec.write_text(json.dumps(options))
        try:
            proc = subprocess.run([sys.executable, __file__, str(out), "--case-options", str(spec)],
                                  timeout=CASE_TIMEOUT_S, cwd=REPO, env=dict(os.environ, PYTHONUNBUFFERED="1"))
            if proc.returncode != 0:
                result.case(name, "failed", error=f"case process exited {proc.returncode} (see the log above)")
                continue
            result.case(name, "passed", **json.loads(out.read_text()))
        except Exception as error:  # noqa: BLE001 - recorded; the next case runs
            traceback.print_exc()
            result.case(name, "failed", error=f"{type(error).__name__}: {error}")
    return result.exit_code()


if __name__ == "__main__":
    sys.exit(main())
