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

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..rng import RngReplay, capture_rng_state
from .args import BlockArguments
from .bits import PackedBits, pack_bits, unpack_bits
from .chunks import AUTO, BatchSplit, plan_split
from .compile import forward_arguments, forward_block, holds_compiled_code
from .fixedpoint import exact_limit, quantize
from .gradients import Gradients, recompute, skip_gradient
from .options import check_options
from .params import EngineRequest, block_parameters, check_parameters_unchanged, distinct, sharded_block
from .step import (
    BlockProtocolError,
    Step,
    StreamRangeError,
    call_block,
    check_block_arguments,
    raise_if_out_of_range,
    state_checksum,
    stream_max,
)
from .token_slices import check_token_slice, install_declared, training_pass
from .tools import FORWARD, RECOMPUTE, has_no_values, pipelining_shape_inference, profiled
from .verify import ReversibilityError, compare_block0, compare_state, raise_on_mismatch

__all__ = ["BDIAStack", "BlockProtocolError", "RecomputeContext", "ReversibilityError", "StreamRangeError"]

#: ``context(k)`` -> the context manager the backward enters around each recomputation of block k.
RecomputeContext = Callable[[int], contextlib.AbstractContextManager]


# ----------------------------------------------------------------------------------------------
# Everything the backward pass needs besides the two saved states.


@dataclass
class _Plan:
    blocks: Sequence[nn.Module]
    args: BlockArguments  # the extra block arguments, tensors replaced by None
    tensor_slots: list[int]  # where the tensor arguments go in args.values()
    params: list[list[int]]  # per block, indices into the parameter list
    block_params: list[list[torch.Tensor]]  # per block, its parameters and held tensors at forward time (bdia.params)
    compiled: list[bool]  # per block, whether it holds compiled code (bdia.compile)
    num_params: int
    bits: int
    step: Step  # one BDIA step k >= 1 and its inverse (bdia.step)
    check: bool
    verify: bool
    preserve_rng: bool
    recompute_context: RecomputeContext | None = None  # entered around each recomputation of a block
    backward_ends: Callable[[], None] | None = None  # called once the backward has rebuilt every state
    signs: PackedBits | None = None
    split: BatchSplit | None = None  # the batch chunks every block runs on (bdia.chunks)
    token_slice: int | str | None = None  # the token slices of token-wise modules (bdia.token_slices)
    planes: list[list[PackedBits] | None] = field(default_factory=list)  # per block, one per chunk
    rng_states: list[tuple[torch.Tensor, torch.Tensor | None]] = field(default_factory=list)
    checksums: list[torch.Tensor] = field(default_factory=list)
    states: list[torch.Tensor] = field(default_factory=list)  # check=True only
    last_states: list[torch.Tensor] = field(default_factory=list)  # x_{K-1}, x_K
    output_version: int = 0
    autocast: tuple[str, bool, torch.dtype] = ("cpu", False, torch.bfloat16)

    def block_args(self, tensors: Sequence[torch.Tensor]) -> BlockArguments:
        values = self.args.values()
        for slot, tensor in zip(self.tensor_slots, tensors):
            values[slot] = tensor
        return self.args.with_values(values)

    @contextlib.contextmanager
    def recomputing(self, k: int) -> Iterator[None]:
        """The stack's ``recompute_context(k)`` (or no context), in the profiler region ``revbits.bdia.recompute``."""
        context = contextlib.nullcontext() if self.recompute_context is None else self.recompute_context(k)
        with profiled(RECOMPUTE), context:
            yield

    def gamma_of(self, k: int, like: torch.Tensor) -> torch.Tensor:
        """g_k as a per-sample tensor broadcastable against the states."""
        assert self.signs is not None
        sign = unpack_bits(self.signs, torch.int8)[k - 1].to(like.dtype) * 2 - 1
        return (sign * self.step.gamma).view(-1, *([1] * (like.dim() - 1)))


_HIGHER_ORDER = (
    "BDIAStack computes first-order gradients only: its backward rebuilds the activations "
    "instead of storing them, and that rebuild cannot be differentiated again. For "
    "create_graph=True (higher-order gradients) set `stack.reversible = False` (plain autograd on the "
    "same forward), and if the blocks call scaled_dot_product_attention, run the forward inside "
    "`with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):`, since the fused "
    "attention kernels (flash, memory-efficient) have no double backward."
)


