"""A real English Wikipedia extract, as cased prose, for masked-LM fine-tuning.

The source is a bzip2-compressed MediaWiki XML dump that ships inside the PyPI package gensim
(4.4.0) as test data: ``gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``
(1.7 MB, 206 pages, from the English Wikipedia dump of May 2016). It is taken from the installed
gensim, else from the gensim wheel fetched with ``pip download`` (never installed); either way its
sha256 is checked.

The dump is parsed at fetch time with gensim (an optional dependency, from the hf extra, imported
only then), so loading the cached articles needs neither gensim nor the dump. gensim's
``extract_pages`` reads the pages; kept are those of namespace 0 (articles) that are not
redirects: 106 of the 206. Their wikitext becomes plain text in three steps:

1. ``prepare`` drops what gensim's filter would turn into stray text: tables, galleries and the
   pictures that start a line (their captions would join the paragraph beside them).
2. gensim's ``filter_wiki`` removes comments, references, maths, templates (all of them: a
   quantity written with ``{{convert|5|mi|km}}`` or a foreign name in ``{{lang|..}}`` is lost)
   and file and category links; links become their label.
3. ``prose_lines`` drops headings, and the sections that list sources or links (See also,
   References, Notes, Further reading, External links, ...); strips bold and italic quote marks;
   joins the lines of a paragraph; keeps list items, without their markers.

Each paragraph (or list item) is one line, without blank lines between them. The articles are
cached as ``articles.jsonl``: one UTF-8 JSON object per line, ``{"title": ..., "text": ...}``,
in dump order (2.8 MB; 7,554 paragraphs and list items in all). The manifest records ``FORMAT``;
a cache made under another format (the earlier, hand-written filter recorded none) is refused
by the loaders and made again by ``revbits data fetch wiki-extract``.

Splits are by article, by position in the file: article ``i`` (counting from 0) is "valid" if
``i % 20 == 0``, "test" if ``i % 20 == 1``, else "train". Measured on the real data by
``benchmarks/wiki_extract_stats.py`` (lines are paragraphs and list items; words are
whitespace-separated tokens of the cached text; benchmarks/results/wiki_extract_stats.md compares
them with the earlier filter's, which kept 442,002 words in 7,614 lines):

========  ========  =======  =======
split     articles  lines    words
========  ========  =======  =======
train           94    6,788  381,230
valid            6      353   29,818
test             6      413   21,752
all            106    7,554  432,800
========  ========  =======  =======

valid is Anarchism, Anthropology, Ada, Alkali metal, Demographics of Angola and Agnostida;
test is Autism, Agricultural science, Aberdeen (disambiguation), Alphabet, Politics of Angola
and Abortion.
"""

from __future__ import annotations

import bz2
import importlib.util
import json
import re
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import BinaryIO, NamedTuple
from xml.etree import ElementTree

from .cache import read_utf8_lines
from .errors import DataFormatError, SourceError
from .registry import Dataset, fetch, register, require
from .sources import Source, check_digest, pip_download

NAME = "wiki-extract"
REQUIREMENT = "gensim==4.4.0"
DUMP_NAME = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
DUMP_MEMBER = f"gensim/test/test_data/{DUMP_NAME}"  # its path inside the package (and the wheel)
DUMP_SHA256 = "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d"
ARTICLES_FILE = "articles.jsonl"
# What the articles were made by; a cache made by another format is refetched (2: gensim's filter + our pass;
# before it, none recorded: revbits' own wikitext filter, which rendered a few inline templates).
FORMAT = "2 (gensim filter_wiki + revbits pass)"
MIN_ARTICLES = 50
SPLITS = ("train", "valid", "test", "all")


class Article(NamedTuple):
    """One article: its title and its plain text (paragraphs one per line)."""

    title: str
    text: str


# --- wikitext to plain text: gensim's filter, then a short pass of our own --------------------

