"""Which tensors take part in a block's recomputation, and how their gradients reach them.

BDIA's backward runs each block again with a graph, y = block(x, *args), and back-propagates
g_y through it. Plain autograd would hand every tensor t that this graph reaches its share
J_t^T g_y, and what the engine then does with it depends on how the backward was called:
``loss.backward()`` accumulates it into every leaf's ``.grad``, ``loss.backward(inputs=S)`` only
into the leaves in S, and ``torch.autograd.grad(loss, S)`` into none (it returns S's gradients).
The reversible backward keeps that rule exactly, whatever the parameters are by then:

- the tensors the forward pass handed to the reversible Function -- the blocks' trainable
  parameters and the tensors requiring grad that a block holds as plain attributes, or as leaves
  in list, tuple and dict attributes (:func:`held_tensors`) -- get their gradients returned by the
  Function, so the engine treats them as any autograd input: hooks, DDP, ``autograd.grad`` and
  ``backward(inputs=)`` all work.
  A held tensor computed with a graph (not a leaf) is replaced by a detached leaf while its block
  is recomputed, so its graph is walked once, by the engine, as under plain autograd;
- a leaf the forward never saw -- a wrapper swapped the parameters in between, as FSDP's unshard
  does, FSDP1's flat parameter stands behind views, or a block reaches it through a closure --
  gets its gradient accumulated into ``.grad`` by the autograd engine inside the backward, with the
  wrapper's own hooks (FSDP's reduce-scatter) firing on the way, but only when the running backward
  accumulates into it (:class:`EngineRequest`);
- a parameter the recomputation does not reach, or whose gradient the running backward does not
  use, gets none, as under plain autograd.

Nothing is matched by name or shape; the graph of the recomputation decides. A parameter replaced by
another object between forward and backward raises (:func:`check_parameters_unchanged`).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from .step import call_block

__all__ = [
    "BlockGradients",
    "EngineRequest",
    "RecomputationError",
    "backward_through_block",
    "block_parameters",
    "check_parameters_unchanged",
    "detached_held_tensors",
    "distinct",
    "held_tensors",
    "reached_leaves",
    "recompute_block",
    "sharded_block",
    "trainable_parameters",
    "unmanaged_leaves",
]


class RecomputationError(RuntimeError):
    """A block that ran in the forward pass cannot be run again, or back-propagated, the same way."""


# -- the tensors handed to the reversible Function ----------------------------------------------------


def _flat_param_or_view(t: torch.Tensor) -> bool:
    """FSDP1's flat parameter, or one of the views of it that FSDP1 sets as module attributes."""
    return getattr(t, "_is_flat_param", False) or getattr(t._base, "_is_flat_param", False)


def _returnable(p: nn.Parameter) -> bool:
    """A trainable parameter whose gradient the reversible Function can return. FSDP1's flat
    parameter is not one: it changes shape between forward (sharded) and backward (unsharded), so
    it is left to the engine, which finds it behind the views the recomputation uses."""
    return p.requires_grad and not getattr(p, "_is_flat_param", False)


#: The attributes every nn.Module instance has (hooks, the parameter and buffer dicts, ...): never a tensor.
_MODULE_ATTRIBUTES = frozenset(vars(nn.Module()))
_MAY_HOLD_TENSORS = (torch.Tensor, list, tuple, dict)


