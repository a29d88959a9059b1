"""One run, one directory: what makes a folder a revbits run, and the lock a run holds on it.

A run directory is marked by its lock file, ``.revbits-lock`` (directories written by revbits before
it are recognised by their ``checkpoints/step_*``, ``progress.json``, or ``config.json`` beside
``metrics.jsonl``). ``--out`` may name a new directory, an empty one, or a run; any other folder that
holds files is refused in one line, before anything is written there.

While a run trains (every PETRA stage included) it holds an exclusive advisory lock
(``flock(LOCK_EX)``) on the lock file, which also records who holds it: PID, host, start time and,
for PETRA, the stages' PIDs. A second run on the same directory, or a ``--resume`` of a live one,
is refused in one line naming that PID and host. The kernel drops the lock when the last process
holding it exits, however it ends (SIGKILL, out of memory), so a lock left by a killed run is free:
the next run takes it over, and says so when the file shows its holder never released it.

Under the lock, every training command, single-process or PETRA, checks where its run starts by one
rule (:func:`check_start`): no new run over an old one, no ``--resume`` without a run, no resume with
changed options, no damaged checkpoint. Only after these checks pass does a run remove anything: the
leftovers of an interrupted write, whose names start with ``.revbits-tmp-`` (:data:`revbits.io.TEMP_PREFIX`),
and nothing else.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, fields
from multiprocessing import reduction
from pathlib import Path
from typing import Any

from ..io import TEMP_PREFIX, IntegrityError, WriteError, read_json, write_error
from .checkpoint import STEP_DIR, checkpoint_dirs, clean_run_dir, latest_checkpoint, read_checkpoint_state
from .config import ConfigError, TrainConfig

LOCK_NAME = ".revbits-lock"


class RunInUseError(ConfigError):
    """Another live process holds the run directory's lock."""


def _has_checkpoints(out: Path) -> bool:
    root = out / "checkpoints"
    return root.is_dir() and any(STEP_DIR.fullmatch(p.name) for p in root.iterdir())


def is_revbits_run(out: Path) -> bool:
    """Whether ``out`` is a revbits run directory: it has the lock file, or (written by a revbits
    before the lock) checkpoints, a PETRA ``progress.json``, or a run's ``config.json`` and metrics."""
    if (out / LOCK_NAME).is_file() or _has_checkpoints(out) or (out / "progress.json").is_file():
        return True
    if not ((out / "config.json").is_file() and (out / "metrics.jsonl").is_file()):
        return False
    with contextlib.suppress(IntegrityError):
        return "model" in read_config_json(out)
    return False


def read_config_json(out: Path) -> dict[str, Any]:
    """The options in run directory ``out``'s ``config.json``; an IntegrityError naming the file if it
    is not a table of options (the one reader of that file)."""
    path = Path(out) / "config.json"
    values = read_json(path, "run configuration")
    if not isinstance(values, dict):
        raise IntegrityError(f"{path} is damaged: it holds no table of options")
    return values


def check_out(out: Path) -> None:
    """A ConfigError in one line unless ``--out`` may hold this run: a new or empty directory, or a
    revbits run. Nothing is written."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a directory for the run")
    if out.is_dir() and any(out.iterdir()) and not is_revbits_run(out):
        raise ConfigError(
            f"--out {out} holds files but is not a revbits run directory; nothing was changed there: "
            "choose a new or empty directory"
        )


def _create(out: Path) -> None:
    """Create ``out`` and check that files can be written there; one line saying why not."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f"{TEMP_PREFIX}{os.getpid()}-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise ConfigError(f"--out {out}: cannot write there ({error.strerror or error})") from None


