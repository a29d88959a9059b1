"""The modules that stand in for a transformers layer list while a model is converted.

A transformers model runs its layers in a loop inside its own ``forward``::

    for i, layer in enumerate(self.layers):
        hidden_states = layer(hidden_states, mask_of[layer_type[i]], cache=cache, ...)

The arguments may differ from layer to layer (Gemma 2/3 and Qwen alternate sliding-window and
full-attention masks, Gemma 3 alternates rotary tables, older models pass a per-layer head
mask). A converted list keeps the loop and the list's length: slots 0..K-2 are
:class:`LayerSlot` modules that record the call they receive and hand the hidden states on
untouched, and slot K-1, a :class:`StackedLayers`, records the last call and then runs all K
original layers as one revbits stack, layer k with exactly the arguments the loop gave slot k.
Each original layer is wrapped in a :class:`LayerBlock`, the ``block(x, *args) -> y`` adapter
that revbits stacks call.

Every tensor in the recorded calls (also inside tuples, lists and dicts, such as the rotary
``position_embeddings = (cos, sin)``) becomes a top-level argument of the stack, once however
many layers share it, so its gradient flows. In training with gradients on, a stack may run a
layer more than once (BDIA's rebuild, checkpointing), so nothing a layer could mutate may reach
it: transformers' cache objects are replaced by None and ``use_cache`` by False, and any other
object that is not a plain constant is refused with an error that names it.
"""

from __future__ import annotations

import enum
import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..stack import stack as make_stack

CHECKPOINTING_HINT = "model.activation_checkpointing_disable(), gradient_checkpointing_disable() before transformers 5"
_CONSTANT_TYPES = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, enum.Enum, slice)


def is_cache(value: Any) -> bool:
    """Whether ``value`` is a transformers key/value cache (any ``transformers.cache_utils.Cache``)."""
    try:
        from transformers.cache_utils import Cache
    except ImportError:  # pragma: no cover - revbits.hf needs transformers
        return False
    return isinstance(value, Cache)


@dataclass(frozen=True)
class _TensorSlot:
    """Marks where the i-th tensor argument of the stack goes back into a layer call."""

    index: int


