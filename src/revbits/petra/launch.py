"""Start J local stage processes (torch.multiprocessing, spawn) on gloo over 127.0.0.1, and fail fast.

If any process fails, the others are killed and :class:`StageFailure` names the stage and its PID, in
one line, printed once (a stage prints nothing of a failure it reports; only a bug's traceback). The
root cause is preferred over its echoes: a stage's own error first (one it raised on purpose), then a
stage that died without a word, then any other error, then a stage that only reports a broken or
silent neighbour; such a report blames the neighbour: it died, or it stopped responding (stopped by
SIGSTOP or a debugger, or hung), named with its PID.

There is no deadline on a healthy run: the launcher waits as long as the stages live, and a stalled
stage is found by its neighbours' per-message timeouts (``PetraConfig.timeout``). Each stage asks the
kernel for SIGTERM when the launcher dies (``prctl(PR_SET_PDEATHSIG)``), so no stage outlives it by
more than the time it takes to stop. SIGINT and SIGTERM sent to the launcher are passed on to the
stages, which stop at an update boundary and save (see :func:`revbits.petra.runtime.StageWorker.run`).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ..data.errors import DataError
from ..io import IntegrityError

GRACE_S = 2.0  # after a failure, how long the other stages get to exit before they are judged


class StageFailure(RuntimeError):
    """A stage process failed; ``stage`` is its index."""

    def __init__(self, message: str, stage: int) -> None:
        super().__init__(message)
        self.stage = stage


class StageError(RuntimeError):
    """An error a stage function raises on purpose (bad data, a bad option, a full disk): the launcher
    reports its message as it is, and the stage prints no traceback."""


# A stage's own errors that are the user's input or environment, not a bug: reported without a traceback.
USER_ERRORS = (StageError, IntegrityError, DataError, FloatingPointError, OSError)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def environ(**values: str) -> Iterator[None]:
    """Set environment variables for the duration of the block (spawned children inherit them)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


PR_SET_NAME, PR_SET_PDEATHSIG = 15, 1


def die_with_parent(parent: int, name: str | None = None, sig: int = signal.SIGTERM) -> None:
    """Have the kernel send this process ``sig`` when its parent ``parent`` dies (Linux; elsewhere a
    no-op), and if the parent is already gone, send it now. ``name`` becomes the process name ps shows."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if name:
            libc.prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the launcher's pipe still tells a stage nothing
        return
    if os.getppid() != parent:
        os.kill(os.getpid(), sig)


def _child(
    rank: int,
    world_size: int,
    port: int,
    fn: Callable[..., Any],
    args: Sequence[Any],
    conn: Connection,
    parent: int,
) -> None:
    """Run ``fn(rank, world_size, *args)`` in a stage process and report ("ok", value) or
    ("error", text, kind, peer) on ``conn``: kind "echo" for an error that blames neighbour ``peer``
    (it has ``.peer``), "own" for one of :data:`USER_ERRORS`, "bug" for anything else. The launcher
    prints the failure; the stage prints only a bug's traceback, or its line if the launcher is gone."""
    die_with_parent(parent, f"petra-stage-{rank}")
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size)
    )
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    code = 0
    try:
        conn.send(("ok", fn(rank, world_size, *args)))
    except BaseException as e:
        echo = hasattr(e, "peer") or isinstance(e, dist.DistError)  # the process group broke: another stage's doing
        kind = "echo" if echo else "own" if isinstance(e, USER_ERRORS) else "bug"
        text = f"{type(e).__name__}: {e}" if kind == "bug" else " ".join(str(e).split())
        if kind == "bug":
            traceback.print_exc()
        try:
            conn.send(("error", text, kind, getattr(e, "peer", None)))
        except Exception:  # the launcher is gone: this line is all anyone will see
            if kind != "bug":
                print(f"PETRA stage {rank}: {text}", file=sys.stderr)
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # skip interpreter teardown: a broken process group must not hang the exit


