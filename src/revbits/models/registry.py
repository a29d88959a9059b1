"""The model registry: ``create(name, memory=..., **options)`` and ``list_models()``.

A model registers itself where it is defined::

    @register("gpt", config=GPTConfig, memory_modes=MEMORY_MODES, tiny={...}, example=lm_example)
    class GPT(nn.Module): ...

``create(name, memory, **options)`` is then ``Model(Config(memory=memory, **options))``: it builds the
same weights, from the same random numbers, as calling the constructor directly. Every registered model
follows one forward contract, ``model(*inputs, targets=None) -> Output`` (:class:`revbits.models.Output`),
and brings a tiny configuration and an example batch, so the tests run every model under every memory
mode it has without being told about it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn

Batch = tuple[tuple[torch.Tensor, ...], torch.Tensor]  # (inputs, targets): model(*inputs, targets=targets)
M = TypeVar("M", bound=type[nn.Module])


@dataclass(frozen=True)
class ModelSpec:
    """What the registry knows of a model.

    - ``model``: the class, called as ``model(config)``; ``config``: the dataclass of its options;
    - ``memory_modes``: the memory modes it can be built with, the first being plain autograd;
    - ``tiny``: the options of a small instance (for tests and smoke checks);
    - ``example(config, generator)``: a small (inputs, targets) batch for a model built from ``config``;
    - ``shared_weights``: whether a state dict trained in one memory mode loads into every other (False
      for the RNN models, where the reversible cells are other cells than torch's GRU and LSTM).
    """

    name: str
    model: type[nn.Module]
    config: type
    memory_modes: tuple[str, ...]
    tiny: dict[str, Any]
    example: Callable[[Any, torch.Generator], Batch]
    shared_weights: bool = True

    @property
    def options(self) -> tuple[str, ...]:
        """The options ``create`` takes for this model besides ``memory``."""
        return tuple(f.name for f in dataclasses.fields(self.config) if f.name != "memory")

    def takes_memory(self) -> bool:
        return any(f.name == "memory" for f in dataclasses.fields(self.config))


_MODELS: dict[str, ModelSpec] = {}


def register(
    name: str,
    *,
    config: type,
    memory_modes: tuple[str, ...],
    tiny: dict[str, Any],
    example: Callable[[Any, torch.Generator], Batch],
    shared_weights: bool = True,
) -> Callable[[M], M]:
    """A class decorator (or, called on the class, a call) that registers a model under ``name``."""
    if not dataclasses.is_dataclass(config):
        raise TypeError(f"register({name!r}): config must be a dataclass of the model's options, got {config!r}")
    if not memory_modes:
        raise ValueError(f"register({name!r}): a model needs at least one memory mode")

    def add(model: M) -> M:
        if name in _MODELS and _MODELS[name].model is not model:
            raise ValueError(f"a model named {name!r} is already registered ({_MODELS[name].model.__qualname__})")
        _MODELS[name] = ModelSpec(name, model, config, tuple(memory_modes), dict(tiny), example, shared_weights)
        return model

    return add


def list_models() -> list[str]:
    """The names of the registered models, sorted."""
    return sorted(_MODELS)


def model_spec(name: str) -> ModelSpec:
    """The registry entry of ``name``; a ValueError naming it and the known models if there is none."""
    try:
        return _MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}") from None


def memory_modes(name: str) -> tuple[str, ...]:
    """The memory modes model ``name`` can be built with."""
    return model_spec(name).memory_modes


def create(name: str, memory: str = "standard", **options: Any) -> nn.Module:
    """Model ``name`` under memory mode ``memory``: ``Model(Config(memory=memory, **options))``.

    Raises a ValueError naming the cause for an unknown model, a memory mode the model does not have,
    an option it does not take or a required option left out.
    """
    spec = model_spec(name)
    if memory not in spec.memory_modes:
        raise ValueError(f"{name}: memory must be one of {', '.join(spec.memory_modes)}, got {memory!r}")
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        raise ValueError(f"{name} has no option(s) {', '.join(unknown)}; its options: {', '.join(spec.options)}")
    required = [
        f.name
        for f in dataclasses.fields(spec.config)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in options
    ]
    if required:
        raise ValueError(f"{name} needs the option(s) {', '.join(required)}")
    config = spec.config(**options, **({"memory": memory} if spec.takes_memory() else {}))
    return spec.model(config)
