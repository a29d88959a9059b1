"""Learning-rate schedule: linear warm-up, then cosine decay to min_lr at the last step."""

from __future__ import annotations

import math


def lr_factor(step: int, *, warmup: int, total: int, lr: float, min_lr: float) -> float:
    """lr(step) / lr: (step + 1) / warmup during warm-up, then
    min_lr / lr + (1 - min_lr / lr) * (1 + cos(pi * progress)) / 2, progress from 0 to 1."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    floor = min_lr / lr
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
