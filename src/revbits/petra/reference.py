"""Plain backprop on the same stages and micro-batches as a PETRA run: the baseline and the tests' oracle."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .optim import accumulate_, make_optimizer, make_scheduler
from .record import StageRecord
from .runtime import PetraConfig


def backprop_reference(
    stages: Sequence[nn.Module],
    micro_batches: Sequence[tuple[Tensor, Tensor]],
    k: int,
    config: PetraConfig | None = None,
) -> list[StageRecord]:
    """Single-process backprop through ``stages`` (as made by :func:`split`) over ``micro_batches`` in
    order, one autograd graph per micro-batch. Gradients are accumulated as in PETRA,
    Delta_j <- Delta_j + (1/k) dL_m/dtheta_j, and every k micro-batches (and after a final partial window)
    each stage's optimizer (from ``config``; none if ``config`` is None) steps and gradients are reset.

    Returns one record per stage with the gradients of every update, the true stage inputs, the losses
    (on the last stage) and the final parameters. This is the exact gradient PETRA approximates; with
    lr = 0 PETRA must reproduce it up to rounding.
    """
    records = [StageRecord(stage=j) for j in range(len(stages))]
    params = [[p for p in s.parameters() if p.requires_grad] for s in stages]
    optimizers = [make_optimizer(p, config) if config is not None and p else None for p in params]
    schedules = [make_scheduler(o, config) for o in optimizers]
    for s in stages:
        s.train()

    def update() -> None:
        for stage, record, optimizer, schedule in zip(stages, records, optimizers, schedules):
            record.add_grads(stage)
            if optimizer is not None:
                optimizer.step()
            if schedule is not None:
                schedule.step()
            stage.zero_grad(set_to_none=True)

    for m, (x, target) in enumerate(micro_batches):
        for j, stage in enumerate(stages[:-1]):
            records[j].inputs[m] = x.detach().clone()
            x = stage(x, m)
        records[-1].inputs[m] = x.detach().clone()
        loss = stages[-1](x, target, m)
        records[-1].losses.append(loss.item())
        flat = [p for ps in params for p in ps]
        grads = torch.autograd.grad(loss, flat, allow_unused=True)
        i = 0
        for ps in params:
            accumulate_(ps, grads[i : i + len(ps)], k)
            i += len(ps)
        if (m + 1) % k == 0:
            update()
    if len(micro_batches) % k:
        update()
    for stage, record in zip(stages, records):
        record.set_params(stage)
    return records
