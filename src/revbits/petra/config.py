"""The options of a PETRA run (:class:`PetraConfig`), shared by the runtime and the optimisers."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class PetraConfig:
    """A PETRA run.

    stages: J, one process each. micro_batches: M, micro-batch m is
    ``data[(first_micro_batch + m) % len(data)]`` (None: one pass over ``data``). accumulation: k.
    optimizer: "sgd" (with momentum, nesterov, weight_decay),
    "adamw", or a picklable callable ``(params, config) -> Optimizer``. timeout: seconds any single wait
    for a neighbour may take; init_timeout: for the start-up rendezvous. seed: every process seeds with
    it before ``build_stages()``, so all build the same initial weights. out_dir: where each stage saves
    its :class:`StageRecord` (losses, final parameters; gradients, inputs and reconstructions too under
    the test-only switch of :mod:`revbits.petra.testing`). lr_schedule: the learning rate is
    ``lr * lr_schedule(n)`` after n updates of a stage (every stage counts its own updates alike).
    device: "cpu" or "cuda"; the data may stay on the CPU, each stage moves what it reads.
    """

    stages: int = 1
    micro_batches: int | None = None
    accumulation: int = 1
    lr: float = 0.01
    optimizer: str | Callable[..., torch.optim.Optimizer] = "sgd"
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    timeout: float = 60.0
    init_timeout: float = 300.0
    seed: int = 0
    out_dir: str | None = None
    lr_schedule: Callable[[int], float] | None = None  # lr factor after n updates (picklable); None: constant
    first_micro_batch: int = 0  # the global id of this segment's micro-batch 0 (data index, random seeds)
    resume_from: str | None = None  # a previous segment's out_dir: start from its stage states
    device: str = "cpu"  # "cuda": stage j runs on GPU LOCAL_RANK mod the GPU count; messages go over gloo

    def __post_init__(self) -> None:
        for name in ("stages", "accumulation"):
            if getattr(self, name) < 1:
                raise ValueError(f"PetraConfig.{name} must be at least 1, got {getattr(self, name)}")
        if self.micro_batches is not None and self.micro_batches < 1:
            raise ValueError(f"PetraConfig.micro_batches must be at least 1 (or None), got {self.micro_batches}")
        if not (self.timeout > 0 and self.init_timeout > 0):
            raise ValueError("PetraConfig.timeout and init_timeout must be positive: every wait has a deadline")
        if torch.device(self.device).type not in ("cpu", "cuda"):
            raise ValueError(f"PetraConfig.device must be cpu or cuda, got {self.device!r}")
