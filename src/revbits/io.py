"""Files that are whole or absent: atomic, fsync'd writes, per-directory manifests, and fault points.

Every file revbits keeps (checkpoints, PETRA stage states, metrics rewrites, the data cache, run
configurations) is written here, one way:

1. the bytes go to a temporary name beside the target (``.revbits-tmp-<pid>-<random>-<name>``: only
   names with this prefix are ever removed as leftovers, so a user's own files are never touched);
2. the file is flushed and ``fsync``'d;
3. it is renamed over the target (``os.replace``, atomic on POSIX);
4. the directory is ``fsync``'d, so that the rename itself survives a power loss.

A directory of files that belong together (a checkpoint, a PETRA stage-state set, a cached data
set) gets a manifest, ``manifest.json``, written last: ``{"files": {name: {"size": bytes,
"sha256": hex}}, ...}``. A directory with a manifest whose files match it is complete; anything
else is refused, naming the file that differs (:func:`verify_manifest`).

A write that fails (disk full, quota exceeded, read-only file system, I/O error) raises
:class:`WriteError`, one line naming the file and the error, whichever writer failed (Python's,
torch's or safetensors'); the temporary file is removed and the target keeps its old content.

Fault points: ``fault_point(name)`` does nothing unless the environment variable
``REVBITS_FAULT`` is ``name@n`` or ``name@n:ACTION``; then the n-th time the point is reached the
process sends itself the signal ACTION (``KILL`` by default, ``INT``, ``STOP``...) or, for an errno
name (``ENOSPC``, ``EDQUOT``, ``EROFS``, ``EIO``...), the point raises that OSError. Every atomic
write passes the point ``write:<file name>`` after its bytes are written and before they are
made durable, and every metrics record ``write:metrics.jsonl``. The fault-injection tests use
them to stop a process at each step of a write with a real signal, and to fail a write as a full
disk does.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

MANIFEST = "manifest.json"
FAULT_ENV = "REVBITS_FAULT"
TEMP_PREFIX = ".revbits-tmp-"  # every temporary name revbits writes starts so; nothing else is removed
AFFORDABLE_SHA_BYTES = 256 * 2**20  # data files up to this size are hashed on every load
SHA256_HEX = re.compile(r"[0-9a-f]{64}")


class IntegrityError(RuntimeError):
    """A file that is missing, of the wrong size, or whose bytes differ from its manifest's record."""


class WriteError(OSError):
    """A file revbits could not write (disk full, quota exceeded, read-only file system, I/O error):
    one line naming the file and the error; ``note`` says what is still safe and how to go on."""

    def __init__(self, path: Path | str, error_number: int, note: str = "") -> None:
        super().__init__(error_number, os.strerror(error_number), str(path))
        self.note = note

    def __str__(self) -> str:
        code = errno.errorcode.get(self.errno, str(self.errno))
        text = f"cannot write {self.filename}: {self.strerror} ({code})"
        return f"{text}; {self.note}" if self.note else text

    def __reduce__(self) -> tuple[Any, ...]:
        return WriteError, (self.filename, self.errno, self.note)

    def noted(self, note: str) -> WriteError:
        """The same error with ``note`` (what was saved last, how to continue) added to its line."""
        return WriteError(self.filename, self.errno, note)


def write_error(error: BaseException, path: Path) -> WriteError | None:
    """The :class:`WriteError` for ``path`` that ``error`` (raised while writing it) stands for: an
    OSError, or a library's error that carries the OS error in its text (safetensors: ``os error
    28``); None if it is neither (a bug, which keeps its traceback)."""
    if isinstance(error, WriteError):
        return error
    if isinstance(error, OSError) and error.errno is not None:
        return WriteError(path, error.errno)
    found = re.search(r"os error (\d+)", str(error))
    return WriteError(path, int(found.group(1))) if found else None


def unsafe_pickle(error: BaseException) -> str | None:
    """Why ``torch.load(weights_only=True)`` refused a file, in a few words (the code the pickle asked
    to import or call), or None if ``error`` is not such a refusal."""
    text = str(error)
    if "Weights only load failed" not in text and "weights_only" not in text.lower():
        return None
    found = re.search(r"GLOBAL ([\w.]+)", text)
    what = f" ({found.group(1)})" if found else ""
    return f"it is a pickle that asks to run code{what}, which loading with weights_only=True refuses"


