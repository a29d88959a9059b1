"""The wiki-extract data set: gensim's wikitext filter plus our pass on small wikitext samples (headings,
source sections, links, templates, tables, paragraphs), the split rule, the format check of the cache, and
the real fetch from the dump inside the installed gensim package (never the network)."""

from __future__ import annotations

import bz2
import dataclasses
import hashlib
import importlib.util
import io
import json
import shutil
import sys
from pathlib import Path
from xml.sax.saxutils import escape

import pytest

import data_files
from revbits.cli import main
from revbits.data import FetchError, MissingDataError, Source, SourceError, cache, load_wiki_extract, registry, wiki
from revbits.data.errors import DataFormatError

# gensim is an optional dependency (the hf extra): parsing needs it, loading a cached extract does not.
needs_gensim = pytest.mark.skipif(importlib.util.find_spec("gensim") is None, reason="gensim is not installed")


cache_dir = data_files.cache_dir  # the cache fixture (autouse): every networked or system source off


# --- wikitext samples ----------------------------------------------------------------------

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
The word comes from [[Greek language|Greek]]&nbsp;''anarchia'' ({{lang-grc|ἀναρχία}}).<ref>Quoted source.</ref>
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
    "Anarchy is a philosophy that rejects the state. It spread along rivers for, so to speak.\n"  # no "5 mi"
    "The word comes from Greek anarchia.\n"
    "First item with bold italics\n"
    "Second item, see the site"
)

