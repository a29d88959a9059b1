"""Per-stage optimisers and Algorithm 1's gradient accumulation."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from .config import PetraConfig


def make_optimizer(params: Iterable[nn.Parameter], config: PetraConfig) -> torch.optim.Optimizer:
    """The optimiser named by ``config.optimizer`` ("sgd": SGD with ``config.momentum``, ``nesterov``
    and ``weight_decay``; "adamw"), or ``config.optimizer(params, config)`` if it is a callable (which
    must be picklable, e.g. a module-level function, to reach the stage processes)."""
    params = list(params)
    if callable(config.optimizer):
        return config.optimizer(params, config)
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            params,
            lr=config.lr,
            momentum=config.momentum,
            nesterov=config.nesterov,
            weight_decay=config.weight_decay,
        )
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    raise ValueError(f"unknown optimizer {config.optimizer!r}: use 'sgd', 'adamw' or a callable")


def make_scheduler(optimizer: torch.optim.Optimizer | None, config: PetraConfig | None):
    """lr = config.lr * config.lr_schedule(n) after n updates (LambdaLR); None without an optimiser or a
    schedule (constant lr)."""
    if optimizer is None or config is None or config.lr_schedule is None:
        return None
    return torch.optim.lr_scheduler.LambdaLR(optimizer, config.lr_schedule)


def accumulate_(params: Sequence[nn.Parameter], grads: Sequence[Tensor | None], k: int) -> None:
    """Delta <- Delta + (1/k) g for each parameter's ``.grad`` (Algorithm 1: gradients averaged over
    the k micro-batches of one update). A None gradient (parameter unused) adds nothing."""
    for p, g in zip(params, grads, strict=True):
        if g is None:
            continue
        g = g / k
        if p.grad is None:
            p.grad = g
        else:
            p.grad.add_(g)
