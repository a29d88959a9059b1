"""The extra arguments of a stack call, ``stack(x, *args, **kwargs)``, handed to every block.

Every block k computes y_k = block_k(x_k, *args, **kwargs) with the same arguments. The
reversible Function can only return gradients to its own inputs, so the tensors among the
arguments (positional or keyword) become inputs of the Function, and the rest are kept as
they are. :class:`BlockArguments` keeps both kinds in one object that is a pytree node, so
code that maps over block arguments (the batch chunks of :mod:`revbits.bdia.chunks`) sees the
keyword arguments too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import MappingKey, SequenceKey, register_pytree_node

__all__ = ["BlockArguments"]


class BlockArguments:
    """``args`` and ``kwargs`` for ``block(x, *args, **kwargs)``, the same for every block."""

    __slots__ = ("args", "kwargs")

    def __init__(self, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None) -> None:
        self.args = tuple(args)
        self.kwargs = dict(kwargs or {})

    def __repr__(self) -> str:
        return f"BlockArguments(args={self.args!r}, kwargs={self.kwargs!r})"

    def __len__(self) -> int:
        return len(self.args) + len(self.kwargs)

    def values(self) -> list[Any]:
        """The arguments in one list: the positional ones, then the keyword ones in call order."""
        return [*self.args, *self.kwargs.values()]

    def names(self) -> list[str]:
        """A name for each of :meth:`values`, for error messages."""
        return [f"argument {i}" for i in range(len(self.args))] + [f"keyword argument {k!r}" for k in self.kwargs]

    def with_values(self, values: Sequence[Any]) -> BlockArguments:
        """The same call with :meth:`values` replaced, in the same order."""
        n = len(self.args)
        return BlockArguments(values[:n], dict(zip(self.kwargs, values[n:])))

    def tensor_slots(self) -> list[int]:
        """Where the top-level tensors are in :meth:`values`."""
        return [i for i, a in enumerate(self.values()) if isinstance(a, torch.Tensor)]

    def call(self, block: nn.Module, x: torch.Tensor) -> Any:
        """block(x, *args, **kwargs)."""
        return block(x, *self.args, **self.kwargs)


def _flatten(call: BlockArguments) -> tuple[list[Any], tuple[int, tuple[str, ...]]]:
    return call.values(), (len(call.args), tuple(call.kwargs))


def _flatten_with_keys(call: BlockArguments) -> tuple[list[tuple[Any, Any]], tuple[int, tuple[str, ...]]]:
    keys: list[Any] = [SequenceKey(i) for i in range(len(call.args))] + [MappingKey(k) for k in call.kwargs]
    return list(zip(keys, call.values())), (len(call.args), tuple(call.kwargs))


def _unflatten(values: Any, context: tuple[int, tuple[str, ...]]) -> BlockArguments:
    values = list(values)
    n, names = context
    return BlockArguments(values[:n], dict(zip(names, values[n:])))


register_pytree_node(
    BlockArguments,
    _flatten,
    _unflatten,
    serialized_type_name="revbits.bdia.args.BlockArguments",
    flatten_with_keys_fn=_flatten_with_keys,
)
