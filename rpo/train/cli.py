"""The training command: `rpo-train`, `python -m rpo.train` and `examples/train.py` all run `main`.

    rpo-train --loss rpo --max-steps 100                          # one process
    torchrun --nproc-per-node 2 -m rpo.train --global-contrast    # two data-parallel ranks

Errors: an option error is argparse's usage line and exit status 2. An error in the user's input found later,
on any rank (a bad data row, a missing or empty file, a model that does not fit --tensor-parallel, ...) reaches
every rank (rpo.train.ranks): rank 0 prints it once as `PROG: error: ...`, every rank exits with status 2. The
full traceback only with --debug or RPO_DEBUG=1.
"""
from __future__ import annotations

import logging
import os
import sys
import traceback
from typing import List, Optional

from rpo.train.config import TrainConfig

USAGE_ERROR = 2


def configure_logging(level: int = logging.INFO) -> None:
    """One-line logs (rank-prefixed under torchrun) for scripts that have not configured logging."""
    rank = os.environ.get("RANK")
    prefix = f"[rank {rank}] " if rank is not None and os.environ.get("WORLD_SIZE", "1") != "1" else ""
    logging.basicConfig(level=level, format=f"%(asctime)s {prefix}%(name)s: %(message)s", datefmt="%H:%M:%S")


def main(argv: Optional[List[str]] = None, prog: str = "rpo-train") -> int:
    """Parse the command line, train, return the exit status (0, or 2 for an error in the user's input)."""
    config = TrainConfig.from_cli(sys.argv[1:] if argv is None else argv, prog=prog)
    # Imported after parsing so that --help answers at once (no torch or megatron import; the loss options are
    # checked by rpo.losses inside from_cli).
    import torch

    from rpo.models.parallel import teardown
    from rpo.train.trainer import Trainer
    from rpo.train.ranks import user_error_types

    if not torch.cuda.is_available():
        torch.set_flush_denormal(True)  # denormal gradients make CPU backward ~10x slower
    configure_logging()
    debug = config.debug or os.environ.get("RPO_DEBUG", "") not in ("", "0")
    try:
        if config.plan:  # the memory estimate only (rpo.train.scale), nothing is trained
            from rpo.train.scale import print_memory_plan

            print_memory_plan(config)
        else:
            Trainer(config).fit()
    except user_error_types() as error:
        if debug:
            traceback.print_exc()
        if os.environ.get("RANK", "0") == "0":
            print(f"{prog}: error: {_one_line(error)}", file=sys.stderr)
        return USAGE_ERROR
    finally:
        teardown()
    return 0


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


if __name__ == "__main__":
    sys.exit(main())
