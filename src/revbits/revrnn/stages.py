"""Runs a multi-layer RNN's per-layer work in stages: one after another, or the layers of a stage at once.

A stack of L layers computes layer l's step t from layer l-1's step t, so along time the layers form a
wavefront: in stage s, layer l can do step s - l while its neighbours do theirs. :func:`run_stages`
takes a list of stages, each a list of independent tasks (one per layer), and runs them in order;
with ``workers`` above one it runs each stage's tasks on that many threads at once, each with one
torch thread (torch's products and the native operators release the GIL). Every task does the same
operators on the same tensors in either case, so the results are the same bits; only the time differs.

On the CPU at batch 20 a step's products are too small for torch's own threads to split well (the
RevLSTM's gate product takes as long on two threads as on one), so two layers side by side are what
uses a second core.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

Task = Callable[[], None]

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()
_one_thread = threading.local()  # whether this worker has set torch to one thread


def _thread_local_state_active() -> bool:
    """True where something that holds for this thread only is on: autograd recording, a dispatch or
    function mode (FlopCounterMode, MemTracker, revbits.measure's counters), autocast, the profiler,
    or compilation. Work on another thread would escape it, so the stages then run on this one."""
    return (
        torch.is_grad_enabled()
        or bool(_get_current_dispatch_mode_stack())
        or torch._C._len_torch_function_stack() > 0
        or any(torch.is_autocast_enabled(device) for device in ("cpu", "cuda"))
        or torch._C._autograd._profiler_enabled()
        or torch.compiler.is_compiling()
    )


def workers_for(layers: int, parallel_allowed: bool) -> int:
    """Threads for a stack of ``layers`` layers: one per layer up to torch's thread count, where allowed
    and nothing thread-local (see :func:`_thread_local_state_active`) is on."""
    if not parallel_allowed or layers < 2 or torch.get_num_threads() < 2 or _thread_local_state_active():
        return 1
    return min(layers, torch.get_num_threads())


def _executor(workers: int) -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None or _pool._max_workers < workers:
            _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="revbits-rnn-layers")
        return _pool


def _in_worker(task: Task) -> None:
    if not getattr(_one_thread, "set", False):
        torch.set_num_threads(1)
        _one_thread.set = True
    with torch.no_grad():  # grad mode is per thread; the stages run without a graph
        task()


def run_stages(stages: Sequence[Sequence[Task]], workers: int) -> None:
    """Runs each stage's tasks, stage after stage; with ``workers`` > 1 a stage's tasks at once (no graph)."""
    if workers <= 1:
        for tasks in stages:
            for task in tasks:
                task()
        return
    if _thread_local_state_active():
        raise RuntimeError("revbits: layer stages run on threads only without autograd, modes, autocast or profiler")
    pool = _executor(workers - 1)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for tasks in stages:
            futures = [pool.submit(_in_worker, task) for task in tasks[1:]]
            try:
                if tasks:
                    tasks[0]()
            finally:
                errors = [f.exception() for f in futures]  # waits for every task of the stage
            for error in errors:
                if error is not None:
                    raise error
    finally:
        torch.set_num_threads(previous)
