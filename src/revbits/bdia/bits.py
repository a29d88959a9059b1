"""Bit planes packed eight to a byte.

A plane of integers in ``[0, 2**width)`` is stored as ``width`` one-bit planes, each packed
into ``ceil(n / 8)`` bytes: byte j of plane i holds bit i of elements 8j .. 8j+7, element 8j+t
in bit t.

Every shift here is by a Python constant, and bytes are combined with bitwise OR, never summed:
torch.compile's CPU backend (inductor) has been seen to miscompile a uint8 shift by a tensor of
bit positions followed by a uint8 sum (docs/engines.md, "An inductor repro"), and the stack's
plain path, which torch.compile compiles, packs the signs of g with this module.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PackedBits:
    """``width`` bit planes of a tensor of shape ``shape``, packed into ``data`` (uint8)."""

    data: torch.Tensor
    shape: torch.Size
    width: int

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()


def _pack_plane(bits: torch.Tensor) -> torch.Tensor:
    """byte[j] = OR_t bits[8j + t] << t for a flat uint8 plane of 0/1 whose length is a multiple of 8."""
    columns = bits.view(-1, 8)
    byte = columns[:, 0].clone()
    for t in range(1, 8):
        byte.bitwise_or_(columns[:, t] << t)
    return byte


def pack_bits(values: torch.Tensor, width: int = 1) -> PackedBits:
    """Pack integers in ``[0, 2**width)`` into ``width`` planes of 1 bit per element.

    byte[i, j] = OR_t ((v[8j + t] >> i) & 1) << t
    """
    if not 1 <= width <= 8:
        raise ValueError(f"pack_bits packs 1 to 8 bit planes, got width={width}")
    if values.dtype.is_floating_point or (values.dtype == torch.bool and width != 1):
        raise TypeError(f"pack_bits needs an integer or bool tensor, got {values.dtype}")
    flat = values.reshape(-1)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    flat = flat.to(torch.uint8) if values.dtype != torch.uint8 else flat
    planes = [_pack_plane((flat >> i) & 1 if i else flat & 1) for i in range(width)]
    return PackedBits(torch.stack(planes), values.shape, width)


def unpack_bits(packed: PackedBits, dtype: torch.dtype = torch.int32) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: v[8j + t] = OR_i ((byte[i, j] >> t) & 1) << i."""
    numel = 1
    for size in packed.shape:
        numel *= size
    out = None
    for i in range(packed.width):
        byte = packed.data[i]
        bits = torch.stack([(byte >> t) & 1 if t else byte & 1 for t in range(8)], dim=-1).reshape(-1)[:numel]
        out = bits if out is None else out.bitwise_or_(bits << i)
    assert out is not None
    return out.to(dtype).view(packed.shape)


__all__ = ["PackedBits", "pack_bits", "unpack_bits"]
