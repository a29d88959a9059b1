"""The table of model kinds ``revbits train --model`` knows: one entry per kind, filled where its task
registers itself (``@register(name, data=..., help=..., petra=...)`` in :mod:`revbits.train.tasks`).

An entry holds everything the command line and the configuration need to know of a kind: its task, the
data set it trains on by default, the help text of ``--model``, and, for a kind that ``--parallel petra``
trains, how its model is cut into pieces and into how many stages at most. This module imports nothing
of the training package, so that :mod:`revbits.train.config` can read the table; the entries are there
once :mod:`revbits.train.tasks` is imported (``revbits.train`` imports it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn


@dataclass(frozen=True)
class PetraCut:
    """How ``--parallel petra`` trains a kind.

    - ``pieces(model, seed)``: the model's pieces, sharing its modules (training them trains the model);
    - ``most_stages(config)``: the number of pieces, so the most stages it can be split into;
    - ``memory``: the memory mode its stages need (None: any of the kind's modes).
    """

    pieces: Callable[[nn.Module, int], list[nn.Module]]
    most_stages: Callable[[Any], int]
    memory: str | None = None


@dataclass(frozen=True)
class ModelKind:
    """One ``--model``: its ``task`` class, default ``data`` set, ``help`` text and ``petra`` cut (None
    when PETRA does not train it)."""

    name: str
    task: type
    data: str
    help: str
    petra: PetraCut | None = None


_KINDS: dict[str, ModelKind] = {}


def add_kind(kind: ModelKind) -> None:
    """Add ``kind`` to the table; a ValueError if another task already holds its name."""
    if kind.name in _KINDS and _KINDS[kind.name].task is not kind.task:
        holder = _KINDS[kind.name].task.__qualname__
        raise ValueError(f"a task for model {kind.name!r} is already registered ({holder})")
    _KINDS[kind.name] = kind


def kind_names() -> list[str]:
    """The ``--model`` names, sorted."""
    return sorted(_KINDS)


def model_kind(name: str) -> ModelKind:
    """The entry of ``--model name``; a ValueError naming it and the known kinds if there is none."""
    try:
        return _KINDS[name]
    except KeyError:
        raise ValueError(f"model must be one of {', '.join(kind_names())}, got {name!r}") from None


def petra_kinds() -> list[str]:
    """The kinds ``--parallel petra`` trains, sorted."""
    return [name for name in kind_names() if _KINDS[name].petra is not None]
