"""The checks of BDIAStack's numeric options, as a pure function: :class:`BDIAStack` runs them when it is
built, and a configuration (``revbits train``'s) runs them without building a stack."""

from __future__ import annotations

from .chunks import check_batch_chunks
from .step import gamma_exponent


def check_options(bits: int, gamma: float, batch_chunks: int | str) -> tuple[int, int | str]:
    """``(b, batch_chunks)`` with |gamma| = 2**-b if the options can be used, else a ValueError naming the
    option: ``bits`` an integer from 1 to 23 (the grid keeps ``bits`` fraction bits of a float32's 23),
    ``gamma`` = +-2**-b for b from 1 to 8, ``batch_chunks`` "auto" or an integer >= 1."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 23:
        raise ValueError(f"bits must be an integer from 1 to 23, got {bits!r}")
    return gamma_exponent(gamma), check_batch_chunks(batch_chunks)
