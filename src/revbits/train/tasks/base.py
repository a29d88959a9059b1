"""What every training task provides to the loop: a model, batches, a loss and an evaluation; and the
task registry, one task per ``--model``.

A task is registered under the name of the model it trains, with the facts of that model kind
(:mod:`revbits.train.kinds`): ``@register("gpt", data="shakespeare", help="characters")``. Unless it builds
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
from ..kinds import ModelKind, PetraCut, add_kind, kind_names, model_kind
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


def register(name: str, *, data: str, help: str, petra: PetraCut | None = None) -> Callable[[T], T]:  # noqa: A002
    """A class decorator (or, called on the class, a call) that makes ``task`` the task of ``--model name``
    and enters the kind in :mod:`revbits.train.kinds`: ``data``, the data set it trains on by default;
    ``help``, what ``--model``'s help says of it; ``petra``, how ``--parallel petra`` cuts its model."""

    def add(task: T) -> T:
        add_kind(ModelKind(name, task, data, help, petra))
        task.name = name
        return task

    return add


def list_tasks() -> list[str]:
    """The ``--model`` names with a task, sorted."""
    return kind_names()


def make_task(config: TrainConfig) -> Task:
    """The task of ``config.model``, built on ``config`` (it loads the data set)."""
    try:
        task = model_kind(config.model).task
    except ValueError as error:
        raise ConfigError(str(error)) from None
    return task(config)


def read_run_config(run_dir: Path) -> TrainConfig:
    """The configuration a run directory was trained with: its config.json, or, when that is missing,
    the options its newest checkpoint records. A directory that holds no run is a ConfigError; a
    damaged config.json an IntegrityError (:func:`revbits.train.rundir.read_config_json`)."""
    path = Path(run_dir) / "config.json"
    values = saved_options(Path(run_dir))
    if values is None:
        raise ConfigError(f"{run_dir} is not a revbits run directory (no config.json, no checkpoint)")
    source = str(path) if path.exists() else f"the options recorded in the newest checkpoint of {run_dir}"
    return TrainConfig.from_dict(values, source=source)
