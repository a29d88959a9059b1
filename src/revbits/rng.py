"""Reproducible random streams: seeds derived from a run's seed, and the global RNG run from a
chosen state and restored afterwards.

Everything that must draw the same random numbers twice (BDIA's recomputation, PETRA's
stages, the reversible RNN's dropout, the data order of a resumed run) derives its seed here,
so one mixing rule serves them all.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

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
    # On the CPU no device is forked, and device_type keeps torch's default (before 2.13 None is refused).
    accelerator = {} if device.type == "cpu" else {"device_type": device.type}
    with torch.random.fork_rng(devices=[device] if accelerator else [], **accelerator):
        torch.manual_seed(seed)
        yield


RngState = tuple[torch.Tensor, "torch.Tensor | None"]


def capture_rng_state(device: torch.device) -> RngState:
    """The CPU generator's state, and ``device``'s if it is a CUDA device, to replay later."""
    cuda_state = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    # cloned through the dispatcher, so memory trackers see the bytes this keeps
    return torch.get_rng_state().clone(), cuda_state


class RngReplay:
    """Run the body from a state taken by :func:`capture_rng_state` (when ``on``), leaving the global
    RNG as it was before: a block recomputed in backward draws the dropout masks of its forward."""

    def __init__(self, state: RngState | None, device: torch.device, on: bool = True) -> None:
        self.state, self.device, self.on = state, device, on
        self.fork = torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], enabled=on)

    def __enter__(self) -> None:
        self.fork.__enter__()
        if self.on:
            assert self.state is not None
            torch.set_rng_state(self.state[0])
            if self.state[1] is not None:
                torch.cuda.set_rng_state(self.state[1], self.device)

    def __exit__(self, *exc: Any) -> None:
        self.fork.__exit__(*exc)