class _BDIAFunction(torch.autograd.Function):
    """Forward without a graph; backward rebuilds every state from x_{K-1}, x_K exactly.

    Backward, for k = K-1 .. 1, with g_j = dL/dx_j and p_k the skip-path part of g_k:
        recompute y_k = block_k(x_k) with a graph;  u = Q((1 + g) y_k - 2 g x_k)
        x_{k-1} = (x_{k+1} - u) / g - r_{k-1} 2**-l
        g_k     = p_k - 2 g g_{k+1} + J_y^T ((1 + g) g_{k+1})      (Q is straight-through)
        p_{k-1} = g g_{k+1}
    and for block 0, x_1 = Q(y_0): g_0 = p_0 + J_y0^T g_1.
    """

    @staticmethod
    def forward(ctx, plan: _Plan, x0: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        arg_tensors = inputs[: len(plan.tensor_slots)]
        split = plan.split
        assert split is not None
        x0 = x0.detach()  # nothing here is differentiable (bdia.tools: module trackers)
        chunk_args, leaf_args = forward_arguments(plan.block_args, split, arg_tensors, any(plan.compiled))
        x_prev, x_cur = None, x0
        maxima = [stream_max(x0)]
        for k, block in enumerate(plan.blocks):
            if plan.preserve_rng:  # chunk c + 1 draws from where chunk c left the RNG, in both passes
                plan.rng_states.append(capture_rng_state(x0.device))
            if plan.check:
                plan.states.append(x_cur)
            elif plan.verify:
                plan.checksums.append(state_checksum(x_cur))
            # Chunk c of x_{k+1} reads only chunk c of x_{k-1} and x_k, so it can overwrite x_{k-1}
            # in place once that buffer is this forward's own (not the input x_0; check=True keeps all).
            owned = x_prev is not None and x_prev is not x0 and not plan.check
            x_next = x_prev if owned else torch.empty_like(x_cur)
            assert x_next is not None
            g = plan.gamma_of(k, x_cur) if k else None
            planes: list[PackedBits] = []
            for c, rows in enumerate(split.slices):
                block_args = leaf_args[c] if plan.compiled[k] else chunk_args[c]
                y = forward_block(block, k, x_cur[rows], block_args, plan.compiled[k])
                if g is None:
                    x_next[rows] = quantize(y, plan.bits)
                else:
                    assert x_prev is not None
                    x_next[rows], kept = plan.step.forward(x_prev[rows], x_cur[rows], y, g[rows])
                    assert kept is not None
                    planes.append(kept)
                del y
            if g is not None:
                plan.planes.append(planes)
            x_prev, x_cur = x_cur, x_next
            maxima.append(stream_max(x_cur))
        raise_if_out_of_range(maxima, x0.dtype, plan.bits)
        # The two states are kept as detached aliases rather than saved tensors, so backward
        # can let go of each one as soon as it is rebuilt past; x_K's version counter (shared
        # with the output) still reveals an in-place change of the output.
        assert x_prev is not None
        plan.last_states = [x_prev, x_cur.detach()]
        plan.output_version = x_cur._version
        ctx.plan = plan
        ctx.save_for_backward(*arg_tensors)
        return x_cur

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        plan, x_cur, x_next = _begin_backward(ctx)
        arg_inputs = [a.detach().requires_grad_(a.requires_grad) for a in ctx.saved_tensors]
        grads = Gradients(plan, arg_inputs, EngineRequest(getattr(ctx, "next_functions", None)))
        mismatches: list[torch.Tensor] = []
        device_type, autocast_on, autocast_dtype = plan.autocast
        split = plan.split
        assert split is not None

        # State-sized tensors: x_cur = x_k, x_next = x_{k+1}, g_next = dL/dx_{k+1}, g_after = dL/dx_{k+2}.
        # Chunk by chunk, block k writes x_{k-1} over x_{k+1} and dL/dx_k over dL/dx_{k+2}, except over the
        # output x_K and autograd's grad_out, which are not this backward's to overwrite: four buffers,
        # plus grad_out (the engine holds it) and, during block K-1, x_K.
        next_is_output = True
        g_next, g_after, gamma_after = grad_out, None, None
        for k in range(len(plan.blocks) - 1, -1, -1):
            g = plan.gamma_of(k, x_cur) if k else None
            planes = plan.planes[k - 1] if k else None
            if k:
                plan.planes[k - 1] = None  # its memory is no longer needed
            x_prev = (torch.empty_like(x_cur) if next_is_output else x_next) if k else None
            g_cur = torch.empty_like(x_cur) if g_after is None or g_after is grad_out else g_after
            rng = plan.rng_states[k] if plan.preserve_rng else None
            check_parameters_unchanged(plan.blocks[k], k, plan.block_params[k])
            block0: list[torch.Tensor] = []
            for c, rows in enumerate(split.slices):
                leaves = [split.leaf(a, c) for a in arg_inputs]
                with (
                    RngReplay(rng, x_cur.device, plan.preserve_rng),
                    torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_on),
                ):
                    xk, y, held = recompute(plan, k, x_cur[rows], split.tree(plan.block_args(leaves), c))
                    if plan.preserve_rng:
                        rng = capture_rng_state(x_cur.device)  # where chunk c + 1 starts
                    gn = g_next[rows]
                    if g is None:  # block 0: the recomputed x_1 = Q(y_0) must be the one block 1 rebuilt
                        compare_block0(plan, quantize(y.detach(), plan.bits), x_next[rows], block0)
                        grad_y = gn
                    else:  # rebuild x_{k-1}, then form the gradients that bypass the block
                        assert planes is not None and x_prev is not None
                        x_prev[rows] = plan.step.inverse(x_next[rows], x_cur[rows], y, g[rows], planes[c])
                        grad_y = (1 + g[rows]) * gn
                    skip_gradient(g_cur[rows], g_after, gamma_after, rows, gn, g)
                    del gn
                grad_x = grads.through_block(k, c, y, grad_y, xk, leaves, held)
                del y, xk, grad_y, leaves, held
                if grad_x is not None:
                    g_cur[rows].add_(grad_x)
                del grad_x
            if x_prev is not None:
                compare_state(plan, k - 1, x_prev, mismatches)
                x_next, x_cur, next_is_output = x_cur, x_prev, False
            elif block0:
                mismatches.append(torch.stack(block0).any())
            g_after, g_next, gamma_after = g_next, g_cur, g
        raise_on_mismatch(plan, mismatches)
        if plan.backward_ends is not None:
            plan.backward_ends()
        return (None, g_next, *grads.args, *grads.params, None)  # None: the probe of EngineRequest