def first_line(error: BaseException) -> str:
    """The first non-empty line of an error's message (its type's name if it has none)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


_fault_counts: dict[str, int] = {}


def fault_point(name: str) -> None:
    """At this point's n-th visit, send this process the signal ``REVBITS_FAULT`` names, or raise the
    OSError it names (see the module's docstring)."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    point, _, rest = spec.partition("@")
    if point != name:
        return
    count, _, action = rest.partition(":")
    _fault_counts[name] = _fault_counts.get(name, 0) + 1
    if _fault_counts[name] != int(count or 1):
        return
    if action.startswith("E") and hasattr(errno, action):
        code = getattr(errno, action)
        raise OSError(code, os.strerror(code))
    os.kill(os.getpid(), getattr(signal, f"SIG{action or 'KILL'}"))


def fsync_dir(folder: Path) -> None:
    """Make the entries of ``folder`` (renames, new files) durable (a no-op where the OS cannot)."""
    with contextlib.suppress(OSError):
        _fsync_file(folder)


def temp_name(path: Path) -> Path:
    """A fresh temporary name beside ``path``, recognisable by :func:`remove_leftovers`."""
    return path.with_name(f"{TEMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}-{path.name}")


@contextlib.contextmanager
def _staged(path: Path) -> Iterator[Path]:
    """A temporary path for ``path``'s new content; renamed over ``path`` when the block ends well,
    removed when it raises. A failed write is a :class:`WriteError` naming ``path``."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise write_error(error, path.parent) from None
    tmp = temp_name(path)
    try:
        yield tmp
        fault_point(f"write:{path.name}")
        _fsync_file(tmp)
        os.replace(tmp, path)
    except Exception as error:
        about_another_file = isinstance(error, OSError) and error.filename not in (None, str(tmp), str(path))
        failed = None if about_another_file else write_error(error, path)
        if failed is None or failed is error:
            raise
        raise failed from None
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


def atomic_write_stream(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """``write(f)`` writes the new content to an open binary file, which then replaces ``path``
    atomically and durably (for writers that take a file, such as ``torch.save``: its OSError,
    which torch passes on from a file object but not from a path, then names the cause)."""

    def to_file(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            write(f)

    atomic_write(path, to_file)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data``, atomically and durably."""
    atomic_write_stream(path, lambda f: f.write(data))


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
        atomic_write_stream(dst, lambda f: _copy_into(src, f))
        src.unlink()
    else:
        _fsync_file(dst)
    fsync_dir(dst.parent)


def _copy_into(src: Path, f: IO[bytes]) -> None:
    with open(src, "rb") as source:
        shutil.copyfileobj(source, f, 1 << 20)


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
    """Remove the temporary files and directories an interrupted write left in ``folder``: only names
    that start with :data:`TEMP_PREFIX` (:func:`temp_name`'s), never another file; returns them.
    Call it only on a folder that belongs to revbits and that no other process is writing (a run
    directory under its lock)."""
    removed = []
    if not Path(folder).is_dir():
        return removed
    for entry in Path(folder).iterdir():
        if entry.name.startswith(TEMP_PREFIX):
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


def entry_problem(entry: Any) -> str | None:
    """What a manifest's record of one file lacks (None if it has an integer size and a sha256)."""
    if not isinstance(entry, dict):
        return "is not a record of a size and a sha256"
    size, sha = entry.get("size"), entry.get("sha256")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        return "has no size" if "size" not in entry else f"has no valid size ({size!r})"
    if not isinstance(sha, str) or not SHA256_HEX.fullmatch(sha):
        return "has no sha256" if "sha256" not in entry else "has no valid sha256"
    return None


def read_manifest(folder: Path) -> dict[str, Any]:
    """``folder``'s manifest; :class:`IntegrityError` naming it if it is missing, damaged or
    incomplete (every entry must have its size and its sha256: an entry without one cannot vouch
    for its file, so the whole directory is refused)."""
    path = Path(folder) / MANIFEST
    manifest = read_json(path, "manifest")
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict):
        raise IntegrityError(f"{path} is damaged: it lists no files with their sizes and sha256")
    for name, entry in files.items():
        problem = entry_problem(entry)
        if problem:
            raise IntegrityError(f"{path} is incomplete: its entry for {name} {problem} (was it edited?)")
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
    if sha and sha256_file(path) != entry["sha256"]:
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
