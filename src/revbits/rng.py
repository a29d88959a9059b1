"""Reproducible random streams: seeds derived from a run's seed, and the global RNG run from a
chosen state and restored afterwards.

Everything that must draw the same random numbers twice (BDIA's recomputation, PETRA's
stages, the reversible RNN's dropout, the data order of a resumed run) derives its seed here,
so one mixing rule serves them all.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

MIXER = 1_000_003  # a prime; consecutive parts give well separated seeds


def derive_seed(seed: int, *parts: int) -> int:
    """s_0 = seed, s_{i+1} = s_i * 1_000_003 + parts[i]; the result mod 2**63 (a valid torch seed)."""
    for part in parts:
        seed = seed * MIXER + part
    return seed % 2**63


@contextlib.contextmanager
def seeded_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Run the body with torch's global RNG (and ``device``'s, if it is an accelerator) seeded with
    ``seed``, then put the previous states back."""
    on_cpu = device.type == "cpu"
    with torch.random.fork_rng(devices=[] if on_cpu else [device], device_type=None if on_cpu else device.type):
        torch.manual_seed(seed)
        yield
