"""Alignment benchmark: does a method align the embedded default model better than DPO at the same budget?

Every method trains SmolLM2-135M-Instruct (the embedded default) on the shared data with the same budget (steps,
global batch, micro-batch, lr, optimiser, seed, lengths, 2 CPU ranks, reference log-probs precomputed), holding out
the same seeded rows (--eval-split-fraction). Each trained policy is then scored on its held-out rows with one
common yardstick, the DPO implicit reward r = beta_eval * (log pi - log pi_ref) against the starting model
(examples/evaluate.py --run-held-out --reward-type dpo), whatever loss trained it. Reported per method:
held-out reward accuracy and margin with 95% bootstrap intervals over held-out rows, the accuracy difference to
dpo on the same rows and the margin difference (paired bootstrap), the effective beta of the diagonal and of an
off-diagonal pair the run logged, its mean off-diagonal prompt cosine, and the training curves (one plot).

    python benchmarks/alignment.py            # every method (about an hour on 2 cores)
    python benchmarks/alignment.py --quick    # dpo, rpo local, rpo global: a ~10 minute smoke run
    python benchmarks/alignment.py --methods dpo,rpo-global-mean --steps 40

A run of some --methods keeps the other methods' results from the output folder's alignment.json when they were
measured at the same budget, so the report always lists every method measured at that budget.

A method whose options this checkout does not offer is reported as "unavailable" with the reason (the
benchmark's method list is ahead of the trainer in some checkouts); it never stops the other methods.
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
sys.path.insert(0, str(REPO / "benchmarks"))
import _common  # noqa: E402
SHARED_DATA = REPO.parent / "shared" / "data"


@dataclass(frozen=True)
class Method:
    name: str
    args: Sequence[str]
    data: str = "paired"  # "paired" or "unpaired" (the shared data file it trains on)
    note: str = ""
    # KTO's KL scores mismatched pairs with the live reference each step, which --precompute-reference drops.
    precompute_reference: bool = True


# The normalisation is named wherever it matters, so a row means the same whatever --global-contrast's default.
ROW = ("--weight-normalization", "row")
# The budget is the same for all: only these arguments differ between methods.
METHODS: List[Method] = [
    Method("dpo", ["--loss", "dpo"]),
    Method("rpo-local", ["--loss", "rpo"], note="the authors' per-GPU matrix (each rank its own 4x4)"),
    Method("rpo-global-row", ["--loss", "rpo", "--global-contrast", "--weight-normalization", "row"],
           note="global 8x8 matrix, rows sum to 1 (effective beta ~ beta/N)"),
    Method("rpo-global-mean", ["--loss", "rpo", "--global-contrast", "--weight-normalization", "mean"],
           note="global matrix, average pair keeps the full beta"),
    Method("rpo-global-reference", ["--loss", "rpo", "--global-contrast", "--weight-normalization", "reference_columns",
                                    "--normalization-columns", "4"],
           note="global matrix at the 4-column scale of the per-rank matrix (the default until 2026-12-07; the "
                "default is now K = 8, at 8 pairs the matrix of rpo-global-row)"),
    Method("rpo-uniform", ["--loss", "rpo", "--global-contrast", "--weighting", "uniform", *ROW]),
    Method("rpo-diagonal-paper", ["--loss", "rpo", "--global-contrast", "--weighting", "diagonal", *ROW],
           note="Eq. 13: alpha inside the sigmoid"),
    Method("rpo-diagonal-authors", ["--loss", "rpo", "--global-contrast", "--weighting", "diagonal",
                                    "--contrast-form", "authors", *ROW],
           note="the authors' code: alpha outside the sigmoid"),
    Method("simpo", ["--loss", "simpo"]),
    Method("simpo-rpo", ["--loss", "simpo-rpo", "--global-contrast", *ROW]),
    Method("kto-unpaired", ["--loss", "kto"], data="unpaired", note="KTO with its KL reference point",
           precompute_reference=False),
    Method("rpo-unpaired", ["--loss", "rpo", "--global-contrast", *ROW], data="unpaired"),
    # Related-prompt batches (--batching related, default --related-fraction) vs the random rows above.
    Method("rpo-global-related", ["--loss", "rpo", "--global-contrast", "--batching", "related", *ROW],
           note="rpo-global-row's matrix over related-prompt batches"),
    Method("simpo-rpo-related", ["--loss", "simpo-rpo", "--global-contrast", "--batching", "related", *ROW],
           note="simpo-rpo over related-prompt batches"),
]
QUICK = ("dpo", "rpo-local", "rpo-global-row")


@dataclass
class Result:
    method: str
    status: str = "ok"
    reason: str = ""
    train_s: float = 0.0
    eval_s: float = 0.0
    accuracy: Optional[float] = None
    accuracy_ci: Optional[List[float]] = None
    margin: Optional[float] = None
    margin_ci: Optional[List[float]] = None
    accuracy_vs_dpo: Optional[float] = None
    accuracy_vs_dpo_ci: Optional[List[float]] = None
    margin_vs_dpo: Optional[float] = None
    margin_vs_dpo_ci: Optional[List[float]] = None
    effective_beta: Optional[float] = None  # of an average pair of the (global) matrix; dpo & co: beta
    diag_effective_beta: Optional[float] = None
    offdiag_effective_beta: Optional[float] = None
    offdiag_prompt_cosine: Optional[float] = None  # mean over the training steps
    final_train_loss: Optional[float] = None
    held_out_rows: int = 0
    note: str = ""
    curve: Dict[str, List[float]] = field(default_factory=dict)


def _env() -> Dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1")
    return env


def _run(what: str, cmd: List[str], log: Path, timeout: float) -> tuple:
    """(seconds, None) when `cmd` succeeded, else (seconds, why) naming its log."""
    return _common.run_logged(what, cmd, log, timeout, cwd=REPO, env=_env(), label="alignment benchmark")


def _unavailable_reason(method: Method, help_text: str) -> Optional[str]:
    """Why this checkout cannot run the method (an option it lacks), else None."""
    for arg in method.args:
        if arg.startswith("--") and arg not in help_text:
            return f"this checkout's train.py has no {arg}"
    return None


def bootstrap(values: np.ndarray, statistic, draws: int, seed: int) -> List[float]:
    """95% percentile interval of `statistic` over rows resampled with replacement (rows are axis 0)."""
    rng = np.random.default_rng(seed)
    n = len(values)
    stats = np.array([statistic(values[rng.integers(0, n, n)]) for _ in range(draws)])
    low, high = np.percentile(stats, [2.5, 97.5])
    return [float(low), float(high)]


def held_out_arrays(records: List[dict], paired: bool):
    """(rows x 2 array of chosen/rejected rewards) for paired data; for unpaired (rewards, labels)."""
    if paired:
        return np.array([[r["reward_chosen"], r["reward_rejected"]] for r in records], dtype=np.float64)
    return np.array([[r["reward_completion"], 1.0 if r["label"] else 0.0] for r in records], dtype=np.float64)


def accuracy_and_margin(rows: np.ndarray, paired: bool):
    if paired:
        return float(np.mean(rows[:, 0] > rows[:, 1])), float(np.mean(rows[:, 0] - rows[:, 1]))
    chosen, rejected = rows[rows[:, 1] == 1, 0], rows[rows[:, 1] == 0, 0]
    if len(chosen) == 0 or len(rejected) == 0:
        return float("nan"), float("nan")
    return float(np.mean(chosen[:, None] > rejected[None, :])), float(chosen.mean() - rejected.mean())


def read_curve(metrics_path: Path) -> Dict[str, List[float]]:
    curve: Dict[str, List[float]] = {"step": [], "loss": [], "rewards/margins": []}
    if not metrics_path.is_file():
        return curve
    for line in metrics_path.read_text().splitlines():
        record = json.loads(line)
        if "loss" not in record:
            continue
        curve["step"].append(record["step"])
        curve["loss"].append(record["loss"])
        curve["rewards/margins"].append(record.get("rewards/margins", float("nan")))
    return curve


def last_record(metrics_path: Path) -> dict:
    lines = metrics_path.read_text().splitlines() if metrics_path.is_file() else []
    return json.loads(lines[-1]) if lines else {}


def train_arguments(method: Method, args, run_dir: Path) -> List[str]:
    """examples/train.py's arguments for `method` at the benchmark's budget."""
    dataset = SHARED_DATA / f"{method.data}.jsonl"
    return [*method.args, "--max-steps", str(args.steps), "--global-batch-size", str(args.global_batch_size),
            "--micro-batch-size", str(args.micro_batch_size), "--max-prompt-length", str(args.max_prompt_length),
            "--max-length", str(args.max_length), "--eval-split-fraction", str(args.eval_fraction),
            "--eval-every", "0", "--save-every", "0", "--lr", str(args.lr), "--seed", str(args.seed),
            *(["--precompute-reference"] if method.precompute_reference else []), "--no-progress-bar",
            "--dataset", str(dataset), "--output-dir", str(run_dir / "train")]


def finished_training(run_dir: Path, arguments: List[str]) -> bool:
    """True when run_dir/train holds a finished run (final/, metrics.jsonl, config.yaml) whose resolved config is
    the one `arguments` give (the default model and cache: their resolved paths are not compared)."""
    sys.path.insert(0, str(REPO))
    from rpo.train.config import TrainConfig

    train_dir = run_dir / "train"
    if not all((train_dir / name).exists() for name in ("final", "metrics.jsonl", "config.yaml")):
        return False
    ours, theirs = TrainConfig.from_cli(arguments).to_dict(), TrainConfig.from_yaml(train_dir / "config.yaml").to_dict()
    return all(ours[key] == theirs[key] for key in ours if key not in ("model", "cache_dir"))


def train_method(method: Method, args, out_dir: Path, help_text: str) -> Result:
    """Train `method` (or, with --reuse-finished, keep a finished training of the same config); the result's
    status says whether it can be evaluated."""
    result = Result(method.name, note=method.note)
    reason = _unavailable_reason(method, help_text)
    if reason:
        result.status, result.reason = "unavailable", reason
        return result
    run_dir = out_dir / method.name
    arguments = train_arguments(method, args, run_dir)
    if args.reuse_finished and run_dir.exists() and finished_training(run_dir, arguments):
        print(f"[alignment] {method.name}: reusing the finished training in {run_dir / 'train'}", flush=True)
        previous = run_dir / "result.json"
        if previous.is_file():
            result.train_s = json.loads(previous.read_text()).get("train_s", 0.0)
        return result
    if run_dir.exists():
        shutil.rmtree(run_dir)  # the benchmark's own folder: a new training starts clean
    run_dir.mkdir(parents=True)
    train = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.nproc),
             "examples/train.py", *arguments]
    result.train_s, failure = _run("training", train, run_dir / "train.log", args.timeout)
    (run_dir / "result.json").write_text(json.dumps({"train_s": result.train_s}))
    if failure:
        result.status, result.reason = "failed", failure
    return result


class Evaluation:
    """The held-out evaluation of a trained method, in its own process: it overlaps the next method's training
    (one process beside the two training ranks), which keeps the whole benchmark near an hour on 2 cores."""

    def __init__(self, method: Method, result: Result, args, out_dir: Path, reuse: bool = False):
        """`reuse`: keep a finished evaluation of this very training (--reuse-finished)."""
        self.method, self.result, self.args = method, result, args
        self.run_dir = out_dir / method.name
        self.log = self.run_dir / "eval.log"
        self.started = time.perf_counter()
        outputs = [self.run_dir / "eval.json", self.run_dir / "held_out.jsonl"]
        final = self.run_dir / "train" / "final"
        self.process = None
        if reuse and all(p.is_file() and p.stat().st_mtime >= final.stat().st_mtime for p in outputs):
            print(f"[alignment] {method.name}: reusing its finished evaluation", flush=True)
            return
        command = [sys.executable, "examples/evaluate.py", "--model", str(self.run_dir / "train" / "final"),
                   "--run-held-out", "--reward-type", "dpo", "--beta", str(args.eval_beta),
                   "--output-json", str(self.run_dir / "eval.json"),
                   "--per-example-output", str(self.run_dir / "held_out.jsonl")]
        with open(self.log, "w") as out:
            self.process = subprocess.Popen(command, cwd=REPO, env=_env(), stdout=out, stderr=subprocess.STDOUT)

    def finish(self) -> Result:
        """Wait for the evaluation and fill the result from its per-row output and the training's metrics."""
        result, args, run_dir = self.result, self.args, self.run_dir
        rc = 0
        if self.process is not None:
            try:
                rc = self.process.wait(timeout=args.timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                rc = 124
            result.eval_s = time.perf_counter() - self.started
        if rc != 0:
            result.status, result.reason = "failed", f"evaluation exited {rc}: see {self.log}"
            return result
        records = [json.loads(line) for line in (run_dir / "held_out.jsonl").read_text().splitlines()]
        paired = self.method.data == "paired"
        rows = held_out_arrays(records, paired)
        result.held_out_rows = len(rows)
        result.accuracy, result.margin = accuracy_and_margin(rows, paired)
        result.accuracy_ci = bootstrap(rows, lambda r: accuracy_and_margin(r, paired)[0], args.bootstrap, args.seed)
        result.margin_ci = bootstrap(rows, lambda r: accuracy_and_margin(r, paired)[1], args.bootstrap, args.seed)
        metrics = run_dir / "train" / "metrics.jsonl"
        record = last_record(metrics)
        result.final_train_loss = record.get("loss")
        result.effective_beta = record.get("contrast/effective_beta")
        result.diag_effective_beta = record.get("contrast/diag_effective_beta")
        result.offdiag_effective_beta = record.get("contrast/offdiag_effective_beta")
        cosines = [json.loads(line).get("batch/offdiag_prompt_cosine") for line in metrics.read_text().splitlines()]
        cosines = [c for c in cosines if c is not None]
        result.offdiag_prompt_cosine = float(np.mean(cosines)) if cosines else None
        result.curve = read_curve(metrics)
        return result


def _report_line(result: Result) -> None:
    print(f"[alignment] {result.method}: {result.status} {result.reason} accuracy {result.accuracy} "
          f"margin {result.margin} (train {result.train_s:.0f} s, eval {result.eval_s:.0f} s)", flush=True)


def compare_to_dpo(results: List[Result], out_dir: Path, args) -> None:
    """Accuracy difference to dpo on the same held-out rows (same seed and split), paired bootstrap."""
    def rows_of(name: str):
        path = out_dir / name / "held_out.jsonl"
        return None if not path.is_file() else held_out_arrays(
            [json.loads(line) for line in path.read_text().splitlines()], True)

    dpo = rows_of("dpo")
    if dpo is None:
        return
    for result in results:
        method = next(m for m in METHODS if m.name == result.method)
        if result.status != "ok" or method.data != "paired" or result.method == "dpo":
            continue
        mine = rows_of(result.method)
        if mine is None or mine.shape != dpo.shape:
            continue
        wins = np.stack([mine[:, 0] > mine[:, 1], dpo[:, 0] > dpo[:, 1]], axis=1).astype(np.float64)
        result.accuracy_vs_dpo = float(wins[:, 0].mean() - wins[:, 1].mean())
        result.accuracy_vs_dpo_ci = bootstrap(wins, lambda w: w[:, 0].mean() - w[:, 1].mean(), args.bootstrap,
                                              args.seed)
        margins = (mine[:, 0] - mine[:, 1]) - (dpo[:, 0] - dpo[:, 1])
        result.margin_vs_dpo = float(margins.mean())
        result.margin_vs_dpo_ci = bootstrap(margins, lambda m: m.mean(), args.bootstrap, args.seed)


def _interval(value, ci, digits=3) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f} [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]" if ci else f"{value:.{digits}f}"


