"""A real English Wikipedia extract, as cased prose, for masked-LM fine-tuning.

The source is a bzip2-compressed MediaWiki XML dump that ships inside the PyPI package gensim
(4.4.0) as test data: ``gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``
(1.7 MB, 206 pages, from the English Wikipedia dump of May 2016). It is taken from an installed
gensim if there is one (gensim is never imported), else from the gensim wheel fetched with
``pip download`` (never installed); either way its sha256 is checked.

The dump is parsed at fetch time, so loading needs neither gensim nor the dump. Kept are the
pages of namespace 0 (articles) that are not redirects: 106 of the 206 pages. Their wikitext is
turned into plain text by this module's own filter (``wikitext_to_text``): comments, references,
maths, tables, file and category links and most templates are removed; links become their
label; a few inline templates are rendered (``convert`` gives "5 mi", ``lang`` its text, ``as
of`` "As of 2010"...); bold and italic quote marks (``'''``, ``''``) are stripped; headings are
dropped, and so are the sections that are lists of sources or links (See also, References,
Notes, Further reading, External links, ...); list markers are dropped and list items kept.
Each paragraph (or list item) is one line, without blank lines between them. The articles are
cached as ``articles.jsonl``: one UTF-8 JSON object per line, ``{"title": ..., "text": ...}``,
in dump order (2.8 MB; 7,614 paragraphs and list items in all).

Splits are by article, by position in the file: article ``i`` (counting from 0) is "valid" if
``i % 20 == 0``, "test" if ``i % 20 == 1``, else "train". Measured on the real data (words are
whitespace-separated tokens of the cached text):

========  ========  =======
split     articles  words
========  ========  =======
train           94  390,176
valid            6   30,068
test             6   21,758
all            106  442,002
========  ========  =======

valid is Anarchism, Anthropology, Ada, Alkali metal, Demographics of Angola and Agnostida;
test is Autism, Agricultural science, Aberdeen (disambiguation), Alphabet, Politics of Angola
and Abortion.
"""

from __future__ import annotations

import bz2
import html
import importlib.util
import json
import re
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
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
MIN_ARTICLES = 50
SPLITS = ("train", "valid", "test", "all")


class Article(NamedTuple):
    """One article: its title and its plain text (paragraphs one per line)."""

    title: str
    text: str


# --- wikitext to plain text ------------------------------------------------------------------

# Elements whose content is not prose: dropped with their content.
_DROP_ELEMENTS = (
    "ref|math|gallery|timeline|imagemap|score|chem|ce|hiero|syntaxhighlight|source|graph|mapframe|references"
)
_COMMENT = re.compile(r"<!--.*?(?:-->|\Z)", re.DOTALL)
_SELF_CLOSING = re.compile(rf"<(?:{_DROP_ELEMENTS})\b[^<>]*/>", re.IGNORECASE)
_ELEMENT = re.compile(rf"<({_DROP_ELEMENTS})\b[^<>]*>.*?</\1\s*>", re.IGNORECASE | re.DOTALL)
_BR = re.compile(r"<br\s*/?>", re.IGNORECASE)
_TAG = re.compile(r"</?[a-zA-Z][a-zA-Z0-9]*\b[^<>]*>")
# A template with no template inside it (single braces are allowed): removed innermost first.
_TEMPLATE = re.compile(r"\{\{((?:(?!\{\{|\}\}).)*)\}\}", re.DOTALL)
# A link with no link inside it.
_LINK = re.compile(r"\[\[([^\[\]]*)\]\]([a-z]*)")
_EXTERNAL = re.compile(r"\[(?:https?:|ftp:)?//[^\s\[\]]*\s*([^\[\]]*)\]")
_DROP_LINK_PREFIX = re.compile(r"\s*(?:file|image|category|media)\s*:", re.IGNORECASE)
_DROP_LINK_START = re.compile(r"\[\[\s*(?:file|image|category|media)\s*:", re.IGNORECASE)
_INTERWIKI = re.compile(r"\s*[a-z][a-z-]*:")
_QUOTES = re.compile(r"'{2,}")
_MAGIC = re.compile(r"__[A-Z]+__")
_HEADING = re.compile(r"^(={1,6})\s*(.*?)\s*\1\s*$")
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

