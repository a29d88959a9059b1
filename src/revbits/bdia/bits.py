"""Bit planes packed eight to a byte.

A plane of integers in ``[0, 2**width)`` is stored as ``width`` one-bit planes, each packed
into ``ceil(n / 8)`` bytes: byte j of plane i holds bit i of elements 8j .. 8j+7, element 8j+t
in bit t.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_SHIFTS: dict[torch.device, torch.Tensor] = {}


def _shifts(device: torch.device) -> torch.Tensor:
    """The bit positions 0..7 as a uint8 tensor on ``device`` (cached)."""
    if device not in _SHIFTS:
        _SHIFTS[device] = torch.arange(8, dtype=torch.uint8, device=device)
    return _SHIFTS[device]


@dataclass(frozen=True)
class PackedBits:
    """``width`` bit planes of a tensor of shape ``shape``, packed into ``data`` (uint8)."""

    data: torch.Tensor
    shape: torch.Size
    width: int

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()


def pack_bits(values: torch.Tensor, width: int = 1) -> PackedBits:
    """Pack integers in ``[0, 2**width)`` into ``width`` planes of 1 bit per element.

    byte[i, j] = sum_t ((v[8j + t] >> i) & 1) << t
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
    shifts = _shifts(values.device)
    planes = []
    for i in range(width):
        bit = (flat >> i) & 1 if i else flat & 1
        planes.append((bit.view(-1, 8) << shifts).sum(dim=1, dtype=torch.uint8))
    return PackedBits(torch.stack(planes), values.shape, width)


def unpack_bits(packed: PackedBits, dtype: torch.dtype = torch.int32) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: v[8j + t] = sum_i ((byte[i, j] >> t) & 1) << i."""
    shifts = _shifts(packed.data.device)
    numel = 1
    for size in packed.shape:
        numel *= size
    out = None
    for i in range(packed.width):
        bits = ((packed.data[i].unsqueeze(-1) >> shifts) & 1).reshape(-1)[:numel]
        out = bits if out is None else out.bitwise_or_(bits << i)
    assert out is not None
    return out.to(dtype).view(packed.shape)


__all__ = ["PackedBits", "pack_bits", "unpack_bits"]