def _begin_backward(ctx: Any) -> tuple[_Plan, torch.Tensor, torch.Tensor]:
    """The plan of this forward and its last two states x_{K-1}, x_K, handed over once; raises for a second
    backward, a higher-order one, or an output modified in place since the forward."""
    if torch.is_grad_enabled():
        raise RuntimeError(_HIGHER_ORDER)
    plan: _Plan | None = ctx.plan
    if plan is None:
        raise RuntimeError(
            "BDIAStack: backward already ran for this forward and its stored bits were used "
            "up (retain_graph=True is not supported); run the forward pass again"
        )
    ctx.plan = None
    x_cur, x_next = plan.last_states
    plan.last_states = []
    if x_next._version != plan.output_version:
        raise RuntimeError(
            "the output of BDIAStack was modified in place before backward; the states "
            "cannot be rebuilt from it (use an out-of-place operation)"
        )
    return plan, x_cur, x_next


# ----------------------------------------------------------------------------------------------


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
        plan = self._plan(x0, args, signs)
        split = plan.split
        assert split is not None

        def run(k: int, x: torch.Tensor) -> torch.Tensor:  # block k on the chunks the reversible path uses
            ys = [call_block(self.blocks[k], k, x[rows], split.tree(args, c)) for c, rows in enumerate(split.slices)]
            return ys[0] if len(ys) == 1 else torch.cat(ys)

        states = [x0, quantize(run(0, x0), self.bits)]
        for k in range(1, len(self.blocks)):
            x_prev, x_cur = states[-2], states[-1]
            g = plan.gamma_of(k, x_cur)
            y = run(k, x_cur)
            states.append(plan.step.forward(x_prev, x_cur, y, g, keep=False)[0])
        raise_if_out_of_range([stream_max(x) for x in states], x0.dtype, self.bits)
        return states[-1]

    @torch.compiler.disable  # the recomputation runs outside dynamo, so the forward must too (bdia.compile)
    @training_pass
    def _forward_reversible(self, x0: torch.Tensor, args: BlockArguments, signs: torch.Tensor) -> torch.Tensor:
        plan = self._plan(x0, args, signs)
        values = args.values()
        arg_tensors = [values[i] for i in plan.tensor_slots]
        params = distinct(plan.block_params)
        with profiled(FORWARD):
            return _BDIAFunction.apply(plan, x0, *arg_tensors, *params, EngineRequest.probe(x0))

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

    def _plan(self, x0: torch.Tensor, args: BlockArguments, signs: torch.Tensor) -> _Plan:
        slots = args.tensor_slots()
        block_params = [block_parameters(b) for b in self.blocks]  # one pass over each block's modules
        params = distinct(block_params)
        index = {id(p): i for i, p in enumerate(params)}
        device_type = x0.device.type
        return _Plan(
            blocks=list(self.blocks),
            args=args.with_values([None if i in slots else a for i, a in enumerate(args.values())]),
            tensor_slots=slots,
            params=[[index[id(p)] for p in tensors] for tensors in block_params],
            block_params=block_params,
            compiled=[holds_compiled_code(b) for b in self.blocks],
            num_params=len(params),
            bits=self.bits,
            step=Step(self.bits, self.gamma),
            check=self.check,
            verify=self.verify,
            preserve_rng=self.preserve_rng_state,
            recompute_context=self.recompute_context,
            backward_ends=self._reversible_backward_ends,
            signs=pack_bits(signs > 0),
            split=_split(self.batch_chunks, x0, args, self.blocks),
            token_slice=self.token_slice,
            autocast=(
                device_type,
                torch.is_autocast_enabled(device_type),
                torch.get_autocast_dtype(device_type),
            ),
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
