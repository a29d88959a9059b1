"""BDIA's step in one native pass per chunk (``revbits/native/bdia_step.cpp``), where it applies.

The Python path of :mod:`revbits.bdia.step` runs about a dozen elementwise operators per block and batch
chunk in the forward (residue, its bytes and bit planes, the combine, the step) and as many in the
backward (the combine, the unpacked residue, the inverse, the gradients that bypass the block). At the
sizes BDIA is for, each is a pass over memory. The native operators do each chain in one pass, with the
same operations in the same order, so their results are the Python path's bit for bit (tests compare the
two on every operator and on whole training steps):

    forward_step    x_{k+1} = Q((1 + g) y - 2 g x_k) + g (x_{k-1} + r 2**-l), and the b bit planes of r
    inverse_step    x_{k-1} = (x_{k+1} - Q((1 + g) y - 2 g x_k)) / g - r 2**-l, r read from the planes
    step_gradients  dL/dy_k = (1 + g_k) dL/dx_{k+1},  g_{k+1} dL/dx_{k+2} - 2 g_k dL/dx_{k+1}

They run where every state-sized tensor is a contiguous float32 or float64 CPU tensor of one shape, g holds
one value per sample (or one for all), nothing is recorded for autograd, nothing is being compiled, and
the kernel could be built (``REVBITS_NATIVE=0`` turns it off); everywhere else the Python path runs.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import _disable_current_modes

from .. import native

_KERNEL = "bdia_step"
_DTYPES = (torch.float32, torch.float64)


def _ops():
    return torch.ops.revbits_bdia_step


def available() -> bool:
    """Whether the native kernel is on (``REVBITS_NATIVE``, which :func:`revbits.native.load` reads) and built."""
    return native.load(_KERNEL)


def _fits(x: torch.Tensor, g: torch.Tensor, *others: torch.Tensor) -> bool:
    """Whether x, g and the other state-sized tensors are what the kernel takes (module docstring)."""
    if x.device.type != "cpu" or x.dtype not in _DTYPES or x.dim() == 0 or x.numel() == 0 or not x.is_contiguous():
        return False
    if g.dtype != x.dtype or g.device != x.device or not g.is_contiguous() or g.dim() > x.dim():
        return False
    # one g for all, or g of shape [B, 1, .., 1] (a [B] g would broadcast along x's last dim instead)
    if g.numel() != 1 and (g.dim() != x.dim() or g.shape[0] != x.shape[0] or g.numel() != x.shape[0]):
        return False
    if any(t.shape != x.shape or t.dtype != x.dtype or not t.is_contiguous() for t in others):
        return False
    recording = torch.is_grad_enabled() and any(t.requires_grad for t in (x, g, *others))
    return not recording and not torch.compiler.is_compiling() and available()


def forward_step(
    x_prev: torch.Tensor,
    x_cur: torch.Tensor,
    y: torch.Tensor,
    g: torch.Tensor,
    bits: int,
    gamma_bits: int,
    keep: bool,
    out: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(x_{k+1}, the [b, ceil(n/8)] uint8 planes of r or None) in one pass, x_{k+1} written in ``out`` (a new
    tensor where None; ``out`` may be x_prev); None where the kernel does not apply."""
    if not _fits(x_prev, g, x_cur, y) or (out is not None and not _fits(out, g)):
        return None
    target = torch.empty_like(x_prev, memory_format=torch.contiguous_format) if out is None else out
    planes = _ops().forward_step(x_prev, x_cur, y, g, bits, gamma_bits, keep, target)
    return target, (planes if keep else None)


def inverse_step(
    x_next: torch.Tensor,
    x_cur: torch.Tensor,
    y: torch.Tensor,
    g: torch.Tensor,
    planes: torch.Tensor,
    bits: int,
    out: torch.Tensor | None,
) -> torch.Tensor | None:
    """x_{k-1} in one pass, written in ``out`` (a new tensor where None; ``out`` may be x_next); None where the
    kernel does not apply."""
    if not _fits(x_next, g, x_cur, y) or (out is not None and not _fits(out, g)):
        return None
    if not planes.is_contiguous() or planes.device != x_next.device:
        return None
    target = torch.empty_like(x_next, memory_format=torch.contiguous_format) if out is None else out
    _ops().inverse_step(x_next, x_cur, y, g, planes, bits, target)
    return target


_ADDCMUL_FUSED: dict[torch.dtype, bool | None] = {}


def addcmul_rounds_once(dtype: torch.dtype) -> bool | None:
    """Whether ATen's ``addcmul`` rounds self + (v t1) t2 once (its AVX2 and AVX-512 kernels are compiled with
    fused multiply-adds) or twice (its default kernels), found once per dtype by running it where every product
    is subnormal and comparing with the kernel's two ways; None where it matches neither everywhere (then the
    gradients take the Python path). The two ways differ only where the product is not exact: for gradients
    times g = +-2**-b, subnormal ones."""
    if dtype not in _ADDCMUL_FUSED:
        # outside any dispatch mode (revbits.measure counts operators and bytes), where the probe does not belong
        with _disable_current_modes(), torch.no_grad():
            _ADDCMUL_FUSED[dtype] = _probe_addcmul(dtype)
    return _ADDCMUL_FUSED[dtype]


def _probe_addcmul(dtype: torch.dtype) -> bool | None:
    """:func:`addcmul_rounds_once`'s probe: ATen's addcmul against the kernel's two ways, on subnormal products."""
    generator = torch.Generator().manual_seed(0)
    tiny = torch.finfo(dtype).tiny
    d1 = (torch.rand(1000, generator=generator, dtype=torch.float64) * 400 - 200).to(dtype) * tiny
    d2 = (torch.rand(1000, generator=generator, dtype=torch.float64) - 0.5).to(dtype) * tiny
    g = torch.full((10, 1, 1), 2.0**-8, dtype=dtype)
    d1, d2 = d1.view(10, 10, 10), d2.view(10, 10, 10)
    codes = torch.int32 if dtype == torch.float32 else torch.int64
    aten = torch.mul(d2, g).addcmul_(d1, g, value=-2).view(codes)
    ways = {}
    for fused in (True, False):
        ways[fused] = torch.empty_like(d1)
        _ops().step_gradients(d1, d2, g, g, fused, ways[fused])
    matches = [fused for fused, out in ways.items() if torch.equal(out.view(codes), aten)]
    return matches[0] if len(matches) == 1 else None  # both: the probe told nothing


def step_gradients(
    out: torch.Tensor,
    grad_x_k_plus_2: torch.Tensor | None,
    gamma_k_plus_1: torch.Tensor | None,
    grad_x_k_plus_1: torch.Tensor,
    gamma_k: torch.Tensor,
) -> torch.Tensor | None:
    """dL/dy_k = (1 + g_k) dL/dx_{k+1} (returned) and the skip gradient of :func:`~revbits.bdia.gradients.
    skip_gradient` written in ``out``, in one pass (block k >= 1); None where the kernel does not apply."""
    others = [out] if grad_x_k_plus_2 is None else [out, grad_x_k_plus_2]
    if not _fits(grad_x_k_plus_1, gamma_k, *others):
        return None
    if gamma_k_plus_1 is not None:
        if gamma_k_plus_1.shape != gamma_k.shape or not _fits(grad_x_k_plus_1, gamma_k_plus_1):
            return None
    fused = addcmul_rounds_once(grad_x_k_plus_1.dtype) if grad_x_k_plus_2 is not None else False
    if fused is None:
        return None
    return _ops().step_gradients(grad_x_k_plus_1, grad_x_k_plus_2, gamma_k_plus_1, gamma_k, fused, out)
