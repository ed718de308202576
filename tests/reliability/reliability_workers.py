"""Fault-injection workers for tests/reliability/: runs of the training command on 2 gloo ranks, each case in the
same processes (one launch: imports cost seconds), through `rpo.train.cli.run`, the command's own code path.

`python reliability_workers.py CASES WORKDIR` (started by tests/multirank.py). For every run a case makes, each rank
writes results/NAME-rankR.json: the exit status `run` returned and what it printed to stderr (the command's error
line, a traceback); rank 0 also writes the run's logged history and, after a run that finished, its weights
(results/NAME.safetensors). Faults are injected here (a callback, a patched writer), never in the library; the
test asserts.
"""
from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import shutil
import signal
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "train"))

import trainer_workers as tw  # noqa: E402  (tests/train: the tiny assets and their configs)

PROG = "train.py"
# The run every checkpoint case starts from: rpo --global-contrast with related batching and evaluation, rmsprop
# with a cosine schedule after one warm-up step, 6 steps, a checkpoint every 2 (all kept).
RUN = dict(tw.RESUME, lr_schedule="cosine", warmup_steps=1)
# For a loss other than rpo: RUN's rpo options unset.
NOT_RPO = dict(tau=None, weighting=None, weight_normalization=None, global_contrast=False)


def config(workdir: Path, name: str, **overrides):
    values = dict(RUN, dataset=str(workdir / f"paired{tw.RUN_ROWS}.jsonl"))
    values.update(overrides)
    return tw.base_config(workdir, name, **values)


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank()


def barrier() -> None:
    import torch.distributed as dist

    dist.barrier()


class Recorder:
    """After a run that finished: rank 0 writes its weights (HF names); every rank of any run: its history."""

    def __init__(self, workdir: Path, name: str):
        self.workdir, self.name = workdir, name
        self.trainer = None

    def on_fit_start(self, trainer):
        self.trainer = trainer

    def on_fit_end(self, trainer, summary):
        from safetensors.torch import save_file

        from rpo.models import gather_hf_state

        state = gather_hf_state(trainer.policy)  # collective over TP
        if rank() == 0:
            save_file({k: v.contiguous() for k, v in state.items()},
                      str(self.workdir / "results" / f"{self.name}.safetensors"))


class At:
    """Calls `action(trainer)` in the hook `hook` of step `step` on the ranks `ranks`."""

    def __init__(self, step: int, action, ranks=(0, 1), hook: str = "on_step_end"):
        self.step, self.action, self.ranks, self.hook = step, action, ranks, hook

    def on_step_end(self, trainer, step, record):
        if self.hook == "on_step_end" and step == self.step and rank() in self.ranks:
            self.action(trainer)

    def on_log(self, trainer, record):
        if self.hook == "on_log" and record["step"] == self.step and rank() in self.ranks:
            self.action(trainer)


def run(workdir: Path, name: str, callbacks=(), output: str | None = None, **overrides) -> int:
    """One command run (every rank); records the exit status, stderr and history."""
    from rpo.train import cli

    recorder = Recorder(workdir, name)
    captured = io.StringIO()
    with contextlib.redirect_stderr(captured):
        code = cli.run(config(workdir, output or name, **overrides), prog=PROG, callbacks=[recorder, *callbacks])
    results = workdir / "results"
    history = recorder.trainer.history if recorder.trainer is not None else None
    (results / f"{name}-rank{rank()}.json").write_text(json.dumps(
        {"code": code, "stderr": captured.getvalue(), "history": history}, default=str))
    barrier()
    return code


def copy_run(workdir: Path, source: str, target: str, drop=()) -> Path:
    """Rank 0 copies a run folder (without the checkpoints `drop`), as a run killed after its last kept one."""
    runs = workdir / "runs"
    if rank() == 0:
        shutil.rmtree(runs / target, ignore_errors=True)
        shutil.copytree(runs / source, runs / target)
        for step in drop:
            shutil.rmtree(runs / target / "checkpoints" / f"step-{step:08d}")
    barrier()
    return runs / target