_RANGE_WORDS = {"-": "–", "–": "–", "to": "to", "and": "and", "by": "by", "x": "×", "or": "or", "+/-": "±"}
_UNITS = {
    "sqmi": "sq mi",
    "sqft": "sq ft",
    "e3acre": "thousand acres",
    "e6acre": "million acres",
    "e6km2": "million km2",
    "e6sqmi": "million sq mi",
    "e3km": "thousand km",
    "e6km": "million km",
}
_SIMPLE = {"'": "'", "ndash": "–", "mdash": "—", "snd": " – ", "spaced ndash": " – ", "nbsp": " ", "-": "", "•": "•"}
_FIRST_ARG = {"small", "smaller", "big", "nowrap", "nobr", "nobreak", "flag", "flagcountry", "visible anchor", "abbr"}
_FIRST_ARG.update({"nihongo", "math", "mvar", "em", "strong", "sic", "lang-en", "keypress"})


def _split_args(body: str) -> list[str]:
    """The ``|``-separated fields of a template body; a ``|`` inside a ``[[link]]`` separates nothing."""
    fields, depth, start = [], 0, 0
    i = 0
    while i < len(body):
        pair = body[i : i + 2]
        if pair == "[[":
            depth += 1
            i += 2
        elif pair == "]]" and depth:
            depth -= 1
            i += 2
        else:
            if body[i] == "|" and not depth:
                fields.append(body[start:i])
                start = i + 1
            i += 1
    fields.append(body[start:])
    return [f.strip() for f in fields]


def _is_number(s: str) -> bool:
    return bool(re.fullmatch(r"[-+−]?[\d,]*\.?\d+(?:e[-+]?\d+)?", s))


def _unit(code: str) -> str:
    return _UNITS.get(code, code)


def _render_convert(args: list[str]) -> str:
    """``{{convert|5|mi|km}}`` -> "5 mi"; ``{{convert|1|to|2|km}}`` -> "1 to 2 km"; "6 ft 4 in"."""
    if not args or not _is_number(args[0]):
        return ""
    out = args[0]
    i = 1
    while i + 1 < len(args) and args[i].lower() in _RANGE_WORDS and _is_number(args[i + 1]):
        word = _RANGE_WORDS[args[i].lower()]
        out += word + args[i + 1] if word == "–" else f" {word} {args[i + 1]}"
        i += 2
    if i < len(args) and not _is_number(args[i]):
        out += " " + _unit(args[i])
        i += 1
        # a compound quantity, e.g. 6|ft|4|in|cm: a number, a unit, and the unit to convert to after them
        if i + 2 < len(args) and _is_number(args[i]) and not _is_number(args[i + 1]):
            out += f" {args[i]} {_unit(args[i + 1])}"
    return out


def _render_template(match: re.Match) -> str:
    """The text a template shows, for a few inline templates; nothing for every other one."""
    fields = _split_args(match.group(1))
    name = fields[0].lower().replace("_", " ").strip()
    named = {k.strip().lower(): v.strip() for k, _, v in (f.partition("=") for f in fields[1:] if "=" in f)}
    args = [f for f in fields[1:] if "=" not in f]
    if name in _SIMPLE:
        return _SIMPLE[name]
    if name in ("convert", "cvt"):
        return _render_convert(args)
    if name == "lang":
        return args[1] if len(args) > 1 else ""
    if name.startswith("lang-") or name in ("transl", "transliteration"):
        return args[-1] if args else ""
    if name in _FIRST_ARG:
        return args[0] if args else ""
    if name in ("quote", "blockquote", "quotation", "cquote"):
        return named.get("text", args[0] if args else "")
    if name == "as of":
        return f"As of {args[0]}" if args else ""
    if name in ("circa", "c."):
        return f"c. {args[0]}" if args else "c."
    if name == "frac" and len(args) >= 2:
        return " ".join(args[:-2] + [f"{args[-2]}/{args[-1]}"])
    return ""


