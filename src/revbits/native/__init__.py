"""Native CPU kernels: C++ sources beside this file, built with the machine's C++ compiler on first use.

Eager PyTorch pays a few microseconds of dispatch and Python per operator. Where revbits runs long
chains of small elementwise operators per step (the reversible RNN cells' fixed-point updates), one
C++ operator does the chain in one pass. A kernel calls ATen for every transcendental function
(sigmoid, tanh) on the same tensors the Python path gives them, and does the rest (integer
arithmetic, one rounding per product) in plain loops built without floating-point contraction, so
its results are the Python path's bit for bit; tests compare the two.

``load(name)`` compiles ``<name>.cpp`` against the installed torch's headers into
``$REVBITS_NATIVE_CACHE`` (default ``~/.cache/revbits/native``), under a name made of the hash of the
source, the flags and the CPU's features (it is built for this CPU) and torch's version, and registers
its operators as ``torch.ops.revbits_<name>``. The library is written to a temporary name and renamed
into place, so no process loads a half-written file, and builds hold a lock on the cache directory, so
processes that start together on an empty cache (DDP or PETRA ranks) compile each kernel once: the others
wait and load it. Where there is no compiler or
the build fails, ``load`` warns once, naming the cause, and returns False: callers then take the Python
path (the same bits, slower).
``REVBITS_NATIVE=0`` turns every kernel off.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sysconfig
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from ..io import atomic_move

ENV_SWITCH = "REVBITS_NATIVE"
ENV_CACHE = "REVBITS_NATIVE_CACHE"
SOURCES = Path(__file__).parent
# -ffp-contract=off: no fused multiply-add where the source has a product and a sum (ATen's loops
# round each); no -ffast-math. -march=native builds for this CPU, whose features are part of the cache name.
# C++20, as torch.utils.cpp_extension builds: torch 2.14's ATen headers refuse anything older.
FLAGS = ["-O3", "-march=native", "-std=c++20", "-shared", "-fPIC", "-ffp-contract=off", "-fno-fast-math", "-w"]

_loaded: dict[str, bool] = {}


class NativeBuildError(RuntimeError):
    """A native kernel could not be built (no compiler, or the compiler refused the source)."""


def enabled() -> bool:
    """False when ``REVBITS_NATIVE=0``."""
    return os.environ.get(ENV_SWITCH, "1") != "0"


def cache_dir() -> Path:
    return Path(os.environ.get(ENV_CACHE) or Path.home() / ".cache" / "revbits" / "native")


def _compiler() -> str:
    for name in (os.environ.get("CXX"), sysconfig.get_config_var("CXX"), "c++", "g++", "clang++"):
        found = name and shutil.which(name.split()[0])
        if found:
            return found
    raise NativeBuildError("no C++ compiler found (set CXX, or install g++)")


def _command(compiler: str, source: Path, target: Path) -> list[str]:
    torch_dir = Path(torch.__file__).parent
    includes = [torch_dir / "include", torch_dir / "include" / "torch" / "csrc" / "api" / "include"]
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return [
        compiler,
        *FLAGS,
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        *(f"-I{path}" for path in includes),
        str(source),
        "-o",
        str(target),
        f"-L{torch_dir / 'lib'}",
        "-ltorch_cpu",
        "-lc10",
        f"-Wl,-rpath,{torch_dir / 'lib'}",
    ]


def _cpu_features() -> str:
    """The CPU's architecture and feature flags (``-march=native`` builds for them), as Linux reports them."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    flags = next((line for line in lines if line.startswith(("flags", "Features"))), "")
    return f"{platform.machine()} {flags}"


def library_path(name: str) -> Path:
    """Where the built library of ``<name>.cpp`` for this source (and the headers beside it), these flags, this
    CPU and this torch lives."""
    source = SOURCES / f"{name}.cpp"
    headers = b"".join(path.read_bytes() for path in sorted(SOURCES.glob("*.h")))  # what the sources include
    key = source.read_bytes() + headers + " ".join(FLAGS).encode() + _cpu_features().encode()
    digest = hashlib.sha256(key).hexdigest()[:16]
    return cache_dir() / f"{name}-{digest}-torch{torch.__version__.replace('+', '_')}.so"


@contextmanager
def _cache_lock(directory: Path) -> Iterator[None]:
    """An exclusive lock on ``directory`` (flock on the directory itself, so no lock file is left behind),
    held while one process builds; others block until it is released. Without fcntl, or on a file system that
    refuses locks, builds go on unlocked: the rename into place still keeps them safe, only not single."""
    try:
        import fcntl
    except ImportError:  # not a POSIX system
        yield
        return
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
        except OSError:  # e.g. a network file system without lock support
            pass
        yield
    finally:
        os.close(descriptor)  # releases the lock


def build(name: str) -> Path:
    """The library of ``<name>.cpp``, compiled now unless the cache has it (or another process, holding the
    cache's lock, has just built it)."""
    target = library_path(name)
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _cache_lock(target.parent):
        if not target.exists():
            _compile(name, target)
    return target


def _compile(name: str, target: Path) -> None:
    """Compiles ``<name>.cpp`` under a temporary name beside ``target`` and renames it to ``target``."""
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".revbits-tmp-build-") as scratch:
        built = Path(scratch) / target.name
        done = subprocess.run(
            _command(_compiler(), SOURCES / f"{name}.cpp", built), capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            lines = [line for line in done.stderr.splitlines() if "error" in line] or done.stderr.splitlines()
            raise NativeBuildError(f"compiling {name}.cpp failed: {lines[0] if lines else done.returncode}")
        atomic_move(built, target)


def load(name: str) -> bool:
    """Registers ``torch.ops.revbits_<name>`` (building it if needed); False where ``REVBITS_NATIVE=0`` (read at
    every call) or, with one warning, where it cannot be built (decided once per process)."""
    if not enabled():
        return False
    if name not in _loaded:
        try:
            torch.ops.load_library(str(build(name)))
            _loaded[name] = True
        except (NativeBuildError, OSError, RuntimeError) as error:
            warnings.warn(
                f"revbits: native kernel {name!r} unavailable ({error}); using the slower PyTorch path", stacklevel=2
            )
            _loaded[name] = False
    return _loaded[name]
