"""`python -m rpo.train ...` (and `torchrun -m rpo.train ...`): the training command, rpo.train.cli."""
import sys

from rpo.train.cli import main

# The guard matters: megatron's checkpoint writer starts a spawn-context process that re-imports the main module.
if __name__ == "__main__":
    sys.exit(main(prog="python -m rpo.train"))
