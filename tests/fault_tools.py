"""Tools of the fault-injection tests (tests/test_faults*.py): revbits commands run in real processes
forked from the test process (so they skip the import of torch), their output in a log file.

``REVBITS_FAULT=point@n[:ACTION]`` makes such a process send itself a signal (default SIGKILL) the
n-th time it reaches a named point, or raise an OSError there (``ENOSPC``, ``EIO``...): see
:mod:`revbits.io`.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import resource
import signal
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from revbits.cli import main
from revbits.train.checkpoint import checkpoint_dirs
from test_train import TINY, run

GPT = ["train", "--model", "gpt", "--memory", "standard", *TINY, "--eval-interval", "2"]  # checkpoints at 2, 4, 6


FILE_SIZE_LIMIT = "REVBITS_TEST_FILE_SIZE_LIMIT"  # env of start(): the child's RLIMIT_FSIZE, in bytes


def _child(argv: list[str], env: dict[str, str], log: str, session: bool) -> None:
    stream = open(log, "w", buffering=1)  # noqa: SIM115 (the process ends with os._exit)
    os.dup2(stream.fileno(), 1)
    os.dup2(stream.fileno(), 2)
    sys.stdout = sys.stderr = stream  # the test's capture replaced them
    if session:
        os.setsid()
    os.environ.update(env)
    if FILE_SIZE_LIMIT in env:  # a real write error from the kernel: EFBIG past this size
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        limit = int(env[FILE_SIZE_LIMIT])
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    try:
        code = main(argv)
    except SystemExit as exit:
        code = exit.code if isinstance(exit.code, int) else 2
    except BaseException:
        traceback.print_exc()
        code = 99
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def start(tmp_path: Path, *argv: object, env: dict[str, str] | None = None, session: bool = False):
    """Start ``revbits argv`` in a forked process; returns (process, path of its output)."""
    log = tmp_path / f"log-{time.monotonic_ns()}.txt"
    ctx = multiprocessing.get_context("fork")
    process = ctx.Process(target=_child, args=([str(a) for a in argv], env or {}, str(log), session))
    process.start()
    return process, log


def cli(tmp_path: Path, *argv: object, env: dict[str, str] | None = None, timeout: float = 300) -> tuple[int, str]:
    """(exit code, negative for a signal; output) of ``revbits argv`` run in a forked process."""
    process, log = start(tmp_path, *argv, env=env)
    process.join(timeout)
    assert process.exitcode is not None, f"revbits {argv} still running after {timeout} s"
    return process.exitcode, log.read_text()


def newest_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(checkpoint_dirs(run_dir)[-1] / "model.safetensors"))


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = newest_weights(a), newest_weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def leftovers(run_dir: Path) -> list[str]:
    """The temporary names revbits left in a run directory (every one starts with .revbits-tmp-)."""
    folders = (run_dir, run_dir / "checkpoints")
    return [p.name for d in folders if d.is_dir() for p in d.iterdir() if p.name.startswith(".revbits-tmp-")]


@pytest.fixture(name="straight")
def straight_run(tmp_path) -> Path:
    """The tiny GPT run trained straight through (6 steps, checkpoints at 2, 4 and 6)."""
    out = tmp_path / "straight"
    assert run(*GPT, "--out", out) == 0
    return out


def records(run_dir: Path) -> list[tuple]:
    """(step, split, loss) of every metrics record of a run."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["split"], r["loss"]) for r in map(json.loads, lines)]


def one_line(log: str, command: str = "train") -> str:
    """The one line a failed command printed (asserting there is exactly one, and no traceback; a
    note, such as taking over a killed run's lock, is not a failure)."""
    lines = [line for line in log.splitlines() if line.startswith(f"revbits {command}:") and ": note: " not in line]
    assert len(lines) == 1 and "Traceback" not in log, log
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every entry under ``folder`` with its bytes (None for a directory), to show nothing changed."""
    return {str(p.relative_to(folder)): None if p.is_dir() else p.read_bytes() for p in sorted(folder.rglob("*"))}


def flip_byte(path: Path, offset: int) -> None:
    """Flip the lowest bit of one byte of a file (its size stays: only a sha256 can tell)."""
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 0x01
    path.write_bytes(bytes(data))
