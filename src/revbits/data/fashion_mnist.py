"""Fashion-MNIST (Zalando, MIT): 70,000 28x28 grey-scale images of clothes in 10 classes.

Sources, tried in order:
1. the installed Debian package ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``);
2. the canonical URL (fails fast offline);
3. ``apt-get download dataset-fashion-mnist`` and ``dpkg-deb -x`` (no root needed, nothing installed).

The four IDX ``.gz`` files are cached as they are. Every source is checked against the sha256
of the decompressed IDX contents, which do not depend on how a source compressed them.
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

import numpy as np
import torch

from .errors import DataFormatError, SourceError
from .idx import parse_idx, read_idx, read_idx_bytes
from .registry import Dataset, fetch, register, require
from .sources import Source, apt_download, copy_files, download_url, extract_deb

NAME = "fashion-mnist"
DEBIAN_PACKAGE = "dataset-fashion-mnist"
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
SPLITS = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FILES = tuple(name for pair in SPLITS.values() for name in pair)
# sha256 of the decompressed IDX files (checked on the Debian package 0.0~git20200523.55506a9-1).
CONTENT_SHA256 = {
    "train-images-idx3-ubyte.gz": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte.gz": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte.gz": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte.gz": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}


def _check_pair(images: np.ndarray, labels: np.ndarray, where: str) -> None:
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise DataFormatError(f"{where}: images must be uint8 [N, 28, 28], got {images.dtype} {list(images.shape)}")
    if labels.dtype != np.uint8 or labels.ndim != 1 or len(labels) != len(images):
        raise DataFormatError(
            f"{where}: labels must be uint8 [{len(images)}] to match the images, "
            f"got {labels.dtype} {list(labels.shape)}"
        )
    if len(labels) and labels.max() >= len(CLASSES):
        raise DataFormatError(f"{where}: label {int(labels.max())} is out of range 0..{len(CLASSES) - 1}")


def verify(folder: Path) -> None:
    """Check the four IDX files in ``folder``: contents against ``CONTENT_SHA256``, then shapes and labels."""
    arrays = {}
    for name in FILES:
        data = read_idx_bytes(folder / name)
        digest = hashlib.sha256(data).hexdigest()
        if CONTENT_SHA256.get(name) and digest != CONTENT_SHA256[name]:
            raise DataFormatError(f"{name}: decompressed sha256 {digest} is not the expected {CONTENT_SHA256[name]}")
        arrays[name] = parse_idx(data, name)
    for split, (images, labels) in SPLITS.items():
        _check_pair(arrays[images], arrays[labels], f"{NAME} {split}")


def _from_debian_dir(staging: Path) -> dict[str, str]:
    if not DEBIAN_DIR.is_dir():
        raise SourceError(f"{DEBIAN_DIR} does not exist (the package is not installed)")
    copy_files(DEBIAN_DIR, FILES, staging)
    return {"from": str(DEBIAN_DIR)}


def _from_url(staging: Path) -> dict[str, str]:
    for name in FILES:
        download_url(URL + name, staging / name)
    return {"url": URL}


def _from_apt(staging: Path) -> dict[str, str]:
    with tempfile.TemporaryDirectory() as tmp:
        deb = apt_download(DEBIAN_PACKAGE, Path(tmp) / "deb")
        tree = extract_deb(deb, Path(tmp) / "tree")
        copy_files(tree / DEBIAN_DIR.relative_to("/"), FILES, staging)
        return {"deb": deb.name}


def load_fashion_mnist(split: str = "train", download: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST as torch tensors: images uint8 ``[N, 28, 28]`` and labels int64 ``[N]``.

    ``split`` is "train" (60,000 images) or "test" (10,000). Class names are in ``CLASSES``.
    Without ``download`` a missing data set raises ``MissingDataError``; with it, it is fetched.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    if download:
        fetch(NAME)
    folder = require(NAME)
    images_file, labels_file = SPLITS[split]
    images, labels = read_idx(folder / images_file), read_idx(folder / labels_file)
    _check_pair(images, labels, str(folder))
    return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))


DATASET = register(
    Dataset(
        name=NAME,
        description="Fashion-MNIST: 60k+10k 28x28 grey images, 10 classes (Debian dataset-fashion-mnist)",
        files=FILES,
        sources=(
            Source(f"Debian package {DEBIAN_PACKAGE} (installed)", _from_debian_dir),
            Source(f"canonical URL {URL}", _from_url),
            Source(f"apt-get download {DEBIAN_PACKAGE}", _from_apt),
        ),
        verify=verify,
        loader=load_fashion_mnist,
        needs=f"Fetching needs the Debian package {DEBIAN_PACKAGE}: installed "
        f"(apt-get install {DEBIAN_PACKAGE}) or downloadable with apt-get download, or internet access.",
    )
)
