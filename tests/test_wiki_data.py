"""The wiki-extract data set: the wikitext filter and the split rule on hand-made inputs, and the
real fetch from the dump inside the installed gensim package (never the network)."""

from __future__ import annotations

import bz2
import hashlib
import io
import json
import shutil
import sys
from pathlib import Path
from xml.sax.saxutils import escape

import pytest

from revbits.data import FetchError, MissingDataError, SourceError, cache, load_wiki_extract, registry, wiki
from revbits.data.errors import DataFormatError


def _offline(*args, **kwargs):
    raise SourceError("network disabled in the tests")


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch) -> Path:
    """An empty cache, and the PyPI source switched off."""
    root = tmp_path / "cache"
    monkeypatch.setenv("REVBITS_DATA", str(root))
    monkeypatch.setattr(wiki, "pip_download", _offline)
    return root


# --- a hand-made dump ------------------------------------------------------------------------

ANARCHY = """{{Use dmy dates|date=May 2016}}
{{Infobox thing
| name = Anarchy
| image = [[File:A.svg|20px]]
}}
'''Anarchy''' is a [[political philosophy|philosophy]] that rejects [[State (polity)|the state]].<ref name="a" />
It spread along [[river]]s<ref>{{cite web |url=http://example.org |title=Ref}}</ref> for {{convert|5|mi|km}},
''so to speak''.<!-- a hidden
comment -->
[[File:Black flag.svg|thumb|A [[flag]] caption]]

== History ==
The word comes from [[Greek language|Greek]]&amp;nbsp;''anarchia'' ({{lang-grc|ἀναρχία}}).<ref>Quoted source.</ref>
{| class="wikitable"
|-
! Year !! Event
|-
| 1840 || Proudhon
|}
* First item with '''''bold italics'''''
* Second item, see [http://example.org the site]

== See also ==
* [[Anarchism]]

== References ==
{{reflist}}

[[Category:Political ideologies]]
[[de:Anarchie]]
"""

ANARCHY_TEXT = (
    "Anarchy is a philosophy that rejects the state. It spread along rivers for 5 mi, so to speak.\n"
    "The word comes from Greek anarchia (ἀναρχία).\n"
    "First item with bold italics\n"
    "Second item, see the site"
)

PAGES = [
    ("Anarchy", "0", False, ANARCHY),
    ("Anarchist", "0", True, "#REDIRECT [[Anarchy]] {{R from related word}}"),
    ("Wikipedia:About", "4", False, "'''Wikipedia''' is an [[encyclopedia]]."),
    ("Albedo", "0", False, "{{Other uses}}\n'''Albedo''' is the ''whiteness'' of a surface.\n\nIt is a [[ratio]]."),
]


def dump_xml(pages: list[tuple[str, str, bool, str]]) -> bytes:
    """A MediaWiki export (schema 0.10, with its XML namespace) holding ``pages``."""
    parts = ['<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/" version="0.10" xml:lang="en">']
    parts.append("<siteinfo><sitename>Wikipedia</sitename></siteinfo>")
    for number, (title, ns, redirect, text) in enumerate(pages, start=1):
        parts.append(f"<page><title>{escape(title)}</title><ns>{ns}</ns><id>{number}</id>")
        if redirect:
            parts.append('<redirect title="Anarchy" />')
        parts.append(f'<revision><id>{100 + number}</id><text xml:space="preserve">{escape(text)}</text></revision>')
        parts.append("</page>")
    parts.append("</mediawiki>")
    return "\n".join(parts).encode("utf-8")


def test_the_parser_keeps_articles_and_strips_the_markup():
    articles = wiki.articles_from_dump(io.BytesIO(bz2.compress(dump_xml(PAGES))), "tiny.xml.bz2")
    assert [a.title for a in articles] == ["Anarchy", "Albedo"]  # the redirect and the ns 4 page are skipped
    anarchy, albedo = articles
    assert anarchy.text == ANARCHY_TEXT
    assert albedo.text == "Albedo is the whiteness of a surface.\nIt is a ratio."
    for marks in ("'''", "''", "[[", "{{", "<ref", "|", "=="):
        assert marks not in anarchy.text
    assert "Proudhon" not in anarchy.text and "Political ideologies" not in anarchy.text  # table, category


