"""The Megatron-core trainer: `Trainer(TrainConfig(...)).fit()` (see docs/training.md)."""
from rpo.train.config import ConfigError, TrainConfig

__all__ = ["ConfigError", "TrainConfig", "Trainer"]


def __getattr__(name):
    # The trainer imports megatron-core and torch.distributed; keep `import rpo.train` (config, --help) light.
    if name == "Trainer":
        from rpo.train.trainer import Trainer
        return Trainer
    raise AttributeError(name)
