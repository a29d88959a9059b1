"""The training loop, its configuration, checkpoints and metrics."""

from . import tasks  # noqa: F401 (the tasks register the model kinds TrainConfig reads: revbits.train.kinds)
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .config import ConfigError, TrainConfig
from .loop import train

__all__ = ["CheckpointError", "ConfigError", "TrainConfig", "load_checkpoint", "save_checkpoint", "train"]
