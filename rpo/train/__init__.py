"""The Megatron-core trainer: `Trainer(TrainConfig(...)).fit()` (see README.md (section "Training with Megatron-core"))."""
from rpo.train.config import ConfigError, TrainConfig

__all__ = ["Callback", "ConfigError", "TrainConfig", "Trainer", "configure_logging"]

_LAZY = ("Callback", "Trainer", "configure_logging")


def __getattr__(name):
    # The trainer imports megatron-core and torch.distributed; keep `import rpo.train` (config, --help) light.
    if name in _LAZY:
        from rpo.train import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'rpo.train' has no attribute {name!r}")
