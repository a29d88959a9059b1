"""What the loop trains: a model, its batches, its loss and its evaluation, one task per ``--model``.

- ``gpt``: character language modelling (loss, perplexity, bits per character);
- ``vit``: image classification (loss, accuracy);
- ``revnet``: image classification with a small RevNet (trained stage-parallel by ``--parallel petra``);
- ``translator``: sequence-to-sequence translation (loss, perplexity; BLEU in ``revbits eval``);
- ``rnnlm``: word-level language modelling with a (reversible) GRU or LSTM (loss, perplexity);
- ``rnn-translator``: attention seq2seq translation on (reversible) GRUs or LSTMs;
- ``hf``: continued pre-training of a local Hugging Face model (:mod:`.hf`).

A new task subclasses :class:`Task` and registers itself with its kind's facts:
``@register("name", data="default data set", help="what --model's help says")``.
"""

from .base import EVAL_SEED, Task, list_tasks, make_task, read_run_config, register
from .hf import HFTextTask
from .image import ImageTask, RevNetImageTask
from .lm import CharLMTask, WordLMTask
from .translation import RNNTranslationTask, TranslationTask

__all__ = [
    "EVAL_SEED",
    "CharLMTask",
    "HFTextTask",
    "ImageTask",
    "RNNTranslationTask",
    "RevNetImageTask",
    "Task",
    "TranslationTask",
    "WordLMTask",
    "list_tasks",
    "make_task",
    "read_run_config",
    "register",
]