def _describe_exit(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


def _state(pid: int) -> str:
    """A live process's state letter from /proc (T: stopped, t: traced; "" where unknown)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def _settle(procs: list, grace: float) -> None:
    """Give the processes still running up to ``grace`` seconds to exit (a killed neighbour's socket
    closes before the kernel lets its parent see it gone)."""
    deadline = time.monotonic() + grace
    for p in procs:
        if p.exitcode is None:
            p.join(max(0.0, deadline - time.monotonic()))


def _blame(procs: list, peer: int, J: int, echo: str) -> str:
    """The failure of ``peer``, which a neighbour's error ``echo`` blames and which has not failed by
    itself: it died without a word, or it is alive and stopped responding."""
    p = procs[peer]
    if p.exitcode is not None:
        return f"PETRA stage {peer} of {J} failed (PID {p.pid}): process {_describe_exit(p.exitcode)} ({echo})"
    state = _state(p.pid)
    how = {"T": " (it is stopped, as by SIGSTOP)", "t": " (it is stopped by a debugger)"}.get(state, "")
    return f"PETRA stage {peer} of {J} stopped responding (PID {p.pid}){how}: {echo}"


def _failure(procs: list, reports: dict[int, tuple], timed_out: bool, timeout: float | None) -> StageFailure:
    """The StageFailure for the current state, blaming the most likely root cause."""
    J = len(procs)
    own, silent, other, echo = [], [], [], []
    for r, p in enumerate(procs):
        report = reports.get(r)
        if report is not None and report[0] == "error":
            _, text, kind, peer = report
            {"own": own, "echo": echo}.get(kind, other).append((r, text, peer))
        elif p.exitcode is not None and (p.exitcode != 0 or report is None):
            silent.append((r, f"process {_describe_exit(p.exitcode)} without reporting an error", None))
    failures = own + silent + other + echo
    if not failures:
        running = [r for r, p in enumerate(procs) if p.exitcode is None]
        return StageFailure(f"PETRA stages {running} of {J} still running after the {timeout:g} s deadline", running[0])
    stage, text, peer = failures[0]
    if failures[0] in echo and peer is not None and 0 <= peer < J:
        stage, first = peer, _blame(procs, peer, J, text)
    else:
        first = f"PETRA stage {stage} of {J} failed (PID {procs[stage].pid}): {text}"
    parts = [first]
    for r, t, _ in failures[1:]:
        if r != stage:
            parts.append(f"then stage {r}: " + ("the same error" if t == text else (t.splitlines() or [""])[0]))
    if timed_out:
        parts.append(f"(the {timeout:g} s deadline also passed)")
    return StageFailure("; ".join(parts), stage)


def _drain(open_conns: dict[int, Connection], reports: dict[int, tuple]) -> None:
    """Move every report waiting in a pipe into ``reports``; forget pipes whose process closed them."""
    for r, conn in list(open_conns.items()):
        try:
            if conn.poll():
                reports[r] = conn.recv()
                del open_conns[r]
        except EOFError:
            del open_conns[r]


class _Stalls:
    """When each stage was first seen stopped (SIGSTOP, a debugger), so that one stopped for ``limit``
    seconds is named by the launcher itself, wherever its neighbours wait for it."""

    def __init__(self, limit: float | None) -> None:
        self.limit, self.since = limit, {}

    def check(self, procs: list) -> StageFailure | None:
        if self.limit is None:
            return None
        now = time.monotonic()
        for r, p in enumerate(procs):
            if p.exitcode is None and _state(p.pid) in ("T", "t"):
                if now - self.since.setdefault(r, now) >= self.limit:
                    how = _blame(procs, r, len(procs), f"it has not run for {self.limit:g} s")
                    return StageFailure(how, r)
            else:
                self.since.pop(r, None)
        return None


def launch(
    world_size: int,
    fn: Callable[..., Any],
    args: Sequence[Any] = (),
    timeout: float | None = None,
    threads: int = 1,
    on_start: Callable[[list[int]], None] | None = None,
    stall_timeout: float | None = None,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` spawned processes, with MASTER_ADDR,
    MASTER_PORT, RANK and WORLD_SIZE set as torchrun would (e.g. ``launch(J, run_stage, (build, data,
    config))``), and return their return values (which must be small and picklable), by rank.

    Waits as long as the processes live, or at most ``timeout`` seconds in all when it is given (tests).
    If a process fails or the deadline passes, kills the remaining processes and raises
    :class:`StageFailure` naming the failed stage. Each process gets OMP_NUM_THREADS = ``threads``.
    SIGINT and SIGTERM received while waiting are sent on to the processes. ``on_start(pids)`` is
    called once every process has started (the training command records them in its run's lock).
    ``stall_timeout``: a process stopped (SIGSTOP, a debugger) for that many seconds fails the run too.
    """
    ctx = mp.get_context("spawn")
    port = free_port()
    procs, conns = [], []
    previous = {}

    def pass_on(signum: int, frame: object) -> None:
        for p in procs:
            if p.exitcode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signum)

    try:
        if threading.current_thread() is threading.main_thread():
            previous = {sig: signal.signal(sig, pass_on) for sig in (signal.SIGINT, signal.SIGTERM)}
        # torch's C++ warnings (a broken connection's stack) would add lines to a failure's one line
        quiet_cpp = {} if "TORCH_CPP_LOG_LEVEL" in os.environ else {"TORCH_CPP_LOG_LEVEL": "ERROR"}
        with environ(OMP_NUM_THREADS=str(threads), **quiet_cpp):
            for rank in range(world_size):
                reader, writer = ctx.Pipe(duplex=False)
                p = ctx.Process(
                    target=_child,
                    args=(rank, world_size, port, fn, args, writer, os.getpid()),
                    name=f"petra-stage-{rank}",
                    daemon=True,
                )
                p.start()
                writer.close()
                procs.append(p)
                conns.append(reader)
        if on_start is not None:
            on_start([p.pid for p in procs])
        return _supervise(procs, conns, timeout, _Stalls(stall_timeout))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for p in procs:
            if p.is_alive():
                p.kill()
        for p in procs:
            p.join(timeout=10)
        for conn in conns:
            conn.close()


