"""The data set registry: what each data set is, where it comes from, and whether it is cached.

``fetch(name)`` tries the data set's sources in order. The first one that delivers files that
pass the data set's ``verify`` wins: its files move into the cache and a manifest records where
they came from. Loaders call ``require(name)``, which never downloads anything: a data set that
is not cached raises ``MissingDataError`` with the command that gets it.
"""

from __future__ import annotations

import errno
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..io import TEMP_PREFIX, WriteError
from .cache import MANIFEST, atomic_move, check_files, data_root, dataset_dir, read_manifest, write_manifest
from .errors import DataFormatError, FetchError, MissingDataError, SourceError, UnknownDatasetError
from .sources import Source


@dataclass(frozen=True)
class Dataset:
    """A data set the registry knows.

    - ``files``: the paths, relative to the data set's cache folder, that make it complete.
    - ``sources``: tried in order by ``fetch``.
    - ``verify(folder)``: raises ``DataFormatError`` unless ``folder`` holds good copies of ``files``.
    - ``loader``: the function that reads the cached data set (``load(name, ...)`` calls it).
    - ``needs``: one sentence for the user, saying what fetching requires.
    - ``format``: the version of what the sources make of the raw data (e.g. of a text filter), or "".
      The manifest records it; a cached copy made under another one counts as stale: loaders refuse
      it and ``fetch`` makes it again.
    """

    name: str
    description: str
    files: tuple[str, ...]
    sources: tuple[Source, ...]
    verify: Callable[[Path], None]
    loader: Callable[..., Any]
    needs: str
    format: str = ""


_REGISTRY: dict[str, Dataset] = {}


def register(dataset: Dataset) -> Dataset:
    """Add a data set to the registry (a name can be registered once)."""
    if dataset.name in _REGISTRY:
        raise ValueError(f"data set {dataset.name!r} is already registered")
    _REGISTRY[dataset.name] = dataset
    return dataset


def names() -> list[str]:
    """The names of all registered data sets, sorted."""
    return sorted(_REGISTRY)


def get(name: str) -> Dataset:
    """The registered data set ``name``; ``UnknownDatasetError`` (listing the known names) if none."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownDatasetError(f"unknown data set {name!r}; known data sets: {', '.join(names())}") from None


def is_cached(name: str) -> bool:
    """Whether every file of data set ``name`` is in the cache."""
    folder = dataset_dir(name)
    return all((folder / rel).is_file() for rel in get(name).files)


def stale(dataset: Dataset) -> str | None:
    """Why the cached copy of ``dataset`` was made under another ``format`` than the current one (None if not)."""
    manifest = read_manifest(dataset.name)
    made = (manifest or {}).get("notes", {}).get("format", "")
    if not dataset.format or manifest is None or made == dataset.format:
        return None
    return f"its files were made by format {made or '(none recorded)'}, this revbits makes {dataset.format!r}"


def _problems(dataset: Dataset, full: bool = False) -> list[str]:
    """What is wrong with the cached copy of ``dataset``: a stale format, then each damaged file."""
    return [reason for reason in [stale(dataset)] if reason] + check_files(dataset.name, dataset.files, full)


def fetch_command(name: str) -> str:
    """The shell command that fetches a data set."""
    return f"revbits data fetch {name}"


def require(name: str) -> Path:
    """The cache folder of data set ``name``, checked against its manifest (sizes, and sha256 where
    affordable); ``MissingDataError`` saying how to get it, or ``DataFormatError`` naming a damaged file."""
    dataset = get(name)
    if not is_cached(name):
        raise MissingDataError(
            f"data set {name!r} is not in the cache folder {dataset_dir(name)} ($REVBITS_DATA, or ~/.cache/revbits "
            f"when that is not set); get it with: {fetch_command(name)} ({' '.join(dataset.needs.split())})"
        )
    problems = _problems(dataset)
    if problems:
        raise DataFormatError(f"data set {name!r}: {problems[0]}; fetch it again with: {fetch_command(name)} --force")
    return dataset_dir(name)


def verify(name: str) -> list[str]:
    """Everything wrong with cached data set ``name``, each file's sha256 included ([] when it is whole).
    A data set that is not cached, or has no manifest, says so."""
    dataset = get(name)
    if not is_cached(name):
        missing = [rel for rel in dataset.files if not (dataset_dir(name) / rel).is_file()]
        return [f"not cached (missing {', '.join(missing)})"]
    if not (dataset_dir(name) / MANIFEST).exists():
        return [f"no {MANIFEST}: the files were put there by hand and cannot be checked"]
    return _problems(dataset, full=True)


def _install(dataset: Dataset, staging: Path, source: Source, notes: dict[str, str]) -> Path:
    """Move verified files from ``staging`` into the cache, then write the manifest."""
    folder = dataset_dir(dataset.name)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MANIFEST).unlink(missing_ok=True)  # no manifest may describe a half-replaced set
    for rel in dataset.files:
        atomic_move(staging / rel, folder / rel)
    notes = {**notes, "format": dataset.format} if dataset.format else notes
    write_manifest(dataset.name, source.name, {rel: folder / rel for rel in dataset.files}, notes)
    return folder


DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO)  # no other source can do better


def disk_error(error: BaseException, path: Path) -> WriteError | None:
    """The :class:`WriteError` a failure stands for if it (or what caused it) is a full disk, an exceeded
    quota, a read-only file system or an I/O error; None otherwise."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in DISK_ERRORS:
            return seen if isinstance(seen, WriteError) else WriteError(seen.filename or path, seen.errno)
        seen = seen.__cause__ or seen.__context__
    return None


