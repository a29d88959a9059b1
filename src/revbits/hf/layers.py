"""How a transformers layer list runs as one revbits stack while the model is converted.

A transformers model runs its layers in a loop inside its own ``forward``::

    for i, layer in enumerate(self.layers):
        hidden_states = layer(hidden_states, mask_of[layer_type[i]], cache=cache, ...)

The arguments may differ from layer to layer (Gemma 2/3 and Qwen alternate sliding-window and
full-attention masks, Gemma 3 alternates rotary tables, older models pass a per-layer head
mask). Conversion keeps the loop, the list and the layers where they are, and swaps each
layer's class for a subclass whose ``__call__`` records the call the loop makes and hands the
hidden states on untouched (:class:`InFlight`); the call to the last layer then runs all K
layers as one revbits stack, layer k with exactly the arguments the loop gave it. Each layer
is wrapped in a :class:`LayerBlock`, the ``block(x, *args) -> y`` adapter that revbits stacks
call, and the stack lives outside the model's module tree, so the model's ``state_dict()``,
parameter names and module names are those of the plain model.

Every tensor in the recorded calls (also inside tuples, lists and dicts, such as the rotary
``position_embeddings = (cos, sin)``) becomes a top-level argument of the stack, once however
many layers share it, so its gradient flows. In training with gradients on, a BDIA or checkpoint
stack runs a layer more than once (BDIA's rebuild, checkpointing) and BDIA runs it once per batch
chunk, so nothing a layer could mutate may reach it: each run of a layer gets its own fresh copy
of the (empty) transformers cache the model passed, so it computes exactly what the plain model
computes while the model's cache is left alone, and any other object that is not a plain constant
is refused with an error that names it.
"""

from __future__ import annotations

import enum
import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..bdia import token_slices
from ..modes import stack as make_stack
from .caches import FreshCache, is_cache, past_length
from .checkpointing import CHECKPOINTING_FLAG, FLAG, give_back_request, log_request, take_request
from .layer_slices import LayerSlicer, structure_known

#: Memory modes whose stack runs every layer exactly once per forward, on the whole batch, as the model's loop does.
_ONE_RUN_MODES = ("standard", "mesa")
_CONSTANT_TYPES = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, enum.Enum, slice)


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
            if isinstance(value, FreshCache):
                return value.new()
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
        self._call = type(layer).__call__  # the layer's own call, hooks included, not the recording one
        self.slicer: LayerSlicer | None = None  # set by Conversion.slice_layers (revbits.hf.layer_slices)

    def forward(self, x: torch.Tensor, calls: LayerCalls, *tensors: torch.Tensor) -> torch.Tensor:
        args, kwargs = calls[self.index].unpack(tensors)
        if self.slicer is not None:  # in a BDIA stack's training passes, the layer in token slices where it can
            out = self.slicer.run(self.layer, x, args, kwargs)
            if out is not None:
                return out
        return self._format.record(self._call(self.layer, x, *args, **kwargs))


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


