"""The same DPO training step in rpo and in TRL's DPOTrainer: tokens/s and peak memory, as ratios.

Both sides train DPO (sigmoid loss, β = 0.1) with RMSprop (lr 5e-7, gradient clipping 1.0), float32 on the CPU, a
reference model kept in memory, no evaluation, logging or checkpoints, on the same model folder, the same
shortened rows of ../shared/data/paired.jsonl (benchmarks/_common.short_paired_subset: no row needs truncation on
either side) and the same batch of --batch pairs. Models: a tiny random LLaMA with SmolLM2's tokenizer and
49152-token vocabulary, and SmolLM2-135M-Instruct itself (the embedded default model).

  rpo: rpo.train.Trainer with --loss dpo (benchmarks/trainer_step.py's worker: megatron-core GPTModel, chunked
       vocab-parallel log-probs).
  trl: trl.DPOTrainer (Hugging Face model, TRL's own fused/chunked LM-head log-probs), run by the interpreter of a
       separate environment (--trl-python; `make bench-trl` creates benchmarks/results/.venv-trl), so TRL is never
       installed into .venv. Variants: "trl" (gradient_checkpointing=False, like rpo) and "trl, its defaults"
       (gradient_checkpointing=True, DPOConfig's default).

Each side runs in its own fresh process with the same thread count; --warmup steps are dropped, then per step the
wall time and the process CPU time (optimizer step included, data loading excluded on both sides) and the rise of
the peak resident set above the resident set at the step's start. tokens/s = mean non-padding tokens per step /
median step time (also per CPU second). Then a paired run: rpo's and TRL's steps alternating in ONE process on the
same rows (batch k of rpo's batcher, collated by TRL's collator), the median over steps of the ratio of tokens per
CPU second: the speed comparison that a shared machine's load does not bias (--no-paired skips it). Memory comes
from the separate processes only. Ratios are rpo / TRL, at each --lengths (default 32+32 and 64+192 tokens, the
issue's 64 and 256): speed ≥ 1.2 and memory ≤ 0.5 are the issue's goals.

    make bench-trl          # or: .venv/bin/python benchmarks/trl_dpo.py --trl-python PATH [--models tiny smollm2]
                            #     [--lengths 32+32 64+192] [--trl-variants plain checkpointing] [--no-paired]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
DEFAULT_TRL_PYTHON = _common.RESULTS_DIR / ".venv-trl" / "bin" / "python"
# rpo's --optimizer -> TrainingArguments.optim (torch's own implementations on both sides)
TRL_OPTIMIZERS = {"rmsprop": "rmsprop", "adamw": "adamw_torch"}


def _trl_worker(spec: dict) -> dict:
    """One TRL DPOTrainer run (executed by the TRL environment's interpreter)."""
    _common.limit_malloc_caching()
    torch.set_num_threads(spec["threads"])
    torch.set_flush_denormal(True)
    import datasets
    import transformers
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    records: list[dict] = []
    tokens: list[int] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.memory = _common.PeakMemory("cpu").__enter__()
            self.started, self.cpu_started = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kwargs):
            seconds, cpu_seconds = time.perf_counter() - self.started, time.process_time() - self.cpu_started
            self.memory.__exit__(None, None, None)
            records.append({"seconds": seconds, "cpu_seconds": cpu_seconds, "peak_bytes": self.memory.peak_bytes,
                            "start_bytes": self.memory.start_bytes})

    class CountingDPOTrainer(DPOTrainer):
        def training_step(self, model, inputs, *args, **kwargs):
            tokens.append(int(inputs["attention_mask"].sum()))
            return super().training_step(model, inputs, *args, **kwargs)

    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    # Passed explicitly (TRL would load the same weights itself from config.architectures, which a folder written
    # without that field, such as rpo's converted SmolLM2, lacks).
    ref_model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    dataset = datasets.load_dataset("json", data_files=spec["data"], split="train")
    output_dir = tempfile.mkdtemp(prefix="rpo-bench-trl-")
    config = DPOConfig(
        output_dir=output_dir, per_device_train_batch_size=spec["batch"], gradient_accumulation_steps=1,
        learning_rate=5e-7, optim=TRL_OPTIMIZERS[spec.get("optimizer", "rmsprop")], lr_scheduler_type="constant",
        warmup_steps=0, max_grad_norm=1.0,
        beta=0.1, loss_type=["sigmoid"], max_length=spec["max_length"], max_steps=spec["warmup"] + spec["steps"],
        gradient_checkpointing=spec["gradient_checkpointing"], bf16=False, fp16=False, use_cpu=True,
        precompute_ref_log_probs=False, logging_steps=10**6, save_strategy="no", eval_strategy="no",
        report_to=[], dataloader_num_workers=0, seed=0, disable_tqdm=True)
    trainer = CountingDPOTrainer(model=model, ref_model=ref_model, args=config, train_dataset=dataset,
                                 processing_class=tokenizer, callbacks=[StepTimer()])
    trainer.train()
    timed = records[spec["warmup"]:]
    timed_tokens = tokens[spec["warmup"]:len(records)]
    return {"median_ms": statistics.median(r["seconds"] for r in timed) * 1e3,
            "cpu_ms": statistics.median(r["cpu_seconds"] for r in timed) * 1e3,
            "step_ms": [r["seconds"] * 1e3 for r in timed],
            "peak_extra_mib": max(r["peak_bytes"] for r in timed) / _common.MIB,
            # the process's whole peak resident set during a step, and its resident set before one
            "peak_rss_mib": max(r["start_bytes"] + r["peak_bytes"] for r in timed) / _common.MIB,
            "start_resident_mib": max(r["start_bytes"] for r in timed) / _common.MIB,
            "tokens_per_step": statistics.mean(timed_tokens),
            "resident_mib": _common.resident_bytes() / _common.MIB,
            "versions": {"trl": trl.__version__, "transformers": transformers.__version__,
                         "torch": torch.__version__},
            "attention": model.config._attn_implementation}


