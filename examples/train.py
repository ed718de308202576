"""Train a policy with a preference loss (RPO by default) on one or many processes.

    python examples/train.py                                           # SmolLM2-135M-Instruct on ../shared/data
    torchrun --nproc-per-node 2 examples/train.py --loss rpo --global-contrast
    python examples/train.py --config run.yaml --lr 1e-6              # the command line overrides the YAML

The same command as `rpo-train` and `python -m rpo.train` (rpo/train/cli.py). Every option: --help, and
docs/training.md.
"""
import sys

from rpo.train.cli import main as train_main


def main(argv=None) -> int:
    return train_main(argv, prog="train.py")


# The guard matters: megatron's checkpoint writer starts a spawn-context process that re-imports this file.
if __name__ == "__main__":
    sys.exit(main())
