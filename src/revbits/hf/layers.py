"""The modules that stand in for a transformers layer list while a model is converted.

A transformers model runs its layers in a loop inside its own ``forward``::

    for layer in self.layer:
        hidden_states = layer(hidden_states, *args, **kwargs)

A converted model keeps that loop and the list's length, but the list now holds a
:class:`StackedLayers` in slot 0, which runs all K original layers as one revbits stack, and
K - 1 :class:`PassThrough` modules that return the hidden states they are given. Each
original layer is wrapped in a :class:`LayerBlock`, the ``block(x, *args) -> y`` adapter that
revbits stacks call.

The arguments of the layer call are split into the tensors, which become top-level arguments
of the stack (so their gradients flow, e.g. cross-attention encoder states), and everything
else (None, flags, cache objects), which travels in one :class:`CallSpec`.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..stack import stack as make_stack

#: Argument names under which a layer receives its key/value cache.
CACHE_ARGS = ("past_key_values", "layer_past", "past_key_value")
#: Argument names of per-layer inputs: a loop passes a different value to every layer, and the
#: converted loop would hand layer 0's value to all of them (transformers 4.x head masks).
PER_LAYER_ARGS = ("head_mask", "layer_head_mask")
CHECKPOINTING_HINT = "model.activation_checkpointing_disable(), gradient_checkpointing_disable() before transformers 5"


@dataclass(frozen=True)
class _TensorSlot:
    """Marks where the i-th tensor argument of the stack goes back into the layer call."""

    index: int


class CallSpec:
    """The non-tensor part of one layer call: positional and keyword arguments with every
    top-level tensor replaced by a :class:`_TensorSlot`. Holds no tensor itself (a cache object
    at evaluation may hold some; revbits does not look inside it)."""

    __slots__ = ("args", "kwargs")

    def __init__(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.args = args
        self.kwargs = kwargs

    @staticmethod
    def pack(args: Sequence[Any], kwargs: dict[str, Any]) -> tuple[CallSpec, list[torch.Tensor]]:
        """Split a call into its spec and its top-level tensors, in order of appearance."""
        tensors: list[torch.Tensor] = []

        def take(value: Any) -> Any:
            if isinstance(value, torch.Tensor):
                tensors.append(value)
                return _TensorSlot(len(tensors) - 1)
            return value

        spec = CallSpec(tuple(take(a) for a in args), {k: take(v) for k, v in kwargs.items()})
        return spec, tensors

    def unpack(self, tensors: Sequence[torch.Tensor]) -> tuple[list[Any], dict[str, Any]]:
        """The original positional and keyword arguments, with ``tensors`` put back."""

        def put(value: Any) -> Any:
            return tensors[value.index] if isinstance(value, _TensorSlot) else value

        return [put(a) for a in self.args], {k: put(v) for k, v in self.kwargs.items()}

    def __repr__(self) -> str:
        return f"CallSpec(args={self.args!r}, kwargs={self.kwargs!r})"


class OutputFormat:
    """What the original layers return, recorded at the first call: one tensor (transformers 5.x)
    or a tuple whose first item is the hidden states (transformers 4.x). Shared by the adapters,
    the stack holder and the pass-through slots, so every slot returns the same kind of value."""

    def __init__(self) -> None:
        self.tuple_length: int | None = None  # None: a bare tensor

    def record(self, output: Any) -> torch.Tensor:
        """The hidden states in a layer's output; remembers the output's structure."""
        if isinstance(output, torch.Tensor):
            self.tuple_length = None
            return output
        if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
            self.tuple_length = len(output)
            return output[0]
        raise TypeError(
            f"revbits.hf: a layer returned {type(output).__name__}; expected the hidden states as a tensor "
            "or as the first item of a tuple"
        )

    def wrap(self, hidden_states: torch.Tensor) -> Any:
        """``hidden_states`` in the structure the original layers return (extra tuple items None)."""
        if self.tuple_length is None:
            return hidden_states
        return (hidden_states,) + (None,) * (self.tuple_length - 1)


class LayerBlock(nn.Module):
    """A transformers layer as a revbits block: ``block(x, spec, *tensors) -> y``.

    Calls ``layer(x, *args, **kwargs)`` with exactly the arguments the model's loop passed
    (``spec`` with ``tensors`` put back) and returns the hidden states of its output.
    """

    def __init__(self, layer: nn.Module, output_format: OutputFormat) -> None:
        super().__init__()
        self.layer = layer
        self._format = output_format

    def forward(self, x: torch.Tensor, spec: CallSpec, *tensors: torch.Tensor) -> torch.Tensor:
        args, kwargs = spec.unpack(tensors)
        return self._format.record(self.layer(x, *args, **kwargs))


class PassThrough(nn.Module):
    """Slots 1..K-1 of a converted layer list: return the hidden states unchanged, in the
    structure the original layers return. The stack in slot 0 already ran every layer."""

    def __init__(self, index: int, output_format: OutputFormat) -> None:
        super().__init__()
        self.index = index
        self._format = output_format

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return self._format.wrap(hidden_states)

    def extra_repr(self) -> str:
        return f"layer {self.index} runs inside slot 0"


class StackedLayers(nn.Module):
    """Slot 0 of a converted layer list: all K layers as one revbits stack.

    Called like the first original layer, ``(hidden_states, *args, **kwargs)``, it returns the
    stack's output x_K, computed from x_0 = hidden_states by the stack's memory mode (for BDIA
    at evaluation with ``quantize_eval=False``: exactly the layers in sequence).

    In training with gradients on, a cache argument (``past_key_values``, ``layer_past``) is
    replaced by None and ``use_cache`` by False: a stack may run a layer more than once (the
    backward recomputation of BDIA and checkpointing), and every run would write into the cache
    again. At evaluation the call is passed on unchanged, so generation with a cache works.
    """

    def __init__(self, stack: nn.Module, original: nn.ModuleList, memory: str, output_format: OutputFormat) -> None:
        super().__init__()
        self.stack = stack
        self.memory = memory
        self._format = output_format
        # The original list, kept unregistered so its parameters are not counted twice; restore()
        # puts this very object back.
        self.__dict__["_original"] = original
        first = original[0]
        params = list(inspect.signature(first.forward).parameters.values())
        positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        self._positional_names = [p.name for p in params if p.kind in positional]

    @property
    def original_layers(self) -> nn.ModuleList:
        """The layer list the model had before conversion (its layers are the stack's)."""
        return self.__dict__["_original"]

    def extra_repr(self) -> str:
        return f"memory={self.memory!r}, layers={len(self.original_layers)}"

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        args_list = list(args)
        if args_list:
            hidden_states = args_list.pop(0)
        else:
            name = self._positional_names[0] if self._positional_names else "hidden_states"
            hidden_states = kwargs.pop(name)
        self._refuse_per_layer_args(args_list, kwargs)
        if self.training and torch.is_grad_enabled():
            self._refuse_layer_checkpointing()
            self._drop_cache(args_list, kwargs)
        spec, tensors = CallSpec.pack(args_list, kwargs)
        out = self.stack(hidden_states, spec, *tensors)
        return self._format.wrap(out)

    # -- argument handling ----------------------------------------------------------------------

    def _name_of(self, position: int) -> str | None:
        """The parameter name of positional argument ``position`` (0 = first after the hidden states)."""
        names = self._positional_names
        return names[position + 1] if position + 1 < len(names) else None

    def _refuse_per_layer_args(self, args: list[Any], kwargs: dict[str, Any]) -> None:
        named = {self._name_of(i): a for i, a in enumerate(args)} | kwargs
        for name in PER_LAYER_ARGS:
            if named.get(name) is not None:
                raise NotImplementedError(
                    f"revbits.hf: the model passed a per-layer `{name}`; a converted model sees only layer 0's "
                    "value and cannot apply a different one to each layer. Call it without a head mask, or "
                    "restore() the model first."
                )

    def _refuse_layer_checkpointing(self) -> None:
        if any(getattr(layer, "gradient_checkpointing", False) for layer in self.original_layers):
            raise ValueError(
                "revbits.hf: transformers' own activation checkpointing was enabled on the layers of a converted "
                f"model; disable it ({CHECKPOINTING_HINT}): the revbits stack already decides what is kept "
                "for backward, and convert(model, 'checkpoint') checkpoints every layer"
            )

    def _drop_cache(self, args: list[Any], kwargs: dict[str, Any]) -> None:
        for i in range(len(args)):
            name = self._name_of(i)
            if name in CACHE_ARGS:
                args[i] = None
            elif name == "use_cache":
                args[i] = False
        for name in CACHE_ARGS:
            if name in kwargs:
                kwargs[name] = None
        if "use_cache" in kwargs:
            kwargs["use_cache"] = False


def stacked_layer_list(layers: nn.ModuleList, memory: str, **options: Any) -> nn.ModuleList:
    """A list of ``len(layers)`` modules that, called in a loop like ``layers``, runs them all as
    ``revbits.stack(layers, memory, **options)`` in slot 0 and passes the hidden states through
    in the others. ``layers`` itself is left as it is (slot 0 keeps it for restoring)."""
    output_format = OutputFormat()
    stack = make_stack([LayerBlock(layer, output_format) for layer in layers], memory, **options)
    holder = StackedLayers(stack, layers, memory, output_format)
    converted = nn.ModuleList([holder] + [PassThrough(i, output_format) for i in range(1, len(layers))])
    converted.train(layers.training)
    return converted
