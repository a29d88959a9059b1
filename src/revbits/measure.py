"""Measure the memory of one training step, on CPU or CUDA.

:class:`LiveBytes` is a dispatch-mode tracker: every storage that an operator creates inside
it counts from its creation until Python frees it, so it sees what autograd saves, what a
custom Function keeps, and every temporary. Registered storages (parameters, optimiser state,
gradients) are counted in their own category. The peak is taken over every operator.

:func:`measure_training_step` runs warm-up steps (so the optimiser state exists), then one
measured step and reports

- the peak of live bytes, split into parameters, gradients, optimiser state and activations
  (activations: everything else alive at the peak, temporaries included);
- ``held_after_forward``: the activation bytes alive between the end of forward and the start
  of backward, which is what a memory mode stores;
- on CUDA, also ``torch.cuda.max_memory_allocated`` over the step, as a cross-check.

:func:`tracking` is the one place a tracker is set up for a training step (parameters, optimiser
state and gradients registered in their categories); :func:`measure_training_step` and PETRA's
pipeline baselines both use it. (This module was ``revbits.memory`` until 0.2.)
"""

from __future__ import annotations

import contextlib
import weakref
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map_only

CATEGORIES = ("parameters", "gradients", "optimizer", "activations")


class OperatorCount(TorchDispatchMode):
    """Counts the ATen operators dispatched inside it: ``.count`` in all and ``.by_name`` per operator,
    what eager PyTorch pays its per-operator overhead on."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.by_name: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.count += 1
        self.by_name[str(func)] += 1
        return func(*args, **(kwargs or {}))


class LiveBytes(TorchDispatchMode):
    """Bytes of live storages by category, and the breakdown at the peak of their total.

    Inside the mode every storage an operator returns is counted as ``activations`` until it
    is freed; :meth:`register` puts a storage (new or already counted) in another category.
    Storages created outside the mode and never registered are not counted.

    A storage that is moved to another category after the peak, but was alive at the peak
    (a gradient computed before it reaches ``.grad``), is moved in the peak breakdown too.
    """

    def __init__(self) -> None:
        super().__init__()
        self.current = dict.fromkeys(CATEGORIES, 0)
        self.peak = dict(self.current)
        self._entries: dict[int, list] = {}  # id(storage) -> [category, nbytes, serial]
        self._serial = 0  # storages get increasing serial numbers
        self._peak_serial = 0  # the last serial alive at the peak

    @property
    def total(self) -> int:
        return sum(self.current.values())

    @property
    def peak_total(self) -> int:
        return sum(self.peak.values())

    def register(self, tensor: torch.Tensor, category: str) -> None:
        """Count ``tensor``'s storage under ``category``."""
        if category not in CATEGORIES:
            raise ValueError(f"unknown category {category!r}; use one of {CATEGORIES}")
        self._add(tensor.untyped_storage(), category)
        self._update_peak()

    def reset_peak(self) -> None:
        self.peak = dict(self.current)
        self._peak_serial = self._serial

    def _add(self, storage: torch.UntypedStorage, category: str) -> None:
        key = id(storage)
        entry = self._entries.get(key)
        if entry is not None:
            old, size, serial = entry
            if old != category and category != "activations":
                self.current[old] -= size
                self.current[category] += size
                entry[0] = category
                if serial <= self._peak_serial:  # alive now and created before the peak
                    self.peak[old] -= size
                    self.peak[category] += size
            return
        self._serial += 1
        size = storage.nbytes()
        self._entries[key] = [category, size, self._serial]
        self.current[category] += size
        weakref.finalize(storage, self._drop, key)

    def _drop(self, key: int) -> None:
        category, size, _ = self._entries.pop(key)
        self.current[category] -= size

    def _update_peak(self) -> None:
        if self.total > self.peak_total:
            self.peak = dict(self.current)
            self._peak_serial = self._serial

    def _track(self, tensor: torch.Tensor, inputs: set[int]) -> None:
        if tensor.device.type == "meta" or tensor.is_sparse:
            return
        storage = tensor.untyped_storage()
        if storage.data_ptr() in inputs:  # a view or in-place result: the op allocated nothing
            return
        self._add(storage, "activations")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        inputs = {
            t.untyped_storage().data_ptr()
            for t in tree_flatten((args, kwargs))[0]
            if isinstance(t, torch.Tensor) and t.device.type != "meta" and not t.is_sparse
        }
        out = func(*args, **kwargs)
        tree_map_only(torch.Tensor, lambda t: self._track(t, inputs), out)
        self._update_peak()
        return out


