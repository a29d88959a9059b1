"""Two small tokenizers, each saved and loaded as JSON.

- ``CharTokenizer``: one id per character, the vocabulary being the sorted distinct characters
  of a text (nanoGPT's char-level Shakespeare).
- ``WordTokenizer``: lower-cased words and punctuation marks, for translation. Ids 0-3 are
  ``<pad>``, ``<bos>``, ``<eos>`` and ``<unk>``; the rest is built from training text, most
  frequent first, with a minimum count and a maximum size.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

from .cache import atomic_write_text

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)
_WORD = re.compile(r"\w+|[^\w\s]")  # a run of letters/digits, or one punctuation mark


def _read_json(path: Path, kind: str) -> dict:
    try:
        state = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: cannot read a tokenizer ({exc})") from exc
    if not isinstance(state, dict) or state.get("kind") != kind:
        raise ValueError(f"{path}: not a saved {kind} tokenizer")
    return state


class CharTokenizer:
    """Characters <-> ids, ids being positions in the sorted vocabulary ``chars``."""

    def __init__(self, chars: Sequence[str]):
        chars = list(chars)
        if len(set(chars)) != len(chars) or any(len(c) != 1 for c in chars):
            raise ValueError("the vocabulary must be distinct single characters")
        self.chars = chars
        self.ids = {c: i for i, c in enumerate(chars)}

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        """The tokenizer whose vocabulary is the sorted distinct characters of ``text``."""
        return cls(sorted(set(text)))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        """The ids of the characters of ``text``; ``ValueError`` names any character not in the vocabulary."""
        try:
            return [self.ids[c] for c in text]
        except KeyError:
            unknown = sorted(set(text) - set(self.ids))
            raise ValueError(f"characters not in the vocabulary: {unknown!r}") from None

    def decode(self, ids: Iterable[int]) -> str:
        """The text of ``ids`` (a list, or a 1-D tensor)."""
        return "".join(self.chars[int(i)] for i in ids)

    def save(self, path: str | Path) -> None:
        atomic_write_text(Path(path), json.dumps({"kind": "char", "chars": self.chars}, ensure_ascii=False))

    @classmethod
    def load(cls, path: str | Path) -> CharTokenizer:
        return cls(_read_json(Path(path), "char")["chars"])


class WordTokenizer:
    """Lower-cased words and punctuation <-> ids, with ``<pad>``=0, ``<bos>``=1, ``<eos>``=2, ``<unk>``=3.

    Splitting: the text is lower-cased and cut into runs of letters and digits (accented letters
    included) and single punctuation marks, so "L'homme, dit-il." is ``l ' homme , dit - il .``.
    ``decode`` joins tokens with spaces: it gives back the tokenized text, not the original spacing.
    """

    def __init__(self, tokens: Sequence[str]):
        tokens = list(tokens)
        if tuple(tokens[: len(SPECIALS)]) != SPECIALS or len(set(tokens)) != len(tokens):
            raise ValueError(f"the vocabulary must start with {SPECIALS} and hold no duplicates")
        self.tokens = tokens
        self.ids = {t: i for i, t in enumerate(tokens)}
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = range(len(SPECIALS))

    @staticmethod
    def tokenize(text: str) -> list[str]:
        """Lower-case ``text`` and split it into words and punctuation marks."""
        return _WORD.findall(text.lower())

    @classmethod
    def build(cls, texts: Iterable[str], min_count: int = 1, max_size: int | None = None) -> WordTokenizer:
        """A vocabulary from ``texts`` (the training side only): every token seen at least ``min_count``
        times, most frequent first (ties in alphabetical order), cut to ``max_size`` entries in all,
        the 4 specials included."""
        if max_size is not None and max_size < len(SPECIALS):
            raise ValueError(f"max_size must leave room for the {len(SPECIALS)} special tokens")
        counts = Counter(token for text in texts for token in cls.tokenize(text))
        ranked = sorted((t for t, n in counts.items() if n >= min_count), key=lambda t: (-counts[t], t))
        if max_size is not None:
            ranked = ranked[: max_size - len(SPECIALS)]
        return cls([*SPECIALS, *ranked])

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """The ids of ``text``'s tokens (unknown ones map to ``<unk>``), optionally between ``<bos>`` and ``<eos>``."""
        ids = [self.ids.get(token, self.unk_id) for token in self.tokenize(text)]
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """The tokens of ``ids`` joined by spaces, stopping at ``<eos>``; ``<pad>``/``<bos>`` are dropped
        unless ``skip_special`` is False (``<unk>`` is always shown)."""
        out = []
        for i in map(int, ids):
            if skip_special and i == self.eos_id:
                break
            if skip_special and i in (self.pad_id, self.bos_id):
                continue
            out.append(self.tokens[i])
        return " ".join(out)

    def save(self, path: str | Path) -> None:
        atomic_write_text(Path(path), json.dumps({"kind": "word", "tokens": self.tokens}, ensure_ascii=False))

    @classmethod
    def load(cls, path: str | Path) -> WordTokenizer:
        return cls(_read_json(Path(path), "word")["tokens"])
