"""The image data sets on small format-true files the tests write: IDX and Fashion-MNIST, CIFAR-10 (pickles
included, malicious ones refused). No network, no real data."""

from __future__ import annotations

import gzip
import hashlib
import pickle
import shutil

import numpy as np
import pytest
import torch

import data_files
from data_files import fashion_content_hashes, idx_bytes, py2_batch, sha256, write_cifar, write_fashion
from revbits.data import (
    DataFormatError,
    FetchError,
    MissingDataError,
    cache,
    cifar10,
    fashion_mnist,
    read_idx,
    registry,
)

cache_dir = data_files.cache_dir  # the cache fixture (autouse): every networked or system source off

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
