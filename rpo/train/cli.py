"""The training command: `rpo-train`, `python -m rpo.train` and `examples/train.py` all run `main`.

    rpo-train --loss rpo --max-steps 100                          # one process
    torchrun --nproc-per-node 2 -m rpo.train --global-contrast    # two data-parallel ranks

Errors: an option error is argparse's usage line and exit status 2. Anything that stops a run later, on any rank,
reaches every rank (rpo.train.ranks): rank 0 prints it once as `PROG: error: ...` (or `PROG: stopped by ...`),
every rank exits with the same status (rpo.train.exits: 2 the user's input, 3 diverged, 4 an output could not be
written, 128+N a signal, 1 a bug, whose traceback the failing rank prints). The full traceback of any error with
--debug or RPO_DEBUG=1.
"""
from __future__ import annotations

import logging
import os
import sys
import traceback
from typing import List, Optional, Sequence

from rpo.train.config import TrainConfig
from rpo.train.exits import EXIT_OK, EXIT_USAGE, describe_failure

USAGE_ERROR = EXIT_USAGE


def configure_logging(level: int = logging.INFO) -> None:
    """One-line logs (rank-prefixed under torchrun) for scripts that have not configured logging."""
    rank = os.environ.get("RANK")
    prefix = f"[rank {rank}] " if rank is not None and os.environ.get("WORLD_SIZE", "1") != "1" else ""
    logging.basicConfig(level=level, format=f"%(asctime)s {prefix}%(name)s: %(message)s", datefmt="%H:%M:%S")


def main(argv: Optional[List[str]] = None, prog: str = "rpo-train") -> int:
    """Parse the command line, train, return the exit status (rpo.train.exits)."""
    config = TrainConfig.from_cli(sys.argv[1:] if argv is None else argv, prog=prog)
    return run(config, prog=prog)


def run(config: TrainConfig, prog: str = "rpo-train", callbacks: Sequence = ()) -> int:
    """Train with `config` (every rank of the launch calls it) and return the exit status; a failure is printed
    once, by rank 0, as one line."""
    from rpo.train import ranks, signals

    ranks.set_program_name(prog)
    ranks.forget_failures()
    signals.exit_with_launcher()
    stop_signals = signals.StopSignals().install()  # Ctrl-C during the imports and set-up: one line, no traceback
    debug = config.debug or os.environ.get("RPO_DEBUG", "") not in ("", "0")
    rank = int(os.environ.get("RANK", "0"))
    teardown = None
    try:
        # Imported after parsing so that --help answers at once (no torch or megatron import; the loss options are
        # checked by rpo.losses inside from_cli).
        import torch

        from rpo.models.parallel import teardown
        from rpo.train.trainer import Trainer

        if not torch.cuda.is_available():
            torch.set_flush_denormal(True)  # denormal gradients make CPU backward ~10x slower
        configure_logging()
        if config.plan:  # the memory estimate only (rpo.train.scale), nothing is trained
            from rpo.train.scale import print_memory_plan

            print_memory_plan(config)
        else:
            (Trainer(config, callbacks=callbacks) if callbacks else Trainer(config)).fit()
    except (Exception, KeyboardInterrupt) as error:
        code, line, bug = describe_failure(error, rank)
        _, code, line = ranks.share_failure(code, line)  # the run's first failure (maybe another rank's)
        if debug or bug:
            traceback.print_exc()
        if rank == 0:
            print(f"{prog}: {line}", file=sys.stderr, flush=True)
        return code
    finally:
        stop_signals.restore()
        if teardown is not None:
            teardown()
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