PAGES = [
    ("Anarchy", "0", False, ANARCHY),
    ("Anarchist", "0", True, "#REDIRECT [[Anarchy]] {{R from related word}}"),
    ("Wikipedia:About", "4", False, "'''Wikipedia''' is an [[encyclopedia]]."),
    ("Albedo", "0", False, "{{Other uses}}\n'''Albedo''' is the ''whiteness'' of a surface.\n\nIt is a [[ratio]]."),
    ("Redirected", "0", True, "Only the redirect element says that this page is a redirect."),
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


@needs_gensim
def test_the_parser_keeps_articles_and_strips_the_markup():
    articles = wiki.articles_from_dump(io.BytesIO(bz2.compress(dump_xml(PAGES))), "tiny.xml.bz2")
    assert [a.title for a in articles] == ["Anarchy", "Albedo"]  # redirects (either kind) and ns 4 are skipped
    anarchy, albedo = articles
    assert anarchy.text == ANARCHY_TEXT
    assert albedo.text == "Albedo is the whiteness of a surface.\nIt is a ratio."
    for marks in ("'''", "''", "[[", "{{", "<ref", "|", "==", "&nbsp;", "\xa0"):
        assert marks not in anarchy.text
    for gone in ("Proudhon", "Political ideologies", "Anarchie", "caption", "5 mi", "Quoted source", "ἀναρχία"):
        assert gone not in anarchy.text  # table, category, interlanguage link, picture, templates, reference


@needs_gensim
def test_iter_pages_gives_each_page_with_its_namespace_and_redirect_flag():
    pages = list(wiki.iter_pages(io.BytesIO(dump_xml(PAGES))))
    assert [(title, ns, redirect) for title, ns, redirect, _ in pages] == [
        (title, ns, redirect) for title, ns, redirect, _ in PAGES
    ]
    assert pages[3][3] == PAGES[3][3]  # the wikitext, unescaped


SECTIONS = """Lead paragraph, written
over two lines.

== History ==
History paragraph.
=== Early years ===
Early paragraph.
== See also ==
* [[Other article]]
=== Lists ===
* [[List of things]]
==References==
{{reflist}}
== Legacy ==
Legacy paragraph.
===Further reading===
* Smith, ''A Book'' (1999)
== Later ==
Back in prose.
== External links ==
* [http://example.org Official site]
"""


@needs_gensim
def test_headings_and_the_sections_of_sources_and_links_are_dropped():
    # An end section lasts to the next heading of its level or above; its subsections go with it.
    assert wiki.wikitext_to_text(SECTIONS).splitlines() == [
        "Lead paragraph, written over two lines.",
        "History paragraph.",
        "Early paragraph.",
        "Legacy paragraph.",
        "Back in prose.",
    ]
    assert wiki.wikitext_to_text("== Notes: ==\nA note.\n== Body ==\nText.") == "Text."  # ":" ignored


@needs_gensim
def test_links_keep_their_labels_and_templates_tables_and_pictures_go():
    wikitext = (
        "The [[Paris|capital]] lies on [[Seine]]s and [[Loire|the Loire]].{{citation needed|date=2016}}\n\n"
        "{{Infobox river\n| name = {{lang|fr|Seine}}\n| length = {{convert|777|km}}\n}}\n"
        "{|\n| outer\n{|\n| inner cell\n|}\n| outer again\n|}\n"
        "<gallery>\nFile:One.jpg|A gallery picture\n</gallery>\n"
        "[[Image:Map.png|thumb|right|A map of [[France]]]]\n"
        "A second paragraph with <math>x^2</math> maths and a comment<!-- hidden -->.\n"
        "[[Category:Rivers]]\n[[fr:Seine]]"
    )
    assert wiki.wikitext_to_text(wikitext).splitlines() == [
        "The capital lies on Seines and the Loire.",
        "A second paragraph with maths and a comment.",
    ]


@needs_gensim
def test_a_picture_that_starts_a_line_goes_whole_and_the_text_after_it_stays():
    wikitext = (
        "First paragraph.\n"
        "[[File:A.jpg|thumb|A [[flag]] with [[File:B.png|20px]] in it]]\n"  # a paragraph break, as in MediaWiki
        "Second paragraph.\n\n"
        "[[File:C.jpg|thumb|Caption]][[Image:D.png|Another]]Third paragraph, ending in a [[link]].\n\n"
        "[[File:E.jpg|thumb|A caption with a note<ref>{{cite web | publisher=[[Museum]]\n| url=http://x.org\n"
        "| title=Note}}</ref> and [[text]]]] Fourth paragraph."
    )
    lines = wiki.wikitext_to_text(wikitext).splitlines()
    assert lines[:3] == ["First paragraph.", "Second paragraph.", "Third paragraph, ending in a link."]
    # a picture that does not close on its line is gensim's: it keeps the caption, and the template goes
    assert len(lines) == 4 and lines[3].endswith("Fourth paragraph.") and "{" not in lines[3] and "=" not in lines[3]


@needs_gensim
def test_paragraphs_and_list_items_are_one_line_each():
    wikitext = "First line\nof one paragraph.\n\nSecond paragraph.\n* item one\n# item two\n: indented\n;term\nEnd."
    assert wiki.wikitext_to_text(wikitext).splitlines() == [
        "First line of one paragraph.",
        "Second paragraph.",
        "item one",
        "item two",
        "indented",
        "term",
        "End.",
    ]
    assert wiki.wikitext_to_text("{{Only a template}}\n\n* \n----\n") == ""  # nothing with a letter: nothing


def test_without_gensim_parsing_names_the_hf_extra_and_loading_still_works(monkeypatch, cache_dir):
    articles = write_fake_cache(cache_dir, 25)
    monkeypatch.setitem(sys.modules, "gensim", None)  # `import gensim` now raises ImportError
    monkeypatch.setitem(sys.modules, "gensim.corpora", None)
    with pytest.raises(SourceError, match="^parsing the Wikipedia dump needs gensim, from the project's hf extra"):
        wiki.wikitext_to_text("'''Text'''")
    with pytest.raises(SourceError, match="needs gensim"):
        wiki.articles_from_dump(io.BytesIO(bz2.compress(dump_xml(PAGES))), "tiny.xml.bz2")
    assert load_wiki_extract("all") == [a.text for a in articles]  # the cached extract needs no gensim


@needs_gensim
def test_a_corrupt_dump_is_refused_with_its_name():
    data = bz2.compress(dump_xml(PAGES))
    with pytest.raises(SourceError, match=r"cut\.xml\.bz2: not a readable bzip2-compressed XML dump"):
        wiki.articles_from_dump(io.BytesIO(data[: len(data) // 2]), "cut.xml.bz2")
    with pytest.raises(SourceError, match="not a readable"):
        wiki.articles_from_dump(io.BytesIO(bz2.compress(b"<mediawiki><page>")), "unclosed.xml.bz2")
    with pytest.raises(SourceError, match=r"other\.xml\.bz2: not a readable .*not recognized as MediaWiki"):
        wiki.articles_from_dump(io.BytesIO(bz2.compress(b"<html><page/></html>")), "other.xml.bz2")
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


def test_a_cache_made_by_another_filter_is_refused_by_loaders_and_made_again_by_fetch(monkeypatch, cache_dir, capsys):
    made = []

    def source(staging: Path) -> dict[str, str]:  # stands for the dump: MIN_ARTICLES articles
        made.append(staging)
        wiki.write_articles([wiki.Article(f"T{i}", f"New text {i}.") for i in range(wiki.MIN_ARTICLES)],
                            staging / wiki.ARTICLES_FILE)
        return {"articles": str(wiki.MIN_ARTICLES)}

    fake = dataclasses.replace(wiki.DATASET, sources=(Source("fake dump", source),))
    monkeypatch.setitem(registry._REGISTRY, wiki.NAME, fake)
    old = write_fake_cache(cache_dir, wiki.MIN_ARTICLES)  # the files of the earlier filter, whole...
    folder = cache_dir / wiki.NAME
    cache.write_manifest(wiki.NAME, "installed gensim package (its test data)", {wiki.ARTICLES_FILE: folder /
                         wiki.ARTICLES_FILE}, {"articles": "50"})  # ...with a manifest that records no format
    assert cache.check_files(wiki.NAME, fake.files) == []  # no file is damaged: only the format tells
    with pytest.raises(DataFormatError) as info:
        load_wiki_extract("all")
    assert str(info.value) == (
        f"data set 'wiki-extract': its files were made by format (none recorded), this revbits makes {wiki.FORMAT!r}; "
        "fetch it again with: revbits data fetch wiki-extract --force"
    )
    assert registry.verify(wiki.NAME)[0].startswith("its files were made by format (none recorded)")
    assert registry.describe(wiki.NAME)["damaged"].startswith("its files were made by format")
    assert registry.describe(wiki.NAME)["out_of_date"] is True
    capsys.readouterr()
    assert main(["data", "list"]) == 0
    assert "  cached   OUT OF DATE: its files were made by format (none recorded)" in capsys.readouterr().out

    heard: list[str] = []
    registry.fetch(wiki.NAME, log=heard.append)  # no --force needed: an outdated copy is made again
    assert len(made) == 1 and "outdated or damaged (its files were made by format" in heard[0]
    assert cache.read_manifest(wiki.NAME)["notes"]["format"] == wiki.FORMAT
    assert load_wiki_extract("all")[0] == "New text 0." != old[0].text
    registry.fetch(wiki.NAME)  # now current: nothing is fetched
    assert len(made) == 1 and registry.verify(wiki.NAME) == [] and registry.describe(wiki.NAME)["out_of_date"] is False


@pytest.mark.slow
def test_the_real_fetch_from_the_installed_gensim(cache_dir):
    if wiki.installed_dump() is None:
        pytest.skip("gensim (with its test data) is not installed")
    folder = registry.fetch(wiki.NAME)
    assert sorted(p.name for p in folder.iterdir()) == ["articles.jsonl", "manifest.json"]
    manifest = cache.read_manifest(wiki.NAME)
    assert manifest["source"] == "installed gensim package (its test data)"
    assert manifest["notes"]["dump_sha256"] == wiki.DUMP_SHA256 and manifest["notes"]["articles"] == "106"
    assert manifest["notes"]["format"] == wiki.FORMAT

    articles = wiki.load_wiki_articles("all")
    titles = [a.title for a in articles]
    assert len(articles) == 106 and len(set(titles)) == 106
    assert titles[:3] == ["Anarchism", "Autism", "Albedo"] and "Abraham Lincoln" in titles
    assert "AccessibleComputing" not in titles  # the first page of the dump is a redirect
    splits = {s: [a.title for a in wiki.load_wiki_articles(s)] for s in ("train", "valid", "test")}
    assert {s: len(t) for s, t in splits.items()} == {"train": 94, "valid": 6, "test": 6}
    assert sorted(sum(splits.values(), [])) == sorted(titles)  # disjoint, and cover everything
    # the splits of the module docstring, the same under the earlier filter (the articles did not change)
    valid = ["Anarchism", "Anthropology", "Ada", "Alkali metal", "Demographics of Angola", "Agnostida"]
    test = ["Autism", "Agricultural science", "Aberdeen (disambiguation)", "Alphabet", "Politics of Angola", "Abortion"]
    assert splits["valid"] == valid and splits["test"] == test
    texts = {s: load_wiki_extract(s) for s in ("train", "valid", "test", "all")}
    assert sorted(texts["train"] + texts["valid"] + texts["test"]) == sorted(texts["all"])

    anarchism = texts["valid"][0]
    assert anarchism.startswith("Anarchism is a political philosophy that advocates self-governed societies")
    assert "Anarcho-capitalism" in anarchism  # a link's label, kept
    assert "People Without Government" not in anarchism  # an item of its Further reading
    alabama = dict(zip(titles, texts["all"]))["Alabama"]
    for gone in ("Etymology", "Outline of Alabama", "Alabama in the Twentieth Century", "TourAlabama.org"):
        assert gone not in alabama  # a heading, See also, Further reading and External links items
    assert "Racial composition" not in alabama and "73.6%" not in alabama  # a table
    words = sum(len(t.split()) for t in texts["all"])
    assert 400_000 < words < 500_000
    for text in texts["all"]:
        assert text and text == text.strip() and "\n\n" not in text
        for marks in ("'''", "[[", "]]", "{{", "}}", "<ref", "&nbsp;", "==", "thumb|", "Category:"):
            assert marks not in text, marks
        for line in text.splitlines():
            assert line == line.strip() and not line.startswith(("*", "#")), line  # no list markers

    shutil.rmtree(folder)  # and the loader can fetch it again by itself, the same
    assert load_wiki_extract("test", download=True) == texts["test"]
    assert json.loads((folder / "articles.jsonl").read_text(encoding="utf-8").splitlines()[0])["title"] == "Anarchism"
