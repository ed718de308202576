"""On-policy preference pairs: ``rpo-generate`` / ``python -m rpo.generation`` (docs/generation.md).

    rpo-generate --model runs/x/final --prompts prompts.jsonl --samples-per-prompt 4 --judge vader \\
        --output-dir pairs/                         # pairs/pairs.jsonl: best vs worst sample of every prompt
    torchrun --nproc-per-node 2 -m rpo.generation ...   # the batches sharded over the ranks

K samples per prompt from the policy (a Hugging Face folder, a run's final/ or Hub name), batched through
``generate`` with its KV cache and seeded per sample (rpo.evaluation.sampling: a sample is the same whatever the
ranks or batches), each scored by a pointwise judge (rpo.evaluation.judges) on the rank that drew it. Every
batch is appended to ``samples.rank<R>.jsonl`` at once; a rerun with the same settings skips the batches already
there (resume). Rank 0 then writes ``samples.jsonl`` (every sample: text, score, whether it ended, log-prob), the
training rows (``pairs.jsonl`` or ``unpaired.jsonl``, rpo.generation.pairs) and ``summary.json`` (the counts).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Optional

logger = logging.getLogger("rpo.generate")

SETTINGS_FILE = "generate_config.json"
# Settings that decide the samples and their scores: a resume must match them (the batch size does not change a
# sample's random stream, only float rounding, and may differ).
SAMPLE_SETTINGS = ("model", "prompts", "prompts_digest", "samples_per_prompt", "max_new_tokens", "temperature",
                   "top_p", "seed", "max_prompt_length", "max_prompts", "dtype", "judge", "judge_options",
                   "judge_model", "reward_fn")


class GenerationError(ValueError):
    """Bad input or state of a generation run; the message names the option or file. ``everywhere``: raised on
    every rank alike (printed by rank 0 only)."""

    def __init__(self, message: str, everywhere: bool = False):
        super().__init__(message)
        self.everywhere = everywhere


def build_parser(prog: str = "rpo-generate") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="On-policy preference data: K samples per prompt from a policy, scored by a judge, written as "
        "paired (best vs worst) or unpaired (score threshold) JSONL for rpo-train. Resumable; shards over the "
        "ranks of torchrun.")
    model = parser.add_argument_group("policy")
    model.add_argument("--model", default=None, metavar="DIR",
                       help="Policy to sample: a Hugging Face folder (a run's final/) or Hub name. Default: the "
                       "embedded SmolLM2-135M-Instruct.")
    model.add_argument("--tokenizer", default=None, metavar="DIR", help="Tokenizer (default: --model's, else the "
                       "run's).")
    model.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                       help="auto = bfloat16 on GPU, float32 on CPU.")
    model.add_argument("--trust-remote-code", action="store_true", help="Allow model code from the model folder.")
    data = parser.add_argument_group("prompts and sampling")
    data.add_argument("--prompts", required=True, metavar="FILE",
                      help="Prompt file: .jsonl/.json rows with a 'prompt' field (a string or messages), or .txt "
                      "one prompt per line.")
    data.add_argument("--max-prompts", type=int, default=None, metavar="N", help="The first N prompts only.")
    data.add_argument("--samples-per-prompt", type=int, default=4, metavar="K", help="Samples drawn per prompt.")
    data.add_argument("--max-new-tokens", type=int, default=128, help="Tokens per sample at most (a sample that "
                      "reaches it without ending is cut off, and never trained on).")
    data.add_argument("--max-prompt-length", type=int, default=256, help="Prompt tokens (truncated on the left).")
    data.add_argument("--temperature", type=float, default=1.0, help="Sampling temperature (0 = greedy).")
    data.add_argument("--top-p", type=float, default=1.0, help="Nucleus sampling mass.")
    data.add_argument("--seed", type=int, default=0, help="Seed of every sample's random stream.")
    data.add_argument("--batch-size", type=int, default=16, help="Samples per generate call.")
    judge = parser.add_argument_group("judge")
    judge.add_argument("--judge", default="vader", metavar="NAME",
                       help="Pointwise judge: vader, hf (--judge-model DIR), python (--reward-fn), openai "
                       "(--judge-option url=... --judge-model NAME), a plugin's registered name, 'file.py:fn' or "
                       "'pkg.module:fn'.")
    judge.add_argument("--judge-model", default=None, help="hf: the model folder; openai: the model name.")
    judge.add_argument("--reward-fn", default=None, metavar="MODULE:FN", help="--judge python: the function.")
    judge.add_argument("--judge-option", action="append", default=[], metavar="KEY=VALUE",
                       help="A judge option (VALUE parsed as YAML); repeatable.")
    out = parser.add_argument_group("output")
    out.add_argument("--output-dir", required=True, metavar="DIR", help="Where the samples and rows are written.")
    out.add_argument("--format", choices=("paired", "unpaired"), default="paired",
                     help="paired: pairs.jsonl, best vs worst sample per prompt; unpaired: unpaired.jsonl, every "
                     "sample labelled by --threshold.")
    out.add_argument("--min-gap", type=float, default=0.0,
                     help="paired: the smallest best - worst score gap written (equal scores are always dropped).")
    out.add_argument("--threshold", type=float, default=0.0,
                     help="unpaired: desirable above, undesirable below (equal: dropped).")
    out.add_argument("--overwrite", action="store_true", help="Start afresh in a used --output-dir.")
    out.add_argument("--no-progress", action="store_true", help="No progress bar (log lines instead).")
    return parser


def _check_args(parser, args) -> None:
    for name in ("samples_per_prompt", "max_new_tokens", "max_prompt_length", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.max_prompts is not None and args.max_prompts < 1:
        parser.error(f"--max-prompts must be >= 1, got {args.max_prompts}")
    if args.temperature < 0:
        parser.error(f"--temperature must be >= 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        parser.error(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.min_gap < 0:
        parser.error(f"--min-gap must be >= 0, got {args.min_gap}")
    if args.format == "paired" and args.samples_per_prompt < 2:
        parser.error("--format paired needs --samples-per-prompt >= 2 (a pair is two samples of one prompt)")
    from rpo.evaluation.cli import parse_judge_options

    try:
        args.judge_options = parse_judge_options(args.judge_option)
    except ValueError as err:
        parser.error(str(err))


def _build_judge(args):
    from rpo.evaluation.judges import build_judge

    options = dict(args.judge_options)
    if args.judge == "python":
        if not args.reward_fn:
            raise GenerationError("--judge python needs --reward-fn MODULE:FN")
        options.setdefault("fn", args.reward_fn)
    elif args.reward_fn:
        raise GenerationError("--reward-fn is used only with --judge python")
    if args.judge in ("hf", "openai") and args.judge_model:
        options.setdefault("model", args.judge_model)
    try:
        return build_judge(args.judge, **options)
    except ValueError as err:
        raise GenerationError(f"--judge {args.judge}: {err}") from err


# --- the shard files -------------------------------------------------------------------------------------------

def shard_path(out: Path, rank: int) -> Path:
    return out / f"samples.rank{rank}.jsonl"


def read_shards(out: Path) -> list[dict]:
    """Every sample line of every shard (any number of ranks wrote them); a torn last line is left out."""
    rows = []
    for path in sorted(out.glob("samples.rank*.jsonl")):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                logger.warning("%s: line %d is incomplete (an interrupted write) and is sampled again", path,
                               number + 1)
    return rows


def _open_for_append(path: Path):
    """Append mode, after cutting a torn last line (a write interrupted by a kill) back to the last newline."""
    if path.is_file():
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            with open(path, "r+b") as handle:
                handle.truncate(data.rfind(b"\n") + 1)
    return open(path, "a", encoding="utf-8")


# --- the run ---------------------------------------------------------------------------------------------------

def _distributed():
    """(rank, world size, process group initialised here)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world == 1:
        return 0, 1, False
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
        return rank, world, True
    return dist.get_rank(), dist.get_world_size(), False


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def _settings(args, prompts: list) -> dict:
    import hashlib

    digest = hashlib.sha256(json.dumps(prompts, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]
    return {"model": str(args.model), "prompts": str(args.prompts), "prompts_digest": digest,
            "samples_per_prompt": args.samples_per_prompt, "max_new_tokens": args.max_new_tokens,
            "temperature": args.temperature, "top_p": args.top_p, "seed": args.seed,
            "max_prompt_length": args.max_prompt_length, "max_prompts": args.max_prompts, "dtype": args.dtype,
            "judge": args.judge, "judge_options": {k: v for k, v in args.judge_options.items() if k != "api_key"},
            "judge_model": args.judge_model, "reward_fn": args.reward_fn, "batch_size": args.batch_size}


def _prepare_output(out: Path, settings: dict, overwrite: bool, rank: int, world: int) -> bool:
    """Checks (and on rank 0 writes) the run's settings; True when earlier samples are resumed."""
    path = out / SETTINGS_FILE
    resumed = False
    if rank == 0:
        if overwrite and out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        if path.is_file():
            previous = json.loads(path.read_text())
            changed = [k for k in SAMPLE_SETTINGS if previous.get(k) != json.loads(json.dumps(settings)).get(k)]
            if changed:
                raise GenerationError(
                    f"--output-dir {out} holds samples drawn with other settings ({', '.join(changed)}); pass "
                    f"--overwrite to start afresh or choose another folder")
            resumed = True
        elif any(out.glob("samples.rank*.jsonl")):
            raise GenerationError(f"--output-dir {out} holds samples but no {SETTINGS_FILE}; pass --overwrite")
        path.write_text(json.dumps(settings, indent=1) + "\n")
    return resumed


def generate(args) -> dict[str, Any]:
    import torch

    from rpo.evaluation.cli import load_model, load_tokenizer, resolve_device_dtype, find_run_config, \
        load_run_config
    from rpo.evaluation.generation import load_prompt_file
    from rpo.evaluation.judges import checked_scores
    from rpo.evaluation.sampling import encode_prompts, end_token_ids, plan_batches, sample_batch
    from rpo.generation.pairs import build_pairs, build_unpaired

    rank, world, own_group = _distributed()
    try:
        if args.model is None:
            from rpo.models.default_model import default_model_path

            args.model = str(default_model_path())
        try:
            prompt_rows = load_prompt_file(args.prompts, baseline_field=None)
        except (ValueError, FileNotFoundError) as err:
            raise GenerationError(f"--prompts: {err}") from err
        if args.max_prompts is not None:
            prompt_rows = prompt_rows[: args.max_prompts]
        prompts = [row.prompt for row in prompt_rows]
        out = Path(args.output_dir)
        settings = _settings(args, prompts)
        # Rank 0 checks and prepares the folder; an error there is every rank's (one line, exit 2 on each).
        error = None
        try:
            _prepare_output(out, settings, args.overwrite, rank, world)
        except GenerationError as err:
            error = str(err)
        if world > 1:
            import torch.distributed as dist

            box = [error]
            dist.broadcast_object_list(box, src=0)
            error = box[0]
        if error:
            raise GenerationError(error, everywhere=True)

        device, dtype = resolve_device_dtype(
            f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available() else "cpu", args.dtype)
        if device.type == "cpu":
            torch.set_flush_denormal(True)
        fallbacks = []
        config_path = find_run_config(args.model)
        if config_path is not None:
            config = load_run_config(config_path)
            fallbacks = [p for p in (config.tokenizer, config.model) if p]
        tokenizer = load_tokenizer([args.tokenizer or args.model] + ([] if args.tokenizer else fallbacks),
                                   args.trust_remote_code)
        model = load_model(args.model, device, dtype, args.trust_remote_code)
        judge = _build_judge(args)
        torch.manual_seed(args.seed)  # nothing should draw from it; samples use their own streams

        encoded = encode_prompts(tokenizer, prompts, args.max_prompt_length)
        batches = plan_batches([len(encoded[i]) for i in range(len(prompts))], args.samples_per_prompt,
                               args.batch_size)
        done = {(r["prompt_index"], r["sample_index"]) for r in read_shards(out)}
        mine = [b for index, b in enumerate(batches) if index % world == rank]
        pending = [b for b in mine if not all(tuple(u) in done for u in b)]
        if rank == 0 and done:
            logger.info("resuming: %d of %d samples already drawn in %s", len(done),
                        len(prompts) * args.samples_per_prompt, out)
        end_ids = end_token_ids(tokenizer, model)
        from rpo.progress import StageProgress

        started = time.monotonic()
        with StageProgress(f"sampling (rank {rank})" if world > 1 else "sampling",
                           sum(len(b) for b in pending), progress=not args.no_progress and rank == 0,
                           logger=logger, unit="samples") as bar, _open_for_append(shard_path(out, rank)) as shard:
            for units in pending:
                samples = sample_batch(model, tokenizer, units, encoded, max_new_tokens=args.max_new_tokens,
                                       temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                                       end_ids=end_ids)
                scores = checked_scores(judge, [prompts[s.prompt_index] for s in samples], [s.text for s in samples])
                shard.write("".join(json.dumps({**s.to_dict(), "score": None if math.isnan(v) else v},
                                               ensure_ascii=False) + "\n" for s, v in zip(samples, scores)))
                shard.flush()
                os.fsync(shard.fileno())
                bar.update(len(samples))
        seconds = time.monotonic() - started
        _barrier(world)
        summary = None
        if rank == 0:
            summary = _write_outputs(args, out, prompt_rows, prompts, build_pairs, build_unpaired)
            summary["sampling_seconds_rank0"] = round(seconds, 1)
            summary["world_size"] = world
            (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        _barrier(world)
        return summary or {}
    finally:
        if own_group:
            import torch.distributed as dist

            dist.destroy_process_group()


def _write_outputs(args, out: Path, prompt_rows, prompts, build_pairs, build_unpaired) -> dict:
    rows = read_shards(out)
    unique: dict = {}
    for row in rows:
        key = (row["prompt_index"], row["sample_index"])
        if key in unique and unique[key] != row:
            raise GenerationError(f"{out}: sample {key} was drawn twice with different results; --overwrite")
        unique[key] = row
    expected = {(i, k) for i in range(len(prompts)) for k in range(args.samples_per_prompt)}
    missing = sorted(expected - set(unique))
    if missing:
        raise GenerationError(f"{out}: {len(missing)} samples missing after sampling (e.g. {missing[:3]})")
    samples = [unique[key] for key in sorted(expected)]
    source_rows = [row.source_row for row in prompt_rows]
    with open(out / "samples.jsonl", "w", encoding="utf-8") as handle:
        for sample in samples:
            handle.write(json.dumps({**sample, "source_row": source_rows[sample["prompt_index"]]},
                                    ensure_ascii=False) + "\n")
    if args.format == "paired":
        data, counts = build_pairs(samples, prompts, source_rows, args.min_gap)
        name = "pairs.jsonl"
    else:
        data, counts = build_unpaired(samples, prompts, source_rows, args.threshold)
        name = "unpaired.jsonl"
    with open(out / name, "w", encoding="utf-8") as handle:
        for row in data:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    scores = [s["score"] for s in samples if s["score"] is not None]
    return {"format": args.format, "output": str(out / name), **counts,
            "mean_score": sum(scores) / len(scores) if scores else None,
            "zero_scores": sum(1 for s in scores if s == 0)}


def format_summary(summary: dict) -> str:
    text = (f"{summary['samples']} samples of {summary['prompts']} prompts ({summary['cut_off']} cut off, "
            f"{summary['unscored']} unscored); {summary['written']} {summary['format']} rows written to "
            f"{summary['output']}")
    if summary["format"] == "paired":
        text += (f"; {summary['tied']} prompts tied (gap <= 0 or < {summary['min_gap']:g}), "
                 f"{summary['too_few_usable']} with fewer than 2 ended, scored samples")
    else:
        text += (f" ({summary['desirable']} desirable, {summary['undesirable']} undesirable); "
                 f"{summary['at_threshold']} at the threshold {summary['threshold']:g} dropped")
    return text


def main(argv: Optional[list] = None, prog: str = "rpo-generate") -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    _check_args(parser, args)
    rank = int(os.environ.get("RANK", "0"))
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from rpo.evaluation.cli import EvaluationError
    from rpo.evaluation.judge import JudgeError

    try:
        summary = generate(args)
    except (GenerationError, EvaluationError, JudgeError) as err:
        if rank == 0 or not getattr(err, "everywhere", False):
            where = f" (rank {rank})" if int(os.environ.get("WORLD_SIZE", "1")) > 1 and rank else ""
            print(f"{parser.prog}: error{where}: {err}", file=sys.stderr)
        return 2
    if rank == 0:
        print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
