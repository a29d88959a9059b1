"""transformers key/value caches in the layer calls of a converted model.

A plain decoder in training mode runs each layer once, against the cache its forward made (the
default ``use_cache=True``): each layer appends its keys and values and attends to what the cache
hands back, a contiguous copy. A BDIA or checkpoint stack runs a layer several times (BDIA once
per batch chunk, both again in backward), and each run would append to the one cache again, so
later runs would attend to earlier runs' keys. Instead every run gets a :class:`FreshCache` copy
of the cache as the model passed it (empty), and so computes exactly what the plain model's run
computes, without touching the model's cache. The copy is cheap: a cache's per-layer slots are
copied only when a layer first reaches for one (:class:`_SlotsCopiedOnUse`), so a run costs one
slot, not one per layer of the model.
"""

from __future__ import annotations

import functools
from typing import Any

import torch


@functools.cache
def _cache_types() -> tuple[type, ...]:
    """transformers' cache classes: a whole cache, and (transformers 5) one layer's slot of it."""
    try:
        from transformers import cache_utils
    except ImportError:  # pragma: no cover - revbits.hf needs transformers
        return ()
    return tuple(t for t in (getattr(cache_utils, "Cache", None), getattr(cache_utils, "CacheLayerMixin", None)) if t)


def is_cache(value: Any) -> bool:
    """Whether ``value`` is a transformers key/value cache (any ``transformers.cache_utils.Cache``)."""
    try:
        from transformers.cache_utils import Cache
    except ImportError:  # pragma: no cover - revbits.hf needs transformers
        return False
    return isinstance(value, Cache)


def past_length(cache: Any) -> int:
    """The number of tokens a transformers cache already holds (0 where it cannot say)."""
    try:
        return int(cache.get_seq_length())
    except (AttributeError, TypeError, ValueError, IndexError):
        return 0


def fresh_copy(value: Any, lazy: bool = True) -> Any:
    """A copy of a cache (or a part of one) that shares nothing a run could change: caches and their
    slots are new objects, containers are rebuilt, tensors cloned; other values (ints, classes,
    configs) are shared. With ``lazy`` a cache's ``layers`` list becomes a :class:`_SlotsCopiedOnUse`
    of the original's slots, so ``value`` must then stay unchanged while the copy is in use."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, dict):
        return type(value)((k, fresh_copy(v, lazy)) for k, v in value.items())
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(fresh_copy(v, lazy) for v in value)
    if isinstance(value, _cache_types()):
        copy = object.__new__(type(value))
        for name, attribute in vars(value).items():
            if lazy and name == "layers" and type(attribute) is list and is_cache(value):
                copy.__dict__[name] = _SlotsCopiedOnUse(attribute)
            else:
                copy.__dict__[name] = fresh_copy(attribute, lazy)
        return copy
    return value


class _SlotsCopiedOnUse(list):
    """A cache's list of per-layer slots that copies a slot of ``template`` (:func:`fresh_copy`) the first
    time it is read, and takes new slots (a cache that grows its list) as they come."""

    def __init__(self, template: list[Any]) -> None:
        super().__init__(template)
        self.template = template
        self.copied = [False] * len(template)

    def _own(self, index: int) -> None:
        index = index % len(self)
        if index < len(self.copied) and not self.copied[index]:
            super().__setitem__(index, fresh_copy(self.template[index]))
            self.copied[index] = True

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            for i in range(*index.indices(len(self))):
                self._own(i)
        else:
            self._own(index)
        return super().__getitem__(index)

    def __iter__(self) -> Any:
        for i in range(len(self)):
            self._own(i)
        return super().__iter__()


class FreshCache:
    """Stands for a transformers cache in a recorded layer call: each run of the layer gets its own
    :func:`fresh_copy` of the cache as the model passed it."""

    __slots__ = ("template",)

    def __init__(self, cache: Any) -> None:
        self.template = fresh_copy(cache, lazy=False)  # the model may go on using its own cache

    def new(self) -> Any:
        return fresh_copy(self.template)

    def __repr__(self) -> str:
        return f"FreshCache({type(self.template).__name__})"
