"""The random streams of a model cut into PETRA pieces, all by one rule, :func:`revbits.rng.derive_seed`:

    plain piece i (stem, downsampling):  derive_seed(seed, m, PLAIN, i)
    BDIA block k's dropout:              derive_seed(seed, m, DROPOUT, k)
    BDIA block k's signs of gamma:       derive_seed(seed, m, SIGNS, k)

for micro-batch m. Each use has its own stream, so no two pieces start from the same RNG state (the
stem and block 0 did, before 0.3), and none starts from derive_seed(seed, m) itself, which the
training command's data order uses.
"""

from __future__ import annotations

PLAIN, DROPOUT, SIGNS = 0, 1, 2


def plain(i: int) -> tuple[int, int]:
    """The stream of plain piece ``i`` (its index in the model's list of pieces)."""
    return (PLAIN, i)


def dropout(k: int) -> tuple[int, int]:
    """The stream of BDIA block ``k``'s dropout (and any other draw of the block)."""
    return (DROPOUT, k)


def signs(k: int) -> tuple[int, int]:
    """The stream of BDIA block ``k``'s per-sample signs of gamma."""
    return (SIGNS, k)
