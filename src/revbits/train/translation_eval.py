"""BLEU of a translator on a split, with greedy or beam decoding (sacrebleu, 13a tokenisation)."""

from __future__ import annotations

from typing import Any

import sacrebleu
import torch
from torch import nn


def bleu(task: Any, model: nn.Module, split: str, decode: str, beam_size: int, max_sentences: int) -> dict[str, Any]:
    """Corpus BLEU of the first ``max_sentences`` pairs of ``split``, case-insensitive."""
    rows = task.splits[split][:max_sentences]
    references = [target for _, target in task.raw[split][:max_sentences]]
    hypotheses: list[str] = []
    for start in range(0, len(rows), task.config.batch_size):
        chunk = rows[start : start + task.config.batch_size]
        src = task.collate(chunk, task.device)[0]
        with torch.no_grad():
            tokens = (
                model.greedy(src, max_len=task.config.block_size - 1)
                if decode == "greedy"
                else model.beam(src, beam_size=beam_size, max_len=task.config.block_size - 1)
            )
        hypotheses.extend(task.tgt_tokenizer.decode(t) for t in tokens)
    # hypotheses are word-tokenized; the 13a tokenizer splits the references the same way
    score = sacrebleu.corpus_bleu(hypotheses, [references], lowercase=True, force=True)
    return {"bleu": score.score, "decode": decode, "sentences": len(rows), "example": hypotheses[:1]}
