"""Mesa mode: 8-bit storage of every activation saved for backward.

``with revbits.mesa.compress() as report: loss = model(x)`` compresses what autograd saves in
the forward pass; ``revbits.stack(blocks, memory="mesa")`` does it for a stack of blocks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from .compressor import Compressor, MesaConfig, NonFiniteActivationError, PackedActivation, compressors_in
from .report import MesaReport

__all__ = [
    "Compressor",
    "MesaConfig",
    "MesaReport",
    "NonFiniteActivationError",
    "PackedActivation",
    "compress",
    "compressors_in",
]


@contextlib.contextmanager
def compress(**options: Any) -> Iterator[MesaReport]:
    """A one-off :class:`Compressor` with :class:`MesaConfig` ``options``, around a forward pass."""
    with Compressor(MesaConfig(**options)).saving() as report:
        yield report
