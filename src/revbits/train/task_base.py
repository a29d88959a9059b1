"""Deprecated: moved to revbits.train.tasks.base; this alias goes in 0.3."""

from .tasks.base import EVAL_SEED, Task

__all__ = ["EVAL_SEED", "Task"]
