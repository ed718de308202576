"""One rank of the training command (`rpo.train.cli.run`) with a fault injected from the environment, for the
tests/reliability cases that must end real processes (started by tests/multirank.py or tests/reliability/
launcher.py). Exits with the command's status.

    FAULT_METRICS_FULL=R:S   rank R cannot append step S to metrics.jsonl: ENOSPC (a disk that fills on rank 0)
    FAULT_BUG=R:S            rank R raises RuntimeError after step S (a bug on one rank)
    FAULT_SLEEP=SECONDS      every rank sleeps after each step (a run slow enough to be killed mid-way)
    FAULT_PID_DIR=DIR        every rank writes DIR/rank-R.pid, and DIR/rank-R.exit with its exit status
"""
import errno
import os
import sys
import time
from pathlib import Path


def _at(variable):
    value = os.environ.get(variable)
    if not value:
        return None
    rank, step = value.split(":")
    return (int(rank), int(step)) if int(rank) == int(os.environ["RANK"]) else None


class Faults:
    def __init__(self):
        self.bug = _at("FAULT_BUG")
        self.sleep = float(os.environ.get("FAULT_SLEEP", "0"))

    def on_step_end(self, trainer, step, record):
        if self.bug and step == self.bug[1]:
            raise RuntimeError(f"injected bug after step {step}")
        if self.sleep:
            time.sleep(self.sleep)


def main(argv):
    from rpo.train import TrainConfig, cli
    from rpo.train.metrics import MetricsLog

    if os.environ.get("FAULT_PID_DIR"):
        Path(os.environ["FAULT_PID_DIR"], f"rank-{os.environ['RANK']}.pid").write_text(str(os.getpid()))
    full = _at("FAULT_METRICS_FULL")
    if full:
        real_write = MetricsLog.write

        def write(self, record):
            if record["step"] == full[1]:
                raise OSError(errno.ENOSPC, "No space left on device", str(self.path))
            real_write(self, record)

        MetricsLog.write = write
    config = TrainConfig.from_cli(argv, prog="train.py")
    code = cli.run(config, prog="train.py", callbacks=[Faults()])
    if os.environ.get("FAULT_PID_DIR"):
        Path(os.environ["FAULT_PID_DIR"], f"rank-{os.environ['RANK']}.exit").write_text(str(code))
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
