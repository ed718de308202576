"""GPU check, stage "trainer_accumulation": the global contrast over micro-batches against the accumulated DPO step,
and TRL's DPO step in bf16, on one GPU.

    python benchmarks/gpu/accumulation_check.py RESULT.json          # run by benchmarks/gpu_check.sh

Model: SmolLM2-135M's architecture and tokenizer with random weights, bf16 with fp32 master weights (check_common);
data: the carried 64 rows of the shared paired data, each cut to ≤ 64 prompt + ≤ 192 answer tokens (no side
truncates; the issue's 256-token setting).
  accumulation   for --recompute none, selective, full × 2 and 4 micro-batches (W = 1, 8 pairs per step): dpo
                 and rpo --global-contrast, one rpo.train.Trainer each in this process, their steps interleaved
                 on the same batches (benchmarks/trainer_step.py's comparison on a GPU); per case the median step
                 time, tokens/s, the peak memory above the step's start and, for the global contrast, its step
                 time and peak ÷ the dpo case's and the graphs it kept.
  trl            trl.DPOTrainer's step in bf16 (gradient checkpointing off, RMSprop, clipping 1.0) and rpo's DPO
                 step on the same 4 pairs, alternating in this process: step time, tokens/s, peak memory and rpo ÷
                 TRL. "not available" when trl does not import.
With GPU_CHECK_DRY_RUN=1 (a CPU): a 2-layer LLaMA in float32, rows of ≤ 16 + 16 tokens, recompute none and full
at 2 micro-batches, 1 timed step, TRL on the CPU.
"""
from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import check_common as cc  # noqa: E402

import torch  # noqa: E402

def sizes() -> dict:
    if cc.dry_run():
        return dict(recompute=("none", "full"), micro_batches=(2,), warmup=1, steps=1, dtype="float32",
                    prompt_tokens=16, answer_tokens=16)
    return dict(recompute=("none", "selective", "full"), micro_batches=(2, 4), warmup=1, steps=3, dtype="bfloat16",
                prompt_tokens=64, answer_tokens=192)


