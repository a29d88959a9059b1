"""The splits and tokenizers each task trains on, from the data sets of :mod:`revbits.data`.

Validation data never overlaps training data:
- text (shakespeare): the data set's own train/valid/test cut by position; wiki-extract: whole
  articles per split;
- images: the last 5,000 training images (a tenth of smaller sets) are the validation set; the test
  split is the official one;
- sentence pairs (bible-en-fr): whole books per split, as the data set defines them.
"""

from __future__ import annotations

import torch

from ..data import (
    CharTokenizer,
    WordTokenizer,
    load_bible_pairs,
    load_cifar10,
    load_fashion_mnist,
    load_shakespeare,
    load_wiki_extract,
)
from .config import ConfigError


def wiki_text(split: str) -> str:
    """The articles of a split of the Wikipedia extract, one blank line apart."""
    return "\n\n".join(load_wiki_extract(split))


TEXT = {"shakespeare": load_shakespeare, "wiki-extract": wiki_text}
IMAGES = {"fashion-mnist": load_fashion_mnist, "cifar10": load_cifar10}
PAIRS = {"bible-en-fr": load_bible_pairs}
VALID_IMAGES = 5000  # at most; a tenth of a smaller training set
VOCAB = {"min_count": 2, "max_size": 8000}


def _known(name: str, table: dict, kind: str) -> None:
    if name not in table:
        raise ConfigError(f"{name!r} is not a {kind} data set; use one of {', '.join(table)}")


def texts(name: str) -> dict[str, str]:
    """Train/valid/test text."""
    _known(name, TEXT, "text")
    return {split: TEXT[name](split) for split in ("train", "valid", "test")}


def text_splits(name: str) -> tuple[dict[str, str], CharTokenizer]:
    """Train/valid/test text, and a character tokenizer over all of it."""
    return texts(name), CharTokenizer.from_text(TEXT[name]("all"))


def image_splits(name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """uint8 images and int64 labels for train, valid (held out of the official train) and test."""
    _known(name, IMAGES, "image")
    load = IMAGES[name]
    images, labels = load("train")
    held = min(VALID_IMAGES, len(images) // 10)
    return {
        "train": (images[:-held], labels[:-held]),
        "valid": (images[-held:], labels[-held:]),
        "test": load("test"),
    }


def pair_splits(name: str) -> tuple[dict[str, list[tuple[str, str]]], WordTokenizer, WordTokenizer]:
    """(source, target) sentence pairs per split, and word tokenizers built on the training side."""
    _known(name, PAIRS, "sentence-pair")
    pairs = {split: [(p.en, p.fr) for p in PAIRS[name](split)] for split in ("train", "valid", "test")}
    source = WordTokenizer.build((s for s, _ in pairs["train"]), **VOCAB)
    target = WordTokenizer.build((t for _, t in pairs["train"]), **VOCAB)
    return pairs, source, target
