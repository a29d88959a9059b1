"""Files that are whole or absent: atomic, fsync'd writes, per-directory manifests, and fault points.

Every file revbits keeps (checkpoints, PETRA stage states, metrics rewrites, the data cache, run
configurations) is written here, one way:

1. the bytes go to a temporary name beside the target (``.<name>.tmp-<pid>-<random>``);
2. the file is flushed and ``fsync``'d;
3. it is renamed over the target (``os.replace``, atomic on POSIX);
4. the directory is ``fsync``'d, so that the rename itself survives a power loss.

A directory of files that belong together (a checkpoint, a PETRA stage-state set, a cached data
set) gets a manifest, ``manifest.json``, written last: ``{"files": {name: {"size": bytes,
"sha256": hex}}, ...}``. A directory with a manifest whose files match it is complete; anything
else is refused, naming the file that differs (:func:`verify_manifest`).

Fault points: ``fault_point(name)`` does nothing unless the environment variable
``REVBITS_FAULT`` is ``name@n`` or ``name@n:SIGNAL`` (default SIGKILL); then the n-th time the
point is reached the process sends itself that signal. The fault-injection tests use it to stop a
process at each step of a write with a real signal.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import signal
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
FAULT_ENV = "REVBITS_FAULT"
TEMP_MARK = ".tmp-"
AFFORDABLE_SHA_BYTES = 256 * 2**20  # data files up to this size are hashed on every load


class IntegrityError(RuntimeError):
    """A file that is missing, of the wrong size, or whose bytes differ from its manifest's record."""


_fault_counts: dict[str, int] = {}


def fault_point(name: str) -> None:
    """Send this process the signal ``REVBITS_FAULT`` names when it asks for this point's n-th visit."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    point, _, rest = spec.partition("@")
    if point != name:
        return
    count, _, sig = rest.partition(":")
    _fault_counts[name] = _fault_counts.get(name, 0) + 1
    if _fault_counts[name] == int(count or 1):
        os.kill(os.getpid(), getattr(signal, f"SIG{sig or 'KILL'}"))


def fsync_dir(folder: Path) -> None:
    """Make the entries of ``folder`` (renames, new files) durable (a no-op where the OS cannot)."""
    with contextlib.suppress(OSError):
        _fsync_file(folder)


def temp_name(path: Path) -> Path:
    """A fresh temporary name beside ``path``, recognisable by :func:`remove_leftovers`."""
    return path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}-{secrets.token_hex(4)}")


@contextlib.contextmanager
def _staged(path: Path) -> Iterator[Path]:
    """A temporary path for ``path``'s new content; renamed over ``path`` when the block ends well,
    removed when it raises."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def _fsync_file(path: Path) -> None:
    """fsync the file (or directory) at ``path``."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """fsync every file and directory under ``folder`` (before renaming a staged directory into place)."""
    for path in sorted(Path(folder).rglob("*"), reverse=True):
        if path.is_file() and not path.is_symlink():
            _fsync_file(path)
        elif path.is_dir():
            fsync_dir(path)
    fsync_dir(folder)


def atomic_write(path: Path, write: Callable[[Path], Any]) -> None:
    """``write(tmp)`` writes the new content to a temporary path, which then replaces ``path``
    atomically and durably (for writers that take a path: ``torch.save``, safetensors)."""
    with _staged(path) as tmp:
        write(tmp)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data``, atomically and durably."""
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: Path, text: str) -> None:
    """:func:`atomic_write_bytes` for UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, value: Any) -> None:
    """:func:`atomic_write_text` of ``value`` as indented JSON."""
    atomic_write_text(path, json.dumps(value, indent=1, sort_keys=True) + "\n")


def atomic_move(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst`` atomically: a rename when both are on one file system, else a copy to a
    temporary file beside ``dst`` and a rename; durable either way."""
    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(src, dst)
    except OSError:  # another file system: copy, then rename
        atomic_write(dst, lambda tmp: shutil.copyfile(src, tmp))
        src.unlink()
    else:
        _fsync_file(dst)
    fsync_dir(dst.parent)


def remove_tree(folder: Path) -> None:
    """Delete a directory so that it never appears half-deleted under its name: it is first renamed
    to a temporary name (which :func:`remove_leftovers` would clean up after a crash)."""
    folder = Path(folder)
    if not folder.exists():
        return
    trash = temp_name(folder)
    os.replace(folder, trash)
    fsync_dir(folder.parent)
    fault_point("remove_tree")
    shutil.rmtree(trash, ignore_errors=True)


def remove_leftovers(folder: Path) -> list[Path]:
    """Remove the temporary files and directories an interrupted write left in ``folder`` (hidden
    names with ``.tmp`` in them: :func:`temp_name`'s, and those of revbits before it); returns them."""
    removed = []
    if not Path(folder).is_dir():
        return removed
    for entry in Path(folder).iterdir():
        if entry.name.startswith(".") and ".tmp" in entry.name:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def file_entry(path: Path) -> dict[str, Any]:
    """A manifest's record of one file: its size in bytes and its sha256."""
    return {"size": Path(path).stat().st_size, "sha256": sha256_file(path)}


def write_manifest(folder: Path, names: Iterable[str], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Record the size and sha256 of ``folder/name`` for each name in ``folder/manifest.json``,
    atomically (write it after the files it describes are durable)."""
    folder = Path(folder)
    manifest = {**(extra or {}), "files": {name: file_entry(folder / name) for name in names}}
    atomic_write_json(folder / MANIFEST, manifest)
    return manifest


def read_json(path: Path, what: str = "file") -> Any:
    """The JSON value in ``path``; :class:`IntegrityError` naming the file if it cannot be read."""
    try:
        return json.loads(Path(path).read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise IntegrityError(f"{path} is missing ({what})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise IntegrityError(f"{path} is damaged: not a JSON {what} ({error})") from None


def read_manifest(folder: Path) -> dict[str, Any]:
    """``folder``'s manifest; :class:`IntegrityError` naming it if it is missing or damaged."""
    manifest = read_json(Path(folder) / MANIFEST, "manifest")
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(isinstance(v, dict) and "size" in v for v in files.values()):
        raise IntegrityError(f"{Path(folder) / MANIFEST} is damaged: it lists no files with their sizes")
    return manifest


def check_file(path: Path, entry: dict[str, Any], sha: bool = True) -> str | None:
    """Why ``path`` does not match its manifest ``entry`` (None if it does): missing, a size that
    differs, or (when ``sha``) a sha256 that differs."""
    path = Path(path)
    if not path.is_file():
        return f"{path} is missing"
    size = path.stat().st_size
    if size != entry["size"]:
        return f"{path} is {size:,} bytes, its manifest records {entry['size']:,} (damaged or cut short)"
    if sha and "sha256" in entry and sha256_file(path) != entry["sha256"]:
        return f"{path} is damaged: its sha256 differs from the one its manifest records"
    return None


def verify_manifest(folder: Path, names: Iterable[str] | None = None, sha: bool = True) -> dict[str, Any]:
    """Check ``folder``'s files (``names``, or every file listed) against its manifest; returns the
    manifest, or raises :class:`IntegrityError` naming the first file that is missing or differs."""
    manifest = read_manifest(folder)
    files = manifest["files"]
    for name in files if names is None else names:
        if name not in files:
            raise IntegrityError(f"{Path(folder) / name} is not listed in {Path(folder) / MANIFEST}")
        problem = check_file(Path(folder) / name, files[name], sha)
        if problem:
            raise IntegrityError(problem)
    return manifest
