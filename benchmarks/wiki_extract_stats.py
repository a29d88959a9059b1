"""The size of each split of the cached wiki-extract data set: articles, lines (paragraphs and list
items) and words (whitespace-separated tokens), the figures of ``revbits.data.wiki``'s docstring.

With ``--before FILE`` (an ``articles.jsonl`` made by an earlier filter), the same figures for that
file too, the words and lines only one of the two holds, and a few example differences: how far a
change of the wikitext filter moved the text.

    python benchmarks/wiki_extract_stats.py                                   # the cached data set
    python benchmarks/wiki_extract_stats.py --before old/articles.jsonl --examples 6
"""

from __future__ import annotations

import argparse
import difflib
import random
from pathlib import Path

from report import write_results
from revbits.data import require, wiki

SPLITS = ("train", "valid", "test", "all")


def split_sizes(articles: list[wiki.Article]) -> dict[str, dict[str, int]]:
    """Per split: articles, lines and words."""
    sizes = {}
    for split in SPLITS:
        chosen = wiki.split_articles(articles, split)
        sizes[split] = {
            "articles": len(chosen),
            "lines": sum(len(a.text.splitlines()) for a in chosen),
            "words": sum(len(a.text.split()) for a in chosen),
        }
    return sizes


def word_diff(before: str, after: str, context: int = 8) -> str:
    """The first change between two texts, word by word: ``... context [-removed-] {+added+} context ...``."""
    old, new = before.split(), after.split()
    matcher = difflib.SequenceMatcher(None, old, new, autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            continue
        removed = f"[-{' '.join(old[i1:i2])}-] " if i2 > i1 else ""
        added = f"{{+{' '.join(new[j1:j2][:60])}+}} " if j2 > j1 else ""
        head = " ".join(old[max(0, i1 - context) : i1])
        tail = " ".join(old[i2 : i2 + context])
        return f"... {head} {removed}{added}{tail} ...".replace("  ", " ")
    return "(no change)"


def differences(before: list[wiki.Article], after: list[wiki.Article], examples: int) -> dict:
    """Lines only one side holds (counted with their words), and ``examples`` word-level diffs of
    changed blocks of lines, picked at random with a fixed seed."""
    old_lines = {line for a in before for line in a.text.splitlines()}
    new_lines = {line for a in after for line in a.text.splitlines()}
    only_old = [line for a in before for line in a.text.splitlines() if line not in new_lines]
    only_new = [line for a in after for line in a.text.splitlines() if line not in old_lines]
    blocks = []
    for old, new in zip(before, after):
        old_text, new_text = old.text.splitlines(), new.text.splitlines()
        matcher = difflib.SequenceMatcher(None, old_text, new_text, autojunk=False)
        for tag, i1, i2, j1, j2 in matcher.get_opcodes():
            if tag != "equal":
                diff = word_diff("\n".join(old_text[i1:i2]), "\n".join(new_text[j1:j2]))
                blocks.append({"title": old.title, "diff": diff})
    return {
        "same_titles_in_order": [a.title for a in before] == [a.title for a in after],
        "lines_only_before": len(only_old),
        "words_in_lines_only_before": sum(len(line.split()) for line in only_old),
        "lines_only_after": len(only_new),
        "words_in_lines_only_after": sum(len(line.split()) for line in only_new),
        "changed_blocks": len(blocks),
        "examples": random.Random(0).sample(blocks, min(examples, len(blocks))),
    }


def table(result: dict) -> list[str]:
    compared = "before" in result
    lines = [
        "| split | articles | lines | words |" + (" before: articles | lines | words |" if compared else ""),
        "|---|---|---|---|" + ("---|---|---|" if compared else ""),
    ]
    for split in SPLITS:
        a = result["after"][split]
        row = f"| {split} | {a['articles']} | {a['lines']:,} | {a['words']:,} |"
        if "before" in result:
            b = result["before"][split]
            row += f" {b['articles']} | {b['lines']:,} | {b['words']:,} |"
        lines.append(row)
    if "before" in result:
        d = result["differences"]
        lines += [
            "",
            f"Same titles in the same order: {d['same_titles_in_order']}. Lines only before: "
            f"{d['lines_only_before']:,} ({d['words_in_lines_only_before']:,} words); only after: "
            f"{d['lines_only_after']:,} ({d['words_in_lines_only_after']:,} words); changed blocks: "
            f"{d['changed_blocks']:,}.",
            "",
            "Examples, the first change of a changed block ([-before-] {+after+}):",
        ]
        lines += ["", *[f"- {e['title']}: {e['diff']}" for e in d["examples"]]]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, help="an articles.jsonl made by an earlier filter")
    parser.add_argument("--examples", type=int, default=6)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "wiki_extract_stats")
    args = parser.parse_args()
    after = wiki.read_articles(require(wiki.NAME) / wiki.ARTICLES_FILE)
    result: dict = {"format": wiki.FORMAT, "after": split_sizes(after)}
    if args.before is not None:
        before = wiki.read_articles(args.before)
        result["before"] = split_sizes(before)
        result["before_note"] = "the articles.jsonl of the earlier filter (revbits' own wikitext filter)"
        result["differences"] = differences(before, after, args.examples)
    write_results(args.out, result, table(result))


if __name__ == "__main__":
    main()