# A table, innermost first: a line that opens one, no other opening line, the line that closes it.
_TABLE = re.compile(r"^[ \t]*\{\|(?:(?!^[ \t]*\{\|).)*?^[ \t]*\|\}[^\n]*", re.MULTILINE | re.DOTALL)
_GALLERY = re.compile(r"<gallery\b.*?</gallery\s*>", re.IGNORECASE | re.DOTALL)
_PICTURE = re.compile(r"[ \t]*\[\[[ \t]*(?:file|image)[ \t]*:", re.IGNORECASE)
_LINK_BRACKETS = re.compile(r"\[\[|\]\]")
_HEADING = re.compile(r"^(={1,6})\s*(.*?)\s*\1$")
_QUOTES = re.compile(r"'{2,}")
_MAGIC = re.compile(r"__[A-Z]+__")
_EMPTY_PARENS = re.compile(r"\(\s*[,;:]?\s*\)")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([,.;:!?)])")
_SPACES = re.compile(r"[ \t\u00a0\u2009\u200b]+")
_WORD_CHAR = re.compile(r"\w")

# Sections that list sources or links rather than say something.
END_SECTIONS = frozenset(
    {
        "see also",
        "references",
        "notes",
        "footnotes",
        "notes and references",
        "references and notes",
        "citations",
        "sources",
        "bibliography",
        "further reading",
        "external links",
        "works cited",
        "primary sources",
        "secondary sources",
    }
)


def _wikicorpus() -> ModuleType:
    """gensim's ``wikicorpus`` module, imported on first use (gensim is an optional dependency)."""
    try:
        from gensim.corpora import wikicorpus
    except ImportError as exc:
        raise SourceError(f"parsing the Wikipedia dump needs gensim, from the project's hf extra ({exc})") from exc
    return wikicorpus


def _drop_leading_pictures(line: str) -> str:
    """``line`` without the pictures (``[[File:...]]``, captions and their links included) it starts with.

    A picture that does not close on its line, or holds an unclosed template, is left to gensim's filter.
    """
    while _PICTURE.match(line):
        depth = 0
        for bracket in _LINK_BRACKETS.finditer(line):
            depth += 1 if bracket.group() == "[[" else -1
            if depth == 0:
                break
        picture = line[: bracket.end()]
        if depth or picture.count("{{") != picture.count("}}"):
            return line
        line = line[bracket.end() :]
    return line


def prepare(wikitext: str) -> str:
    """What gensim's filter cannot undo, done before it: tables, galleries and the pictures that start a
    line are dropped. The filter keeps each table cell and gallery entry as a line of its own, and a
    picture's caption as text that joins the paragraph beside it. Tables are dropped innermost first;
    an unclosed one is left to the filter, and so is a picture inside a paragraph."""
    text = _GALLERY.sub("", wikitext.replace("\r\n", "\n"))
    while (dropped := _TABLE.sub("", text)) != text:
        text = dropped
    return "\n".join(map(_drop_leading_pictures, text.split("\n")))


def _tidy(line: str) -> str:
    """One line without bold/italic quote marks and magic words, its spaces collapsed and the gaps
    removed templates leave ("()", " ,") closed."""
    line = _MAGIC.sub("", _QUOTES.sub("", line))
    line = _EMPTY_PARENS.sub("", line)
    line = _SPACES.sub(" ", line)
    line = _SPACE_BEFORE_PUNCT.sub(r"\1", line)
    return line.replace("( ", "(").strip()


def prose_lines(filtered: str) -> list[str]:
    """The paragraphs and list items of gensim-filtered wikitext, one per line, list markers dropped.

    As in MediaWiki, consecutive lines of text are one paragraph, a blank line ends it, and each
    list item (a line that starts with ``*``, ``#``, ``:`` or ``;``) is a line of its own. Headings
    are dropped, and so is every section (subsections included) whose heading is in ``END_SECTIONS``;
    lines without a letter or digit are dropped.
    """
    out: list[str] = []
    paragraph: list[str] = []
    skip_level = 0  # inside an end section of this heading level; 0: not inside one
    for raw in [*filtered.split("\n"), ""]:
        line = raw.strip()
        heading = _HEADING.match(line)
        if heading or not line or line[0] in "*#:;":
            out.append(" ".join(paragraph))
            paragraph.clear()
        if heading:
            level = len(heading.group(1))
            if not skip_level or level <= skip_level:
                skip_level = level if _tidy(heading.group(2)).strip(" :").lower() in END_SECTIONS else 0
        elif skip_level or not line:
            continue
        elif line[0] in "*#:;":
            out.append(line.lstrip("*#:;"))
        else:
            paragraph.append(line)
    return [line for line in map(_tidy, out) if _WORD_CHAR.search(line)]


