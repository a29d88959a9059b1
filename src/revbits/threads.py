"""torch's CPU threads on a shared machine: how they wait between parallel regions, and how many run.

torch runs its CPU kernels on an OpenMP team, one thread per core. With GNU OpenMP's default wait
policy a thread that finishes its share of a region spins (up to 300,000 iterations, milliseconds)
before it sleeps. On a machine whose cores other processes also use, the spinning thread keeps a core
from its own partner thread, which is descheduled, and every region then waits for that one. With
``OMP_WAIT_POLICY=PASSIVE`` a waiting thread sleeps at once and leaves the core to useful work
(``benchmarks/cli_overhead.py --mode busy`` measures a step under each policy with a busy neighbour).
The OpenMP runtime reads the policy once, when torch loads it, so the command line sets it before it
imports torch; this module imports nothing of torch at load time.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

# The OpenMP settings that already choose how threads wait: a user who set one keeps their choice.
WAIT_SETTINGS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")


def prefer_passive_waiting(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` in ``environ`` unless a wait setting is there already; return
    whether it was set. It takes effect in a process that imports torch afterwards (this one, if torch is
    not loaded yet, and every child process, e.g. PETRA's stages)."""
    if any(name in environ for name in WAIT_SETTINGS):
        return False
    environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return True


def use_threads(threads: int | None) -> None:
    """``torch.set_num_threads(threads)``; None keeps torch's default (``OMP_NUM_THREADS``, else one per core)."""
    if threads is None:
        return
    if threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    import torch

    torch.set_num_threads(threads)
