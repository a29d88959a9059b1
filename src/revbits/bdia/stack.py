"""BDIA: exact bit-level reversible training of a stack of same-shape residual blocks.

With y_k = block_k(x_k, *args), a per-sample gamma g_k = +-2**-b and the grid quantiser Q:

    x_0     = Q(x)
    x_1     = Q(y_0)
    x_{k+1} = g_k * (x_{k-1} + r_{k-1} * 2**-l) + Q((1 + g_k) * y_k - 2 g_k x_k),   k >= 1

``(1 + g) y - 2 g x`` is the paper's ``(1 - g) x + (1 + g) h(x)`` with h(x) = y - x. The residue
r_{k-1} = (-m_{k-1}) mod 2**b of the integer code m_{k-1} = x_{k-1} * 2**l makes
x_{k-1} + r_{k-1} 2**-l a multiple of 2**(b - l), so the product with g_k lands on the grid
and nothing is rounded. The inverse

    x_{k-1} = (x_{k+1} - Q((1 + g_k) y_k - 2 g_k x_k)) / g_k - r_{k-1} * 2**-l

is then exact, and training keeps only x_{K-1}, x_K, the residues (b bits per element per
block), the signs of g and the RNG state of every block. At evaluation g = 0, which is the
standard residual stack (with or without Q on each block output).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .args import BlockArguments
from .bits import pack_bits
from .chunks import AUTO, BatchSplit, plan_split
from .compile import holds_compiled_code
from .fixedpoint import exact_limit, quantize
from .function import BDIAFunction
from .options import check_options
from .params import EngineRequest, block_parameters, distinct, sharded_block
from .plan import ForwardState, RecomputeContext, StackConfig
from .step import (
    BlockProtocolError,
    Step,
    StreamRangeError,
    call_block,
    check_block_arguments,
    raise_if_out_of_range,
    stream_extremes,
)
from .token_slices import check_token_slice, install_declared, training_pass
from .tools import FORWARD, has_no_values, pipelining_shape_inference, profiled
from .top_graph import check_keep_last_graph, keeps_last_graph
from .verify import ReversibilityError

__all__ = ["BDIAStack", "BlockProtocolError", "RecomputeContext", "ReversibilityError", "StreamRangeError"]


class BDIAStack(nn.Module):
    """A stack of residual blocks trained bit-exactly reversibly (BDIA-transformer).

    Args:
        blocks: K >= 2 modules with ``block(x, *args) -> y``, y of the shape and dtype of x.
        bits: the grid is 2**-bits; states must stay below 2**(24 - bits) in float32.
        gamma: |g|, 2**-b; b bits per element per block are stored (b = 1 for 0.5).
        quantize_eval: apply Q to each block output at evaluation (g = 0). With False the
            evaluation forward is exactly the blocks applied in sequence.
        check: keep every state and compare each rebuilt one exactly (debugging, tests).
        verify: compare a checksum of every rebuilt state (16 bytes per block) and raise
            ReversibilityError if any differs.
        preserve_rng_state: replay each block's RNG (dropout) in the backward pass.
        recompute_context: ``recompute_context(k)`` returns a context manager that the backward pass
            enters around each recomputation of block k (once per batch chunk), as
            ``torch.utils.checkpoint``'s ``context_fn`` does for its recomputation. It may change how the
            recomputed graph saves its tensors (``memory="bdia+mesa"`` of :func:`revbits.stack` keeps them
            as 8-bit codes this way) but must not change the block's output: the rebuilt states are
            checked against the forward's.
        batch_chunks: how many slices of the batch every block runs on in training, one after
            another, in the forward and in the backward's recomputation, which then holds one
            slice's graph instead of the whole batch's (:mod:`revbits.bdia.chunks`). ``"auto"``
            (default): min(B, 8, numel(x) // 2**18), at least 1; an integer n: min(n, B); 1: the
            whole batch at once. Block arguments follow the rule of :mod:`revbits.bdia.chunks`.
        token_slice: in training, token-wise submodules of the blocks (those :mod:`revbits.bdia.token_slices`
            installs: classes with ``token_wise = True``, a transformers decoder layer's ``mlp``) run on
            slices of this many positions (of a batch chunk), in the forward and in the backward's recomputation,
            which then holds one slice's graph of them at a time. ``"auto"`` (default): max(512, 2**18 / d)
            for width d; None: off.
        keep_last_graph: the forward runs the top block with a graph and keeps it, so the backward does not
            recompute that block (one block's forward less per step; :mod:`revbits.bdia.top_graph`). ``"auto"``
            (default): where it cannot raise the peak (one batch chunk, token slices that cut nothing, no
            ``recompute_context``, no block that is its own FSDP unit); True; False: recompute every block.

    ``stack(x, *args, gammas=signs, **kwargs)`` calls every block as ``block(x, *args, **kwargs)``; tensor
    arguments, positional or keyword, get their gradients. ``gammas`` are explicit signs, a [K-1, batch]
    tensor of +-1.
    ``stack.reversible = False`` runs the same quantised forward under plain autograd.
    ``stack.eval_gamma = g`` evaluates with a fixed g for every sample and block (default 0).
    The first dimension of x is the batch.
    """

    def __init__(
        self,
        blocks: Sequence[nn.Module],
        *,
        bits: int = 9,
        gamma: float = 0.5,
        quantize_eval: bool = True,
        check: bool = False,
        verify: bool = True,
        preserve_rng_state: bool = True,
        recompute_context: RecomputeContext | None = None,
        batch_chunks: int | str = AUTO,
        token_slice: int | str | None = AUTO,
        keep_last_graph: bool | str = AUTO,
    ) -> None:
        super().__init__()
        blocks = list(blocks)
        if len(blocks) < 2:
            raise ValueError(
                f"BDIAStack needs at least 2 blocks, got {len(blocks)}: block 0 is a plain "
                "residual step and reversibility starts at block 1"
            )
        for i, block in enumerate(blocks):
            if not isinstance(block, nn.Module):
                raise TypeError(f"block {i} is a {type(block).__name__}, not an nn.Module")
        gamma_bits, batch_chunks = check_options(bits, gamma, batch_chunks)
        self.blocks = nn.ModuleList(blocks)
        self.bits = bits
        self.gamma = float(gamma)
        self.gamma_bits = gamma_bits
        self.quantize_eval = quantize_eval
        self.check = check
        self.verify = verify
        self.preserve_rng_state = preserve_rng_state
        self.recompute_context = recompute_context
        self.batch_chunks = batch_chunks
        self.token_slice = check_token_slice(token_slice)
        self.keep_last_graph = check_keep_last_graph(keep_last_graph)
        install_declared(self.blocks)
        self.reversible = True
        self.eval_gamma = 0.0  # the fixed g of evaluation; non-zero only for robustness studies

    def extra_repr(self) -> str:
        return f"bits={self.bits}, gamma={self.gamma}, quantize_eval={self.quantize_eval}, reversible={self.reversible}"

    def __iter__(self) -> Any:
        raise TypeError(
            "BDIAStack cannot be iterated over: it runs its blocks itself, reversibly, and a loop over them would "
            "train them with plain autograd; call stack(x, *args, **kwargs) instead (for a timm ViT: no "
            "set_grad_checkpointing, and pass attn_mask to the stack rather than to forward_features)"
        )

    def forward(self, x: torch.Tensor, *args: Any, gammas: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        exact_limit(x.dtype, self.bits)  # rejects a low-precision stream with a clear message
        call = BlockArguments(args, kwargs)
        if x.dim() < 1:
            raise ValueError("the stack input needs a batch dimension first")
        # Without autograd recording (no_grad, inference_mode, generate, scoring) the stack is the plain
        # function g = 0 in either mode, as at evaluation; explicit gammas still select the training function.
        signs = self._signs(x, gammas) if gammas is not None or torch.is_grad_enabled() else None
        if signs is None:
            return self._forward_eval(x, call)
        check_block_arguments(call)
        if self.preserve_rng_state and x.device.type not in ("cpu", "cuda"):
            raise NotImplementedError(
                f"BDIAStack replays the RNG of cpu and cuda devices only, not {x.device.type}; run on one of "
                "those, or pass preserve_rng_state=False if the blocks use no randomness"
            )
        x0 = quantize(x, self.bits).contiguous()  # every state gets one memory layout
        if self.reversible and torch.is_grad_enabled():
            self._reversible_step_starts()
            return self._forward_reversible(x0, call, signs)
        return self._forward_plain(x0, call, signs)

    # Hooks for subclasses whose recompute context keeps state of its own (revbits.modes' bdia+mesa).

    def _reversible_step_starts(self) -> None:
        """Called by every reversible forward with grad, before it runs."""

    def _reversible_backward_ends(self) -> None:
        """Called at the end of every reversible backward, once every state is rebuilt and checked."""

    # -- the three paths ------------------------------------------------------------------------

    def _forward_eval(self, x: torch.Tensor, args: BlockArguments) -> torch.Tensor:
        """g = eval_gamma (0 by default): x_{k+1} = g x_{k-1} + Q((1 + g) y_k - 2 g x_k), x_1 = Q(y_0).

        At g = 0 this is x_{k+1} = Q(y_k), or exactly the blocks in sequence without the quantiser.
        Any g in [-1, 1] may be set for robustness studies; it is not inverted, so any value works.
        """
        g = self.eval_gamma
        round_ = (lambda v: quantize(v, self.bits)) if self.quantize_eval else (lambda v: v)
        x_prev, x = None, round_(x)
        for k, block in enumerate(self.blocks):
            y = call_block(block, k, x, args)
            if g == 0 or x_prev is None:
                x_prev, x = x, round_(y)
            else:
                x_prev, x = x, g * x_prev + round_((1 + g) * y - (2 * g) * x)
        return x

    @training_pass
    def _forward_plain(self, x0: torch.Tensor, args: BlockArguments, signs: torch.Tensor) -> torch.Tensor:
        """The same quantised BDIA forward under ordinary autograd (the reference)."""
        state = self._forward_state(x0, args, signs)
        split = state.split

        def run(k: int, x: torch.Tensor) -> torch.Tensor:  # block k on the chunks the reversible path uses
            ys = [call_block(self.blocks[k], k, x[rows], split.tree(args, c)) for c, rows in enumerate(split.slices)]
            return ys[0] if len(ys) == 1 else torch.cat(ys)

        states = [x0, quantize(run(0, x0), self.bits)]
        for k in range(1, len(self.blocks)):
            x_prev, x_cur = states[-2], states[-1]
            g = state.gamma_of(k, x_cur)
            y = run(k, x_cur)
            states.append(state.config.step.forward(x_prev, x_cur, y, g, keep=False)[0])
        raise_if_out_of_range([stream_extremes(x) for x in states], x0.dtype, self.bits)
        return states[-1]

    @torch.compiler.disable  # the recomputation runs outside dynamo, so the forward must too (bdia.compile)
    @training_pass
    def _forward_reversible(self, x0: torch.Tensor, args: BlockArguments, signs: torch.Tensor) -> torch.Tensor:
        state = self._forward_state(x0, args, signs)
        state.keep_last_graph = keeps_last_graph(state.config.keep_last_graph, state.config, state.split, x0)
        values = args.values()
        arg_tensors = [values[i] for i in state.tensor_slots]
        params = state.params
        with profiled(FORWARD):
            return BDIAFunction.apply(state, x0, *arg_tensors, *params, EngineRequest.probe(x0))

    # -- helpers --------------------------------------------------------------------------------

    def _signs(self, x: torch.Tensor, gammas: torch.Tensor | None) -> torch.Tensor | None:
        """The [K-1, B] signs of g: explicit, drawn (training), or None for g = 0 (eval, and where there is nothing
        to train: pipelining's shape inference and meta tensors, bdia.tools)."""
        K, B = len(self.blocks), x.shape[0]
        if (gammas is None and not self.training) or has_no_values(x) or pipelining_shape_inference():
            return None
        if gammas is None:
            return torch.randint(0, 2, (K - 1, B), device=x.device, dtype=torch.int8) * 2 - 1
        if gammas.shape != (K - 1, B):
            raise ValueError(f"gammas must have shape [K-1, batch] = [{K - 1}, {B}], got {list(gammas.shape)}")
        if not bool(((gammas == 1) | (gammas == -1)).all()):
            raise ValueError("gammas must hold signs, +1 or -1; the magnitude is the stack's `gamma`")
        return gammas.to(device=x.device, dtype=torch.int8)

    def _config(self) -> StackConfig:
        """The stack's :class:`StackConfig`, built again only when one of its options (or the blocks) changed since
        the last forward; its :class:`Step` is built again only when ``bits`` or ``gamma`` changed."""
        options = (
            tuple(self.blocks),
            self.bits,
            self.gamma,
            self.check,
            self.verify,
            self.preserve_rng_state,
            self.token_slice,
            self.recompute_context,
            self.keep_last_graph,
        )
        cached = self.__dict__.get("_cached_config")
        if cached is not None and _same(cached[0], options):
            return cached[1]
        step = cached[1].step if cached is not None and cached[0][1:3] == options[1:3] else Step(self.bits, self.gamma)
        config = StackConfig(
            blocks=options[0],
            step=step,
            check=self.check,
            verify=self.verify,
            preserve_rng=self.preserve_rng_state,
            token_slice=self.token_slice,
            recompute_context=self.recompute_context,
            backward_ends=self._reversible_backward_ends,
            keep_last_graph=self.keep_last_graph,
        )
        self.__dict__["_cached_config"] = (options, config)
        return config

    def _forward_state(self, x0: torch.Tensor, args: BlockArguments, signs: torch.Tensor) -> ForwardState:
        """What one training forward runs with: the configuration, and this forward's arguments, parameters,
        signs of g, batch chunks and autocast settings."""
        config = self._config()
        slots = args.tensor_slots()
        block_params = [block_parameters(b) for b in config.blocks]  # one pass over each block's modules
        params = distinct(block_params)
        index = {id(p): i for i, p in enumerate(params)}
        device_type = x0.device.type
        return ForwardState(
            config=config,
            args=args.with_values([None if i in slots else a for i, a in enumerate(args.values())]),
            tensor_slots=slots,
            param_index=[[index[id(p)] for p in tensors] for tensors in block_params],
            block_params=block_params,
            compiled=[holds_compiled_code(b) for b in config.blocks],
            params=params,
            signs=pack_bits(signs > 0),
            drawn_signs=signs,
            split=_split(self.batch_chunks, x0, args, config.blocks),
            autocast=(device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)),
        )


def _same(cached: tuple, options: tuple) -> bool:
    """Whether two option tuples are the same: blocks and recompute context by identity, the rest by value."""
    blocks, *values, context, keep = cached
    now_blocks, *now_values, now_context, now_keep = options
    return (
        len(blocks) == len(now_blocks)
        and all(a is b for a, b in zip(blocks, now_blocks))
        and values == now_values
        and context is now_context
        and keep == now_keep
    )


def _split(option: int | str, x0: torch.Tensor, args: BlockArguments, blocks: Sequence[nn.Module]) -> BatchSplit:
    """The batch chunks of :func:`plan_split`, or one chunk where a block is its own FSDP unit, which
    reduces its gradients once per recomputation (``"auto"``; an explicit count > 1 raises)."""
    split = plan_split(option, x0, args, blocks)
    if split.chunks > 1 and (reason := sharded_block(blocks)) is not None:
        if option != AUTO:
            raise ValueError(
                f"batch_chunks={option}: {reason}, which reduces its gradients at the end of each recomputation, "
                "so only the first chunk's would count; use batch_chunks=1, or shard the stack or the model instead"
            )
        return BatchSplit.into(x0.shape[0], 1)
    return split
