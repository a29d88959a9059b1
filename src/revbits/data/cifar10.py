"""CIFAR-10 from its official python format, unpickled safely.

No package registry ships the CIFAR-10 pixels, so the sources are, in order:
1. a ``cifar-10-batches-py`` folder named by ``$REVBITS_CIFAR10`` (the folder or its parent);
2. the canonical ``cifar-10-python.tar.gz`` (fails fast offline).
A folder put by hand at ``<cache>/cifar10/cifar-10-batches-py`` counts as cached too.

Each batch file (``data_batch_1`` .. ``data_batch_5``, ``test_batch``) is a pickled dict with
``b"data"``, a uint8 numpy array [N, 3072] (1024 red, then green, then blue values, each a 32x32
image in row order), and ``b"labels"``, a list of N ints in 0..9. The files were written by
Python 2 with numpy, so unpickling them needs numpy's array-reconstruction globals and nothing
else; ``SafeUnpickler`` allows exactly those and refuses any other global.
"""

from __future__ import annotations

import os
import pickle
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import DataFormatError, SourceError
from .registry import Dataset, fetch, register, require
from .sources import Source, check_digest, copy_files, download_url

NAME = "cifar10"
ENV_VAR = "REVBITS_CIFAR10"
FOLDER = "cifar-10-batches-py"
URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
TGZ_MD5 = "c58f30108f718f92721af3b95e74349a"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
SPLITS = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
FILES = tuple(f"{FOLDER}/{batch}" for batches in SPLITS.values() for batch in batches)
# The md5 sums published with the official archive.
EXPECTED_MD5 = {
    f"{FOLDER}/data_batch_1": "c99cafc152244af753f735de768cd75f",
    f"{FOLDER}/data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    f"{FOLDER}/data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    f"{FOLDER}/data_batch_4": "634d18415352ddfa80567beed471001a",
    f"{FOLDER}/data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    f"{FOLDER}/test_batch": "40351d587109b95175f43aff81a1287e",
}


def _numpy_globals() -> dict[tuple[str, str], Any]:
    """The only globals a CIFAR-10 batch may name: how numpy pickles an array and its dtype."""
    core = getattr(np, "_core", None) or np.core  # numpy 2 renamed numpy.core to numpy._core
    reconstruct = core.multiarray._reconstruct
    return {
        ("numpy.core.multiarray", "_reconstruct"): reconstruct,  # written by numpy 1.x (the official files)
        ("numpy._core.multiarray", "_reconstruct"): reconstruct,  # written by numpy 2.x
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }


