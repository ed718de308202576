"""Run metrics: reduction over data-parallel ranks, the metrics.jsonl log and curves.png.

`python -m rpo.train.metrics RUN_DIR` redraws RUN_DIR/curves.png from RUN_DIR/metrics.jsonl (e.g. during a run).
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Tuple, Union

import torch
import torch.distributed as dist

Number = Union[float, int, torch.Tensor]


def collective_device(group: Optional[dist.ProcessGroup] = None) -> torch.device:
    """Where a tensor must live to be reduced over `group`: NCCL takes CUDA tensors only, gloo CPU ones."""
    if dist.is_initialized() and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _as_float(value: Number) -> float:
    if isinstance(value, torch.Tensor):
        return float(value.detach().float().mean()) if value.numel() else float("nan")
    return float(value)


class WeightedMean:
    """Accumulates metric dicts with weights (e.g. micro-batches of different sizes) into weighted means.

    A NaN metric usually carries no information (an accuracy over zero pairs) and is left out of its mean, except
    for the keys in `never_dropped` (the loss: it is never legitimately undefined, so a NaN loss is a diverged step
    and its mean is NaN). `poison` marks a window's metrics as undefined (a step the divergence guard skipped).
    """

    def __init__(self, never_dropped: Iterable[str] = ("loss",)):
        self.sums: Dict[str, float] = {}
        self.weights: Dict[str, float] = {}
        self.never_dropped = frozenset(never_dropped)

    def add(self, metrics: Mapping[str, Number], weight: float = 1.0) -> None:
        for key, value in metrics.items():
            value = _as_float(value)
            if math.isnan(value) and key not in self.never_dropped:
                continue  # e.g. an accuracy over zero pairs; carries no information, must not poison the mean
            self.sums[key] = self.sums.get(key, 0.0) + value * weight
            self.weights[key] = self.weights.get(key, 0.0) + weight

    def poison(self, keys: Iterable[str], weight: float = 1.0) -> None:
        """The metrics `keys` of this window are undefined: their means become NaN (on every rank they reach)."""
        for key in keys:
            self.sums[key] = float("nan")
            self.weights[key] = self.weights.get(key, 0.0) + weight

    def reduce(self, group: Optional[dist.ProcessGroup] = None) -> Dict[str, float]:
        """Weighted means over everything added here and, when `group` spans several ranks, on every rank of it."""
        keys = sorted(self.sums)
        if group is not None and dist.is_initialized() and dist.get_world_size(group) > 1:
            # Ranks may lack a key (e.g. no rejected rows in their shard): agree on the union first.
            gathered: List[List[str]] = [None] * dist.get_world_size(group)  # type: ignore[list-item]
            dist.all_gather_object(gathered, keys, group=group)
            keys = sorted(set().union(*map(set, gathered)))
            packed = torch.tensor([[self.sums.get(k, 0.0), self.weights.get(k, 0.0)] for k in keys],
                                  dtype=torch.float64, device=collective_device(group)).reshape(-1, 2)
            dist.all_reduce(packed, group=group)
            sums, weights = packed[:, 0].tolist(), packed[:, 1].tolist()
        else:
            sums = [self.sums[k] for k in keys]
            weights = [self.weights[k] for k in keys]
        return {k: (s / w if w > 0 else float("nan")) for k, s, w in zip(keys, sums, weights)}


def all_reduce_sum(values: Iterable[float], group: Optional[dist.ProcessGroup] = None) -> List[float]:
    """Sum a few scalars over `group` (no-op on one process)."""
    tensor = torch.tensor(list(values), dtype=torch.float64, device=collective_device(group))
    if group is not None and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, group=group)
    return tensor.tolist()


class MetricsLog:
    """metrics.jsonl: one JSON object per logged step (written by one rank)."""

    def __init__(self, path: Union[str, Path], enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled

    def truncate_after(self, step: int) -> None:
        """On resume: drop lines of steps after the checkpoint (they are logged again by the resumed run)."""
        if not self.enabled or not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(self.path)

    def write(self, record: Mapping[str, object]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as handle:
            handle.write(json.dumps(record, allow_nan=True) + "\n")
            handle.flush()


def read_metrics(path: Union[str, Path]) -> List[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# Curves drawn in curves.png: (title, training key, evaluation key).
CURVES: Tuple[Tuple[str, str, str], ...] = (
    ("loss", "loss", "eval/loss"),
    ("reward margin", "rewards/margins", "eval/rewards/margins"),
    ("reward accuracy", "rewards/accuracies", "eval/rewards/accuracies"),
)


def plot_curves(metrics_path: Union[str, Path], png_path: Union[str, Path]) -> Path:
    """Draw loss, reward margin and reward accuracy vs step (training and, when logged, evaluation)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on cluster nodes
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    fig, axes = plt.subplots(1, len(CURVES), figsize=(5 * len(CURVES), 3.6))
    for axis, (title, train_key, eval_key) in zip(axes, CURVES):
        for key, label, style in ((train_key, "train", "-"), (eval_key, "eval", "o--")):
            points = [(r["step"], r[key]) for r in records if key in r and r[key] is not None
                      and not (isinstance(r[key], float) and math.isnan(r[key]))]
            if points:
                steps, values = zip(*points)
                axis.plot(steps, values, style, label=label, markersize=4)
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        if axis.has_data():
            axis.legend()
    fig.tight_layout()
    png_path = Path(png_path)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path


def main(argv: Optional[List[str]] = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m rpo.train.metrics",
                                     description="Redraw RUN_DIR/curves.png from RUN_DIR/metrics.jsonl (e.g. while "
                                     "the run is still going).")
    parser.add_argument("run_dir", metavar="RUN_DIR", type=Path, help="a run folder (the trainer's --output-dir)")
    run = parser.parse_args(argv).run_dir
    if not (run / "metrics.jsonl").is_file():
        parser.error(f"{run / 'metrics.jsonl'} not found: RUN_DIR must be a run folder (the trainer's --output-dir)")
    print(plot_curves(run / "metrics.jsonl", run / "curves.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
