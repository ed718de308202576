"""Evaluate a trained policy: held-out implicit-reward accuracy/margin, generation, pairwise judge win rate.

    python examples/evaluate.py --model runs/demo/final --dataset held_out.jsonl --output-json eval.json

The same command as `rpo-eval` and `python -m rpo.evaluation` (rpo/evaluation/cli.py). All options: --help, and
docs/evaluation.md.
"""
import sys

from rpo.evaluation.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], prog="evaluate.py"))