def _remove_templates(text: str) -> str:
    """Render or remove every balanced template, innermost first; stray braces are removed too."""
    while True:
        new = _TEMPLATE.sub(_render_template, text)
        if new == text:
            return new.replace("{{", "").replace("}}", "")
        text = new


def _remove_tables(text: str) -> str:
    """Drop ``{| ... |}`` tables (nested ones too). An unclosed table loses only its first line."""
    lines = text.split("\n")
    keep = []
    i = 0
    while i < len(lines):
        if not lines[i].lstrip().startswith("{|"):
            keep.append(lines[i])
            i += 1
            continue
        depth, j = 0, i
        while j < len(lines):
            stripped = lines[j].lstrip()
            if stripped.startswith("{|"):
                depth += 1
            elif stripped.startswith("|}"):
                depth -= 1
                if depth == 0:
                    break
            j += 1
        i = j + 1 if j < len(lines) else i + 1
        keep.append("")  # a table ends the paragraph before it
    return "\n".join(keep)


def _render_link(match: re.Match) -> str:
    """``[[target|label]]tail`` -> label + tail; file, category and interlanguage links -> nothing."""
    body, tail = match.group(1), match.group(2)
    if _DROP_LINK_PREFIX.match(body):
        return ""
    target, pipe, label = body.partition("|")
    if not pipe and _INTERWIKI.match(target) and not target.startswith(":"):
        return ""  # [[de:Anarchismus]]: a link to another language edition
    shown = label if pipe else target
    if pipe and not label:  # the pipe trick: [[Paris, Texas|]] shows "Paris"
        shown = re.sub(r"\s*\(.*?\)\s*$|,.*$", "", target.split(":")[-1])
    return shown.lstrip(":").strip() + tail


def _remove_file_links(text: str) -> str:
    """Drop file, image and category links whole, captions (which may hold links and brackets) included.

    An unclosed one is dropped to the end of its line.
    """
    out, pos = [], 0
    while (start := _DROP_LINK_START.search(text, pos)) is not None:
        out.append(text[pos : start.start()])
        depth, i = 0, start.start()
        while i < len(text):
            pair = text[i : i + 2]
            if pair == "[[":
                depth += 1
                i += 2
            elif pair == "]]":
                depth -= 1
                i += 2
                if depth == 0:
                    break
            else:
                i += 1
        if depth:
            end = text.find("\n", start.start())
            i = len(text) if end < 0 else end
        pos = i
    out.append(text[pos:])
    return "".join(out)


def _remove_links(text: str) -> str:
    """Replace links by what they show, innermost first; interlanguage links are dropped."""
    while True:
        new = _LINK.sub(_render_link, text)
        if new == text:
            return new
        text = new


def _tidy(line: str) -> str:
    """One paragraph with spaces collapsed and the gaps removed templates leave ("()", " ,") closed."""
    line = _EMPTY_PARENS.sub("", line)
    line = _SPACES.sub(" ", line)
    line = _SPACE_BEFORE_PUNCT.sub(r"\1", line)
    return line.replace("( ", "(").strip()