class SafeUnpickler(pickle.Unpickler):
    """An unpickler that resolves numpy's array globals and refuses every other global."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = _numpy_globals()
        if (module, name) not in allowed:
            raise DataFormatError(
                f"refusing to unpickle the global {module}.{name}: a CIFAR-10 batch holds only dicts, "
                "lists, bytes, ints and numpy arrays"
            )
        return allowed[(module, name)]

    def persistent_load(self, pid: Any) -> Any:
        raise DataFormatError("refusing a pickle with persistent ids: not a CIFAR-10 batch")


def _field(batch: dict, key: str) -> Any:
    """``batch[b"key"]``, or ``batch["key"]`` for a file re-pickled by Python 3."""
    return batch[key.encode()] if key.encode() in batch else batch.get(key)


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one batch file: images uint8 ``[N, 3, 32, 32]`` and labels int64 ``[N]``."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            batch = SafeUnpickler(f, encoding="bytes").load()
    except DataFormatError as exc:
        raise DataFormatError(f"{path}: {exc}") from None
    except Exception as exc:  # UnpicklingError, EOFError, ValueError...: a corrupt or foreign file
        raise DataFormatError(f"{path}: not a CIFAR-10 python batch ({type(exc).__name__}: {exc})") from exc
    if not isinstance(batch, dict):
        raise DataFormatError(f"{path}: a CIFAR-10 batch is a dict, this pickle holds a {type(batch).__name__}")
    data, labels = _field(batch, "data"), _field(batch, "labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        what = f"{data.dtype} {list(data.shape)}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataFormatError(f"{path}: 'data' must be a uint8 array [N, 3072], got {what}")
    if not isinstance(labels, list) or len(labels) != len(data) or not all(isinstance(y, int) for y in labels):
        raise DataFormatError(f"{path}: 'labels' must be a list of {len(data)} ints")
    labels_array = np.asarray(labels, dtype=np.int64)
    if len(labels_array) and (labels_array.min() < 0 or labels_array.max() >= len(CLASSES)):
        raise DataFormatError(f"{path}: labels must lie in 0..{len(CLASSES) - 1}")
    return data.reshape(-1, 3, 32, 32), labels_array


def verify(folder: Path) -> None:
    """Check the six batch files under ``folder``: md5 against ``EXPECTED_MD5``, then their contents."""
    for rel in FILES:
        if EXPECTED_MD5.get(rel):
            try:
                check_digest(folder / rel, EXPECTED_MD5[rel], "md5")
            except SourceError as exc:
                raise DataFormatError(str(exc)) from None
        read_batch(folder / rel)


def _batches_folder(path: Path) -> Path:
    """``path`` itself if it holds the batches, else its ``cifar-10-batches-py`` child."""
    return path if (path / "data_batch_1").exists() else path / FOLDER


def _from_env_folder(staging: Path) -> dict[str, str]:
    value = os.environ.get(ENV_VAR)
    if not value:
        raise SourceError(f"${ENV_VAR} is not set")
    folder = _batches_folder(Path(value).expanduser())
    copy_files(folder, [rel.split("/", 1)[1] for rel in FILES], staging / FOLDER)
    return {"from": str(folder)}


def _from_url(staging: Path) -> dict[str, str]:
    archive = download_url(URL, staging / "cifar-10-python.tar.gz")
    check_digest(archive, TGZ_MD5, "md5")
    with tarfile.open(archive, "r:gz") as tar:
        for rel in FILES:  # read the members we need; never extract paths named by the archive
            member = tar.extractfile(rel)
            if member is None:
                raise SourceError(f"{archive.name} has no file {rel}")
            (staging / rel).parent.mkdir(parents=True, exist_ok=True)
            (staging / rel).write_bytes(member.read())
    archive.unlink()
    return {"url": URL, "md5": TGZ_MD5}


def load_cifar10(
    split: str = "train", root: str | Path | None = None, download: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-10 as torch tensors: images uint8 ``[N, 3, 32, 32]`` (channels first) and labels int64 ``[N]``.

    ``split`` is "train" (50,000 images, batches 1-5 in order) or "test" (10,000). ``root`` reads a
    ``cifar-10-batches-py`` folder (or its parent) in place instead of the cache. Without
    ``download`` a data set missing from the cache raises ``MissingDataError``.
    Class names are in ``CLASSES``.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    if root is not None:
        folder = _batches_folder(Path(root).expanduser())
    else:
        if download:
            fetch(NAME)
        folder = require(NAME) / FOLDER
    parts = [read_batch(folder / batch) for batch in SPLITS[split]]
    images = np.concatenate([images for images, _ in parts])
    labels = np.concatenate([labels for _, labels in parts])
    return torch.from_numpy(images), torch.from_numpy(labels)


DATASET = register(
    Dataset(
        name=NAME,
        description="CIFAR-10: 50k+10k 32x32 colour images, 10 classes (official python format; no package ships it)",
        files=FILES,
        sources=(
            Source(f"folder named by ${ENV_VAR}", _from_env_folder),
            Source(f"canonical URL {URL}", _from_url),
        ),
        verify=verify,
        loader=load_cifar10,
        needs=f"No package ships CIFAR-10. Put the official {FOLDER} folder (from cifar-10-python.tar.gz) in "
        f"the cache as cifar10/{FOLDER}, or set {ENV_VAR}=/path/to/{FOLDER} and run "
        f"`revbits data fetch {NAME}` to copy and check it; with internet access fetch downloads it.",
    )
)
