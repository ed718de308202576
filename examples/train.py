"""Train a policy with a preference loss (RPO by default) on one or many processes.

    python examples/train.py                                           # SmolLM2-135M-Instruct on ../shared/data
    torchrun --nproc-per-node 2 examples/train.py --loss rpo --global-contrast
    python examples/train.py --config run.yaml --lr 1e-6              # the command line overrides the YAML

Every option: --help, and README.md (section "Training with Megatron-core").
"""
import sys

from rpo.train import ConfigError, TrainConfig


def main(argv=None) -> int:
    config = TrainConfig.from_cli(sys.argv[1:] if argv is None else argv, prog="train.py")
    # Imported after parsing so that --help and option errors answer at once (no torch/megatron import).
    import torch

    from rpo.models.parallel import teardown
    from rpo.train import Trainer
    from rpo.train.trainer import configure_logging

    if not torch.cuda.is_available():
        torch.set_flush_denormal(True)  # denormal gradients make CPU backward ~10x slower
    configure_logging()
    try:
        Trainer(config).fit()
    except ConfigError as error:
        # Option combinations only the trainer can check (loss name, batch layout vs world size): argparse style.
        print(f"train.py: error: {error}", file=sys.stderr)
        return 2
    finally:
        teardown()
    return 0


# The guard matters: megatron's checkpoint writer starts a spawn-context process that re-imports this file.
if __name__ == "__main__":
    sys.exit(main())