def wikitext_to_text(wikitext: str) -> str:
    """The plain prose of an article's wikitext: paragraphs one per line (see the module docstring).

    ``prose_lines(filter_wiki(prepare(wikitext)))``, with gensim's ``filter_wiki``.
    """
    return "\n".join(prose_lines(_wikicorpus().filter_wiki(prepare(wikitext))))


# --- the XML dump ----------------------------------------------------------------------------


def iter_pages(stream: BinaryIO) -> Iterator[tuple[str, str, bool, str]]:
    """``(title, namespace, is_redirect, wikitext)`` of each page of a MediaWiki XML dump, read by gensim's
    ``extract_pages`` (a redirect has a ``<redirect>`` element or wikitext that starts ``#REDIRECT``)."""
    page: dict[str, object] = {}

    def look(element: ElementTree.Element, namespace: str, **_: object) -> bool:  # extract_pages' filter hook
        page["ns"] = (element.findtext(f"./{{{namespace}}}ns") or "").strip()
        page["redirect"] = element.find(f"./{{{namespace}}}redirect") is not None
        return True

    for title, wikitext, _ in _wikicorpus().extract_pages(stream, False, look):
        redirect = bool(page["redirect"]) or wikitext.lstrip()[:9].upper() == "#REDIRECT"
        yield (title or "").strip(), str(page["ns"]), redirect, wikitext


def articles_from_dump(stream: BinaryIO, name: str = "dump") -> list[Article]:
    """The non-empty articles (namespace 0, not redirects) of a bzip2-compressed XML dump, as plain text."""
    _wikicorpus()  # gensim's absence is named as such, not as an unreadable dump
    articles = []
    try:
        with bz2.open(stream, "rb") as xml:
            pages = [(title, text) for title, ns, redirect, text in iter_pages(xml) if ns == "0" and not redirect]
    except (OSError, EOFError, ElementTree.ParseError, ValueError) as exc:  # bz2: OSError; gensim: ValueError
        raise SourceError(f"{name}: not a readable bzip2-compressed XML dump ({exc})") from exc
    for title, wikitext in pages:
        text = wikitext_to_text(wikitext)
        if text:
            articles.append(Article(title, text))
    if not articles:
        raise SourceError(f"{name}: holds no articles (namespace 0 pages that are not redirects)")
    return articles


def write_articles(articles: list[Article], path: Path) -> None:
    """Write articles as JSON lines (UTF-8, one ``{"title", "text"}`` object a line)."""
    lines = [json.dumps({"title": a.title, "text": a.text}, ensure_ascii=False) for a in articles]
    Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")


def read_articles(path: Path) -> list[Article]:
    """Read a file written by ``write_articles``; ``DataFormatError`` names the first bad line."""
    path = Path(path)
    lines = read_utf8_lines(path)
    articles = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataFormatError(f"{path} line {number}: not JSON ({exc})") from exc
        if not isinstance(row, dict) or not isinstance(row.get("title"), str) or not isinstance(row.get("text"), str):
            raise DataFormatError(f'{path} line {number}: expected an object {{"title": str, "text": str}}')
        articles.append(Article(row["title"], row["text"]))
    return articles


# --- splits --------------------------------------------------------------------------------


def split_of(index: int) -> str:
    """The split of the article at position ``index`` (from 0) in the file."""
    return "valid" if index % 20 == 0 else "test" if index % 20 == 1 else "train"


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")


def split_articles(articles: list[Article], split: str) -> list[Article]:
    """The articles of one split ("train", "valid", "test" or "all"), in file order."""
    _check_split(split)
    return list(articles) if split == "all" else [a for i, a in enumerate(articles) if split_of(i) == split]


# --- sources -------------------------------------------------------------------------------


def gensim_folders() -> list[Path]:
    """The folders of the installed gensim package, found without importing it; ``[]`` if it is not installed."""
    try:
        spec = importlib.util.find_spec("gensim")
    except (ImportError, ValueError):
        return []
    if spec is None or not spec.submodule_search_locations:
        return []
    return [Path(folder) for folder in spec.submodule_search_locations]


