"""Reward-KL frontier: does RPO (local, global at two contrast sizes) align better than DPO at matched KL?

The controlled-sentiment task (the DPO paper's §6.1, on our own prompts): an external judge, VADER's compound
sentiment (-1..1), scores what the policy writes for opinion and review prompts (benchmarks/data/, split by topic).

1. pairs: the starting model (SmolLM2-135M-Instruct, the embedded default) samples K answers to every training
   prompt (`rpo-generate`, 2 ranks); best vs worst by VADER, ties and cut-off samples dropped and counted;
2. the reference point: the starting model's own held-out score (and its samples, reused by every evaluation);
3. every method at every value of its sweep trains from the same start on the same pairs (the same number of
   pairs seen, reference log-probs precomputed, 2 CPU ranks x 1 thread), then `rpo-eval --judge vader --kl` samples
   n answers per held-out prompt: mean score and KL(policy || reference), 95% t intervals over prompts, the score
   paired by prompt with the reference's samples (common random numbers);
4. report: the frontier plot (score vs KL with both intervals, one line per method), the table, the score of each
   point against DPO's frontier interpolated at the point's KL (paired by prompt), and JSON.

Methods: dpo; simpo; rpo local (each micro-batch's 4x4 matrix, the authors' per-GPU form); rpo --global-contrast
over 8 columns (2 ranks x 4) and over 64 columns (2 ranks x 4 x 8 micro-batches, the two-pass global matrix).
The contrast options are explicit, so a row keeps its meaning if a default changes: the global variants name
--global-contrast's default, --weight-normalization reference_columns with K = 8 (every pair weighs what it weighs
in the authors' 8-column per-GPU matrix; at 8 columns the same as row), the local 4x4 the paper's row. Each method traces its frontier over the learning
rate (with RMSprop's normalised steps, beta hardly moves the policy at this budget; the lr does).

    python benchmarks/frontier.py                 # the full run, about 2 hours on 2 cores
    python benchmarks/frontier.py --quick         # dpo and rpo global-8 at 2 learning rates, ~10 minutes
    python benchmarks/frontier.py --gpu           # the GPU stage's preset (benchmarks/gpu_check.sh)
    python benchmarks/frontier.py --dry-run       # the plan and commands, nothing run
    python benchmarks/frontier.py --resume        # keep finished pairs, trainings and evaluations
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[1]
PROMPTS = REPO / "benchmarks" / "data" / "sentiment_prompts.jsonl"
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
import _common  # noqa: E402

# The global rpo variants: --global-contrast's default normalisation, named (see the module docstring).
GLOBAL_DEFAULT = ("--weight-normalization", "reference_columns", "--normalization-columns", "8")


@dataclass(frozen=True)
class Method:
    name: str
    args: Sequence[str]
    global_batch: int  # pairs per step = the global contrast's columns for --global-contrast
    lrs: Sequence[float]  # the sweep that traces the method's frontier
    contrast: str = "-"
    note: str = ""


METHODS: List[Method] = [
    Method("dpo", ["--loss", "dpo", "--beta", "0.1"], 8, (1e-6, 2e-6, 4e-6), "diagonal"),
    Method("simpo", ["--loss", "simpo"], 8, (1e-6, 2e-6, 4e-6), "diagonal", "beta 2, no reference"),
    Method("rpo-local", ["--loss", "rpo", "--beta", "0.1", "--weight-normalization", "row"], 8,
           (1e-6, 2e-6, 4e-6), "4x4 per micro-batch", "the authors' per-GPU matrix"),
    Method("rpo-global-8", ["--loss", "rpo", "--beta", "0.1", "--global-contrast", *GLOBAL_DEFAULT], 8,
           (1e-6, 2e-6, 4e-6), "8x8 global", "2 ranks x 4"),
    # The learning rates put the batch-8 methods' KL at about 1-10 nats after 24 steps (measured with --quick: 3
    # steps of dpo at 5e-6 -> KL 1.0, at 2e-5 -> 10; RMSprop's first steps are the largest). 64 pairs a step: 8x
    # fewer steps for the same pairs seen, so its sweep sits at larger learning rates.
    Method("rpo-global-64", ["--loss", "rpo", "--beta", "0.1", "--global-contrast", *GLOBAL_DEFAULT], 64,
           (5e-6, 1e-5, 2e-5), "64x64 global", "2 ranks x 4 x 8 micro-batches, two-pass"),
]
QUICK_METHODS = ("dpo", "rpo-global-8")
QUICK_LRS = (5e-6, 2e-5)

# The budget of each preset: what the pairs, trainings and evaluations cost (see docs/frontier.md for the timing).
PRESETS: Dict[str, Dict[str, object]] = {
    # 64 new tokens: at 48 a third of SmolLM2's answers to these prompts were cut off (and dropped from the pairs).
    "full": dict(train_prompts=None, samples_per_prompt=7, pairs_per_run=192, eval_prompts=None, eval_samples=2,
                 max_new_tokens=64, nproc=2, parallel=1, lr_scale=1.0),
    "quick": dict(train_prompts=32, samples_per_prompt=4, pairs_per_run=24, eval_prompts=24, eval_samples=2,
                  max_new_tokens=48, nproc=2, parallel=1, lr_scale=1.0),
    # At least 10x the CPU run's training pairs per run and evaluation samples; 16 samples per training prompt;
    # one process per training, 4 points (training then evaluation) at once on the one GPU. 10x the steps: the
    # learning rates x0.15 (an estimate from KL ~ (lr x steps)^1.7 measured on the CPU; not yet run on a GPU).
    "gpu": dict(train_prompts=None, samples_per_prompt=16, pairs_per_run=1920, eval_prompts=None, eval_samples=20,
                max_new_tokens=48, nproc=1, parallel=4, lr_scale=0.15),
}


@dataclass
class Point:
    method: str
    lr: float
    status: str = "ok"
    reason: str = ""
    train_s: float = 0.0
    eval_s: float = 0.0
    steps: int = 0
    global_batch: int = 0
    contrast: str = ""
    kl: Optional[dict] = None
    score: Optional[dict] = None
    difference: Optional[dict] = None  # score - reference score, paired by prompt
    vs_dpo: Optional[dict] = None  # score - DPO's frontier at this KL, paired by prompt
    cut_off: Optional[float] = None
    final_train_loss: Optional[float] = None
    per_prompt: Dict[str, list] = field(default_factory=dict)


def benchmark_env(threads: int = 1) -> Dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(threads))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return env


def run_logged(what: str, command: List[str], log: Path, timeout: float) -> tuple:
    """(seconds, None) when `command` succeeded, else (seconds, why) naming its log."""
    return _common.run_logged(what, command, log, timeout, cwd=REPO, env=benchmark_env(), label="frontier")


# --- prompts -------------------------------------------------------------------------------------------------------

def write_prompt_splits(out: Path, train_prompts: Optional[int], eval_prompts: Optional[int]) -> Dict[str, Path]:
    """train.jsonl and held_out.jsonl from the prompt set (its split field); the first N of each if asked."""
    rows = [json.loads(line) for line in PROMPTS.read_text().splitlines() if line.strip()]
    paths = {}
    for split, limit in (("train", train_prompts), ("held_out", eval_prompts)):
        chosen = [r for r in rows if r["split"] == split]
        if limit is not None:
            # A spread over the topics (every k-th), not the first category only.
            step = max(1, len(chosen) // limit)
            chosen = chosen[::step][:limit]
        paths[split] = out / "prompts" / f"{split}.jsonl"
        paths[split].parent.mkdir(parents=True, exist_ok=True)
        paths[split].write_text("".join(json.dumps({"prompt": r["prompt"], "topic": r["topic"]}) + "\n"
                                        for r in chosen))
    return paths


# --- the stages ----------------------------------------------------------------------------------------------------

def generate_command(args, model: str, prompts: Path, out: Path) -> List[str]:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.nproc)]
                if args.nproc > 1 else [sys.executable])
    return [*launcher, "-m", "rpo.generation", "--model", model, "--prompts", str(prompts),
            "--samples-per-prompt", str(args.samples_per_prompt), "--max-new-tokens", str(args.max_new_tokens),
            "--max-prompt-length", str(args.max_prompt_length), "--judge", "vader", "--seed", str(args.seed),
            "--batch-size", str(args.generation_batch_size), "--output-dir", str(out), "--no-progress"]


def train_arguments(method: Method, lr: float, args, pairs: Path, run_dir: Path) -> List[str]:
    steps = max(1, args.pairs_per_run // method.global_batch)
    micro = min(4, method.global_batch // args.nproc)
    return [*method.args, "--dataset", str(pairs), "--eval-split-fraction", "0", "--eval-every", "0",
            "--save-every", "0", "--max-steps", str(steps), "--global-batch-size", str(method.global_batch),
            "--micro-batch-size", str(micro), "--max-prompt-length", str(args.max_prompt_length),
            "--max-length", str(args.max_length), "--lr", f"{lr:g}", "--seed", str(args.seed),
            "--precompute-reference", "--cache-dir", str(args.cache_dir), "--no-progress-bar",
            "--output-dir", str(run_dir / "train"), "--overwrite"]


def eval_command(args, model: str, reference: str, held_out: Path, run_dir: Path) -> List[str]:
    return [sys.executable, "examples/evaluate.py", "--model", model, "--reference", reference,
            "--prompts", str(held_out), "--judge", "vader", "--kl", "--samples-per-prompt", str(args.eval_samples),
            "--max-new-tokens", str(args.max_new_tokens), "--max-prompt-length", str(args.max_prompt_length),
            "--max-length", str(args.max_length), "--seed", str(args.seed + 1),
            "--generation-batch-size", str(args.generation_batch_size), "--batch-size", "16",
            "--reference-samples", str(args.out / "reference_samples.jsonl"),
            "--output-json", str(run_dir / "eval.json"), "--samples-output", str(run_dir / "samples.jsonl"),
            "--no-progress"]


def plan(args, methods: Sequence[Method]) -> List[tuple]:
    return [(method, float(f"{lr * args.lr_scale:.3g}")) for method in methods
            for lr in (QUICK_LRS if args.quick else method.lrs)]


def point_name(method: Method, lr: float) -> str:
    return f"{method.name}-lr{lr:g}"


class Evaluation:
    """A policy's evaluation in its own process (one thread), overlapping the next training."""

    def __init__(self, point: Point, command: List[str], run_dir: Path, timeout: float, reuse: bool):
        self.point, self.run_dir, self.timeout = point, run_dir, timeout
        self.started = time.perf_counter()
        self.process = None
        self.log = run_dir / "eval.log"
        if reuse and (run_dir / "eval.json").is_file():
            return
        self.handle = open(self.log, "w")
        self.handle.write("$ " + " ".join(command) + "\n")
        self.handle.flush()
        self.process = subprocess.Popen(command, cwd=REPO, env=benchmark_env(), stdout=self.handle,
                                        stderr=subprocess.STDOUT)

    def finish(self) -> Point:
        rc = 0
        if self.process is not None:
            try:
                rc = self.process.wait(timeout=self.timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                rc = 124
            self.handle.close()
            self.point.eval_s = time.perf_counter() - self.started
        if rc != 0:
            self.point.status, self.point.reason = "failed", f"evaluation exited {rc}: see {self.log}"
            return self.point
        fill_point(self.point, json.loads((self.run_dir / "eval.json").read_text()))
        return self.point


def fill_point(point: Point, result: dict) -> None:
    data = result["pointwise"]
    point.kl, point.score, point.difference = data.get("kl"), data["score"], data.get("difference")
    point.cut_off = data["cut_off"] / data["samples"] if data["samples"] else None
    point.per_prompt = data["per_prompt"]


# --- matched KL ----------------------------------------------------------------------------------------------------

def t_interval(values: Sequence[float]) -> dict:
    from rpo.evaluation.frontier import mean_interval

    return mean_interval(values)


def versus_frontier(point: Point, frontier: Sequence[Point]) -> Optional[dict]:
    """The point's score minus `frontier`'s (a method's points) linearly interpolated at the point's KL, per
    prompt (the same held-out prompts), with a t interval; None outside the frontier's KL range."""
    ok = sorted((p for p in frontier if p.status == "ok" and p.kl and p.kl["mean"] is not None),
                key=lambda p: p.kl["mean"])
    if point.kl is None or point.kl["mean"] is None or len(ok) < 2:
        return None
    kl = point.kl["mean"]
    for low, high in zip(ok, ok[1:]):
        if low.kl["mean"] <= kl <= high.kl["mean"]:
            span = high.kl["mean"] - low.kl["mean"]
            weight = 0.0 if span == 0 else (kl - low.kl["mean"]) / span
            interpolated = (1 - weight) * np.asarray(low.per_prompt["score"]) + weight * np.asarray(
                high.per_prompt["score"])
            return t_interval(list(np.asarray(point.per_prompt["score"]) - interpolated))
    return None


# --- report --------------------------------------------------------------------------------------------------------

def fmt(summary: Optional[dict], digits: int = 3) -> str:
    from rpo.evaluation.frontier import format_interval

    return format_interval(summary, digits)


def format_table(reference: Optional[Point], points: Sequence[Point]) -> str:
    lines = ["| method | lr | contrast | steps x pairs | KL nats [95% CI] | VADER score [95% CI] | score − reference "
             "[95% CI] | score − dpo at this KL [95% CI] | cut off | train s |", "|" + "---|" * 10]
    rows = ([reference] if reference is not None else []) + list(points)
    for p in rows:
        if p.status != "ok":
            lines.append(f"| {p.method} | {p.lr:g} | {p.contrast} | | {p.status}: {p.reason} | | | | | |")
            continue
        cut = f"{100 * p.cut_off:.0f}%" if p.cut_off is not None else "-"
        lr = f"{p.lr:g}" if p.lr else "-"
        steps = f"{p.steps} x {p.global_batch}" if p.steps else "-"
        lines.append(f"| {p.method} | {lr} | {p.contrast} | {steps} | {fmt(p.kl)} | {fmt(p.score)} | "
                     f"{fmt(p.difference)} | {fmt(p.vs_dpo)} | {cut} | {p.train_s:.0f} |")
    return "\n".join(lines)


def plot_frontier(reference: Optional[Point], points: Sequence[Point], path: Path, title: str) -> Optional[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [p for p in points if p.status == "ok" and p.kl and p.kl["mean"] is not None]
    if not shown:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 5))
    colours = dict(zip([m.name for m in METHODS], plt.cm.tab10.colors))

    def err(summary):
        if summary.get("ci_low") is None:
            return 0.0
        return [[summary["mean"] - summary["ci_low"]], [summary["ci_high"] - summary["mean"]]]

    for name in dict.fromkeys(p.method for p in shown):
        mine = sorted((p for p in shown if p.method == name), key=lambda p: p.kl["mean"])
        ax.plot([p.kl["mean"] for p in mine], [p.score["mean"] for p in mine], "-", color=colours.get(name),
                alpha=0.6)
        for index, p in enumerate(mine):
            ax.errorbar(p.kl["mean"], p.score["mean"], xerr=err(p.kl), yerr=err(p.score), fmt="o", capsize=3,
                        color=colours.get(name), label=name if index == 0 else None)
    if reference is not None and reference.score:
        ax.errorbar(0.0, reference.score["mean"], yerr=err(reference.score), fmt="s", color="black", capsize=3,
                    label="reference (start)")
    ax.set(xlabel="KL(policy || reference), nats per response", ylabel="VADER compound, mean over held-out prompts",
           title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --- main ----------------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    preset = parser.add_mutually_exclusive_group()
    preset.add_argument("--quick", action="store_true", help=f"{', '.join(QUICK_METHODS)} at lr "
                        f"{', '.join(map(str, QUICK_LRS))}, small pairs and held-out sets (~10 minutes)")
    preset.add_argument("--gpu", action="store_true", help="the GPU preset (>= 10x the CPU run's training pairs "
                        "per run and evaluation samples)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and the commands; run nothing")
    parser.add_argument("--methods", default=None, help="comma-separated subset of: "
                        + ", ".join(m.name for m in METHODS))
    parser.add_argument("--model", default=None, help="starting model (default: the embedded SmolLM2-135M-Instruct)")
    for name, kind in (("train-prompts", int), ("samples-per-prompt", int), ("pairs-per-run", int),
                       ("eval-prompts", int), ("eval-samples", int), ("max-new-tokens", int), ("nproc", int),
                       ("parallel", int), ("lr-scale", float)):
        parser.add_argument(f"--{name}", type=kind, default=None, help="default: the preset's")
    parser.add_argument("--max-prompt-length", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--generation-batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per stage process")
    parser.add_argument("--output-dir", default=None,
                        help="default: benchmarks/results/frontier (-quick, -gpu for the presets)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the pairs, trainings and evaluations already finished in the output folder")
    return parser


def resolve(args) -> argparse.Namespace:
    preset = "quick" if args.quick else "gpu" if args.gpu else "full"
    for key, value in PRESETS[preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.preset = preset
    suffix = "" if preset == "full" else f"-{preset}"
    args.out = Path(args.output_dir or REPO / "benchmarks" / "results" / f"frontier{suffix}").resolve()
    args.cache_dir = args.out / ".cache"
    return args


def main(argv=None) -> int:
    args = resolve(build_parser().parse_args(argv))
    names = args.methods.split(",") if args.methods else list(QUICK_METHODS if args.quick else
                                                              [m.name for m in METHODS])
    unknown = sorted(set(names) - {m.name for m in METHODS})
    if unknown:
        print(f"frontier.py: error: unknown method(s) {', '.join(unknown)}", file=sys.stderr)
        return 2
    methods = [m for m in METHODS if m.name in names]
    points = plan(args, methods)
    model = args.model
    if args.dry_run:
        print(f"[frontier] preset {args.preset}: {len(points)} trainings ({', '.join(point_name(m, lr) for m, lr in points)})")
        out = args.out
        print("$ " + " ".join(generate_command(args, model or "<default model>", out / "prompts" / "train.jsonl",
                                               out / "pairs")))
        for method, lr in points[:1]:
            print("$ examples/train.py " + " ".join(train_arguments(method, lr, args, out / "pairs" / "pairs.jsonl",
                                                                     out / point_name(method, lr))))
        print("$ " + " ".join(eval_command(args, "<final>", model or "<default model>",
                                           out / "prompts" / "held_out.jsonl", out / "<point>")))
        from rpo.evaluation import build_judge

        build_judge("vader")  # the judge is importable
        rows = [json.loads(line) for line in PROMPTS.read_text().splitlines()]
        print(f"[frontier] prompt set: {len(rows)} prompts, {sum(r['split'] == 'held_out' for r in rows)} held out")
        return 0

    started = time.perf_counter()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    if model is None:
        from rpo.models.default_model import default_model_path

        model = str(default_model_path(progress=False))
    splits = write_prompt_splits(out, args.train_prompts, args.eval_prompts)
    report: Dict[str, object] = {"date": time.strftime("%Y-%m-%d"), "preset": args.preset,
                                 "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                                              if k not in ("quick", "gpu", "dry_run", "methods")}}

    # 1. pairs from the starting model
    pairs_dir = out / "pairs"
    summary_file = pairs_dir / "summary.json"
    if not (args.resume and summary_file.is_file()):
        print(f"[frontier] pairs: {args.samples_per_prompt} samples per training prompt ...", flush=True)
        seconds, failure = run_logged("rpo-generate", generate_command(args, model, splits["train"], pairs_dir)
                                      + (["--overwrite"] if not args.resume else []), out / "generate.log",
                                      args.timeout)
        if failure:
            print(f"[frontier] {failure}", file=sys.stderr)
            return 1
        report["pairs_s"] = seconds
    pairs = json.loads(summary_file.read_text())
    report["pairs"] = pairs
    print(f"[frontier] pairs: {pairs['written']} written from {pairs['prompts']} prompts x "
          f"{args.samples_per_prompt} ({pairs['tied']} tied, {pairs['too_few_usable']} with < 2 usable samples, "
          f"{pairs['cut_off']} of {pairs['samples']} samples cut off)", flush=True)
    if pairs["written"] < 2:
        print("[frontier] too few pairs to train on", file=sys.stderr)
        return 1

    # 2. the reference point (also writes the reference's samples every evaluation reuses)
    reference = Point("reference", 0.0, contrast="-")
    ref_dir = out / "reference"
    ref_dir.mkdir(exist_ok=True)
    if not (args.resume and (ref_dir / "eval.json").is_file()):
        seconds, failure = run_logged("reference evaluation", eval_command(args, model, model, splits["held_out"],
                                                                            ref_dir), ref_dir / "eval.log",
                                      args.timeout)
        reference.eval_s = seconds
        if failure:
            print(f"[frontier] {failure}", file=sys.stderr)
            return 1
    fill_point(reference, json.loads((ref_dir / "eval.json").read_text()))

    # 3. train and evaluate every point: on a CPU an evaluation overlaps the next training; with --parallel N
    # (the GPU preset) N points run their training then evaluation at once.
    def train(method: Method, lr: float) -> tuple:
        run_dir = out / point_name(method, lr)
        point = Point(method.name, lr, global_batch=method.global_batch, contrast=method.contrast,
                      steps=max(1, args.pairs_per_run // method.global_batch))
        arguments = train_arguments(method, lr, args, pairs_dir / "pairs.jsonl", run_dir)
        record = run_dir / "training.json"
        previous = json.loads(record.read_text()) if record.is_file() else {}
        same = previous.get("arguments") == arguments and (run_dir / "train" / "final").is_dir()
        print(f"[frontier] {point_name(method, lr)} ...", flush=True)
        if args.resume and same:
            point.train_s = previous.get("train_s", 0.0)
        else:
            same = False
            if run_dir.exists():
                shutil.rmtree(run_dir)
            run_dir.mkdir(parents=True)
            launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.nproc)]
                        if args.nproc > 1 else [sys.executable])
            point.train_s, failure = run_logged("training", [*launcher, "examples/train.py", *arguments],
                                                run_dir / "train.log", args.timeout)
            if failure:
                point.status, point.reason = "failed", failure
            else:
                record.write_text(json.dumps({"arguments": arguments, "train_s": point.train_s}))
        metrics = run_dir / "train" / "metrics.jsonl"
        if metrics.is_file():
            losses = [json.loads(line).get("loss") for line in metrics.read_text().splitlines()]
            losses = [x for x in losses if x is not None]
            point.final_train_loss = losses[-1] if losses else None
        return point, run_dir, same

    def evaluation(point: Point, run_dir: Path, reuse: bool) -> Evaluation:
        return Evaluation(point, eval_command(args, str(run_dir / "train" / "final"), model, splits["held_out"],
                                              run_dir), run_dir, args.timeout, reuse=args.resume and reuse)

    results: List[Point] = []
    if args.parallel > 1:
        from concurrent.futures import ThreadPoolExecutor

        def whole(method: Method, lr: float) -> Point:
            point, run_dir, same = train(method, lr)
            finished = evaluation(point, run_dir, same).finish() if point.status == "ok" else point
            report_line(finished)
            return finished

        with ThreadPoolExecutor(args.parallel) as pool:
            results = list(pool.map(lambda item: whole(*item), points))
    else:
        pending: Optional[Evaluation] = None
        for method, lr in points:
            point, run_dir, same = train(method, lr)
            if pending is not None:
                results.append(pending.finish())
                report_line(results[-1])
                pending = None
            if point.status == "ok":
                pending = evaluation(point, run_dir, same)
            else:
                results.append(point)
                report_line(point)
        if pending is not None:
            results.append(pending.finish())
            report_line(results[-1])

    # 4. report
    dpo = [p for p in results if p.method == "dpo"]
    for p in results:
        if p.method != "dpo" and p.status == "ok":
            p.vs_dpo = versus_frontier(p, dpo)
    table = format_table(reference, results)
    plot = plot_frontier(reference, results, out / "frontier.png",
                         f"controlled sentiment, SmolLM2-135M, {pairs['written']} pairs ({args.preset})")
    report.update(total_s=time.perf_counter() - started, machine=machine(), reference=reference.__dict__,
                  points=[p.__dict__ for p in results], plot=str(plot) if plot else None, table=table)
    (out / "frontier.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(table)
    print(f"reference (start): VADER {fmt(reference.score)}; pairs {pairs['written']}; "
          f"{report['total_s']:.0f} s in all; {machine()['description']}")
    print(f"JSON: {out / 'frontier.json'}; plot: {plot}")
    return 0 if all(p.status == "ok" for p in results) else 1


def report_line(point: Point) -> None:
    print(f"[frontier] {point.method} lr {point.lr:g}: {point.status} {point.reason} KL {fmt(point.kl)} score "
          f"{fmt(point.score)} (train {point.train_s:.0f} s, eval {point.eval_s:.0f} s)", flush=True)


def machine() -> dict:
    import platform

    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if Path("/proc/cpuinfo").is_file() else platform.processor()
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": gpu, "torch": torch.__version__,
            "description": f"{cpu}, {os.cpu_count()} cores, {'GPU ' + gpu if gpu else 'no GPU'}, torch "
                           f"{torch.__version__}, {time.strftime('%Y-%m-%d')}"}


if __name__ == "__main__":
    sys.exit(main())