def _supervise(procs: list, conns: list[Connection], timeout: float | None, stalls: _Stalls) -> list[Any]:
    """Wait for the processes' reports; their values by rank, or the StageFailure that ends the run."""
    deadline = None if timeout is None else time.monotonic() + timeout
    reports: dict[int, tuple] = {}
    open_conns = dict(enumerate(conns))
    while True:
        _drain(open_conns, reports)
        ended = [p.exitcode is not None for p in procs]
        bad = any(p.exitcode not in (None, 0) for p in procs)
        bad |= any(rep[0] == "error" for rep in reports.values())
        bad |= any(e and r not in reports and r not in open_conns for r, e in enumerate(ended))
        if bad:
            _settle(procs, GRACE_S)
            _drain(open_conns, reports)  # the reports sent just before their processes exited
            raise _failure(procs, reports, False, timeout)
        if all(ended) and not open_conns:
            return [reports[r][1] for r in range(len(procs))]
        stalled = stalls.check(procs)
        if stalled is not None:
            raise stalled
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            raise _failure(procs, reports, True, timeout)
        if stalls.limit is not None:
            remaining = min(1.0, remaining if remaining is not None else 1.0)
        # Wait on the snapshot `ended`: a process that exits from now on still wakes us up.
        ready = wait([p.sentinel for p, e in zip(procs, ended) if not e] + list(open_conns.values()), remaining)
        if any(p.sentinel in ready and p.exitcode is None for p in procs):
            time.sleep(0.01)  # its files are closed but it is not reapable yet: do not spin