class Conversion:
    """The state of one converted layer list: the K layers, the revbits stack that runs them, and
    the calls recorded so far in the current forward pass.

    Each layer stays where it is in the model (so ``state_dict()``, ``named_modules()``, PEFT's
    adapter names, FSDP's wrapping by layer class and ``model.layers[k]`` all see the plain model);
    only its class is swapped for a subclass whose ``__call__`` records the call made by the
    model's loop (:func:`converted_class`). The stack is kept outside the model's module tree, so
    no parameter is registered twice.
    """

    def __init__(self, layers: nn.ModuleList, memory: str, **options: Any) -> None:
        self.layers = list(layers)
        self.memory = memory
        self.output_format = OutputFormat()
        self.original_classes = [type(layer) for layer in self.layers]
        self.blocks = [LayerBlock(layer, k, self.output_format) for k, layer in enumerate(self.layers)]
        self.stack = make_stack(self.blocks, memory, **options)
        inside = {id(m) for layer in self.layers for m in layer.modules()}
        self._own_modules = [m for m in self.stack.modules() if id(m) not in inside]
        self.set_training(self.layers[-1].training)
        params = list(inspect.signature(self.layers[0].forward).parameters.values())
        positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        self.positional_names = [p.name for p in params if p.kind in positional]
        self.hidden_states: torch.Tensor | None = None
        self.calls: list[tuple[list[Any], dict[str, Any]]] = []
        self.token_wise: list[nn.Module] = []  # submodules run in token slices (bdia.token_slices)
        self.checkpointing_noted = False
        self.guard: RemovableHandle | None = None  # revbits.hf.convert's forward pre-hook on the base model

    def note_checkpointing_request(self) -> None:
        """transformers' checkpointing was asked for: the stack already does that job; say so once."""
        if not self.checkpointing_noted:
            self.checkpointing_noted = True
            log_request(self.memory)

    def set_training(self, mode: bool) -> None:
        """Put the stack and its adapters (not the layers, which follow the model) in ``mode``."""
        for module in self._own_modules:
            module.training = mode

    def attach(self) -> None:
        requested = False
        for k, layer in enumerate(self.layers):
            layer.__dict__["_revbits_conversion"] = self
            layer.__dict__["_revbits_index"] = k
            if hasattr(self.original_classes[k], FLAG):
                requested |= take_request(layer)
            layer.__class__ = converted_class(self.original_classes[k])
        if requested:
            self.note_checkpointing_request()

    def detach(self) -> None:
        for k, layer in enumerate(self.layers):
            layer.__class__ = self.original_classes[k]
            give_back_request(layer)
            del layer.__dict__["_revbits_conversion"], layer.__dict__["_revbits_index"]
        for module in self.token_wise:
            token_slices.uninstall(module)
        self.token_wise = []
        for block in self.blocks:
            block.slicer = None

    def slice_tokens(self, names: Sequence[str]) -> None:
        """Declare each layer's submodules ``names`` (those it has) token-wise: a BDIA stack runs them in
        token slices in training (:mod:`revbits.bdia.token_slices`); :meth:`detach` undoes it."""
        for layer in self.layers:
            for name in names:
                module = getattr(layer, name, None)
                if isinstance(module, nn.Module) and not token_slices.is_installed(module):
                    self.token_wise.append(token_slices.install(module))

    def slice_layers(self, model_type: str) -> None:
        """Run each layer of a known structure in token slices around its attention in a BDIA stack's training
        passes (:mod:`revbits.hf.layer_slices`); :meth:`detach` undoes it."""
        for block in self.blocks:
            if structure_known(block.layer, model_type):
                slicer = LayerSlicer(block.layer)
                block.slicer = slicer if slicer.enabled else None

    # -- one forward pass -----------------------------------------------------------------------

    def call(self, layer: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The model's loop called ``layer``: record the call; at the last layer run the stack."""
        index = layer.__dict__["_revbits_index"]
        self._record(index, args, kwargs)
        if index < len(self.layers) - 1:
            return InFlight(self.hidden_states, index)
        hidden, calls = self.hidden_states, self.calls
        self.hidden_states, self.calls = None, []
        assert hidden is not None
        # In training with gradients a BDIA or checkpoint stack runs a layer more than once; without gradients
        # (no_grad, generate) and at evaluation every stack runs each layer once on the whole batch.
        repeated = layer.training and torch.is_grad_enabled() and self.memory not in _ONE_RUN_MODES
        tensors: list[torch.Tensor] = []
        specs = []
        fresh: dict[int, FreshCache] = {}  # one per cache object, shared by the layers it is passed to
        for k, (call_args, call_kwargs) in enumerate(calls):
            if repeated:
                call_args, call_kwargs = self._safe_to_repeat(k, call_args, call_kwargs, fresh)
            specs.append(CallSpec.pack(call_args, call_kwargs, tensors))
        self.set_training(layer.training)
        out = self.stack(hidden, LayerCalls(specs), *tensors)
        return self.output_format.wrap(out)

    def _record(self, index: int, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        args_list, kwargs = list(args), dict(kwargs)
        if args_list:
            hidden = args_list.pop(0)
        else:
            names = self.positional_names
            hidden = kwargs.pop(names[0] if names else "hidden_states")
        if isinstance(hidden, InFlight):
            hidden = hidden.hidden_states
        if index == 0:
            self.hidden_states, self.calls = hidden, []
        elif hidden is not self.hidden_states or len(self.calls) != index:
            self.hidden_states, self.calls = None, []
            raise RuntimeError(
                f"revbits.hf: layer {index} of a converted model did not receive the hidden states that entered "
                "layer 0 (the model computes on them between layers, or calls the layers out of order); a "
                "converted model runs all its layers at once when its last layer is called"
            )
        self.calls.append((args_list, kwargs))

    def _name_of(self, position: int) -> str:
        """The parameter name of positional argument ``position`` (0 = first after the hidden states)."""
        names = self.positional_names
        return names[position + 1] if position + 1 < len(names) else f"positional argument {position + 1}"

    def _safe_to_repeat(
        self, k: int, args: list[Any], kwargs: dict[str, Any], fresh: dict[int, FreshCache]
    ) -> tuple[list[Any], dict[str, Any]]:
        """Layer k's call with an empty cache replaced by a :class:`FreshCache` (kept in ``fresh`` by the
        cache's id); a cache holding past tokens, and any other object a layer could mutate, is refused."""

        def clean(name: str, value: Any) -> Any:
            if is_cache(value):
                past = past_length(value)
                if past:
                    raise ValueError(
                        f"revbits.hf: layer {k} was called with a cache (`{name}`) that already holds {past} tokens "
                        f"while training with gradients; a memory={self.memory!r} stack runs each layer again (and "
                        "BDIA once per batch chunk), so it cannot extend that cache. Run this forward under "
                        "torch.no_grad() or in eval mode, without the cache, or convert with memory='standard'."
                    )
                if id(value) not in fresh:
                    fresh[id(value)] = FreshCache(value)
                return fresh[id(value)]
            if isinstance(value, (torch.Tensor, *_CONSTANT_TYPES)):
                return value
            if isinstance(value, (tuple, list, dict)):
                return _map_containers(value, lambda v: clean(name, v))
            raise TypeError(
                f"revbits.hf: layer {k} was called with `{name}` = a {type(value).__name__} object while training; a "
                "revbits stack runs each layer again in backward, and an object the layer may change (a cache, a "
                "stateful helper) would see that second run. Pass it only at evaluation, or restore() the model."
            )

        return [clean(self._name_of(i), a) for i, a in enumerate(args)], {n: clean(n, v) for n, v in kwargs.items()}


def conversion_of(layer: nn.Module) -> Conversion | None:
    """The :class:`Conversion` a layer belongs to, or None for a plain layer."""
    return layer.__dict__.get("_revbits_conversion")


_CONVERTED_CLASSES: dict[type, type] = {}


def _converted_call(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    return self.__dict__["_revbits_conversion"].call(self, args, kwargs)


def converted_class(cls: type) -> type:
    """A subclass of the layer class ``cls`` whose ``__call__`` goes through its :class:`Conversion`.
    It keeps the name, so ``isinstance`` checks and class-name lookups (transformers' output
    recording, FSDP wrapping policies) still find the layer."""
    if cls not in _CONVERTED_CLASSES:
        namespace = {"__call__": _converted_call, "__module__": cls.__module__, "__qualname__": cls.__qualname__}
        if hasattr(cls, FLAG):  # transformers' checkpointing flag: recorded, never acted on inside the stack
            namespace[FLAG] = CHECKPOINTING_FLAG
        _CONVERTED_CLASSES[cls] = type(cls.__name__, (cls,), namespace)
    return _CONVERTED_CLASSES[cls]


def convert_layer_list(layers: nn.ModuleList, memory: str, **options: Any) -> Conversion:
    """Convert ``layers`` in place: called in a loop as before, they run as
    ``revbits.stack(layers, memory, **options)`` when the last one is called, layer k with the
    arguments the loop gave it. :meth:`Conversion.detach` undoes it."""
    conversion = Conversion(layers, memory, **options)
    conversion.attach()
    return conversion


