"""Launch multi-rank test workers: one plain process per rank with torchrun's environment variables.

Every multi-process test starts its ranks through this module, so all of them see the same environment
(RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT on a free port, offline Hugging Face,
unbuffered output, `rpo` importable) and fail the same way: with every rank's exit code and the tail of its log.

    result = multirank.launch(Path(__file__).with_name("my_workers.py"), 2, args=[workdir])
    result.check()                      # AssertionError with every rank's log tail unless all ranks exited 0

    running = multirank.start(script, 2, args=[...])   # several launches at once, or one that kills itself
    result = running.wait(timeout=600)

A worker is a script run as `python SCRIPT ARGS...`; it calls `torch.distributed.init_process_group()` (env://)
or `rpo.models.init_parallel()`. Plain processes rather than torchrun: no agent process, no restarts, and a
rank that fails is seen at once; after `grace_s` the other ranks (typically blocked in a collective) are killed.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from rpo.models.parallel import free_port

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
DEFAULT_TIMEOUT_S = 600
DEFAULT_GRACE_S = 30.0
LOG_TAIL_CHARS = 6000

__all__ = ["DEFAULT_TIMEOUT_S", "LaunchResult", "RunningLaunch", "free_port", "launch", "rank_environment",
           "start"]


def rank_environment(rank: int, world_size: int, port: int, env: Mapping[str, str] | None = None) -> dict:
    """The environment of one rank: the caller's, torchrun's variables, offline HF, `rpo` and tests/ importable.

    `env` entries win over every default (e.g. OMP_NUM_THREADS).
    """
    out = dict(os.environ)
    out.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
        GROUP_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
        # The ranks share the machine's cores (torchrun would set 1).
        OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // world_size)),
        PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
    )
    out["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), str(TESTS), os.environ.get("PYTHONPATH")]))
    out.update(env or {})
    return out


@dataclass
class LaunchResult:
    """Exit codes and logs (stdout + stderr) of every rank of a finished launch."""

    script: str
    returncodes: list[int]
    log_paths: list[Path]
    timed_out: bool = False

    @property
    def returncode(self) -> int:
        """0 when every rank exited 0, else the first non-zero rank exit code."""
        return next((code for code in self.returncodes if code != 0), 0)

    @property
    def logs(self) -> list[str]:
        return [path.read_text(errors="replace") if path.is_file() else "" for path in self.log_paths]

    def report(self, tail_chars: int = LOG_TAIL_CHARS) -> str:
        """Every rank's exit code and the tail of its log."""
        head = f"{self.script}: exit codes {self.returncodes}" + (" (timed out, killed)" if self.timed_out else "")
        parts = [head]
        for rank, (path, text) in enumerate(zip(self.log_paths, self.logs)):
            parts.append(f"--- rank {rank} (exit {self.returncodes[rank]}, {path}):\n{text[-tail_chars:]}")
        return "\n".join(parts)

    def check(self, expected_returncodes: Sequence[int] | None = None) -> "LaunchResult":
        """Raise AssertionError with the report unless the exit codes are `expected` (default: all 0)."""
        expected = list(expected_returncodes) if expected_returncodes is not None else [0] * len(self.returncodes)
        if self.timed_out or self.returncodes != expected:
            raise AssertionError(f"multi-rank launch failed (expected exit codes {expected}):\n{self.report()}")
        return self


class RunningLaunch:
    """The processes of a started launch; `wait()` turns them into a LaunchResult."""

    def __init__(self, script: str, processes: list[subprocess.Popen], log_paths: list[Path]):
        self.script, self.processes, self.log_paths = script, processes, log_paths

    def kill(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
        for process in self.processes:
            process.wait()

    def wait(self, timeout: float = DEFAULT_TIMEOUT_S, grace_s: float = DEFAULT_GRACE_S) -> LaunchResult:
        """Wait for every rank. Once a rank has failed, the others get `grace_s` to end before they are killed
        (they would otherwise sit in a collective until the process-group timeout). Past `timeout` all are
        killed and the result says `timed_out`."""
        deadline = time.monotonic() + timeout
        failed_at = None
        timed_out = False
        while any(process.poll() is None for process in self.processes):
            now = time.monotonic()
            if failed_at is None and any(process.poll() not in (None, 0) for process in self.processes):
                failed_at = now
            if now > deadline or (failed_at is not None and now - failed_at > grace_s):
                timed_out = now > deadline
                self.kill()
                break
            time.sleep(0.1)
        return LaunchResult(self.script, [process.wait() for process in self.processes], self.log_paths, timed_out)


def start(script: str | os.PathLike, world_size: int, args: Sequence[object] = (),
          env: Mapping[str, str] | None = None, log_dir: str | os.PathLike | None = None,
          name: str | None = None) -> RunningLaunch:
    """Start `world_size` ranks of `python script *args`; each rank's output goes to LOG_DIR/NAME-rankR.log."""
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
    script = Path(script).resolve()
    if not script.is_file():
        raise FileNotFoundError(f"worker script {script} does not exist")
    log_dir = Path(log_dir) if log_dir is not None else Path(tempfile.mkdtemp(prefix="multirank-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    name = name or script.stem
    port = free_port()
    processes, log_paths = [], []
    try:
        for rank in range(world_size):
            log_paths.append(log_dir / f"{name}-rank{rank}.log")
            with open(log_paths[-1], "w") as log:
                processes.append(subprocess.Popen([sys.executable, str(script), *map(str, args)],
                                                  env=rank_environment(rank, world_size, port, env),
                                                  stdout=log, stderr=subprocess.STDOUT, cwd=str(REPO)))
    except BaseException:
        RunningLaunch(str(script), processes, log_paths).kill()
        raise
    return RunningLaunch(str(script), processes, log_paths)


def launch(script: str | os.PathLike, world_size: int, args: Sequence[object] = (),
           timeout: float = DEFAULT_TIMEOUT_S, env: Mapping[str, str] | None = None,
           log_dir: str | os.PathLike | None = None, name: str | None = None,
           grace_s: float = DEFAULT_GRACE_S) -> LaunchResult:
    """Start the ranks and wait for them (see `start` and `RunningLaunch.wait`). Does not raise on failure:
    call `.check()` on the result (or inspect `returncodes`)."""
    return start(script, world_size, args, env, log_dir, name).wait(timeout, grace_s)