def fetch(name: str, force: bool = False, log: Callable[[str], None] | None = None) -> Path:
    """Get data set ``name`` into the cache (unless it is there already) and return its folder.

    Sources are tried in order. A source's files are staged in a temporary folder inside the
    cache root and verified before any of them replaces a cached file. ``FetchError`` lists
    every source's failure when none works. ``log`` (e.g. ``print``) hears about each attempt. A full
    disk (or quota, read-only file system, I/O error) stops at once with a :class:`WriteError` naming
    the file, the cached copy unchanged.
    """
    dataset = get(name)
    say = log or (lambda message: None)
    if is_cached(name) and not force:
        problems = _problems(dataset)
        if not problems:
            return dataset_dir(name)
        say(f"{name}: the cached copy is outdated or damaged ({problems[0]}); fetching it again")
    root = data_root()
    root.mkdir(parents=True, exist_ok=True)
    failures = []
    for source in dataset.sources:
        say(f"{name}: trying {source.name}")
        with tempfile.TemporaryDirectory(dir=root, prefix=f"{TEMP_PREFIX}staging-{name}-") as tmp:
            staging = Path(tmp) / "files"
            staging.mkdir()
            try:
                notes = source.fetch(staging) or {}
                missing = [rel for rel in dataset.files if not (staging / rel).is_file()]
                if missing:
                    raise SourceError(f"delivered no {', '.join(missing)}")
                dataset.verify(staging)
            except Exception as exc:  # any failure of one source means: try the next, unless the disk is full
                full = disk_error(exc, staging)
                if full is not None:
                    raise full.noted(f"the cached copy of {name} is unchanged") from None
                reason = str(exc) if isinstance(exc, (SourceError, DataFormatError)) else f"{type(exc).__name__}: {exc}"
                failures.append(f"- {source.name}: {reason}")
                say(f"{name}: {source.name} failed: {reason}")
                continue
            try:
                folder = _install(dataset, staging, source, notes)
            except WriteError as error:
                again = f"{fetch_command(name)} --force"
                raise error.noted(f"the cached copy of {name} may be incomplete: fetch it again with {again}") from None
        say(f"{name}: stored in {folder}")
        return folder
    raise FetchError(
        f"could not fetch data set {name!r}; every source failed:\n" + "\n".join(failures) + "\n" + dataset.needs
    )


def load(name: str, *args: Any, **kwargs: Any) -> Any:
    """Read data set ``name`` with its loader (see each loader for arguments and return types)."""
    return get(name).loader(*args, **kwargs)


def describe(name: str) -> dict[str, Any]:
    """One row of ``list_datasets``."""
    dataset = get(name)
    folder = dataset_dir(name)
    cached = is_cached(name)
    manifest = read_manifest(name) if cached else None
    if not cached:
        source = None
    elif manifest is None:
        source = "unknown (no manifest: the files were put there by hand)"
    else:
        source = manifest.get("source")
    size = sum((folder / rel).stat().st_size for rel in dataset.files) if cached else 0
    problems = _problems(dataset) if cached else []
    return {
        "name": name,
        "description": dataset.description,
        "cached": cached,
        "damaged": problems[0] if problems else None,
        "out_of_date": cached and stale(dataset) is not None,
        "path": str(folder),
        "source": source,
        "fetched_at": manifest.get("fetched_at") if manifest else None,
        "size": size,
    }


def list_datasets() -> list[dict[str, Any]]:
    """Every registered data set as a dict: name, description, cached, path, source, fetched_at, size (bytes)."""
    return [describe(name) for name in names()]