class RunLock:
    """The exclusive lock of a run directory, held from :meth:`acquire` to :meth:`release` (or the end
    of the processes that hold it: the spawned stages hold it too, see :meth:`inheritable`)."""

    def __init__(self, out: Path, fd: int, previous: dict[str, Any]) -> None:
        self.out, self.fd, self.previous = out, fd, previous
        self.holder: dict[str, Any] = {}
        self.proceeded = False

    @classmethod
    def acquire(cls, out: Path, command: str = "train") -> RunLock:
        """Lock ``out`` (which must exist); :class:`RunInUseError` naming the holder if it is taken."""
        path = out / LOCK_NAME
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as error:
            raise (write_error(error, path) or error) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunInUseError(
                f"{out} is in use by {describe_holder(holder)}; a second run or a --resume there must wait "
                "until it ends (or stop it first)"
            ) from None
        lock = cls(out, fd, _read_holder(fd))
        lock.note(pid=os.getpid(), host=socket.gethostname(), started=_now(), command=command, state="running")
        return lock

    @property
    def taken_over(self) -> bool:
        """Whether the lock file shows a holder that ended without releasing it (a killed run)."""
        return self.previous.get("state") == "running"

    def note(self, **facts: Any) -> None:
        """Record ``facts`` about the holder in the lock file (in place: the lock stays on this file)."""
        self.holder.update(facts)
        self._write(self.holder)

    def note_stages(self, pids: list[int]) -> None:
        """Record the PIDs of the run's PETRA stages, which hold the lock with this process."""
        self.note(stages=pids)

    def _write(self, holder: dict[str, Any]) -> None:
        data = (json.dumps(holder, sort_keys=True) + "\n").encode() if holder else b""
        try:
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, data, 0)
        except OSError as error:
            raise (write_error(error, self.out / LOCK_NAME) or error) from None

    def release(self) -> None:
        """Mark the lock released and drop it (what a run does when it ends, well or not). A run that
        never went ahead (refused by its checks) leaves the file as it found it."""
        if self.fd < 0:
            return
        with contextlib.suppress(OSError):
            if self.proceeded:
                self.note(state="released", ended=_now())
            else:
                self._write(self.previous)
        # Closing (not LOCK_UN, which would unlock every holder of this open file) drops this process's
        # hold; the lock is free once no process holds it (a stage that still lives keeps it).
        os.close(self.fd)
        self.fd = -1

    def proceed(self, quiet: bool = False) -> None:
        """The run goes ahead (its checks passed): say so if it takes over from a killed run, and remove
        the leftovers of interrupted writes (only now: the directory is a run, and is ours)."""
        self.proceeded = True
        if self.taken_over and not quiet:
            previous = describe_holder(self.previous)
            print(
                f"revbits {self.holder['command']}: note: taking over {self.out} from {previous}, which ended "
                "without releasing it",
                file=sys.stderr,
            )
        clean_run_dir(self.out)

    def inheritable(self) -> InheritedLock:
        """A handle to give to a spawned process (in its arguments): that process then holds the same
        lock until it exits, so a stage that outlives its launcher still keeps others out."""
        return InheritedLock(self.fd)