def _wants_grad(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.requires_grad and not _flat_param_or_view(value)


def _held_in(module: nn.Module) -> Iterator[tuple[str | None, torch.Tensor]]:
    """(attribute, tensor) for the tensors ``module`` holds as plain attributes, and (None, leaf) for the
    leaves in list, tuple or dict attributes (one level deep; they need no stand-in, being leaves)."""
    attributes = module.__dict__
    added = attributes.keys() - _MODULE_ATTRIBUTES  # the few attributes a module class adds
    if not added:
        return
    for name in sorted(n for n in added if isinstance(attributes[n], _MAY_HOLD_TENSORS)):
        value = attributes[name]
        if _wants_grad(value):
            yield name, value
        elif isinstance(value, (list, tuple, dict)) and value:
            for item in value.values() if isinstance(value, dict) else value:
                if _wants_grad(item) and item.grad_fn is None:
                    yield None, item


def held_tensors(block: nn.Module) -> list[tuple[nn.Module, str | None, torch.Tensor]]:
    """(module, attribute, tensor) for every tensor requiring grad that ``block`` or one of its submodules
    holds as a plain attribute (not a parameter or buffer): a table shared with another module, or a
    tensor the model computed and assigned to its blocks; and (module, None, leaf) for the leaves in a list,
    tuple or dict attribute. FSDP1's views of its flat parameter are not counted: they are that wrapper's
    business (:func:`sharded_block`). Tensors reached otherwise (a closure, a module held outside the
    block's module tree) are not found: the engine rules of :class:`EngineRequest` apply to them."""
    return [(module, name, value) for module in block.modules() for name, value in _held_in(module)]


def block_parameters(block: nn.Module) -> list[torch.Tensor]:
    """The tensors of one block whose gradients the reversible Function returns: its returnable trainable
    parameters and its :func:`held_tensors`, each once, module by module in ``block.modules()`` order
    (the parameters in ``block.parameters()`` order). One pass over the modules."""
    tensors: dict[int, torch.Tensor] = {}
    for module in block.modules():
        for p in module._parameters.values():
            if p is not None and _returnable(p):
                tensors.setdefault(id(p), p)
        for _, value in _held_in(module):
            tensors.setdefault(id(value), value)
    return list(tensors.values())


def distinct(per_block: Sequence[Sequence[torch.Tensor]]) -> list[torch.Tensor]:
    """The tensors of all blocks' lists, each once even when blocks share it, in first-seen order."""
    seen: dict[int, torch.Tensor] = {}
    for tensors in per_block:
        for t in tensors:
            seen.setdefault(id(t), t)
    return list(seen.values())


def trainable_parameters(blocks: Sequence[nn.Module]) -> list[torch.Tensor]:
    """The :func:`block_parameters` of all blocks, each once even when blocks share it."""
    return distinct([block_parameters(block) for block in blocks])


@contextlib.contextmanager
def detached_held_tensors(block: nn.Module, tensors: Sequence[torch.Tensor]) -> Iterator[dict[int, torch.Tensor]]:
    """While the block is recomputed, every held attribute that is one of ``tensors`` and has a graph of its
    own (a non-leaf) is a fresh leaf with its value; yields {id(tensor): leaf}.

    The gradient the recomputation gives the leaf is returned for the tensor by the Function, and the
    engine then back-propagates it through the tensor's graph once, summed over blocks and chunks, as
    plain autograd does. Back-propagating through that graph inside each block's backward would walk it
    once per block, which fails on the second walk (its saved tensors are freed) and, where it does not,
    can count a gradient twice.
    """
    wanted = {id(t) for t in tensors if t.grad_fn is not None}
    if not wanted:  # no held non-leaf (parameters and held leaves need no stand-in)
        yield {}
        return
    leaves: dict[int, torch.Tensor] = {}
    swapped: list[tuple[nn.Module, str, torch.Tensor, torch.Tensor]] = []  # module, attribute, tensor, leaf
    try:
        for module, name, t in held_tensors(block):
            if id(t) in wanted and name is not None:
                leaf = leaves.setdefault(id(t), t.detach().requires_grad_())
                module.__dict__[name] = leaf
                swapped.append((module, name, t, leaf))
        yield leaves
    finally:
        for module, name, t, leaf in swapped:
            if module.__dict__.get(name) is leaf:  # the block may have assigned a new value itself
                module.__dict__[name] = t


def _fsdp_unit(module: nn.Module) -> bool:
    return _fsdp_class(type(module))


@functools.cache
def _fsdp_class(cls: type) -> bool:
    """Whether modules of class ``cls`` are FSDP units (fully_shard gives a sharded module a class of its own)."""
    return bool({c.__name__ for c in cls.__mro__} & {"FSDPModule", "FullyShardedDataParallel"})


def unmanaged_leaves(block: nn.Module, foreign: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The leaves among ``foreign`` (reached by the block's recomputation, unknown to the forward) that no
    wrapper accounts for: neither FSDP1's flat parameter nor the parameters of an FSDP unit in the block."""
    if not foreign or any(_fsdp_unit(m) for m in block.modules()):
        return []
    return [t for t in foreign if not _flat_param_or_view(t)]


def check_parameters_unchanged(block: nn.Module, index: int, forward: Sequence[torch.Tensor]) -> None:
    """Raise RecomputationError if a parameter the forward pass used is no longer a parameter of the block.

    The recomputation would run with the object now in its place and send the gradient there, away
    from the tensor the forward pass used. FSDP swaps a unit's parameters between forward and backward
    on purpose (sharded and unsharded), so blocks that hold an FSDP unit, and DTensor parameters, are
    left to FSDP, whose parameters :func:`backward_through_block` follows.
    """
    registered = {id(p) for m in block.modules() for p in m._parameters.values() if p is not None}
    missing = [p for p in forward if isinstance(p, nn.Parameter) and id(p) not in registered]
    if not missing or any(_fsdp_unit(m) for m in block.modules()):
        return
    now = dict(block.named_parameters(remove_duplicate=False))
    held = {id(t) for _, _, t in held_tensors(block)}  # a parameter may be held as an attribute instead
    for p in missing:
        if id(p) in held or type(p).__name__ == "DTensor":
            continue
        candidates = [n for n, q in now.items() if q.shape == p.shape and id(q) not in {id(f) for f in forward}]
        what = f"parameter {candidates[0]!r}" if len(candidates) == 1 else f"a parameter of shape {list(p.shape)}"
        raise RecomputationError(
            f"block {index} ({type(block).__name__}): {what} was replaced by another object (or removed) between "
            "the forward and the backward pass, so the backward cannot recompute the block the forward ran; "
            "change parameters in place (`with torch.no_grad(): p.copy_(new)`) or after the backward"
        )


# -- what the running backward does with gradients ---------------------------------------------------


def _will_execute(node: Any) -> bool | None:
    """Whether the running engine will execute ``node``; None for a leaf whose gradient ``autograd.grad``
    returns (the engine refuses to answer for those)."""
    try:
        return bool(torch._C._will_engine_execute_node(node))
    except RuntimeError as e:
        if "autograd.grad" in str(e):
            return None
        raise


class EngineRequest:
    """Which gradients the autograd engine run that called the reversible backward uses.

    The reversible Function's last input is a probe: a 0-element leaf requiring grad that no user can
    name, so its AccumulateGrad node runs exactly when the engine accumulates into every leaf it reaches
    (``loss.backward()`` without ``inputs``). Otherwise the engine is asked node by node.
    """

    def __init__(self, next_functions: Sequence[tuple[Any, int]] | None) -> None:
        if not next_functions:  # no graph information: the semantics of loss.backward()
            self.everything, self._inputs = True, None
            return
        *edges, (probe, _) = next_functions
        self.everything = probe is None or bool(_will_execute(probe))
        self._inputs = [node is not None and (self.everything or _will_execute(node) is not False) for node, _ in edges]

    @staticmethod
    def probe(like: torch.Tensor) -> torch.Tensor:
        """The 0-element leaf to pass as the Function's last input (no memory, on ``like``'s device)."""
        return torch.empty(0, dtype=like.dtype, device=like.device, requires_grad=True)

    def wants(self, index: int) -> bool:
        """Whether the engine uses the gradient of the Function's tensor input ``index`` (probe excluded)."""
        return self._inputs is None or self._inputs[index]

    def accumulates(self, accumulator: Any, where: str) -> bool:
        """Whether the engine would accumulate into the leaf of ``accumulator`` (an AccumulateGrad node) that
        the forward never saw. A leaf only the stack's graph reaches is not in the engine's graph, so it is
        accumulated by ``loss.backward()`` alone."""
        if self.everything:
            return True
        answer = _will_execute(accumulator)
        if answer is None:
            shape = list(accumulator.variable.shape)
            raise RecomputationError(
                f"torch.autograd.grad asks for the gradient of a tensor of shape {shape} that {where} uses without "
                "it being a parameter of the block, an attribute of it or an argument of the stack, so the "
                "reversible backward cannot return it; register it as a parameter, hold it as an attribute or "
                "pass it to the stack as an argument"
            )
        return answer


# -- one block's backward -------------------------------------------------------------------------


#: The class of the nodes that accumulate into a leaf (their ``variable``); looked up by attribute where absent.
_ACCUMULATE_GRAD = getattr(getattr(torch._C, "_functions", None), "AccumulateGrad", None)


def _reached_accumulators(y: torch.Tensor) -> list[Any]:
    """The AccumulateGrad nodes reachable from ``y.grad_fn``, in no particular order.

    ``visited`` holds every node's Python object until the walk ends: torch may make a node's object when it
    is read and free it when no reference is left (2.6, 2.10 and 2.12 do, 2.13 keeps it), so an ``id`` seen earlier
    can name another node by the time it is looked up. With ids alone, the walks stopped short on torch 2.6 to
    2.12 and every parameter of a BDIA block silently got no gradient."""
    found: list[Any] = []
    visited: dict[int, Any] = {}
    todo = [y.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or id(node) in visited:
            continue
        visited[id(node)] = node
        accumulates = type(node) is _ACCUMULATE_GRAD if _ACCUMULATE_GRAD is not None else hasattr(node, "variable")
        if accumulates:  # only AccumulateGrad nodes hold a variable (a type test is faster than a failed getattr)
            if node.variable is not None:
                found.append(node)
        else:
            todo.extend([fn for fn, _ in node.next_functions])
    return found


def reached_leaves(y: torch.Tensor) -> list[torch.Tensor]:
    """Every leaf tensor whose gradient ``y.backward()`` would accumulate, in no particular order."""
    if y.grad_fn is None:
        return [y] if y.requires_grad else []
    return [node.variable for node in _reached_accumulators(y)]


class BlockGradients:
    """The gradients of one recomputed block: ``inputs[i]`` for each input, ``params[j]`` for each
    forward-time parameter (None where it was not reached or was handled by the engine), and the
    ``foreign`` leaves the engine accumulated into."""

    __slots__ = ("foreign", "inputs", "params")

    def __init__(
        self,
        inputs: list[torch.Tensor | None],
        params: list[torch.Tensor | None],
        foreign: Sequence[torch.Tensor] = (),
    ) -> None:
        self.inputs, self.params, self.foreign = inputs, params, list(foreign)


def backward_through_block(
    y: torch.Tensor,
    grad_y: torch.Tensor,
    inputs: Sequence[torch.Tensor],
    params: Sequence[torch.Tensor],
    request: EngineRequest | None = None,
    where: str = "a block",
) -> BlockGradients:
    """J^T grad_y for the recomputed block output ``y``, by the rule of the module docstring.

    ``inputs`` are the fresh leaves the recomputation started from (the state x_k, the block arguments
    that want a gradient and the leaves standing in for held non-leaves); ``params`` the block's other
    tensors from :func:`block_parameters` whose gradients the running backward uses. Returns the gradients
    of both; a leaf that is neither gets its gradient in ``.grad`` where ``request`` accumulates into it
    (and then so do ``params``, which the engine would accumulate into as well).
    """
    request = request or EngineRequest(None)
    accumulators = _reached_accumulators(y) if y.grad_fn is not None else []
    reached = {id(node.variable) for node in accumulators}
    known = {id(t) for t in inputs} | {id(p) for p in params}
    foreign = [n.variable for n in accumulators if id(n.variable) not in known and request.accumulates(n, where)]
    used = [j for j, p in enumerate(params) if id(p) in reached]
    param_grads: list[torch.Tensor | None] = [None] * len(params)
    if not foreign:
        grads = torch.autograd.grad(y, [*inputs, *(params[j] for j in used)], grad_y, allow_unused=True)
        for j, grad in zip(used, grads[len(inputs) :]):
            param_grads[j] = grad
        return BlockGradients(list(grads[: len(inputs)]), param_grads)
    # A wrapper stands between the forward-time parameters and the recomputation (FSDP), and the running
    # backward accumulates: every leaf it wants gets its gradient as loss.backward() gives it, from the engine.
    for t in inputs:
        t.grad = None
    torch.autograd.backward(y, grad_y, inputs=[*inputs, *(params[j] for j in used), *foreign])
    input_grads = [t.grad for t in inputs]
    for t in inputs:
        t.grad = None
    return BlockGradients(input_grads, param_grads, foreign)


# -- wrappers and recomputation -------------------------------------------------------------------


def sharded_block(blocks: Sequence[nn.Module]) -> str | None:
    """Why the blocks cannot be run in batch chunks, if one of them is (or holds) its own FSDP unit.

    FSDP reduce-scatters a unit's gradients once per backward, when the unit's backward ends; a block
    recomputed and back-propagated chunk by chunk ends it once per chunk, and the later chunks' gradients
    would never be reduced. FSDP around the stack or the whole model keeps every block unsharded through
    the stack's backward, so chunks are fine there.
    """
    for k, block in enumerate(blocks):
        if not any(_fsdp_unit(module) for module in block.modules()):  # names are built only for the message
            continue
        name = next(name for name, module in block.named_modules() if _fsdp_unit(module))
        where = f"{name!r} in block {k}" if name else f"block {k}"
        return f"{where} is its own FSDP unit"
    return None


def recompute_block(block: nn.Module, index: int, x: torch.Tensor, args: Any) -> torch.Tensor:
    """y = block(x, *args) in the backward's recomputation; a RuntimeError there, after the same call
    succeeded in the forward, almost always means the block's parameters changed in between, and the
    error says so (a RecomputationError chained to the original)."""
    try:
        return call_block(block, index, x, args)
    except RuntimeError as e:
        raise RecomputationError(
            f"block {index} ({type(block).__name__}) ran in the forward pass but failed when the backward "
            f"recomputed it: {e}. The likely cause is a wrapper that resharded or replaced its parameters "
            "after the forward, such as FSDP1 with the block's parameters in an outer unit: wrap each block "
            "in its own FSDP unit (auto_wrap_policy), or use FSDP2's fully_shard"
        ) from e
