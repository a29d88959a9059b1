"""Batch chunks: BDIA runs every block on slices of the batch, in the forward and the backward.

The backward of a reversible stack recomputes one block at a time with a graph. Run on the
whole batch, that graph holds a whole block's activations, which sets the peak of the step.
Run on n slices of the batch one after another (recompute slice c, back-propagate it, free its
graph, then slice c + 1), the graph holds 1/n of it. It stays exact because the forward pass
runs every block on the same slices, in the same order, with the RNG advancing from slice to
slice exactly as the backward replays it, so every recomputed slice is bit-identical to the
forward's. The plain-autograd reference (``reversible = False``) uses the same slices too.

Number of chunks n for a batch of B samples and the stack option ``batch_chunks``:

- ``"auto"`` (the default): n = min(B, 8, max(1, numel(x) // 2**18)): every chunk holds at least 2**18
  stream elements (1 MiB in float32), and a stream of fewer than 2**19 elements is not split. Each
  chunk costs a fixed amount per block (more operator calls, a step of the Python loop, the attention
  kernel's per-call work on its [T, T] mask), which smaller chunks do not amortise (docs/bdia.md,
  "The step's overhead", measures it);
- an integer m >= 1: n = min(m, B); 1 turns chunking off (the backward of revbits 0.1).

The chunks are contiguous slices of dim 0, sizes differing by at most one.

Block arguments that carry the batch must be split with x; the others must not. A wrong
guess would be a silent wrong result, so the rule only splits where dim 0 cannot be anything
but the batch, and refuses the rest. For a tensor argument t (top level, or inside lists,
tuples and dicts) and x of rank r:

- passed whole to every chunk: t is 0-d, or t.shape[0] != B (e.g. a [T, T] mask, a [1, T, d]
  table, a [T] position vector);
- split with x: t.shape[0] == B and either t has a higher rank than x (an attention mask laid
  out to broadcast against [B, heads, T, S], such as [B, 1, 1, S]) or t has x's rank and x's
  last dimension (a stream-like tensor such as an encoder output [B, S, d]);
- ambiguous: any other t with t.shape[0] == B (a [B, S] padding mask, a [h, T, S] bias whose
  head count happens to equal B). With ``"auto"`` the step runs unsplit; with an explicit m > 1
  the stack raises :class:`ValueError` naming the argument.

Tensors inside other objects are passed whole. Blocks that mix samples of a batch (BatchNorm in
training) compute another function on a slice: ``"auto"`` does not split them and an explicit
m > 1 raises.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten_with_path, tree_map_only

__all__ = ["AUTO", "AUTO_MAX_CHUNKS", "AUTO_MIN_CHUNK_NUMEL", "BatchSplit", "check_batch_chunks", "plan_split"]

AUTO = "auto"
AUTO_MAX_CHUNKS = 8
AUTO_MIN_CHUNK_NUMEL = 2**18  # stream elements per chunk, at least (see the module docstring)


def check_batch_chunks(value: int | str) -> int | str:
    """The option ``batch_chunks`` if valid: ``"auto"`` or an integer >= 1."""
    if value == AUTO:
        return AUTO
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"batch_chunks must be 'auto' or an integer >= 1 (1 runs every block on the whole batch), got {value!r}"
        )
    return value


@dataclass(frozen=True)
class BatchSplit:
    """The slices of dim 0 every block runs on, and how block arguments follow them."""

    batch: int
    slices: tuple[slice, ...]

    @staticmethod
    def into(batch: int, chunks: int) -> BatchSplit:
        """``chunks`` contiguous slices of ``range(batch)``, sizes differing by at most one."""
        chunks = max(1, min(chunks, batch))
        if chunks == 1:
            return BatchSplit(batch, (slice(0, batch),))
        size, extra = divmod(batch, chunks)
        bounds = [0]
        for c in range(chunks):
            bounds.append(bounds[-1] + size + (1 if c < extra else 0))
        return BatchSplit(batch, tuple(slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])))

    @property
    def chunks(self) -> int:
        return len(self.slices)

    def part(self, t: torch.Tensor, index: int) -> torch.Tensor:
        """Chunk ``index`` of a tensor whose dim 0 is the batch (a state, its gradient, g): ``t`` itself when there
        is one chunk (no view to make)."""
        return t if len(self.slices) == 1 else t[self.slices[index]]

    def splits(self, t: torch.Tensor) -> bool:
        """Whether the tensor argument ``t`` is sliced with x (the rule was checked by :func:`plan_split`)."""
        return self.chunks > 1 and t.dim() > 0 and t.shape[0] == self.batch

    def tensor(self, t: torch.Tensor, index: int) -> torch.Tensor:
        """Chunk ``index`` of a tensor argument: its slice, or the whole tensor."""
        return t[self.slices[index]] if self.splits(t) else t

    def tree(self, tree: Any, index: int) -> Any:
        """Chunk ``index`` of block arguments: every tensor in lists, tuples and dicts by :meth:`tensor`."""
        if self.chunks == 1:
            return tree
        return tree_map_only(torch.Tensor, lambda t: self.tensor(t, index), tree)

    def leaf(self, t: torch.Tensor, index: int) -> torch.Tensor:
        """A fresh leaf for chunk ``index`` of a tensor input whose gradient is wanted (a slice is a new leaf;
        an unsplit tensor is the same leaf for every chunk, its gradients summed)."""
        if not self.splits(t):
            return t
        return t.detach()[self.slices[index]].requires_grad_(t.requires_grad)

    def add_grad(
        self, store: list[torch.Tensor | None], slot: int, full: torch.Tensor, grad: torch.Tensor | None, index: int
    ) -> None:
        """Accumulate the gradient of chunk ``index`` of the input ``full`` into ``store[slot]``."""
        if grad is None:
            return
        if not self.splits(full):
            store[slot] = grad if store[slot] is None else store[slot] + grad
            return
        if store[slot] is None:
            store[slot] = torch.zeros_like(full)
        target = store[slot]
        assert target is not None
        target[self.slices[index]] += grad


def _ambiguous(t: torch.Tensor, x: torch.Tensor) -> bool:
    if t.dim() == 0 or t.shape[0] != x.shape[0]:
        return False
    if t.dim() > x.dim():
        return False  # laid out to broadcast against [B, heads, T, S]: dim 0 is the batch
    return not (t.dim() == x.dim() and t.shape[-1] == x.shape[-1])


def _mixes_batch(blocks: Sequence[nn.Module]) -> str | None:
    for k, block in enumerate(blocks):
        for name, module in block.named_modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
                return f"block {k} holds {type(module).__name__} {name or '(the block)'!r} in training mode"
    return None


def plan_split(option: int | str, x: torch.Tensor, arguments: Any, blocks: Sequence[nn.Module]) -> BatchSplit:
    """The chunks of one training step: x of shape [B, ...], ``arguments`` the block arguments
    (any nesting of lists, tuples and dicts; other objects are opaque and passed whole).

    Raises:
        ValueError: an explicit ``option`` > 1 meets an argument whose dim 0 might or might not be the
            batch, or a block that mixes samples (see the module docstring for the rule).
    """
    batch = x.shape[0]
    if option == AUTO:
        chunks = min(batch, AUTO_MAX_CHUNKS, max(1, x.numel() // AUTO_MIN_CHUNK_NUMEL))
    else:
        chunks = min(int(option), batch)
    if chunks <= 1:
        return BatchSplit.into(batch, 1)
    leaves, _ = tree_flatten_with_path(arguments)
    for path, value in leaves:
        if isinstance(value, torch.Tensor) and _ambiguous(value, x):
            if option == AUTO:
                return BatchSplit.into(batch, 1)
            where = "".join(str(p) for p in path) or "(top level)"
            raise ValueError(
                f"batch_chunks={option}: block argument {where} of shape {list(value.shape)} has the batch size "
                f"{batch} as its first dimension but not the rank or the last dimension of the stream "
                f"{list(x.shape)}, so it is unclear whether it carries the batch; pass it as [B, 1, ..] laid out "
                "like an attention mask, or as a stream-like [B, .., d] tensor, or use batch_chunks=1"
            )
    reason = _mixes_batch(blocks)
    if reason is not None:
        if option == AUTO:
            return BatchSplit.into(batch, 1)
        raise ValueError(
            f"batch_chunks={option}: {reason}, which mixes the samples of a batch, so a chunk of the batch "
            "would compute another function; use batch_chunks=1"
        )
    return BatchSplit.into(batch, chunks)
