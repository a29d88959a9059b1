"""The training loop, its configuration, checkpoints and metrics."""

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .config import ConfigError, TrainConfig
from .loop import train

__all__ = ["CheckpointError", "ConfigError", "TrainConfig", "load_checkpoint", "save_checkpoint", "train"]