def installed_dump() -> Path | None:
    """The dump inside the installed gensim package, if gensim is installed with its test data."""
    for folder in gensim_folders():
        dump = folder / "test" / "test_data" / DUMP_NAME
        if dump.is_file():
            return dump
    return None


def _stage(dump: Path, staging: Path) -> int:
    with open(dump, "rb") as stream:
        articles = articles_from_dump(stream, dump.name)
    write_articles(articles, staging / ARTICLES_FILE)
    return len(articles)


def _from_installed(staging: Path) -> dict[str, str]:
    if not gensim_folders():
        raise SourceError("the gensim package is not installed (it comes with the project's hf extra)")
    dump = installed_dump()
    if dump is None:
        raise SourceError(f"the installed gensim package has no {DUMP_MEMBER} (its test data was left out)")
    digest = check_digest(dump, DUMP_SHA256)
    count = _stage(dump, staging)
    return {"from": str(dump), "dump_sha256": digest, "articles": str(count)}


def _from_pypi(staging: Path) -> dict[str, str]:
    _wikicorpus()  # the dump is parsed with gensim: check it is there before downloading its wheel
    with tempfile.TemporaryDirectory() as tmp:
        wheel = pip_download(REQUIREMENT, Path(tmp) / "download")
        if wheel.suffix != ".whl":
            raise SourceError(f"pip download {REQUIREMENT} gave {wheel.name}, not a wheel for this platform")
        dump = Path(tmp) / DUMP_NAME
        try:
            with zipfile.ZipFile(wheel) as zf, zf.open(DUMP_MEMBER) as src, open(dump, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        except (zipfile.BadZipFile, KeyError, OSError) as exc:
            raise SourceError(f"{wheel.name}: cannot read {DUMP_MEMBER} ({exc})") from exc
        digest = check_digest(dump, DUMP_SHA256)
        count = _stage(dump, staging)
    return {"archive": wheel.name, "dump_sha256": digest, "articles": str(count)}


def verify(folder: Path) -> None:
    """The JSON lines must parse, hold at least ``MIN_ARTICLES`` articles, and no empty text."""
    path = folder / ARTICLES_FILE
    articles = read_articles(path)
    if len(articles) < MIN_ARTICLES:
        raise DataFormatError(f"{path}: holds {len(articles)} articles, expected at least {MIN_ARTICLES}")
    empty = [a.title for a in articles if not a.text.strip()]
    if empty:
        raise DataFormatError(f"{path}: empty text for {len(empty)} articles, e.g. {empty[0]!r}")


# --- loading -------------------------------------------------------------------------------


def load_wiki_articles(split: str = "train", download: bool = False) -> list[Article]:
    """The articles (title and text) of one split; see ``load_wiki_extract``."""
    _check_split(split)
    if download:
        fetch(NAME)
    return split_articles(read_articles(require(NAME) / ARTICLES_FILE), split)


def load_wiki_extract(split: str = "train", download: bool = False) -> list[str]:
    """The texts of the articles of one split ("train", "valid", "test" or "all"), in file order.

    Each text is cased prose, one paragraph a line. Without ``download`` a missing data set
    raises ``MissingDataError``; with it, it is fetched.
    """
    return [a.text for a in load_wiki_articles(split, download)]


DATASET = register(
    Dataset(
        name=NAME,
        description="English Wikipedia extract, 106 articles, ~433 k words of cased prose, for masked LM "
        "(gensim's test data)",
        files=(ARTICLES_FILE,),
        sources=(
            Source("installed gensim package (its test data)", _from_installed),
            Source(f"PyPI wheel {REQUIREMENT} (pip download)", _from_pypi),
        ),
        verify=verify,
        loader=load_wiki_extract,
        format=FORMAT,
        needs=f"Fetching needs the gensim package installed (the project's hf extra): the dump is taken from "
        f"its test data and parsed with it; if its test data was left out, `python -m pip download --no-deps "
        f"{REQUIREMENT}` gets the dump from the wheel (about 28 MB, never installed; only the text is kept).",
    )
)