def format_table(results: List[Result]) -> str:
    header = ("| method | held-out accuracy [95% CI] | held-out margin [95% CI] | accuracy − dpo [95% CI] | "
              "margin − dpo [95% CI] | effective β diag / off-diag | off-diag prompt cosine | train loss | "
              "train s |")
    lines = [header, "|" + "---|" * 9]
    for r in results:
        if r.status != "ok":
            lines.append(f"| {r.method} | {r.status}: {r.reason} | | | | | | | |")
            continue
        beta = (f"{r.diag_effective_beta:.3g} / {r.offdiag_effective_beta:.3g}"
                if isinstance(r.diag_effective_beta, float) and isinstance(r.offdiag_effective_beta, float) else "-")
        cosine = f"{r.offdiag_prompt_cosine:.3f}" if isinstance(r.offdiag_prompt_cosine, float) else "-"
        loss = f"{r.final_train_loss:.4f}" if isinstance(r.final_train_loss, float) else "-"
        lines.append(f"| {r.method} | {_interval(r.accuracy, r.accuracy_ci)} | {_interval(r.margin, r.margin_ci)} | "
                     f"{_interval(r.accuracy_vs_dpo, r.accuracy_vs_dpo_ci)} | {_interval(r.margin_vs_dpo, r.margin_vs_dpo_ci)} | "
                     f"{beta} | {cosine} | {loss} | {r.train_s:.0f} |")
    return "\n".join(lines)


