"""Token slices: BDIA runs the token-wise parts of a block on slices of the sequence.

A module f is token-wise if its output at a position depends only on its input at that
position (an MLP, a norm, a projection). With x viewed as N positions of width d (every dimension
but the last flattened, [B, T, d] -> [B T, d]), for slices s_1 .. s_n of the N positions:

    f(x) = cat_j f(x[s_j])

BDIA's backward recomputes one block with a graph at a time, and batch chunks
(:mod:`revbits.bdia.chunks`) cut that graph only while there is a batch to slice: at batch 1 it
holds a whole layer's activations over the whole context, and for an LLM the MLP's (a SwiGLU's
gate, up, activation and product, each wider than the stream) are most of them. An installed
token-wise module runs slice by slice in the stack's training passes, and in the backward's
recomputation each slice runs under non-reentrant ``torch.utils.checkpoint``: the recomputed
graph keeps the slices' inputs (views of the module's input, which the block holds anyway), and
autograd rebuilds and frees one slice's graph at a time as it back-propagates. Attention, which
mixes positions, runs whole.

Exact, because the slicing is the same in every pass that must agree bit for bit: the reversible
forward (no graph), the recomputation (graph, checkpointed slices) and the plain-autograd
reference ``reversible = False`` (graph, slices kept) all run the same slices, so each matmul sees
the same rows (a matmul on fewer rows may round differently). The evaluation path of the stack,
and anything outside a stack's training passes, never slices: there the module is the plain one.

Slices: n = ceil(N / L) contiguous slices of the N positions of the module's input (batch times
tokens of a batch chunk), sizes differing by at most one, for the stack option ``token_slice`` = L
(None: off); N <= L runs whole. ``"auto"`` takes L = max(512, ceil(2**18 / d)) for an input of width d:
slices of at least 512 positions and 2**18 elements (1 MiB in float32), the least a batch chunk holds
(:mod:`revbits.bdia.chunks`), since a slice costs a fixed amount too, and the recomputation runs each
sliced module twice. Each slice is passed as a tensor of x's rank, [1, L_j, d] for [B, T, d].

Which modules: :func:`install` declares one (revbits.hf does it for a decoder layer's ``mlp``); a
:class:`~revbits.BDIAStack` installs every submodule of its blocks whose class sets
``token_wise = True`` (revbits' own :class:`~revbits.models.blocks.MLP`). Installing swaps the
instance's class for a subclass of the same name whose ``forward`` slices (as :mod:`revbits.hf` swaps
a layer's): the module tree, the parameter names and the state dict stay those of the plain model, a
pickled or deep-copied module stays installed, and the module is plain outside a stack's training passes.
Declaring a module that mixes positions would make training compute another function than
evaluation: declare only modules that are token-wise.

Each slice's checkpoint keeps its inputs as they are (:func:`checkpointed`), also under an outer saved-tensor
hook such as bdia+mesa's 8-bit codes. :func:`map_slices` runs any function of several sliced tensors the same
way; :mod:`revbits.hf.layer_slices` builds a whole decoder layer from it, attention included.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .slice_backward import backpropagate_slices, saved_as_they_are

__all__ = [
    "AUTO",
    "active_length",
    "checkpointed",
    "map_slices",
    "AUTO_MIN_SLICE_NUMEL",
    "AUTO_SLICE_TOKENS",
    "check_token_slice",
    "declared_token_wise",
    "install",
    "install_declared",
    "is_installed",
    "run_in_slices",
    "slice_bounds",
    "sliced_class",
    "slicing",
    "training_pass",
    "uninstall",
]

AUTO = "auto"
AUTO_SLICE_TOKENS = 512
AUTO_MIN_SLICE_NUMEL = 2**18  # elements per slice with "auto", at least (as per batch chunk)

Option = int | str | None


def check_token_slice(value: Option) -> Option:
    """The option ``token_slice`` if valid: ``"auto"``, None (off) or a slice length >= 1 in tokens."""
    if value is None or value == AUTO:
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"token_slice must be 'auto', None (no token slices) or a slice length >= 1 in tokens, got {value!r}"
        )
    return value


def slice_length(option: Option, width: int) -> int | None:
    """The slice length L of a valid option for an input of ``width`` features, or None for no slicing:
    the option itself, or for ``"auto"`` L = max(512, ceil(2**18 / width))."""
    if option == AUTO:
        return max(AUTO_SLICE_TOKENS, -(-AUTO_MIN_SLICE_NUMEL // max(1, width)))
    return option  # type: ignore[return-value]


def slice_bounds(tokens: int, length: int) -> list[slice]:
    """ceil(tokens / length) contiguous slices of ``range(tokens)``, sizes differing by at most one."""
    pieces = max(1, -(-tokens // length))
    size, extra = divmod(tokens, pieces)
    bounds, start = [], 0
    for j in range(pieces):
        stop = start + size + (1 if j < extra else 0)
        bounds.append(slice(start, stop))
        start = stop
    return bounds


@dataclass(frozen=True, eq=False)
class _Slicing:
    option: int | str  # a slice length, or "auto" (see slice_length)
    checkpoint: bool  # checkpoint each slice when grad is enabled (the backward's recomputation)
    output_grad: torch.Tensor | None = None  # the gradient the block's output will receive, where it is known


_ACTIVE: ContextVar[_Slicing | None] = ContextVar("revbits_token_slicing", default=None)


@contextlib.contextmanager
def slicing(option: Option, *, checkpoint: bool, output_grad: torch.Tensor | None = None) -> Iterator[None]:
    """Inside, installed modules run in slices of ``slice_length(option, d)`` tokens (none for None);
    with ``checkpoint``, each slice under non-reentrant checkpoint wherever grad is enabled. ``output_grad``:
    the gradient the block run inside will receive (BDIA's backward knows it before it recomputes the block);
    a :func:`map_slices` that makes the block's output back-propagates each slice with it at once."""
    token = _ACTIVE.set(None if option is None else _Slicing(option, checkpoint, output_grad))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


Method = TypeVar("Method", bound=Callable[..., Any])


def training_pass(method: Method) -> Method:
    """Decorates a forward path of a stack with a ``token_slice`` attribute: the path runs inside
    ``slicing(self.token_slice, checkpoint=False)`` (a forward pass keeps its slices' graphs, as plain
    autograd would). Under dynamo the path runs as it is: installed modules run whole while compiling."""

    @functools.wraps(method)
    def run(self: Any, *args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():
            return method(self, *args, **kwargs)
        with slicing(getattr(self, "token_slice", None), checkpoint=False):
            return method(self, *args, **kwargs)

    return run  # type: ignore[return-value]


def run_in_slices(forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``forward(x)`` (an installed module's own forward) on slices of the positions of x (all dimensions
    but the last, viewed as one of x's rank, so that every slice is contiguous) inside :func:`slicing`, and
    whole everywhere else. Only a call with one tensor argument of rank >= 2 is sliced; any other runs whole."""
    active = None if torch.compiler.is_compiling() else _ACTIVE.get()
    if active is None or kwargs or len(args) != 1 or not isinstance(args[0], torch.Tensor) or args[0].dim() < 2:
        return forward(*args, **kwargs)
    x = args[0]
    positions = x.shape[:-1].numel()
    length = slice_length(active.option, x.shape[-1])
    assert length is not None
    bounds = slice_bounds(positions, length)
    if len(bounds) == 1:
        return forward(x)
    flat = x.reshape(*([1] * (x.dim() - 2)), positions, x.shape[-1])  # all positions in one row of x's rank
    keep_inputs_only = active.checkpoint and torch.is_grad_enabled()
    outputs = []
    for rows in bounds:
        part = flat[..., rows, :]
        out = checkpointed(forward, part) if keep_inputs_only else forward(part)
        _check_token_wise_output(forward, part, out)
        outputs.append(out)
    out = torch.cat(outputs, dim=-2)
    return out.view(*x.shape[:-1], out.shape[-1])


def active_length(width: int) -> int | None:
    """The slice length inside :func:`slicing` for positions of ``width`` features, or None outside it (and
    while compiling)."""
    active = None if torch.compiler.is_compiling() else _ACTIVE.get()
    return None if active is None else slice_length(active.option, width)


def map_slices(
    fn: Callable[..., Any],
    inputs: Sequence[torch.Tensor],
    dim: int,
    length: int,
    *,
    shared: Sequence[torch.Tensor] = (),
    pass_rows: bool = False,
    block_output: bool = False,
) -> tuple[torch.Tensor, ...]:
    """``fn`` on slices of ``length`` positions along ``dim`` of every tensor in ``inputs`` (all the same size
    there; :func:`slice_bounds`), the outputs (a tensor or a tuple of tensors, each with the slice's size along
    ``dim``) concatenated along ``dim``:

        out_i = cat_j fn(*inputs[s_j], *shared)_i

    ``shared`` tensors are passed whole to every slice. With ``pass_rows`` fn also gets the slice s_j itself, as
    ``fn(*parts, *shared, rows=s_j)``.

    Inside a checkpointing :func:`slicing` with grad enabled each slice runs under :func:`checkpointed`, so the
    graph keeps only the slices' inputs; elsewhere ``fn`` runs plainly on each slice. ``block_output``: the one
    output is the output of the block being recomputed; where the slicing knows its gradient
    (``output_grad``, of the output's shape), each slice is back-propagated right after it runs instead
    (:mod:`revbits.bdia.slice_backward`), which saves checkpoint's second run of every slice."""
    active = _ACTIVE.get()
    keep_inputs_only = active is not None and active.checkpoint and torch.is_grad_enabled()
    bounds = slice_bounds(inputs[0].shape[dim], length)
    if keep_inputs_only and block_output and _output_grad_fits(active, inputs, dim):
        assert active is not None and active.output_grad is not None
        run = fn if pass_rows else _ignore_rows(fn)
        return (backpropagate_slices(run, inputs, shared, dim, bounds, active.output_grad),)
    results: list[tuple[torch.Tensor, ...]] = []
    for rows in bounds:
        parts = [t.narrow(dim, rows.start, rows.stop - rows.start) for t in inputs]
        run = functools.partial(fn, rows=rows) if pass_rows else fn
        out = checkpointed(run, *parts, *shared) if keep_inputs_only else run(*parts, *shared)
        results.append(out if isinstance(out, tuple) else (out,))
    return tuple(torch.cat(pieces, dim=dim) for pieces in zip(*results))


def _output_grad_fits(active: _Slicing | None, inputs: Sequence[torch.Tensor], dim: int) -> bool:
    """Whether the known gradient of the block's output can be that of an output sliced like ``inputs``."""
    grad = None if active is None else active.output_grad
    return grad is not None and grad.dim() > dim and grad.shape[dim] == inputs[0].shape[dim]


def _ignore_rows(fn: Callable[..., Any]) -> Callable[..., Any]:
    def run(*args: Any, rows: slice) -> Any:
        return fn(*args)

    return run


def checkpointed(forward: Callable[..., Any], *inputs: Any) -> Any:
    """``forward(*inputs)`` under non-reentrant checkpoint, its tensor inputs kept as they are.

    ``torch.utils.checkpoint`` saves its inputs through whatever saved-tensor hooks are active, and re-runs
    ``forward`` on what those hooks give back. Under an outer hook that changes tensors (bdia+mesa's 8-bit
    codes) the recomputation would run on a contiguous, rounded copy of a strided slice: another kernel path
    (``mm`` for ``bmm``), so other saved tensors and a CheckpointError. Identity hooks around the call keep the
    inputs (views of what the block holds anyway); inside, the checkpoint's own hooks take over as before.
    """
    with saved_as_they_are():
        return checkpoint(forward, *inputs, use_reentrant=False)


def _check_token_wise_output(forward: Any, part: torch.Tensor, out: Any) -> None:
    if isinstance(out, torch.Tensor) and out.dim() == part.dim() and out.shape[:-1] == part.shape[:-1]:
        return
    bound = forward.args[0] if isinstance(forward, functools.partial) and forward.args else forward
    owner = type(getattr(bound, "__self__", bound)).__name__
    shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
    raise TypeError(
        f"revbits token slices: {owner}, installed as token-wise, maps a slice {tuple(part.shape)} to {shape}; "
        "a token-wise module returns one tensor with the input's dimensions except the last "
        "(uninstall it with revbits.bdia.token_slices.uninstall, or pass token_slice=None)"
    )


# -- installing: the instance's class is swapped for a subclass whose forward runs in slices -----

_SLICED_CLASSES: dict[type, type] = {}


def _sliced_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    # functools.partial rather than a bound method object: dynamo traces it (no graph break per module)
    return run_in_slices(functools.partial(_plain_class(type(self)).forward, self), *args, **kwargs)


def _rebuild(plain: type) -> nn.Module:
    """Unpickling (and deepcopy) of an installed module: a bare instance of its installed class."""
    module = plain.__new__(plain)
    module.__class__ = sliced_class(plain)
    return module


def _reduce_ex(self: nn.Module, protocol: int) -> Any:
    # pickled as the plain class (which pickle finds by name) and installed again when loaded
    return _rebuild, (_plain_class(type(self)),), self.__getstate__()


def _plain_class(cls: type) -> type:
    for klass in cls.__mro__:
        plain = klass.__dict__.get("_revbits_plain_class")
        if plain is not None:
            return plain
    return cls


def sliced_class(cls: type) -> type:
    """The subclass of the module class ``cls`` that :func:`install` gives a module: its ``forward`` is
    :func:`run_in_slices` of ``cls.forward``. It keeps the name, so ``isinstance`` checks and class-name
    lookups still find it, and pickles as ``cls``."""
    if cls not in _SLICED_CLASSES:
        namespace = {
            "forward": _sliced_forward,
            "__reduce_ex__": _reduce_ex,
            "_revbits_plain_class": cls,
            "__module__": cls.__module__,
            "__qualname__": cls.__qualname__,
        }
        _SLICED_CLASSES[cls] = type(cls.__name__, (cls,), namespace)
    return _SLICED_CLASSES[cls]


def is_installed(module: nn.Module) -> bool:
    """Whether ``module`` runs in token slices inside a stack's training passes."""
    return _plain_class(type(module)) is not type(module)


def install(module: nn.Module) -> nn.Module:
    """Declare ``module`` token-wise: inside a BDIA stack's training passes it runs in token slices.
    Idempotent; only the instance's class changes, to :func:`sliced_class` of it. Returns ``module``."""
    if not is_installed(module):
        module.__class__ = sliced_class(type(module))
    return module


def uninstall(module: nn.Module) -> nn.Module:
    """Undo :func:`install` (nothing if not installed). Returns ``module``.

    Raises:
        RuntimeError: the module's class was changed again after :func:`install` (e.g. by FSDP's
            ``fully_shard``), so the plain class cannot be put back without undoing that change too.
    """
    if not is_installed(module):
        return module
    if type(module).__dict__.get("_revbits_plain_class") is None:
        raise RuntimeError(
            f"revbits token slices: the class of {type(module).__name__} was changed after it was installed "
            "(FSDP's fully_shard does that); undo that change before uninstalling"
        )
    module.__class__ = _plain_class(type(module))
    return module


def declared_token_wise(module: nn.Module) -> bool:
    """Whether the class of ``module`` declares it token-wise (a class attribute ``token_wise = True``)."""
    return getattr(type(module), "token_wise", False) is True


def install_declared(blocks: Iterable[nn.Module]) -> None:
    """:func:`install` every submodule of ``blocks`` whose class declares it token-wise."""
    for block in blocks:
        for module in block.modules():
            if declared_token_wise(module):
                install(module)