def test_a_corrupt_dump_is_refused_with_its_name():
    data = bz2.compress(dump_xml(PAGES))
    with pytest.raises(SourceError, match=r"cut\.xml\.bz2: not a readable bzip2-compressed XML dump"):
        wiki.articles_from_dump(io.BytesIO(data[: len(data) // 2]), "cut.xml.bz2")
    with pytest.raises(SourceError, match="not a readable"):
        wiki.articles_from_dump(io.BytesIO(bz2.compress(b"<mediawiki><page>")), "unclosed.xml.bz2")
    with pytest.raises(SourceError, match="holds no articles"):
        wiki.articles_from_dump(io.BytesIO(bz2.compress(dump_xml(PAGES[1:3]))), "redirects.xml.bz2")


# --- the cache, the split rule, the loader ---------------------------------------------------


def write_fake_cache(cache_dir: Path, count: int) -> list[wiki.Article]:
    articles = [wiki.Article(f"Title {i}", f"Text of article {i}.\nIts second paragraph.") for i in range(count)]
    folder = cache_dir / wiki.NAME
    folder.mkdir(parents=True)
    wiki.write_articles(articles, folder / wiki.ARTICLES_FILE)
    return articles


def test_the_split_rule_on_a_fake_cache(cache_dir):
    articles = write_fake_cache(cache_dir, 45)
    texts = [a.text for a in articles]
    assert load_wiki_extract("valid") == [texts[0], texts[20], texts[40]]
    assert load_wiki_extract("test") == [texts[1], texts[21], texts[41]]
    train = load_wiki_extract()  # "train" is the default
    assert train == [t for i, t in enumerate(texts) if i % 20 not in (0, 1)] and len(train) == 39
    assert load_wiki_extract("all") == texts
    assert [a.title for a in wiki.load_wiki_articles("test")] == ["Title 1", "Title 21", "Title 41"]
    assert registry.load(wiki.NAME, "valid") == load_wiki_extract("valid")


def test_a_bad_split_name_lists_the_choices(cache_dir):
    for bad in ("validation", "Train", ""):
        with pytest.raises(ValueError, match=r"split must be one of \['train', 'valid', 'test', 'all'\]"):
            load_wiki_extract(bad)  # refused before the cache is even looked at
    write_fake_cache(cache_dir, 3)
    with pytest.raises(ValueError, match="'dev'"):
        load_wiki_extract("dev")


def test_missing_data_says_how_to_get_it():
    with pytest.raises(MissingDataError) as info:
        load_wiki_extract()
    message = str(info.value)
    assert "revbits data fetch wiki-extract" in message and "gensim==4.4.0" in message


def test_verify_refuses_bad_caches(tmp_path):
    path = tmp_path / wiki.ARTICLES_FILE
    good = [wiki.Article(f"T{i}", "some text") for i in range(wiki.MIN_ARTICLES)]
    wiki.write_articles(good, path)
    wiki.verify(tmp_path)
    wiki.write_articles(good[:-1], path)
    with pytest.raises(DataFormatError, match="holds 49 articles, expected at least 50"):
        wiki.verify(tmp_path)
    wiki.write_articles([*good[1:], wiki.Article("Blank", " \n")], path)
    with pytest.raises(DataFormatError, match="empty text .* 'Blank'"):
        wiki.verify(tmp_path)
    path.write_text(path.read_text(encoding="utf-8") + '{"title": "no text"}\n', encoding="utf-8")
    with pytest.raises(DataFormatError, match=f"line {wiki.MIN_ARTICLES + 1}: expected an object"):
        wiki.verify(tmp_path)
    path.write_text('{"title": "T", "text": "x"}\nnot json\n', encoding="utf-8")
    with pytest.raises(DataFormatError, match="line 2: not JSON"):
        wiki.verify(tmp_path)


# --- the sources -----------------------------------------------------------------------------


def test_without_gensim_the_fetch_fails_naming_the_cause(monkeypatch, cache_dir):
    monkeypatch.setattr(wiki, "gensim_folders", lambda: [])
    with pytest.raises(FetchError) as info:
        registry.fetch(wiki.NAME)
    message = str(info.value)
    assert "installed gensim package (its test data): the gensim package is not installed" in message
    assert "network disabled" in message and not registry.is_cached(wiki.NAME)


def test_a_corrupted_copy_is_rejected_by_its_sha256(tmp_path, monkeypatch):
    real = wiki.installed_dump()
    if real is None:
        pytest.skip("gensim (with its test data) is not installed")
    fake_gensim = tmp_path / "site-packages" / "gensim"
    dump = fake_gensim / "test" / "test_data" / wiki.DUMP_NAME
    dump.parent.mkdir(parents=True)
    data = bytearray(real.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    dump.write_bytes(bytes(data))
    monkeypatch.setattr(wiki, "gensim_folders", lambda: [fake_gensim])
    with pytest.raises(FetchError) as info:
        registry.fetch(wiki.NAME)
    message = str(info.value)
    assert f"{wiki.DUMP_NAME}: sha256 is {hashlib.sha256(data).hexdigest()}, expected {wiki.DUMP_SHA256}" in message
    assert "corrupt or a different release" in message and not registry.is_cached(wiki.NAME)

    dump.unlink()  # gensim without its test data
    with pytest.raises(FetchError, match="has no gensim/test/test_data/enwiki"):
        registry.fetch(wiki.NAME)


def test_the_real_fetch_from_the_installed_gensim(cache_dir):
    if wiki.installed_dump() is None:
        pytest.skip("gensim (with its test data) is not installed")
    gensim_was_imported = "gensim" in sys.modules
    folder = registry.fetch(wiki.NAME)
    if not gensim_was_imported:
        assert "gensim" not in sys.modules  # found, not imported
    assert sorted(p.name for p in folder.iterdir()) == ["articles.jsonl", "manifest.json"]
    manifest = cache.read_manifest(wiki.NAME)
    assert manifest["source"] == "installed gensim package (its test data)"
    assert manifest["notes"]["dump_sha256"] == wiki.DUMP_SHA256 and manifest["notes"]["articles"] == "106"

    articles = wiki.load_wiki_articles("all")
    titles = [a.title for a in articles]
    assert len(articles) == 106 and len(set(titles)) == 106
    assert titles[:3] == ["Anarchism", "Autism", "Albedo"] and "Abraham Lincoln" in titles
    assert "AccessibleComputing" not in titles  # the first page of the dump is a redirect
    splits = {s: [a.title for a in wiki.load_wiki_articles(s)] for s in ("train", "valid", "test")}
    assert {s: len(t) for s, t in splits.items()} == {"train": 94, "valid": 6, "test": 6}
    assert sorted(sum(splits.values(), [])) == sorted(titles)  # disjoint, and cover everything
    assert splits["valid"][0] == "Anarchism" and splits["test"][0] == "Autism"
    texts = {s: load_wiki_extract(s) for s in ("train", "valid", "test", "all")}
    assert sorted(texts["train"] + texts["valid"] + texts["test"]) == sorted(texts["all"])

    anarchism = texts["valid"][0]
    assert anarchism.startswith("Anarchism is a political philosophy that advocates self-governed societies")
    words = sum(len(t.split()) for t in texts["all"])
    assert 400_000 < words < 500_000
    for text in texts["all"]:
        assert text and text == text.strip() and "\n\n" not in text
        for marks in ("'''", "[[", "]]", "{{", "}}", "<ref", "&nbsp;", "==", "thumb|"):
            assert marks not in text, marks

    shutil.rmtree(folder)  # and the loader can fetch it again by itself
    assert load_wiki_extract("test", download=True) == texts["test"]
    assert json.loads((folder / "articles.jsonl").read_text(encoding="utf-8").splitlines()[0])["title"] == "Anarchism"
