"""`python -m rpo.generation`: the on-policy pairs command, the same code as `rpo-generate`."""
import sys

from rpo.generation.cli import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m rpo.generation"))