def plot_curves(results: List[Result], path: Path) -> Optional[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in results if r.status == "ok" and r.curve.get("step")]
    if not shown:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax in axes:  # one colour per method (up to 20)
        ax.set_prop_cycle(color=plt.cm.tab20.colors)
    for r in shown:
        axes[0].plot(r.curve["step"], r.curve["loss"], label=r.method)
        axes[1].plot(r.curve["step"], r.curve["rewards/margins"], label=r.method)
    axes[0].set(title="train loss", xlabel="step")
    axes[1].set(title="train reward margin", xlabel="step")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def budget_of(args) -> Dict[str, object]:
    return {k: getattr(args, k) for k in ("steps", "global_batch_size", "micro_batch_size", "max_prompt_length",
                                          "max_length", "eval_fraction", "eval_beta", "lr", "seed", "nproc")}


def kept_results(report_path: Path, args, names: Sequence[str]) -> List[Result]:
    """The other methods' results of an earlier report in the same folder at the same budget (so a subset can be
    re-run or added: --methods), else none."""
    if not report_path.is_file():
        return []
    report = json.loads(report_path.read_text())
    if report.get("budget") != budget_of(args):
        print(f"[alignment] {report_path} has another budget: its results are not kept", flush=True)
        return []
    known = {m.name for m in METHODS}
    kept = [Result(**r) for r in report["results"] if r["method"] not in names and r["method"] in known]
    if kept:
        print(f"[alignment] kept from {report_path} ({report.get('date')}): {', '.join(r.method for r in kept)}",
              flush=True)
    return kept


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)} with fewer steps")
    parser.add_argument("--methods", default=None, help="comma-separated subset of: "
                        + ", ".join(m.name for m in METHODS))
    parser.add_argument("--steps", type=int, default=None, help="optimiser steps per method (default 20, quick 6)")
    parser.add_argument("--global-batch-size", type=int, default=8)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--max-prompt-length", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--eval-fraction", type=float, default=0.2)
    parser.add_argument("--eval-beta", type=float, default=0.1, help="beta of the common DPO-reward yardstick")
    parser.add_argument("--lr", type=float, default=5e-6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples per interval")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per training or evaluation run")
    parser.add_argument("--output-dir", default=str(REPO / "benchmarks" / "results" / "alignment"))
    parser.add_argument("--reuse-finished", action="store_true",
                        help="keep a method's finished training in the output folder when its config is the same "
                             "(e.g. after an interrupted benchmark); it is evaluated again")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.steps is None:
        args.steps = 6 if args.quick else 20
    names = args.methods.split(",") if args.methods else (list(QUICK) if args.quick else [m.name for m in METHODS])
    unknown = sorted(set(names) - {m.name for m in METHODS})
    if unknown:
        print(f"alignment.py: error: unknown method(s) {', '.join(unknown)}", file=sys.stderr)
        return 2
    out_dir = Path(args.output_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    help_text = subprocess.run([sys.executable, "examples/train.py", "--help"], cwd=REPO, env=_env(),
                               capture_output=True, text=True).stdout
    results = []
    kept = kept_results(out_dir / "alignment.json", args, names)
    pending: Optional[Evaluation] = None
    for method in (m for m in METHODS if m.name in names):
        print(f"[alignment] {method.name} ...", flush=True)
        result = train_method(method, args, out_dir, help_text)
        if pending is not None:
            _report_line(pending.finish())
            pending = None
        if result.status == "ok":
            pending = Evaluation(method, result, args, out_dir, reuse=args.reuse_finished)
        else:
            _report_line(result)
        results.append(result)
    if pending is not None:
        _report_line(pending.finish())
    order = [m.name for m in METHODS]
    results = sorted(results + kept, key=lambda r: order.index(r.method))
    compare_to_dpo(results, out_dir, args)
    table = format_table(results)
    plot = plot_curves(results, out_dir / "curves.png")
    budget = budget_of(args)
    report = {"date": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()} CPU cores", "budget": budget,
              "results": [r.__dict__ for r in results], "curves": str(plot) if plot else None}
    (out_dir / "alignment.json").write_text(json.dumps(report, indent=1))
    print(table)
    print(f"budget: {budget}")
    print(f"JSON: {out_dir / 'alignment.json'}; curves: {plot}")
    return 0 if all(r.status != "failed" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
