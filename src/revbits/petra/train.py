"""``revbits train --parallel petra --stages J``: a revbits model trained by PETRA, one process per stage.

The model is cut into pieces (:func:`revbits.petra.vit.vit_pieces`), the pieces into J stages balanced
by parameter count, and :func:`launch` runs the stages. Optimiser updates are ``steps``; each uses
``accumulation`` micro-batches of ``batch_size`` examples, so micro-batch m is the training batch drawn
from seed (seed, m). AdamW (betas 0.9, 0.95, decay on matrices) with the training command's warm-up and
cosine schedule runs per stage. Gradient clipping is not applied (a global norm would need every
stage's gradients at once). The trained weights are gathered into the plain model, evaluated, and
saved as a checkpoint that ``revbits eval`` reads like any other run.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..train.checkpoint import save_checkpoint
from ..train.config import ConfigError, TrainConfig
from ..train.loop import evaluate, make_optimizer
from ..train.metrics import MetricsLog
from ..train.schedule import lr_factor
from ..train.tasks import Task, make_task
from .launch import launch
from .record import load_records
from .runtime import PetraConfig, run_stage
from .stages import split
from .vit import vit_pieces

PETRA_MODELS = ("vit",)
_TASKS: dict[str, Task] = {}  # per process: the task of a config, built once


def task_of(config: TrainConfig) -> Task:
    key = json.dumps(config.to_dict(), sort_keys=True)
    if key not in _TASKS:
        _TASKS[key] = make_task(config)
    return _TASKS[key]


class TaskBatches(Sequence):
    """Micro-batch m = the task's training batch drawn with seed (config.seed, m); built lazily in each
    stage process, so only the configuration crosses process boundaries."""

    def __init__(self, config: TrainConfig, count: int) -> None:
        self.config, self.count = config, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, m: int) -> tuple[Tensor, Tensor]:
        if not 0 <= m < self.count:
            raise IndexError(m)
        sampler = torch.Generator().manual_seed(self.config.seed * 1_000_003 + m)
        return task_of(self.config).train_batch(sampler, torch.device("cpu"))


def build_stages(config: TrainConfig, J: int) -> tuple[nn.Module, list[nn.Module]]:
    """(model, its J stages); the caller seeds torch first, so every process builds the same weights."""
    model = task_of(config).build_model()
    return model, split(vit_pieces(model, config.seed), J)


def stage_builder(config: TrainConfig, J: int) -> list[nn.Module]:
    return build_stages(config, J)[1]


def adamw(params: list[nn.Parameter], petra: PetraConfig) -> torch.optim.Optimizer:
    """The training command's optimiser over one stage's parameters (see revbits.train.loop)."""
    holder = nn.Module()
    holder.params = nn.ParameterList(params)
    return make_optimizer(holder, TrainConfig(lr=petra.lr, weight_decay=petra.weight_decay))


def check_petra_config(config: TrainConfig) -> None:
    if config.model not in PETRA_MODELS:
        raise ConfigError(f"--parallel petra trains {', '.join(PETRA_MODELS)} models so far, not {config.model}")
    if config.memory != "bdia":
        raise ConfigError(f"--parallel petra needs reversible stages: --memory bdia, got {config.memory}")
    if config.stages < 1 or config.accumulation < 1:
        raise ConfigError("--stages and --accumulation must be at least 1")
    if config.stages > config.n_layer + 1:
        raise ConfigError(f"--stages {config.stages} is more than the model's {config.n_layer + 2} pieces allow")


def train_petra(config: TrainConfig, quiet: bool = False) -> dict[str, Any]:
    """Train ``config`` with PETRA over ``config.stages`` local processes; returns the last evaluation."""
    check_petra_config(config)
    out = Path(config.out)
    if (out / "metrics.jsonl").exists():
        raise ConfigError(f"{out} already holds a run; choose another --out (PETRA runs do not resume yet)")
    J, k = config.stages, config.accumulation
    schedule = partial(lr_factor, warmup=config.warmup, total=config.steps, lr=config.lr, min_lr=config.min_lr)
    petra = PetraConfig(
        stages=J,
        micro_batches=config.steps * k,
        accumulation=k,
        lr=config.lr,
        optimizer=adamw,
        weight_decay=config.weight_decay,
        seed=config.seed,
        out_dir=str(out / "stages"),
        lr_schedule=schedule,
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config.to_dict(), indent=1))
    start = time.perf_counter()
    data = TaskBatches(config, petra.micro_batches)
    summaries = launch(J, run_stage, (partial(stage_builder, config, J), data, petra))
    seconds = time.perf_counter() - start
    torch.manual_seed(config.seed)
    model, stages = build_stages(config, J)
    gather_weights(model, stages, load_records(petra.out_dir, J))
    task = task_of(config)
    metrics = MetricsLog(out / "metrics.jsonl")
    losses = summaries[-1].losses
    for step in range(config.log_interval, config.steps + 1, config.log_interval):
        window = losses[(step - config.log_interval) * k : step * k]
        metrics.write({"step": step, "split": "train", "loss": sum(window) / len(window)})
    model.eval()
    result = {"step": config.steps, "split": "valid", **evaluate(task, model, "valid")}
    metrics.write({**result, "seconds": seconds, "stages": J})
    save_checkpoint(out, config.steps, model, {"config": config.to_dict(), "parallel": "petra"})
    if not quiet:
        print(f"PETRA, {J} stages: {config.steps} updates in {seconds:.0f} s; valid {result}")
    return result


def gather_weights(model: nn.Module, stages: Sequence[nn.Module], records: Sequence[Any]) -> None:
    """Load each stage's trained parameters into ``model``, whose modules the stages share."""
    names = {id(p): name for name, p in model.named_parameters()}
    state = {}
    for stage, record in zip(stages, records, strict=True):
        for name, param in stage.named_parameters():
            state[names[id(param)]] = record.params[name]
    missing = set(names.values()) - set(state)
    if missing:
        raise RuntimeError(f"no stage trained these parameters: {sorted(missing)}")
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(state[name])


__all__ = ["TaskBatches", "train_petra"]