def _clean_lines(text: str) -> list[str]:
    """Paragraphs and list items, one per line: headings, end sections and table residue dropped.

    As in MediaWiki, consecutive lines of plain text are one paragraph; a blank line ends it,
    and each list item (a line that starts with ``*``, ``#``, ``:`` or ``;``) is a line of its own.
    """
    out: list[str] = []
    paragraph: list[str] = []

    def flush() -> None:
        if paragraph:
            out.append(" ".join(paragraph))
            paragraph.clear()

    skip_level = 0  # inside an end section of this heading level; 0: not inside one
    for raw in text.split("\n"):
        line = raw.strip()
        heading = _HEADING.match(line)
        if heading:
            flush()
            level = len(heading.group(1))
            if skip_level and level > skip_level:
                continue
            skip_level = level if heading.group(2).strip(" :").lower() in END_SECTIONS else 0
            continue
        if skip_level:
            continue
        if not line or line.startswith(("|", "!", "{|")):  # a blank line, or what is left of a broken table
            flush()
            continue
        if line[0] in "*#:;":
            flush()
            out.append(line.lstrip("*#:;").strip())
        else:
            paragraph.append(line)
    flush()
    return [line for line in map(_tidy, out) if _WORD_CHAR.search(line)]


def wikitext_to_text(wikitext: str) -> str:
    """The plain prose of an article's wikitext: paragraphs one per line (see the module docstring)."""
    text = wikitext.replace("\r\n", "\n")
    text = _COMMENT.sub("", text)
    text = _SELF_CLOSING.sub("", text)
    text = _ELEMENT.sub("", text)
    text = _remove_templates(text)
    text = _remove_tables(text)
    text = _remove_file_links(text)
    text = _remove_links(text)
    text = _EXTERNAL.sub(r"\1", text)
    text = _BR.sub(" ", text)
    text = _TAG.sub("", text)
    text = html.unescape(html.unescape(text))  # wikitext may hold &amp;nbsp; as well as &nbsp;
    text = _TAG.sub("", text)  # tags that were written as entities
    text = _QUOTES.sub("", text)
    text = _MAGIC.sub("", text)
    return "\n".join(_clean_lines(text))


# --- the XML dump ----------------------------------------------------------------------------


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def iter_pages(stream: BinaryIO) -> Iterator[tuple[str, str, bool, str]]:
    """``(title, namespace, is_redirect, wikitext)`` of each page of a MediaWiki XML dump."""
    for _, element in ElementTree.iterparse(stream, events=("end",)):
        if _local(element.tag) != "page":
            continue
        title, ns, redirect, wikitext = "", "", False, ""
        for child in element:
            name = _local(child.tag)
            if name == "title":
                title = (child.text or "").strip()
            elif name == "ns":
                ns = (child.text or "").strip()
            elif name == "redirect":
                redirect = True
            elif name == "revision":
                for part in child:
                    if _local(part.tag) == "text":
                        wikitext = part.text or ""
        redirect = redirect or wikitext.lstrip()[:9].upper() == "#REDIRECT"
        element.clear()
        yield title, ns, redirect, wikitext


def articles_from_dump(stream: BinaryIO, name: str = "dump") -> list[Article]:
    """The non-empty articles (namespace 0, not redirects) of a bzip2-compressed XML dump, as plain text."""
    articles = []
    try:
        with bz2.open(stream, "rb") as xml:
            for title, ns, redirect, wikitext in iter_pages(xml):
                if ns != "0" or redirect:
                    continue
                text = wikitext_to_text(wikitext)
                if text:
                    articles.append(Article(title, text))
    except (OSError, EOFError, ElementTree.ParseError) as exc:  # bz2 raises OSError for bad data
        raise SourceError(f"{name}: not a readable bzip2-compressed XML dump ({exc})") from exc
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
        description="English Wikipedia extract, 106 articles, ~442 k words of cased prose, for masked LM "
        "(gensim's test data)",
        files=(ARTICLES_FILE,),
        sources=(
            Source("installed gensim package (its test data)", _from_installed),
            Source(f"PyPI wheel {REQUIREMENT} (pip download)", _from_pypi),
        ),
        verify=verify,
        loader=load_wiki_extract,
        needs=f"Fetching needs the gensim package installed (e.g. the project's hf extra), or else pip and "
        f"access to PyPI: it runs `python -m pip download --no-deps {REQUIREMENT}` (a wheel of about 28 MB, "
        f"never installed; only the article text is kept).",
    )
)