class InheritedLock:
    """The run lock as a spawned process receives it: a duplicate of the locked file descriptor (the
    same open file, so the same lock), passed as ``multiprocessing`` passes a pipe. Keep it referenced
    for as long as the process writes the run; it is dropped when the process exits."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __reduce__(self) -> tuple[Any, ...]:
        return _rebuild_lock, (reduction.DupFd(self.fd),)


def _rebuild_lock(dup: Any) -> InheritedLock:
    return InheritedLock(dup.detach())


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %Z")


def _read_holder(fd: int) -> dict[str, Any]:
    """What the lock file says about its holder ({} if it says nothing readable)."""
    try:
        holder = json.loads(os.pread(fd, 1 << 16, 0).decode("utf-8") or "{}")
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def describe_holder(holder: dict[str, Any]) -> str:
    """``revbits train, PID 1234 on host h (started ...; PETRA stages PIDs 1235, 1236)``."""
    if not holder.get("pid"):
        return "another revbits process (its PID is not recorded yet)"
    text = f"revbits {holder.get('command', 'train')}, PID {holder['pid']} on host {holder.get('host', '?')}"
    extra = [f"started {holder['started']}"] if holder.get("started") else []
    if holder.get("stages"):
        extra.append("PETRA stages PIDs " + ", ".join(str(pid) for pid in holder["stages"]))
    return text + (f" ({'; '.join(extra)})" if extra else "")


@contextlib.contextmanager
def hold_run(out: Path, command: str = "train") -> Iterator[RunLock]:
    """Check that ``out`` may hold a run (:func:`check_out`), create it and lock it for the block.
    Once the run is sure to go ahead, it calls :meth:`RunLock.proceed`."""
    out = Path(out)
    check_out(out)
    _create(out)
    lock = RunLock.acquire(out, command)
    try:
        yield lock
    finally:
        lock.release()


# Options that may differ between a run and its resumption (everything else must match).
RESUMABLE_CHANGES = {
    "steps",
    "stop_at",
    "eval_interval",
    "log_interval",
    "device",
    "out",
    "allow_pickle",
    "petra_timeout",
}


def check_resumable(saved: dict[str, Any], config: TrainConfig, source: str = "the run's config.json") -> None:
    """Refuse to resume with changed options, naming each with the value ``source`` (the run's
    config.json, or the checkpoint it resumes) holds and the new one. An option the saved run does not
    name (one added to revbits after it was written) counts as its default."""
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    saved = {**defaults, **saved}
    changed = sorted(k for k, v in config.to_dict().items() if k not in RESUMABLE_CHANGES and saved.get(k) != v)
    if changed:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {getattr(config, k)!r}" for k in changed)
        raise ConfigError(
            f"cannot resume with changed options ({details}; the first value is the one {source} holds); "
            f"only {sorted(RESUMABLE_CHANGES)} may change"
        )


@dataclass(frozen=True)
class RunStart:
    """Where a run in a locked directory starts, as :func:`check_start` found it: the newest checkpoint
    when resuming (None: a new run, or one stopped before its first checkpoint) and its verified state."""

    checkpoint: Path | None = None
    state: dict[str, Any] | None = None


def check_start(out: Path, config: TrainConfig, resume: bool) -> RunStart:
    """The checks every training command (single-process and PETRA) makes in its locked run directory
    before it writes anything, each refusal a ConfigError (or CheckpointError naming the checkpoint) in
    one line:

    - a new run never goes into a directory that holds one (a checkpoint, metrics, a PETRA progress record);
    - ``--resume`` needs a run there (a checkpoint or a ``config.json``); one killed before its first
      checkpoint resumes from the start;
    - a resumed run's options are those it was trained with: its ``config.json``'s and its newest
      checkpoint's (which is verified against its manifest first) (:func:`check_resumable`).
    """
    newest = latest_checkpoint(out)
    has_config = (out / "config.json").is_file()
    if not resume:
        if newest is not None or (out / "metrics.jsonl").exists() or (out / "progress.json").exists():
            raise ConfigError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
        return RunStart()
    if newest is None and not has_config:
        raise ConfigError(f"--resume: {out} holds no run to continue (no config.json); check --out")
    if has_config:
        check_resumable(read_config_json(out), config, "the run's config.json")
    if newest is None:
        return RunStart()
    state = read_checkpoint_state(newest)
    check_resumable(state.get("config", {}), config, f"checkpoint {newest.name}")
    return RunStart(newest, state)


def saved_options(out: Path) -> dict[str, Any] | None:
    """The options a run was trained with: its ``config.json``, or, when that is missing, the options
    its newest checkpoint records (verified first); None when it has neither, or is not a run."""
    path = Path(out) / "config.json"
    if not is_revbits_run(Path(out)):  # a user's own config.json is never read as a run's
        return None
    if path.exists():
        return read_config_json(out)
    newest = latest_checkpoint(Path(out))
    if newest is None:
        return None
    values = read_checkpoint_state(newest).get("config")
    if not isinstance(values, dict):
        raise ConfigError(f"{path} is missing and checkpoint {newest.name} records no options to rebuild it from")
    return dict(values)


def latest_good(out: Path, error_number: int | None = None, saved: str | None = None) -> str:
    """Where a run stands after a failed write (``saved``: by default its newest checkpoint; "" for
    nothing saved yet), and how to go on once the cause (``error_number``) is fixed."""
    fix = "free space" if error_number in (errno.ENOSPC, errno.EDQUOT) else "once the disk can be written again"
    if saved is None:
        newest = checkpoint_dirs(out)[-1:] if out.is_dir() else []
        saved = f"the latest good checkpoint is {newest[0]}" if newest else ""
    if not saved:
        return f"no checkpoint was saved yet; {fix}, then run the command again"
    return f"{saved} and nothing saved before was changed; {fix}, then continue with revbits train --out {out} --resume"


def noted_write_error(error: WriteError, out: Path) -> WriteError:
    """``error`` with where the run stands (:func:`latest_good`) added to its line."""
    return error if error.note else error.noted(latest_good(out, error.errno))
