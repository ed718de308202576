"""The Megatron-core trainer: `Trainer(TrainConfig(...)).fit()` (see docs/training.md); the command: rpo.train.cli."""
from rpo.train.callbacks import Callback
from rpo.train.config import ConfigError, TrainConfig

__all__ = ["Callback", "ConfigError", "TrainConfig", "Trainer", "configure_logging"]


def __getattr__(name):
    # The trainer imports megatron-core and torch.distributed; keep `import rpo.train` (config, --help) light.
    if name == "Trainer":
        from rpo.train.trainer import Trainer

        return Trainer
    if name == "configure_logging":
        from rpo.train.cli import configure_logging

        return configure_logging
    raise AttributeError(f"module 'rpo.train' has no attribute {name!r}")