class CallSpec:
    """One layer call with every tensor (at any depth of tuples, lists and dicts) replaced by a
    :class:`_TensorSlot`; the tensors themselves travel as stack arguments."""

    __slots__ = ("args", "kwargs")

    def __init__(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.args = args
        self.kwargs = kwargs

    @staticmethod
    def pack(args: Sequence[Any], kwargs: dict[str, Any], tensors: list[torch.Tensor]) -> CallSpec:
        """The spec of one call; its tensors are appended to ``tensors`` unless already there
        (by identity), so a mask shared by every layer is one stack argument."""

        def take(value: Any) -> Any:
            if isinstance(value, torch.Tensor):
                for i, known in enumerate(tensors):
                    if known is value:
                        return _TensorSlot(i)
                tensors.append(value)
                return _TensorSlot(len(tensors) - 1)
            return _map_containers(value, take)

        return CallSpec(tuple(take(a) for a in args), {k: take(v) for k, v in kwargs.items()})

    def unpack(self, tensors: Sequence[torch.Tensor]) -> tuple[list[Any], dict[str, Any]]:
        """The original positional and keyword arguments, with ``tensors`` put back."""

        def put(value: Any) -> Any:
            if isinstance(value, _TensorSlot):
                return tensors[value.index]
            return _map_containers(value, put)

        return [put(a) for a in self.args], {k: put(v) for k, v in self.kwargs.items()}

    def __repr__(self) -> str:
        return f"CallSpec(args={self.args!r}, kwargs={self.kwargs!r})"


def _map_containers(value: Any, fn: Any) -> Any:
    """``fn`` applied to the items of a tuple, list or dict (rebuilt with the same type); other
    values unchanged."""
    if isinstance(value, dict):
        return type(value)((k, fn(v)) for k, v in value.items())
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a namedtuple
        return type(value)(*(fn(v) for v in value))
    if isinstance(value, (tuple, list)):
        return type(value)(fn(v) for v in value)
    return value


class LayerCalls:
    """The K recorded layer calls of one forward pass of a converted list; block k of the stack
    reads ``calls[k]``. A plain object, not a tensor: it travels as a constant stack argument."""

    __slots__ = ("specs",)

    def __init__(self, specs: list[CallSpec]) -> None:
        self.specs = specs

    def __getitem__(self, k: int) -> CallSpec:
        return self.specs[k]

    def __repr__(self) -> str:
        return f"LayerCalls({len(self.specs)} layers)"


class OutputFormat:
    """What the original layers return, recorded at their first call: one tensor (transformers 5)
    or a tuple whose first item is the hidden states (older transformers). The last slot answers
    in that structure."""

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
    """Layer k of a transformers model as a revbits block: ``block(x, calls, *tensors) -> y``.

    Calls ``layer(x, *args, **kwargs)`` with exactly the arguments the model's loop passed to
    slot k (``calls[k]`` with ``tensors`` put back) and returns the hidden states of its output.
    """

    def __init__(self, layer: nn.Module, index: int, output_format: OutputFormat) -> None:
        super().__init__()
        self.layer = layer
        self.index = index
        self._format = output_format

    def forward(self, x: torch.Tensor, calls: LayerCalls, *tensors: torch.Tensor) -> torch.Tensor:
        args, kwargs = calls[self.index].unpack(tensors)
        return self._format.record(self.layer(x, *args, **kwargs))


class InFlight:
    """What slots 0..K-2 return: the hidden states, on their way to the last slot.

    A loop that writes ``hidden_states = layer(...)`` hands it to the next slot; one that reads
    ``layer(...)[0]`` gets the tensor itself. Any other use is an error: the layers have not run
    yet, so the value is not a layer output.
    """

    __slots__ = ("hidden_states", "index")

    def __init__(self, hidden_states: torch.Tensor, index: int) -> None:
        self.hidden_states = hidden_states
        self.index = index

    def __getitem__(self, item: int) -> torch.Tensor | None:
        return self.hidden_states if item == 0 else None

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError(
            f"revbits.hf: the model used the output of layer {self.index} (.{name}) before the next layer; a "
            "converted model runs all its layers in the last slot of the layer list, so only passing the hidden "
            "states on to the next layer is supported"
        )


class _Pass:
    """The calls recorded so far in one forward pass through a converted list."""

    def __init__(self) -> None:
        self.hidden_states: torch.Tensor | None = None
        self.calls: list[tuple[list[Any], dict[str, Any]]] = []


class LayerSlot(nn.Module):
    """Slot ``index`` of a converted layer list: records the call and returns :class:`InFlight`.

    Attributes the model's loop reads off a layer (e.g. ``attention_type``) are answered by the
    original layer of the same index.
    """

    def __init__(self, index: int, layer: nn.Module, shared: _Pass, positional_names: list[str]) -> None:
        super().__init__()
        self.index = index
        self.__dict__["_layer"] = layer  # unregistered: the stack owns it
        self.__dict__["_pass"] = shared
        self.__dict__["_positional_names"] = positional_names

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            layer = self.__dict__.get("_layer")
            if layer is None:
                raise
            return getattr(layer, name)

    def extra_repr(self) -> str:
        return f"layer {self.index} runs in the last slot"

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self._record(args, kwargs)
        return InFlight(self._pass.hidden_states, self.index)

    def _record(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        shared: _Pass = self._pass
        args_list, kwargs = list(args), dict(kwargs)
        if args_list:
            hidden = args_list.pop(0)
        else:
            names = self._positional_names
            hidden = kwargs.pop(names[0] if names else "hidden_states")
        if isinstance(hidden, InFlight):
            hidden = hidden.hidden_states
        if self.index == 0:
            shared.hidden_states, shared.calls = hidden, []
        elif hidden is not shared.hidden_states or len(shared.calls) != self.index:
            shared.hidden_states, shared.calls = None, []
            raise RuntimeError(
                f"revbits.hf: layer {self.index} of a converted model did not receive the hidden states that "
                "entered layer 0 (the model computes on them between layers, or calls the layers out of order); "
                "a converted model runs all its layers at once in the last slot of the layer list"
            )
        shared.calls.append((args_list, kwargs))


class StackedLayers(LayerSlot):
    """Slot K-1 of a converted layer list: records the last call, then runs all K layers as one
    revbits stack from the hidden states x_0 that entered slot 0 and returns x_K (for BDIA at
    evaluation with ``quantize_eval=False``: exactly the layers in sequence).

    In training with gradients on, each recorded call is made safe to run twice (see the module
    docstring); at evaluation it is passed on unchanged, so generation with a cache works.
    """

    def __init__(
        self,
        stack: nn.Module,
        original: nn.ModuleList,
        memory: str,
        output_format: OutputFormat,
        shared: _Pass,
        positional_names: list[str],
    ) -> None:
        super().__init__(len(original) - 1, original[len(original) - 1], shared, positional_names)
        self.stack = stack
        self.memory = memory
        self._format = output_format
        # The original list, kept unregistered so its parameters are not counted twice; restore()
        # puts this very object back.
        self.__dict__["_original"] = original

    @property
    def original_layers(self) -> nn.ModuleList:
        """The layer list the model had before conversion (its layers are the stack's)."""
        return self.__dict__["_original"]

    def extra_repr(self) -> str:
        return f"memory={self.memory!r}, layers={len(self.original_layers)}"

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self._record(args, kwargs)
        shared: _Pass = self._pass
        hidden, calls = shared.hidden_states, shared.calls
        shared.hidden_states, shared.calls = None, []
        assert hidden is not None
        training = self.training and torch.is_grad_enabled()
        if training:
            self._refuse_layer_checkpointing()
        tensors: list[torch.Tensor] = []
        specs = []
        for k, (call_args, call_kwargs) in enumerate(calls):
            if training:
                call_args, call_kwargs = self._safe_to_repeat(k, call_args, call_kwargs)
            specs.append(CallSpec.pack(call_args, call_kwargs, tensors))
        out = self.stack(hidden, LayerCalls(specs), *tensors)
        return self._format.wrap(out)

    # -- argument handling ----------------------------------------------------------------------

    def _name_of(self, position: int) -> str:
        """The parameter name of positional argument ``position`` (0 = first after the hidden states)."""
        names = self._positional_names
        return names[position + 1] if position + 1 < len(names) else f"positional argument {position + 1}"

    def _safe_to_repeat(self, k: int, args: list[Any], kwargs: dict[str, Any]) -> tuple[list[Any], dict[str, Any]]:
        """Layer k's call with caches replaced by None and ``use_cache`` by False; any other object a
        layer could mutate is refused."""

        def clean(name: str, value: Any) -> Any:
            if name == "use_cache" and value is not None:
                return False
            if is_cache(value):
                return None
            if isinstance(value, (torch.Tensor, *_CONSTANT_TYPES)):
                return value
            if isinstance(value, (tuple, list, dict)):
                return _map_containers(value, lambda v: clean(name, v))
            raise TypeError(
                f"revbits.hf: layer {k} was called with `{name}` = a {type(value).__name__} object while training; a "
                "revbits stack runs each layer again in backward, and an object the layer may change (a cache, a "
                "stateful helper) would see that second run. Pass it only at evaluation, or restore() the model."
            )

        return [clean(self._name_of(i), a) for i, a in enumerate(args)], {k_: clean(k_, v) for k_, v in kwargs.items()}

    def _refuse_layer_checkpointing(self) -> None:
        if any(getattr(layer, "gradient_checkpointing", False) for layer in self.original_layers):
            raise ValueError(
                "revbits.hf: transformers' own activation checkpointing was enabled on the layers of a converted "
                f"model; disable it ({CHECKPOINTING_HINT}): the revbits stack already decides what is kept "
                "for backward, and convert(model, 'checkpoint') checkpoints every layer"
            )


def stacked_layer_list(layers: nn.ModuleList, memory: str, **options: Any) -> nn.ModuleList:
    """A list of ``len(layers)`` modules that, called in a loop like ``layers``, runs them all as
    ``revbits.stack(layers, memory, **options)`` in its last slot, layer k with the arguments the
    loop gave slot k. ``layers`` itself is left as it is (the last slot keeps it for restoring).

    The list's ``state_dict()`` and ``load_state_dict()`` use the original names (``3.mlp...``,
    not ``<K-1>.stack.blocks.3.layer.mlp...``), so checkpoints written while converted are plain.
    """
    output_format = OutputFormat()
    stack = make_stack([LayerBlock(layer, k, output_format) for k, layer in enumerate(layers)], memory, **options)
    params = list(inspect.signature(layers[0].forward).parameters.values())
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    names = [p.name for p in params if p.kind in positional]
    shared = _Pass()
    last = StackedLayers(stack, layers, memory, output_format, shared, names)
    slots: list[nn.Module] = [LayerSlot(i, layers[i], shared, names) for i in range(len(layers) - 1)]
    converted = nn.ModuleList([*slots, last])
    converted.train(layers.training)
    inner = f"{len(layers) - 1}.stack.blocks."
    converted.register_state_dict_post_hook(_PlainNames(inner))
    converted.register_load_state_dict_pre_hook(_ConvertedNames(inner, len(layers)))
    return converted


class _PlainNames:
    """state_dict post-hook: ``<prefix><K-1>.stack.blocks.<k>.layer.<rest>`` -> ``<prefix><k>.<rest>``,
    keeping the order of the keys."""

    def __init__(self, inner: str) -> None:
        self.inner = inner

    def __call__(self, module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
        start = prefix + self.inner
        items = list(state_dict.items())
        state_dict.clear()
        for key, value in items:
            if key.startswith(start):
                index, _, rest = key[len(start) :].partition(".")
                if rest.startswith("layer."):
                    key = f"{prefix}{index}.{rest[len('layer.') :]}"
            state_dict[key] = value


class _ConvertedNames:
    """load_state_dict pre-hook: ``<prefix><k>.<rest>`` -> ``<prefix><K-1>.stack.blocks.<k>.layer.<rest>``,
    so a plain checkpoint (or one written while converted) loads into a converted list."""

    def __init__(self, inner: str, count: int) -> None:
        self.inner, self.count = inner, count

    def __call__(self, module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        for key in [k for k in state_dict if k.startswith(prefix)]:
            index, _, rest = key[len(prefix) :].partition(".")
            if index.isdigit() and int(index) < self.count and not rest.startswith("stack."):
                state_dict[f"{prefix}{self.inner}{index}.layer.{rest}"] = state_dict.pop(key)
