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
the same folder, fsync'd and then renamed (:mod:`revbits.io`, the one implementation of atomic
writes). Loaders check the cached files against the manifest on every load (:func:`check_files`):
the size always, the sha256 too for files up to ``AFFORDABLE_SHA_BYTES``.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from ..io import (  # noqa: F401 (the loaders' names)
    AFFORDABLE_SHA_BYTES,
    atomic_move,
    atomic_write_bytes,
    atomic_write_text,
    check_file,
    entry_problem,
    file_entry,
    sha256_file,
)
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


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    """The hex digest of a file, read in 1 MiB blocks (``algorithm`` is any hashlib name)."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


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
        "files": {rel: file_entry(path) for rel, path in files.items()},
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


def check_files(name: str, files: tuple[str, ...], full: bool = False) -> list[str]:
    """What is wrong with the cached ``files`` of data set ``name`` against its manifest (empty: nothing).

    Each file's size is checked, and its sha256 when ``full`` or when it is at most
    ``AFFORDABLE_SHA_BYTES`` long. A data set without a manifest (files put there by hand) cannot be
    checked and gives no problems.
    """
    manifest = read_manifest(name)
    folder = dataset_dir(name)
    if manifest is None:
        return [] if not (folder / MANIFEST).exists() else [f"{folder / MANIFEST} is damaged: not a JSON manifest"]
    recorded = manifest.get("files", {})
    problems = []
    for rel in files:
        entry = recorded.get(rel) if isinstance(recorded, dict) else None
        if entry is None:
            problems.append(f"{folder / rel} is not listed in {folder / MANIFEST}")
            continue
        incomplete = entry_problem(entry)
        if incomplete:  # an entry that cannot vouch for its file refuses the data set
            problems.append(f"{folder / MANIFEST} is incomplete: its entry for {rel} {incomplete} (was it edited?)")
            continue
        sha = full or entry["size"] <= AFFORDABLE_SHA_BYTES
        problem = check_file(folder / rel, entry, sha)
        if problem:
            problems.append(problem)
    return problems
