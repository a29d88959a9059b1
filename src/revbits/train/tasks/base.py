"""What every training task provides to the loop: a model, batches, a loss and an evaluation; and the
task registry, one task per ``--model``.

A task is registered under the name of the model it trains (``@register("gpt")``); unless it builds
its own (``hf``), that is the model's name in :mod:`revbits.models`' registry, and
:meth:`Task.build_model` is ``revbits.models.create(name, memory=config.memory, **task.model_options(config))``.
A batch is ``(*inputs, targets)``, and the loss is the model's: ``model(*inputs, targets=targets).loss``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from ...models import create
from ..config import ConfigError, TrainConfig
from ..rundir import saved_options

EVAL_SEED = 1234  # evaluation batches are the same in every run and at every step

T = TypeVar("T", bound=type["Task"])


class Task(ABC):
    item_name = "samples"
    name: str = ""  # the --model this task trains; set by @register

    def __init__(self, config: TrainConfig) -> None:
        self.config = config

    def model_options(self, config: TrainConfig) -> dict[str, Any]:
        """The options of ``revbits.models.create`` for this task's model under ``config`` (besides
        ``memory``): the sizes the data set fixes (vocabulary, classes, image shape) and ``config``'s."""
        raise NotImplementedError(f"{type(self).__name__} builds its model itself (build_model)")

    def build_model(self, config: TrainConfig | None = None) -> nn.Module:
        """The model for ``config`` (by default the task's own configuration; another one gives, say,
        the same model under another memory mode), built by :func:`revbits.models.create`."""
        config = self.config if config is None else config
        return create(self.name, memory=config.memory, **self.model_options(config))

    @abstractmethod
    def train_batch(self, sampler: torch.Generator, device: torch.device) -> tuple[torch.Tensor, ...]: ...

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The mean loss of ``batch`` = (*inputs, targets): ``model(*inputs, targets=targets).loss``."""
        return model(*batch[:-1], targets=batch[-1]).loss

    @abstractmethod
    def evaluate(self, model: nn.Module, split: str) -> dict[str, float]: ...

    def items(self, batch: tuple[torch.Tensor, ...]) -> int:
        return batch[0].shape[0]

    def save_assets(self, run_dir: Path) -> None:  # noqa: B027 (optional hook; images need nothing)
        """Write what evaluation and sampling need besides the weights (vocabularies)."""

    @property
    def device(self) -> torch.device:
        return torch.device(self.config.device)


TASKS: dict[str, type[Task]] = {}


def register(name: str) -> Callable[[T], T]:
    """A class decorator (or, called on the class, a call) that makes ``task`` the task of ``--model name``."""

    def add(task: T) -> T:
        if name in TASKS and TASKS[name] is not task:
            raise ValueError(f"a task for model {name!r} is already registered ({TASKS[name].__qualname__})")
        task.name = name
        TASKS[name] = task
        return task

    return add


def list_tasks() -> list[str]:
    """The ``--model`` names with a task, sorted."""
    return sorted(TASKS)


def make_task(config: TrainConfig) -> Task:
    """The task of ``config.model``, built on ``config`` (it loads the data set)."""
    if config.model not in TASKS:
        raise ConfigError(f"no task trains model {config.model!r}; known: {', '.join(list_tasks())}")
    return TASKS[config.model](config)


def read_run_config(run_dir: Path) -> TrainConfig:
    """The configuration a run directory was trained with: its config.json, or, when that is missing,
    the options its newest checkpoint records."""
    path = Path(run_dir) / "config.json"
    values = saved_options(Path(run_dir))
    if values is None:
        raise FileNotFoundError(f"{run_dir} is not a revbits run directory (no config.json, no checkpoint)")
    source = str(path) if path.exists() else f"the options recorded in the newest checkpoint of {run_dir}"
    return TrainConfig.from_dict(values, source=source)
