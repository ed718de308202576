"""`python -m rpo.evaluation`: the evaluation command, the same code as `rpo-eval` and examples/evaluate.py."""
import sys

from rpo.evaluation.cli import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m rpo.evaluation"))
