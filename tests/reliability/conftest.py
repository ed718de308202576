"""Shared by tests/reliability/: one 2-rank launch of reliability_workers.py that runs every in-process case (the
imports of a launch cost seconds), and readers of what its runs left."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "train"))  # trainer_workers: the tiny assets

import multirank  # noqa: E402
import reliability_workers as workers  # noqa: E402

CASES = ["reference", "damaged", "schedule", "disk_full", "signals", "poisoned", "huge_lr", "setup_errors"]
TIMING = {"step_time", "tokens_per_s"}


@pytest.fixture(scope="session")
def cases(tmp_path_factory):
    """The folder of the in-process cases' runs, results/ and logs/ (the launch must itself end with 0 0)."""
    workdir = tmp_path_factory.mktemp("reliability")
    workers.build(workdir)
    result = multirank.launch(HERE / "reliability_workers.py", 2, args=[",".join(CASES), workdir],
                              log_dir=workdir / "logs", name="cases", timeout=900)
    result.check()
    return workdir


def outcome(workdir: Path, name: str) -> list:
    """[(exit status, stderr lines that are the command's own), ...] of both ranks of the run `name`."""
    seen = []
    for rank in range(2):
        record = json.loads((workdir / "results" / f"{name}-rank{rank}.json").read_text())
        lines = [line for line in record["stderr"].splitlines() if line.startswith("train.py:") or "Traceback" in line]
        seen.append((record["code"], lines))
    return seen


def history(workdir: Path, name: str) -> list:
    return json.loads((workdir / "results" / f"{name}-rank0.json").read_text())["history"]


def metrics(run: Path) -> list:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def weights(workdir: Path, name: str) -> dict:
    from safetensors.torch import load_file

    return load_file(str(workdir / "results" / f"{name}.safetensors"))


def assert_same_steps(ours: list, theirs: list) -> None:
    """Logged steps equal bit for bit (timings aside)."""
    assert [r["step"] for r in ours] == [r["step"] for r in theirs]
    for mine, other in zip(ours, theirs):
        assert set(mine) == set(other), mine["step"]
        for key in set(mine) - TIMING:
            assert mine[key] == other[key] or (mine[key] != mine[key] and other[key] != other[key]), \
                (mine["step"], key)


def assert_same_weights(ours: dict, theirs: dict) -> None:
    import torch

    assert set(ours) == set(theirs)
    for name in theirs:
        assert torch.equal(ours[name], theirs[name]), name


STORE_NOISE = ("Connection closed", "TCPStore", "frame #")  # a rank that talked to a peer or a store that was gone


def quiet(log: str, tracebacks: int = 0) -> bool:
    """No rank noise in a log: no traceback (beyond `tracebacks`), no lost connection, no store warning."""
    return log.count("Traceback") == tracebacks and not any(noise in log for noise in STORE_NOISE)


def one_line(seen: list, code: int) -> str:
    """Both ranks exited `code`; rank 0 printed exactly one line of the command and rank 1 none; returns it."""
    assert [c for c, _ in seen] == [code, code], seen
    assert len(seen[0][1]) == 1 and seen[1][1] == [], seen
    return seen[0][1][0]


# ===================================================================================== real processes ===
def command(workdir: Path, name: str, *extra) -> list:
    """The training command's arguments for the tiny assets (2 ranks, 2 pairs per rank and step)."""
    return ["--model", workdir / "tiny-llama", "--cache-dir", workdir / "cache", "--dataset",
            workdir / "paired12.jsonl", "--max-length", "48", "--max-prompt-length", "24", "--global-batch-size", "4",
            "--micro-batch-size", "2", "--eval-split-fraction", "0", "--no-progress-bar", "--seed", "0",
            "--no-save-final", "--output-dir", workdir / "runs" / name, *extra]


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


@pytest.fixture(scope="session")
def real_runs(cases):
    """Runs that must end real processes, started together: rank 0's metrics.jsonl append fails with ENOSPC after
    step 2 (rank 1 is then blocked in a collective); a bug on rank 1 after step 2; and a slow run whose launcher
    (tests/reliability/launcher.py, in torchrun's place) is SIGKILLed after step 2. Returns
    {name: LaunchResult or the orphans' folder}."""
    workdir = cases
    started = {
        "metrics-full": multirank.start(HERE / "fault_worker.py", 2, args=command(workdir, "metrics-full",
                                                                                   "--max-steps", "4"),
                                        env={"FAULT_METRICS_FULL": "0:2"}, log_dir=workdir / "logs",
                                        name="metrics-full"),
        "bug": multirank.start(HERE / "fault_worker.py", 2, args=command(workdir, "bug", "--max-steps", "4"),
                               env={"FAULT_BUG": "1:2"}, log_dir=workdir / "logs", name="bug"),
    }
    orphans = workdir / "orphans"
    orphans.mkdir()
    launcher_env = dict(os.environ, FAULT_SLEEP="0.5", FAULT_PID_DIR=str(orphans), PYTHONPATH=os.pathsep.join(
        [str(HERE.parents[1]), str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
    launcher = subprocess.Popen([sys.executable, str(HERE / "launcher.py"), "2", str(orphans),
                                 str(HERE / "fault_worker.py"),
                                 *map(str, command(workdir, "orphans", "--max-steps", "100", "--save-every", "0"))],
                                env=launcher_env)
    metrics_file = workdir / "runs" / "orphans" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and (not metrics_file.is_file() or
                                           len(metrics_file.read_text().splitlines()) < 2):
        assert launcher.poll() is None, "the launcher ended early"
        time.sleep(0.2)
    launcher.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    launcher.wait()
    pids = [int((orphans / f"rank-{rank}.pid").read_text()) for rank in range(2)]
    while any(alive(pid) for pid in pids) and time.monotonic() < killed_at + 120:
        time.sleep(0.2)
    outcome = {"orphans": orphans, "orphans_alive": [alive(pid) for pid in pids],
               "orphans_ended_s": time.monotonic() - killed_at}
    for pid in pids:  # never leave a process behind
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
    outcome.update({name: launch.wait(timeout=300) for name, launch in started.items()})
    return outcome