def damage(path: Path, how: str) -> None:
    """Change a file as a flipped bit, a torn write or a truncation would (rank 0 only)."""
    if rank() != 0:
        return
    data = bytearray(path.read_bytes())
    if how == "middle":
        middle = len(data) // 2
        data[middle:middle + 4] = bytes(b ^ 0x5A for b in data[middle:middle + 4])
    elif how == "end":
        data[-4:] = bytes(b ^ 0xFF for b in data[-4:])
    elif how == "truncate":
        del data[len(data) // 2:]
    path.write_bytes(bytes(data))


# ============================================================================================= cases ======
def case_reference(workdir: Path) -> None:
    """The uninterrupted run every resume is compared with."""
    run(workdir, "reference")


DAMAGES = {  # case: (file of checkpoint step-4, how)
    "middle": ("model-tp00.safetensors", "middle"),
    "end": ("model-tp00.safetensors", "end"),
    "truncated-safetensors": ("optimizer-tp00.safetensors", "truncate"),
    "truncated-rank1-json": ("rank-00001.json", "truncate"),
    "truncated-trainer-json": ("trainer.json", "truncate"),
}


def case_damaged(workdir: Path) -> None:
    """A run killed after step 5 (checkpoints 2 and 4), step 4's checkpoint damaged; --resume falls back to 2."""
    for name, (file, how) in DAMAGES.items():
        folder = copy_run(workdir, "reference", f"damaged-{name}", drop=[6])
        damage(folder / "checkpoints" / "step-00000004" / file, how)
        barrier()
        run(workdir, f"damaged-{name}", resume="latest")
    folder = copy_run(workdir, "reference", "all-damaged", drop=[6])
    damage(folder / "checkpoints" / "step-00000004" / "model-tp00.safetensors", "middle")
    damage(folder / "checkpoints" / "step-00000002" / "rank-00000.safetensors", "truncate")
    barrier()
    run(workdir, "all-damaged", resume="latest")
    folder = copy_run(workdir, "reference", "explicit-damaged", drop=[6])
    damage(folder / "checkpoints" / "step-00000004" / "model-tp00.safetensors", "end")
    barrier()
    run(workdir, "explicit-damaged", resume=str(folder / "checkpoints" / "step-00000004"))


def case_schedule(workdir: Path) -> None:
    """Resume from step 4 with --max-steps 8 (another cosine schedule): refused; with --allow-schedule-change the
    schedule is rebuilt from step 5."""
    copy_run(workdir, "reference", "schedule", drop=[6])
    run(workdir, "schedule-refused", output="schedule", resume="latest", max_steps=8)
    run(workdir, "schedule-allowed", output="schedule", resume="latest", max_steps=8, allow_schedule_change=True)


def case_disk_full(workdir: Path) -> None:
    """A checkpoint every step; rank 1's write of step 2 fails with ENOSPC. Then a resume on a disk with room."""
    from rpo.train import checkpoint

    real_save_file = checkpoint.save_file

    def full_disk(tensors, path, *args, **kwargs):
        if "step-00000002" in str(path) and rank() == 1:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_save_file(tensors, path, *args, **kwargs)

    checkpoint.save_file = full_disk
    try:
        run(workdir, "disk-full", save_every=1)
    finally:
        checkpoint.save_file = real_save_file
    run(workdir, "disk-full-resumed", output="disk-full", save_every=1, resume="latest")


def _signal(signum: int, times: int = 1):
    def send(trainer):
        for _ in range(times):
            os.kill(os.getpid(), signum)

    return send


def case_signals(workdir: Path) -> None:
    """SIGTERM (twice at once, as a launcher forwards it) on rank 1 only after step 4: the ranks stop after step 5
    and save it. Ctrl-C (SIGINT on every rank) after step 2 with --no-save-on-signal: stop after step 3, nothing
    saved. Then the SIGTERM run resumes."""
    run(workdir, "sigterm", callbacks=[At(4, _signal(signal.SIGTERM, times=2), ranks=(1,))])
    run(workdir, "sigterm-resumed", output="sigterm", resume="latest")
    run(workdir, "sigint", save_on_signal=False, callbacks=[At(2, _signal(signal.SIGINT))])


def _poison(trainer):
    import torch

    with torch.no_grad():
        next(trainer.policy.parameters()).fill_(float("nan"))


def case_poisoned(workdir: Path) -> None:
    """The weights turn NaN in step 4's update (before its checkpoint): steps 5 and 6 are skipped, the run stops
    with exit 3 at step 6 (its last), checkpoint 4 is set aside; --resume continues from checkpoint 2."""
    run(workdir, "poisoned", save_final=True, callbacks=[At(4, _poison, hook="on_log")])
    if rank() == 0:
        (workdir / "results" / "poisoned-metrics").mkdir(exist_ok=True)
        shutil.copy(workdir / "runs" / "poisoned" / "metrics.jsonl", workdir / "results" / "poisoned-metrics")
    barrier()
    run(workdir, "poisoned-resumed", output="poisoned", resume="latest")


def case_huge_lr(workdir: Path) -> None:
    """--lr 1e9: adamw and rmsprop (dpo / rpo: non-finite log-probs), sgd (the gradient vanishes)."""
    common = dict(max_steps=4, save_every=0, save_final=True, eval_split_fraction=0.0, lr=1e9,
                  lr_schedule="constant", warmup_steps=0, batching="random")
    run(workdir, "lr1e9-adamw", optimizer="adamw", loss="dpo", **NOT_RPO, **common)
    run(workdir, "lr1e9-rmsprop", optimizer="rmsprop", **common)
    run(workdir, "lr1e9-sgd", optimizer="sgd", loss="dpo", **NOT_RPO, **common)


def case_setup_errors(workdir: Path) -> None:
    """A loss that refuses unpaired data on rank 1 only (where the trainer builds the loss for unpaired data); a
    data file with undecodable bytes, then the corrected rerun into the same folder."""
    unpaired = dict(NOT_RPO, dataset=str(workdir / f"unpaired{tw.UNPAIRED_ROWS}.jsonl"), global_batch_size=4,
                    micro_batch_size=2, max_steps=1, eval_split_fraction=0.0, batching="random")
    run(workdir, "rank1-refuses-unpaired", loss=str(HERE / "rank1_refuses_unpaired.py"), **unpaired)
    # The lead's rpo.losses refuses to build a pair-only loss for unpaired data; the trainer must end every rank
    # with that one line (passes once both parts are merged).
    run(workdir, "dpo-unpaired", loss="dpo", **unpaired)
    run(workdir, "bad-bytes", dataset=str(workdir / "bad-bytes.jsonl"), max_steps=1)
    run(workdir, "bad-bytes-fixed", output="bad-bytes", max_steps=1)


def build(workdir: Path) -> None:
    """The assets (parent test process, before the launch)."""
    tw.build_assets(workdir)
    rows = (workdir / f"paired{tw.RUN_ROWS}.jsonl").read_bytes().splitlines()
    rows[5] = rows[5].replace(b'"content": "', b'"content": "caf\xe9 ', 1)  # Latin-1, not UTF-8
    (workdir / "bad-bytes.jsonl").write_bytes(b"\n".join(rows) + b"\n")
    (workdir / "results").mkdir(exist_ok=True)


def main(cases: str, workdir: str) -> None:
    import logging

    import torch.distributed as dist

    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s [rank {os.environ.get('RANK')}] %(name)s: %(message)s")
    dist.init_process_group("gloo")  # kept across the cases (the command's teardown leaves it)
    for case in cases.split(","):
        globals()[f"case_{case.replace('-', '_')}"](Path(workdir))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
