"""The on-disk cache: where data sets live, atomic writes, checksums and the per-set manifest.

Layout::

    $REVBITS_DATA (default ~/.cache/revbits)/
        fashion-mnist/
            manifest.json          where the files came from, when, and their sha256
            train-images-idx3-ubyte.gz
            ...
        shakespeare/
            ...

A file only ever appears under its final name complete: it is written to a temporary file in
the same folder and then renamed with ``os.replace``, which is atomic on POSIX and Windows.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import DataFormatError

ENV_VAR = "REVBITS_DATA"
MANIFEST = "manifest.json"


def data_root() -> Path:
    """The cache folder: ``$REVBITS_DATA`` if set, else ``~/.cache/revbits``."""
    value = os.environ.get(ENV_VAR)
    return Path(value).expanduser() if value else Path.home() / ".cache" / "revbits"


def dataset_dir(name: str) -> Path:
    """The cache folder of one data set (it may not exist yet)."""
    return data_root() / name


@contextlib.contextmanager
def _temp_path(folder: Path, suffix: str) -> Iterator[Path]:
    """A fresh file name in ``folder``; the file is removed on the way out unless it was renamed."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f".tmp-{secrets.token_hex(8)}{suffix}"
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that ``path`` is never seen half-written."""
    path = Path(path)
    with _temp_path(path.parent, path.suffix) as tmp:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    """``atomic_write_bytes`` for UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_move(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst`` atomically: a rename when both are on one file system, else a copy
    to a temporary file beside ``dst`` and a rename."""
    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(src, dst)
        return
    except OSError:  # another file system: copy, then rename
        pass
    with _temp_path(dst.parent, dst.suffix) as tmp:
        with open(src, "rb") as inp, open(tmp, "xb") as out:
            shutil.copyfileobj(inp, out, 1 << 20)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, dst)
    src.unlink()


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    """The hex digest of a file, read in 1 MiB blocks (``algorithm`` is any hashlib name)."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file."""
    return file_digest(path, "sha256")


def read_manifest(name: str) -> dict[str, Any] | None:
    """The manifest of a cached data set, or None when it has none (or an unreadable one)."""
    path = dataset_dir(name) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def write_manifest(name: str, source: str, files: dict[str, Path], notes: dict[str, str] | None = None) -> dict:
    """Record where the cached ``files`` (relative name -> path) of a data set came from.

    The manifest holds the source's name, the UTC time, and each file's size and sha256, plus
    any ``notes`` the source gave (e.g. the checksum of the archive it unpacked).
    """
    manifest = {
        "name": name,
        "source": source,
        "fetched_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "files": {rel: {"size": path.stat().st_size, "sha256": sha256_file(path)} for rel, path in files.items()},
        "notes": dict(notes or {}),
    }
    atomic_write_text(dataset_dir(name) / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest


def read_utf8_lines(path: Path) -> list[str]:
    """The lines of a UTF-8 text file; ``DataFormatError`` if it is not UTF-8."""
    try:
        return Path(path).read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise DataFormatError(f"{path}: not UTF-8 text ({exc})") from exc
