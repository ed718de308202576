"""The run report, a Callback: metrics.jsonl, the progress bar or log lines, TensorBoard / W&B, curves.png and the
closing summary. Global rank 0 writes and shows everything; on the other ranks it does nothing.

metrics.jsonl: one JSON object per logged step (see README / docs/training.md for the keys). With
--report-to tensorboard the same numbers go to TensorBoard event files in <output-dir>/tensorboard/ (tag = the
metrics.jsonl key, x = step); with --report-to wandb to a Weights & Biases run (imported only then; WANDB_MODE=offline
and the other WANDB_* variables are honoured by wandb itself).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, List, Optional

from rpo.train.callbacks import Callback
from rpo.train.metrics import MetricsLog, plot_curves
from rpo.train.preflight import is_rank_zero

logger = logging.getLogger("rpo.train")

REPORT_TARGETS = ("none", "tensorboard", "wandb")
# Warn when a pair's effective beta is below this fraction of --beta (the row normalisation at N >= 4 columns).
FAR_BELOW_BETA = 0.25
TENSORBOARD_DIR = "tensorboard"
_NOT_SCALARS = ("step",)


class RunReport(Callback):
    """What a run shows and leaves in its folder (besides checkpoints/ and final/)."""

    def __init__(self, output_dir: Path, *, progress_bar: bool = True, report_to: str = "none"):
        if report_to not in REPORT_TARGETS:
            raise ValueError(f"--report-to: invalid choice {report_to!r} (choose from {', '.join(REPORT_TARGETS)})")
        self.output_dir = Path(output_dir)
        self.progress_bar = progress_bar
        self.report_to = report_to
        self.is_main = is_rank_zero()
        self.metrics_log = MetricsLog(self.output_dir / "metrics.jsonl", enabled=self.is_main)
        self.bar = None  # tqdm over the steps, rank 0 with --progress-bar
        self.tracker = None
        self.first_step: Optional[int] = None  # the first step of this run (the effective-beta notice)

    # --- hooks ---------------------------------------------------------------------------------------------------
    def on_fit_start(self, trainer) -> None:
        if self.is_main:
            if trainer.step > 0:
                self.metrics_log.truncate_after(trainer.step)  # the resumed run logs the later steps again
            elif self.metrics_log.path.exists():
                self.metrics_log.path.unlink()  # a fresh run starts a fresh log
            self.tracker = _open_tracker(self.report_to, self.output_dir, trainer)
        self.first_step = trainer.step + 1
        if self.is_main and self.progress_bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=trainer.total_steps, initial=trainer.step, desc=trainer.loss.name, unit="step",
                            dynamic_ncols=True)

    def on_log(self, trainer, record: Dict[str, Any]) -> None:
        if not self.is_main:
            return
        self.metrics_log.write(record)
        if self.tracker is not None:
            self.tracker.log(record)
        if self.bar is None:
            logger.info("%s", format_record(record, trainer.total_steps))
        elif any(key.startswith("eval/") for key in record):
            self.bar.write(format_record(record, trainer.total_steps))

    def on_step_end(self, trainer, step: int, record: Optional[Dict[str, Any]]) -> None:
        if self.is_main and step == self.first_step:
            for notice in effective_beta_notices(trainer.loss, trainer.last_step_metrics):
                logger.log(*notice)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(_postfix(trainer.last_step_metrics), refresh=False)

    def on_loop_end(self, trainer) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.tracker is not None:
            self.tracker.close()
            self.tracker = None

    def on_fit_end(self, trainer, summary: Dict[str, Any]) -> None:
        if not self.is_main:
            return
        plot_curves(self.metrics_log.path, summary["curves"])
        logger.info("%s", format_summary(summary))


# --- trackers ------------------------------------------------------------------------------------------------------
def _scalars(record: Dict[str, Any]) -> Dict[str, float]:
    return {key: float(value) for key, value in record.items()
            if key not in _NOT_SCALARS and isinstance(value, (int, float)) and not isinstance(value, bool)}


class _TensorBoard:
    def __init__(self, log_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))

    def log(self, record: Dict[str, Any]) -> None:
        for key, value in _scalars(record).items():
            self.writer.add_scalar(key, value, global_step=record["step"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _WandB:
    def __init__(self, output_dir: Path, trainer):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(dir=str(output_dir), name=output_dir.name, config=trainer.config.to_dict(),
                              resume="allow" if trainer.step > 0 else None)

    def log(self, record: Dict[str, Any]) -> None:
        self.run.log(_scalars(record), step=record["step"])

    def close(self) -> None:
        self.run.finish()


def _open_tracker(report_to: str, output_dir: Path, trainer):
    if report_to == "tensorboard":
        return _TensorBoard(output_dir / TENSORBOARD_DIR)
    if report_to == "wandb":
        return _WandB(output_dir, trainer)
    return None


# --- text ----------------------------------------------------------------------------------------------------------
def loss_summary(loss) -> str:
    """One line: the loss and every option each term trains with (rpo.losses resolved the defaults)."""
    terms = "; ".join(f"{weight:g} x {name} (" + ", ".join(f"{key}={value}" for key, value in term.options.items())
                      + ")" for name, weight, term in loss.terms)
    return f"loss {loss.name}: {terms}"


def effective_beta_notices(loss, metrics: Dict[str, float]) -> List[tuple]:
    """`effective_beta_notice` per term with a contrast matrix (a term whose options name a weight_normalization),
    read from that term's contrast/* metrics. A combination keeps a metric key for the first term that reports it
    and prefixes a later term's with `<term>/` (rpo.losses.combination.WeightedSum), so the first contrast term
    reads `contrast/*` and later ones `<term>/contrast/*`; a combination's notices are led by the term's name."""
    notices, first = [], True
    for name, _, term in loss.terms:
        if "weight_normalization" not in term.options:
            continue
        prefix, first = ("" if first else f"{name}/"), False
        term_metrics = {key[len(prefix):]: value for key, value in metrics.items()
                        if key.startswith(prefix + "contrast/")}
        notice = effective_beta_notice(term_metrics, term.options.get("beta"), term.options["weight_normalization"])
        if notice is not None:
            notices.append(notice if len(loss.terms) == 1 else (notice[0], f"{name}: {notice[1]}"))
    return notices


def effective_beta_notice(metrics: Dict[str, float], beta: Optional[float],
                          weight_normalization: Optional[str] = None) -> Optional[tuple]:
    """(log level, message) stating the effective beta of the diagonal and of an average off-diagonal pair of the
    run's actual (global) contrast matrix, from a step's contrast/* metrics; None for a loss without a contrast
    matrix.

    A warning when either is far below beta and the normalisation is `row` (or unknown): row-normalised weights
    give β/N with N columns, so the scale falls as the (global) matrix grows. `reference_columns` is β/K by design
    (the scale of a K-column matrix at any N) and `mean` keeps β: those are stated, not warned about.
    """
    diagonal = metrics.get("contrast/diag_effective_beta")
    off_diagonal = metrics.get("contrast/offdiag_effective_beta")
    if diagonal is None or not isinstance(beta, (int, float)) or beta <= 0:
        return None
    parts = [f"diagonal {diagonal:.4g} ({diagonal / beta:.3g} x beta)"]
    if off_diagonal is not None and off_diagonal > 0:
        parts.append(f"average off-diagonal pair {off_diagonal:.4g} ({off_diagonal / beta:.3g} x beta)")
    message = f"contrast matrix: effective beta of the {' and '.join(parts)}, beta {beta:.4g}"
    if weight_normalization not in (None, "row"):
        return logging.INFO, message + f" (weight normalisation {weight_normalization})"
    if min(v for v in (diagonal, off_diagonal) if v is not None and v > 0) < FAR_BELOW_BETA * beta:
        return logging.WARNING, (message + ": far below beta, so the scores stay in the sigmoid's linear part; "
                                 "--weight-normalization mean or reference_columns keeps the scale at any matrix "
                                 "size (docs/losses.md)")
    return logging.INFO, message


def _postfix(metrics: Dict[str, float]) -> Dict[str, str]:
    out = {"loss": f"{metrics.get('loss', float('nan')):.4f}"}
    if "rewards/accuracies" in metrics:
        out["acc"] = f"{metrics['rewards/accuracies']:.3f}"
    out["tok/s"] = f"{metrics['tokens_per_s']:.0f}"
    return out


def format_record(record: Dict[str, Any], total_steps: int) -> str:
    parts = [f"step {record['step']}/{total_steps}"]
    for key in ("loss", "rewards/accuracies", "rewards/margins", "grad_norm", "lr", "tokens_per_s",
                "eval/loss", "eval/rewards/accuracies", "eval/rewards/margins"):
        if key in record:
            value = record[key]
            parts.append(f"{key} {value:.3g}" if isinstance(value, float) else f"{key} {value}")
    return " | ".join(parts)


def format_summary(summary: Dict[str, Any]) -> str:
    lines = [f"done: {summary['steps']} steps ({summary['steps_this_run']} this run) in {summary['time_s']:.1f} s, "
             f"{summary['tokens_per_s']:.0f} tokens/s"]
    train = summary["final_train_metrics"]
    if train:
        lines.append("  last train step: " + format_record(train, summary["steps"]))
    if summary["final_eval_metrics"]:
        lines.append("  final eval: " + ", ".join(f"{k} {v:.4g}" for k, v in summary["final_eval_metrics"].items()))
    outputs = ["metrics.jsonl", "curves.png"]
    if summary.get("tensorboard"):
        outputs.append(f"{TENSORBOARD_DIR}/")
    if summary["checkpoints"]:
        outputs.append("checkpoints/")
    if summary["final_model"]:
        outputs.append("final/")
    lines.append(f"  outputs: {summary['output_dir']} ({', '.join(outputs)})")
    return "\n".join(lines)