@dataclass
class StepMemory:
    """Bytes of one training step. ``peak`` = parameters + gradients + optimizer + activations."""

    device: str
    parameters: int
    gradients: int
    optimizer: int
    activations: int
    peak: int
    held_after_forward: int
    cuda_max_allocated: int | None = None
    cuda_held_after_forward: int | None = None

    @property
    def peak_minus_parameters(self) -> int:
        return self.peak - self.parameters

    def as_dict(self) -> dict[str, int | str | None]:
        return asdict(self)


def _optimizer_tensors(optimizer: torch.optim.Optimizer | None) -> list[torch.Tensor]:
    if optimizer is None:
        return []
    return [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]


@contextlib.contextmanager
def tracking(params: Sequence[nn.Parameter], optimizer: torch.optim.Optimizer | None = None) -> Iterator[LiveBytes]:
    """A :class:`LiveBytes` tracker active in the body, its peak reset at entry: ``params`` count as
    parameters, the optimiser's state tensors as optimizer state, every gradient accumulated into a
    parameter as gradients, and everything else created inside as activations."""
    tracker = LiveBytes()
    for p in params:
        tracker.register(p, "parameters")
    for t in _optimizer_tensors(optimizer):
        tracker.register(t, "optimizer")
    hooks = [
        p.register_post_accumulate_grad_hook(lambda p: tracker.register(p.grad, "gradients"))
        for p in params
        if p.requires_grad
    ]
    try:
        with tracker:
            tracker.reset_peak()
            yield tracker
    finally:
        for hook in hooks:
            hook.remove()


def measure_training_step(
    model: nn.Module,
    loss_fn: Callable[[], torch.Tensor],
    optimizer: torch.optim.Optimizer | None = None,
    *,
    warmup_steps: int = 1,
) -> StepMemory:
    """Peak and held bytes of ``zero_grad(set_to_none) -> loss_fn() -> backward -> step``.

    ``loss_fn`` runs the forward pass and returns a scalar loss; tensors it creates count as
    activations, tensors created before the call (an input batch) are not counted. Warm-up
    steps run first so the optimiser state exists when the measured step starts.
    """

    def step(tracker: LiveBytes | None) -> tuple[int, int | None]:
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
        else:
            model.zero_grad(set_to_none=True)
        cuda = torch.cuda.is_available() and any(p.is_cuda for p in params)
        base = torch.cuda.memory_allocated() if cuda else 0
        loss = loss_fn()
        held = tracker.current["activations"] if tracker else 0
        cuda_held = torch.cuda.memory_allocated() - base if cuda else None
        loss.backward()
        del loss
        if optimizer is not None:
            optimizer.step()
        return held, cuda_held

    params = [p for p in model.parameters()]
    for _ in range(warmup_steps):
        step(None)
    on_cuda = any(p.is_cuda for p in params)
    if on_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with tracking(params, optimizer) as tracker:
        held, cuda_held = step(tracker)
    return StepMemory(
        device=str(params[0].device) if params else "cpu",
        **tracker.peak,
        peak=tracker.peak_total,
        held_after_forward=held,
        cuda_max_allocated=torch.cuda.max_memory_allocated() if on_cuda else None,
        cuda_held_after_forward=cuda_held,
    )