def _paired_worker(spec: dict) -> dict:
    """rpo's and TRL's DPO steps in ONE process, alternating on the same rows (batch k of rpo's batcher, the same
    pairs collated by TRL's own collator), each step's CPU time and tokens recorded: the comparison that a shared
    machine's load does not bias (both sides see the same slow phases). TRL is driven step by step as its Trainer
    does (training_step, gradient clipping, optimizer and scheduler step, zero_grad)."""
    import os

    _common.limit_malloc_caching()
    torch.set_num_threads(spec["threads"])
    torch.set_flush_denormal(True)
    import logging

    import datasets
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    import trainer_step

    logging.basicConfig(level=logging.WARNING)
    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    total = spec["warmup"] + spec["steps"]
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    ref_model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    config = DPOConfig(
        output_dir=tempfile.mkdtemp(prefix="rpo-bench-trl-"), per_device_train_batch_size=spec["batch"],
        gradient_accumulation_steps=1, learning_rate=5e-7, optim=TRL_OPTIMIZERS[spec.get("optimizer", "rmsprop")],
        lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0, beta=0.1, loss_type=["sigmoid"],
        max_length=spec["max_length"], max_steps=total, gradient_checkpointing=False, bf16=False, fp16=False,
        use_cpu=True, precompute_ref_log_probs=False, logging_steps=10**6, save_strategy="no", eval_strategy="no",
        report_to=[], dataloader_num_workers=0, seed=0, disable_tqdm=True)
    trl_trainer = DPOTrainer(model=model, ref_model=ref_model, args=config,
                             train_dataset=datasets.load_dataset("json", data_files=spec["data"], split="train"),
                             processing_class=tokenizer)
    trl_trainer.create_optimizer_and_scheduler(num_training_steps=total)
    trl_trainer.current_gradient_accumulation_steps = 1
    rpo_spec = dict(spec, global_batch=spec["batch"], max_prompt_length=spec["max_length"] // 2,
                    cases=[("dpo", "dpo", False, 1)])
    os.environ.setdefault("LOCAL_WORLD_SIZE", "1")
    rpo_trainer = trainer_step.build_trainers(rpo_spec, world=1)["dpo"]
    batches = len(rpo_trainer.batcher)

    def timed(step):
        started, cpu_started = time.perf_counter(), time.process_time()
        step()
        return time.perf_counter() - started, time.process_time() - cpu_started

    def trl_step(rows):
        inputs = trl_trainer.data_collator([trl_trainer.train_dataset[row] for row in rows])
        model.train()

        def step():
            trl_trainer.training_step(model, inputs)
            trl_trainer.accelerator.clip_grad_norm_(model.parameters(), 1.0)
            trl_trainer.optimizer.step()
            trl_trainer.lr_scheduler.step()
            model.zero_grad()

        return timed(step), int(inputs["attention_mask"].sum())

    records = {"rpo": [], "trl": []}
    for index in range(total):
        batch = rpo_trainer.batcher.batch(index // batches, index % batches)
        rows = [int(row) for row in batch["row_ids"][:batch["num_chosen"]]]  # pairs: chosen row = the pair's row
        sides = [("rpo", lambda: (timed(lambda: rpo_trainer.train_step(batch)), int(batch["attention_mask"].sum()))),
                 ("trl", lambda: trl_step(rows))]
        for side, run in (sides if index % 2 == 0 else sides[::-1]):  # alternating order
            (seconds, cpu_seconds), tokens = run()
            if index >= spec["warmup"]:
                records[side].append({"seconds": seconds, "cpu_seconds": cpu_seconds, "tokens": tokens})
    ratio = statistics.median((r["tokens"] / r["cpu_seconds"]) / (t["tokens"] / t["cpu_seconds"])
                              for r, t in zip(records["rpo"], records["trl"]))
    wall_ratio = statistics.median((r["tokens"] / r["seconds"]) / (t["tokens"] / t["seconds"])
                                   for r, t in zip(records["rpo"], records["trl"]))
    return {"paired_cpu_speed_ratio": ratio, "paired_wall_speed_ratio": wall_ratio, "steps": records,
            "same_tokens": all(r["tokens"] == t["tokens"] for r, t in zip(records["rpo"], records["trl"]))}


def _rpo_run(spec: dict, threads: int) -> dict:
    rpo_spec = dict(model=spec["model"], data=spec["data"], cache=spec["cache"], cases=[("dpo", "dpo", False, 1)],
                    global_batch=spec["batch"], max_length=spec["max_length"],
                    max_prompt_length=spec["max_length"] // 2, steps=spec["steps"], warmup=spec["warmup"],
                    threads=threads)
    result = _common.run_worker(HERE / "trainer_step.py", rpo_spec, env=_common.benchmark_env(threads),
                                timeout=7200)[0]["dpo"]
    return result


def _paired_run(spec: dict, threads: int, trl_python: Path) -> dict:
    env = _common.benchmark_env(threads, PAIRED="1")
    # TRL's environment, with the checkout (rpo, benchmarks/) importable.
    env["PYTHONPATH"] = os.pathsep.join([str(_common.REPO), str(HERE)])
    return _common.run_worker(__file__, dict(spec, threads=threads), python=str(trl_python), env=env,
                              timeout=7200)[0]


def _trl_run(spec: dict, threads: int, trl_python: Path, gradient_checkpointing: bool) -> dict:
    trl_spec = dict(spec, threads=threads, gradient_checkpointing=gradient_checkpointing)
    env = _common.benchmark_env(threads)
    env.pop("PYTHONPATH", None)  # TRL's environment must not see the checkout
    return _common.run_worker(__file__, trl_spec, python=str(trl_python), env=env, timeout=7200)[0]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trl-python", type=Path, default=DEFAULT_TRL_PYTHON,
                        help="interpreter of the environment that has trl installed")
    parser.add_argument("--models", nargs="+", default=["tiny", "smollm2"], choices=["tiny", "smollm2"])
    parser.add_argument("--batch", type=int, default=4, help="pairs per optimizer step")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per side")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rows", type=int, default=64, help="rows of ../shared/data/paired.jsonl used")
    parser.add_argument("--lengths", nargs="+", default=["32+32", "64+192"], metavar="PROMPT+ANSWER",
                        help="row lengths: prompt tokens + answer tokens kept per row (default: 64 and 256 tokens)")
    parser.add_argument("--trl-variants", nargs="+", default=["plain", "checkpointing"],
                        choices=["plain", "checkpointing"],
                        help="plain: gradient_checkpointing=False (like rpo); checkpointing: TRL's default True")
    parser.add_argument("--no-paired", dest="paired", action="store_false",
                        help="skip the paired run (rpo and TRL alternating in one process on the same rows)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path, default=_common.default_output("trl_dpo"))


def _lengths(values: list, parser: argparse.ArgumentParser) -> list:
    lengths = []
    for value in values:
        try:
            prompt, answer = (int(part) for part in value.split("+"))
        except ValueError:
            parser.error(f"--lengths {value!r}: expected PROMPT+ANSWER token counts, e.g. 32+32")
        lengths.append((prompt, answer))
    return lengths


def check_trl_python(trl_python: Path, parser: argparse.ArgumentParser) -> None:
    """parser.error unless `trl_python` exists and imports trl."""
    if not trl_python.exists():
        parser.error(f"{trl_python} does not exist: run `make bench-trl` (it creates the TRL environment)")
    probe = subprocess.run([str(trl_python), "-c", "import trl; print(trl.__version__)"], capture_output=True,
                           text=True, env=_common.benchmark_env())
    if probe.returncode != 0:
        parser.error(f"{trl_python} cannot import trl:\n{probe.stderr[-2000:]}")


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    check_trl_python(args.trl_python, parser)
    lengths = _lengths(args.lengths, parser)
    assets = _common.cache_root()
    folders = {"tiny": _common.tiny_llama_folder(assets / "models", hidden=128, layers=2, heads=4, kv_heads=2,
                                                 intermediate=256),
               "smollm2": _common.smollm2_folder()}
    rows = []
    versions = None
    machine = _common.machine_info("cpu")
    machine["torch_threads"] = args.threads
    failures = []
    for prompt_tokens, answer_tokens in lengths:
        data = _common.short_paired_subset(assets / "data", args.rows, prompt_tokens=prompt_tokens,
                                           response_tokens=answer_tokens)
        max_length = 4 * (prompt_tokens + answer_tokens)  # above every shortened row: no truncation
        for name in args.models:
            spec = dict(model=str(folders[name]), data=str(data), cache=str(assets / "rpo-cache"), batch=args.batch,
                        max_length=max_length, steps=args.steps, warmup=args.warmup)
            runs = {}
            started = time.perf_counter()
            paired = None
            try:
                runs["rpo"] = _rpo_run(spec, args.threads)
                for variant in args.trl_variants:
                    label = "trl" if variant == "plain" else "trl, its defaults (gradient checkpointing)"
                    runs[label] = _trl_run(spec, args.threads, args.trl_python, variant == "checkpointing")
                    versions = runs[label]["versions"]
                if args.paired:
                    paired = _paired_run(spec, args.threads, args.trl_python)
            except RuntimeError as error:  # keep the other cases' numbers; report and exit non-zero at the end
                failures.append(f"{name} {prompt_tokens}+{answer_tokens}: {error}")
                print(f"{name} {prompt_tokens}+{answer_tokens} FAILED:\n{error}", flush=True)
                continue
            print(f"{name} {prompt_tokens}+{answer_tokens}: {time.perf_counter() - started:.0f} s", flush=True)
            first = len(rows)
            for label, result in runs.items():
                rows.append({"model": name, "lengths": f"{prompt_tokens}+{answer_tokens}", "library": label,
                             "tokens_per_step": result["tokens_per_step"], "median_ms": result["median_ms"],
                             "tokens_per_s": result["tokens_per_step"] / (result["median_ms"] / 1e3),
                             "cpu_ms": result["cpu_ms"],
                             "tokens_per_cpu_s": result["tokens_per_step"] / (result["cpu_ms"] / 1e3),
                             "peak_extra_mib": result["peak_extra_mib"], "resident_mib": result["resident_mib"],
                             "step_ms": result["step_ms"]})
            ours = rows[first]
            for row in rows[first:]:
                row["rpo_speed_ratio"] = _common.ratio(ours["tokens_per_s"], row["tokens_per_s"])
                row["rpo_cpu_speed_ratio"] = _common.ratio(ours["tokens_per_cpu_s"], row["tokens_per_cpu_s"])
                row["rpo_memory_ratio"] = _common.ratio(ours["peak_extra_mib"], row["peak_extra_mib"])
                if paired is not None and row["library"] == "trl":
                    row["rpo_paired_cpu_speed_ratio"] = paired["paired_cpu_speed_ratio"]
                    row["rpo_paired_wall_speed_ratio"] = paired["paired_wall_speed_ratio"]
                    row["paired_steps"] = paired["steps"]
            machine["trl_environment"] = versions
            _common.write_results(args.out, machine=machine, settings=vars(args), rows=rows)  # after each case

    columns = [("model", "model", ""), ("prompt+answer", "lengths", ""), ("library", "library", ""),
               ("tokens/step", "tokens_per_step", ".0f"), ("median step ms", "median_ms", ".0f"),
               ("tokens/s", "tokens_per_s", ".0f"), ("CPU ms/step", "cpu_ms", ".0f"),
               ("tokens/CPU-s", "tokens_per_cpu_s", ".0f"), ("step peak MiB", "peak_extra_mib", ".0f"),
               ("resident MiB", "resident_mib", ".0f"), ("rpo speed ÷ this", "rpo_speed_ratio", ".2f"),
               ("same, CPU time", "rpo_cpu_speed_ratio", ".2f"),
               ("same, paired CPU time", "rpo_paired_cpu_speed_ratio", ".2f"),
               ("rpo memory ÷ this", "rpo_memory_ratio", ".2f")]
    if rows:  # (a run where every case failed keeps the previous results file)
        _common.report(args.out, columns, rows, machine=machine, settings=vars(args), notes=[
            f"TRL side: {versions}",
            f"batch {args.batch} pairs, rows of ≤ prompt + ≤ answer tokens as listed, median of {args.steps} steps "
            f"after {args.warmup}, float32; paired: rpo and TRL alternating in one process on the same rows, the "
            f"median over steps of the ratio of tokens per CPU second"])
    for row in rows:
        if row["library"] == "trl":
            speed, memory = row["rpo_speed_ratio"], row["rpo_memory_ratio"]
            paired = row.get("rpo_paired_cpu_speed_ratio")
            paired_text = f", {paired:.2f}× paired CPU time" if paired is not None else ""
            best = min(speed, row["rpo_cpu_speed_ratio"], paired if paired is not None else speed)
            print(f"goals vs TRL on {row['model']} at {row['lengths']} tokens: speed {speed:.2f}× wall, "
                  f"{row['rpo_cpu_speed_ratio']:.2f}× CPU time{paired_text} ({'met' if best >= 1.2 else 'NOT met'}, "
                  f"goal ≥ 1.2), peak memory {memory:.2f}× ({'met' if memory <= 0.5 else 'NOT met'}, goal ≤ 0.5)")
    if failures:
        print(f"{len(failures)} case(s) failed: {[f.split(':')[0] for f in failures]}")
        return 1
    return 0


def _worker(spec: dict) -> dict:
    return _paired_worker(spec) if os.environ.get("PAIRED") == "1" else _trl_worker(spec)


def main(argv=None) -> int:
    # The --worker processes run the TRL side or the paired comparison (in TRL's own environment, see _trl_run).
    return _common.benchmark_main(__doc__, add_arguments, run, worker=_worker, argv=argv)


if __name__ == "__main__":
    sys.exit(main())