def short_rows(source: Path, tokenizer_dir: Path, target: Path, prompt_tokens: int, answer_tokens: int) -> Path:
    """The rows with the last user message cut to `prompt_tokens` and the answers to `answer_tokens` tokens."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)

    def head(text: str, tokens: int) -> str:
        return tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"][:tokens]).strip()

    rows = []
    for line in source.read_text().splitlines():
        row = json.loads(line)
        user = [m for m in row["prompt"] if m["role"] == "user"][-1]
        chosen, rejected = (head(row[key][0]["content"], answer_tokens) for key in ("chosen", "rejected"))
        if chosen == rejected:  # cut to the same text: no preference left
            continue
        rows.append({"prompt": [{"role": "user", "content": head(user["content"], prompt_tokens)}],
                     "chosen": [{"role": "assistant", "content": chosen}],
                     "rejected": [{"role": "assistant", "content": rejected}]})
    target.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return target


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed_step(step) -> tuple:
    """(seconds, peak bytes above the start or None on a CPU) of step()."""
    start = cc.reset_peak_memory()
    started = time.perf_counter()
    step()
    synchronize()
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() - start if torch.cuda.is_available() else None
    return seconds, peak


def build_trainer(base: dict, name: str, workdir: Path, **options):
    from rpo.train import TrainConfig, Trainer

    config = TrainConfig(**{**base, "output_dir": str(workdir / name.replace(" ", "_").replace(",", "")), **options})
    trainer = Trainer(config)
    trainer.setup()
    return trainer


def accumulation(result, base: dict, workdir: Path) -> None:
    size = sizes()
    cases = {}
    for recompute in size["recompute"]:
        for micro in size["micro_batches"]:
            for loss, global_contrast in (("dpo", False), ("rpo", True)):
                name = f"{'rpo --global-contrast' if global_contrast else 'dpo'}, {micro} micro-batches, " \
                       f"recompute {recompute}"
                try:
                    cases[name] = (build_trainer(base, name, workdir, loss=loss, global_contrast=global_contrast,
                                                 recompute=recompute,
                                                 micro_batch_size=base["global_batch_size"] // micro),
                                   f"dpo, {micro} micro-batches, recompute {recompute}")
                except Exception as error:  # noqa: BLE001 - recorded; the other cases run
                    traceback.print_exc()
                    result.case(f"accumulation: {name}", "failed", error=f"{type(error).__name__}: {error}")
    records = {name: [] for name in cases}
    names = list(cases)
    for step in range(size["warmup"] + size["steps"]):
        for name in names[step % len(names):] + names[:step % len(names)]:  # rotating order
            trainer = cases[name][0]
            batch = trainer.batcher.batch(0, step % len(trainer.batcher))
            seconds, peak = timed_step(lambda: trainer.train_step(batch))
            if step >= size["warmup"]:
                records[name].append({"seconds": seconds, "peak": peak, "tokens": int(batch["attention_mask"].sum())})
    for name, (trainer, baseline) in cases.items():
        steps, reference = records[name], records.get(baseline)
        figures = {"step_time_s": statistics.median(r["seconds"] for r in steps),
                   "tokens_per_s": statistics.median(r["tokens"] / r["seconds"] for r in steps),
                   "peak_memory_gib": (max(r["peak"] for r in steps) / 2**30
                                       if steps[0]["peak"] is not None else None),
                   "kept_graphs": trainer.kept_graphs, "micro_batches": trainer.accumulation}
        if name != baseline and reference:
            figures["time_vs_dpo"] = statistics.median(r["seconds"] / d["seconds"] for r, d in zip(steps, reference))
            if steps[0]["peak"] is not None:
                figures["memory_vs_dpo"] = max(r["peak"] for r in steps) / max(d["peak"] for d in reference)
        result.case(f"accumulation: {name}", "passed", **figures)
    del cases
    cc.release_memory()


def trl_comparison(result, base: dict, workdir: Path) -> None:
    """TRL's DPO step and rpo's on the same rows, alternating in this process."""
    try:
        import datasets
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from trl import DPOConfig, DPOTrainer
    except ImportError as error:
        result.case("trl", "not available", reason=f"{type(error).__name__}: {error}")
        return
    size = sizes()
    pairs = 4
    try:
        transformers.logging.set_verbosity_error()
        datasets.disable_progress_bars()
        cuda = torch.cuda.is_available()
        dtype = torch.bfloat16 if size["dtype"] == "bfloat16" else torch.float32
        tokenizer = AutoTokenizer.from_pretrained(base["model"])
        model = AutoModelForCausalLM.from_pretrained(base["model"], dtype=dtype)
        ref_model = AutoModelForCausalLM.from_pretrained(base["model"], dtype=dtype)
        total = size["warmup"] + size["steps"]
        config = DPOConfig(
            output_dir=tempfile.mkdtemp(prefix="trl-", dir=workdir), per_device_train_batch_size=pairs,
            gradient_accumulation_steps=1, learning_rate=base["lr"], optim="rmsprop", lr_scheduler_type="constant",
            warmup_steps=0, max_grad_norm=1.0, beta=0.1, loss_type=["sigmoid"], max_length=base["max_length"],
            max_steps=total, gradient_checkpointing=False, bf16=dtype == torch.bfloat16, fp16=False, use_cpu=not cuda,
            precompute_ref_log_probs=False, logging_steps=10**6, save_strategy="no", eval_strategy="no", report_to=[],
            dataloader_num_workers=0, seed=0, disable_tqdm=True)
        trl_trainer = DPOTrainer(model=model, ref_model=ref_model, args=config,
                                 train_dataset=datasets.load_dataset("json", data_files=base["dataset"],
                                                                     split="train"),
                                 processing_class=tokenizer)
        trl_trainer.create_optimizer_and_scheduler(num_training_steps=total)
        trl_trainer.current_gradient_accumulation_steps = 1
        policy = trl_trainer.model
        rpo = build_trainer(base, "rpo dpo for trl", workdir, loss="dpo", global_batch_size=pairs,
                            micro_batch_size=pairs)
        records = {"rpo": [], "trl": []}
        for step in range(total):
            batch = rpo.batcher.batch(0, step % len(rpo.batcher))
            rows = [int(row) for row in batch["row_ids"][:batch["num_chosen"]]]
            inputs = trl_trainer.data_collator([trl_trainer.train_dataset[row] for row in rows])
            inputs = {key: value.to(policy.device) if isinstance(value, torch.Tensor) else value
                      for key, value in inputs.items()}

            def trl_step():
                policy.train()
                trl_trainer.training_step(policy, inputs)
                trl_trainer.accelerator.clip_grad_norm_(policy.parameters(), 1.0)
                trl_trainer.optimizer.step()
                trl_trainer.lr_scheduler.step()
                policy.zero_grad()

            sides = [("rpo", lambda: rpo.train_step(batch)), ("trl", trl_step)]
            for side, run in (sides if step % 2 == 0 else sides[::-1]):
                seconds, peak = timed_step(run)
                if step >= size["warmup"]:
                    records[side].append({"seconds": seconds, "peak": peak,
                                          "tokens": int(batch["attention_mask"].sum())})
        figures = {}
        for side, steps in records.items():
            figures[side] = {"step_time_s": statistics.median(r["seconds"] for r in steps),
                             "tokens_per_s": statistics.median(r["tokens"] / r["seconds"] for r in steps),
                             "peak_memory_gib": (max(r["peak"] for r in steps) / 2**30
                                                 if steps[0]["peak"] is not None else None)}
        figures["rpo_speed_vs_trl"] = statistics.median(t["seconds"] / r["seconds"]
                                                        for r, t in zip(records["rpo"], records["trl"]))
        if records["rpo"][0]["peak"] is not None:
            figures["rpo_memory_vs_trl"] = (max(r["peak"] for r in records["rpo"])
                                            / max(r["peak"] for r in records["trl"]))
        result.case("trl", "passed", pairs=pairs, dtype=str(dtype), trl_version=cc.package_versions("trl")["trl"],
                    **figures)
    except Exception as error:  # noqa: BLE001 - recorded
        traceback.print_exc()
        result.case("trl", "failed", error=f"{type(error).__name__}: {error}")


def main(argv=None) -> int:
    from rpo.models.parallel import teardown

    result, workdir, tiny, model, embedder = cc.start_stage("trainer_accumulation", __doc__, "accumulation-", argv)
    size = sizes()
    data = short_rows(cc.assets_dir() / cc.PAIRED_DATA, cc.assets_dir() / cc.SMOLLM2_DIR, workdir / "short.jsonl",
                      size["prompt_tokens"], size["answer_tokens"])
    # above every shortened row (chat template included): no truncation on either side
    max_length = 4 * (size["prompt_tokens"] + size["answer_tokens"])
    base = dict(model=str(model), dataset=str(data), embedding_model=str(embedder), cache_dir=str(workdir / "cache"),
                dtype=size["dtype"], global_batch_size=8, max_length=max_length, max_prompt_length=max_length // 2,
                max_steps=100, optimizer="rmsprop", lr=1e-6, eval_split_fraction=0.0, save_every=0, save_final=False,
                progress_bar=False, seed=0)
    result.data["settings"] = {k: v for k, v in base.items() if k not in ("model", "dataset", "embedding_model",
                                                                          "cache_dir")}
    result.data["model"] = "SmolLM2-135M architecture, random weights" if not tiny else "2-layer LLaMA (dry run)"
    result.data["versions"] = cc.package_versions("torch", "megatron-core", "transformers", "trl")
    try:
        accumulation(result, base, workdir)
        trl_comparison(result, base, workdir)
    finally:
        teardown()
    return result.exit_code()


if __name__ == "__main__":
    sys.exit(main())
