"""Training configuration: one dataclass, filled from defaults, a JSON/TOML file, then flags."""

from __future__ import annotations

import json
import math
import tomllib
from collections.abc import Callable
from dataclasses import Field, asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from ..bdia import check_options
from ..hf.convert import FINE_TUNING_GAMMA
from ..mesa import MesaConfig
from ..models import list_models
from ..models import memory_modes as model_memory_modes
from ..models.rnn_translator import check_attention_slice
from ..modes import MEMORY_MODES
from ..petra.config import PetraConfig
from ..revrnn import CELLS, FORGET_BITS, RNN_MEMORY_MODES
from .kinds import kind_names, model_kind

PARALLEL = ("none", "petra")
ALL_MEMORY_MODES = (*MEMORY_MODES, *RNN_MEMORY_MODES[1:])


def memory_modes(model: str) -> tuple[str, ...]:
    """The memory modes ``model`` can be trained under: the model registry's (a RevNet trains by plain
    backprop on one process, as --parallel petra inverts its coupling stages itself); a Hugging Face
    model takes every mode of ``revbits.stack``."""
    return model_memory_modes(model) if model in list_models() else MEMORY_MODES


def default_memory(model: str) -> str:
    """The memory mode used when none is given: the model's reversible one (bdia, or reversible for the
    RNN models), else its first."""
    modes = memory_modes(model)
    return next((mode for mode in ("bdia", "reversible") if mode in modes), modes[0])


class ConfigError(ValueError):
    """A configuration value or file that cannot be used; the message names it."""


def option_type(field: Field) -> tuple[type, bool]:
    """``(kind, optional)`` of a TrainConfig field from its annotation (a string, the module having
    ``from __future__ import annotations``): kind is bool, int, float or str, and optional says whether
    None is allowed ("int | None")."""
    text = str(field.type)
    kind = {"bool": bool, "int": int, "float": float}.get(text.split(" |")[0].strip(), str)
    return kind, "None" in text


@dataclass
class TrainConfig:
    """Every option of ``revbits train``. Each option a module configures is checked by that module
    (bits, gamma and batch_chunks by :func:`revbits.bdia.check_options`, the mesa_* options by
    :class:`MesaConfig`, attention_slice by :func:`revbits.models.rnn_translator.check_attention_slice`,
    stages and accumulation by :class:`PetraConfig`),
    and a failed check is a :class:`ConfigError` with the module's one-line message.

    ``forget_bits=None`` is "no limit", as in :class:`revbits.RevGRU`. Text cannot say None (TOML has no
    null, the flag is an integer), so in flags, config files and a run's config.json it is spelled 0:
    0 is read as None here, and :meth:`to_dict` writes None as 0 (runs of revbits 0.1 resume as before).
    """

    model: str = "gpt"
    hf: str | None = None  # model "hf": a local Hugging Face model directory (or a packaged model's name)
    allow_pickle: bool = False  # hf: load pickle weights (*.bin) with torch.load(weights_only=True)
    data: str | None = None  # None: the model's default data set
    memory: str | None = None  # None: bdia, or reversible for the RNN models
    steps: int = 1000
    stop_at: int | None = None  # stop after this step (as if interrupted); resume later
    batch_size: int = 32
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_interval: int = 100
    eval_batches: int = 20
    log_interval: int = 10
    seed: int = 0
    device: str = "cpu"
    out: str = "runs/default"
    # model shape
    n_layer: int = 6
    n_head: int = 4
    d_model: int = 128
    dropout: float = 0.1
    block_size: int = 128  # gpt context; translator maximum length
    patch_size: int = 4  # vit
    train_subset: int | None = None  # use only the first N training examples
    # bdia options
    bits: int = 9
    gamma: float | None = None  # None: 0.5, or hf.FINE_TUNING_GAMMA when fine-tuning a pretrained --hf model
    quantize_eval: bool | None = None  # None: True, or False with --hf (evaluate the plain model that export writes)
    batch_chunks: str = "auto"  # bdia: slices of the batch per block in training, "auto" or an integer (1: whole)
    keep_last_graph: str = "auto"  # bdia: keep the top block's graph from the forward: auto (off with --hf) | on | off
    # mesa options (memory = mesa or bdia+mesa)
    mesa_ranges: str = "batch"  # batch | ema
    mesa_momentum: float = 0.9
    mesa_channel_group: int = 1
    mesa_min_numel: int = 4096  # smaller tensors stay exact
    mesa_stochastic: bool = True  # stochastic rounding; False rounds to nearest
    mesa_check_finite: bool = True  # raise on a non-finite activation
    # recurrent models (rnnlm, rnn-translator; memory = standard or reversible)
    cell: str = "gru"  # gru | lstm
    forget_bits: int | None = 3  # 1, 2, 3 or 5 bits lost at most per unit and step; None (0 in text): no limit
    attention_slice: int = 32  # rnn-translator: units of the top encoder state the attention reads
    # stage parallelism (parallel = petra: one process per stage)
    parallel: str = "none"  # none | petra
    stages: int = 2  # petra: J
    accumulation: int = 1  # petra: micro-batches (of batch_size) per optimiser update
    stage_split: str = "time"  # petra: balance stages by measured time or parameter count, or sizes "2,3"
    petra_timeout: float = 60.0  # petra: seconds a stage waits for a neighbour before naming it as stalled

    def __post_init__(self) -> None:
        if self.data is None:
            self.data = model_kind(self.model).data if self.model in kind_names() else None
        if self.memory is None:
            self.memory = default_memory(self.model)
        if self.gamma is None:
            self.gamma = FINE_TUNING_GAMMA if self.model == "hf" else 0.5
        if self.quantize_eval is None:  # a model from scratch is evaluated as trained, a pretrained one as exported
            self.quantize_eval = self.model != "hf"
        if self.forget_bits == 0 and not isinstance(self.forget_bits, bool):
            self.forget_bits = None  # text's spelling of "no limit"
        self.validate()

    def validate(self) -> None:
        self._check_types()
        self._check_numbers()
        try:
            torch.device(self.device)
        except RuntimeError:
            raise ConfigError(
                f"device must be a torch device such as cpu, cuda or cuda:1, got {self.device!r}"
            ) from None
        if self.memory in ("bdia", "bdia+mesa"):
            _checked_by(check_options, self.bits, self.gamma, self._batch_chunks())
            if self.keep_last_graph not in ("auto", "on", "off"):
                raise ConfigError(f"keep_last_graph must be auto, on or off, got {self.keep_last_graph!r}")
        if self.model not in kind_names():
            raise ConfigError(f"model must be one of {', '.join(kind_names())}, got {self.model!r}")
        modes = memory_modes(self.model)
        if self.memory not in modes:
            raise ConfigError(f"memory must be one of {', '.join(modes)} for {self.model}, got {self.memory!r}")
        if self.cell not in CELLS:
            raise ConfigError(f"cell must be one of {', '.join(CELLS)}, got {self.cell!r}")
        if self.forget_bits not in FORGET_BITS:
            raise ConfigError(f"forget_bits must be 1, 2, 3, 5 or 0 (no limit), got {self.forget_bits}")
        positive = [
            "steps",
            "batch_size",
            "eval_interval",
            "eval_batches",
            "log_interval",
            "n_layer",
            "n_head",
            "d_model",
            "block_size",
            "patch_size",
        ]
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.memory.startswith("bdia") and self.n_layer < 2:
            raise ConfigError(f"memory={self.memory!r} needs n_layer >= 2")
        try:  # MesaConfig checks its own options (checked whatever the memory mode, as every option is)
            MesaConfig(**self._mesa_options())
        except ValueError as error:
            raise ConfigError(f"mesa option: {error}") from None
        if self.d_model % self.n_head:
            raise ConfigError(f"d_model {self.d_model} is not divisible by n_head {self.n_head}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ConfigError(f"need 0 <= min_lr <= lr and lr > 0, got lr={self.lr}, min_lr={self.min_lr}")
        for name in ("warmup", "grad_clip", "weight_decay"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must not be negative, got {getattr(self, name)}")
        if self.stop_at is not None and not 1 <= self.stop_at <= self.steps:
            raise ConfigError(f"stop_at must be between 1 and steps={self.steps}, got {self.stop_at}")
        # The RNN translator checks its slice against its width; another model only needs it non-negative.
        width = self.d_model if self.model == "rnn-translator" else max(self.d_model, self.attention_slice)
        _checked_by(check_attention_slice, self.attention_slice, width)
        if self.parallel not in PARALLEL:
            raise ConfigError(f"parallel must be none or petra, got {self.parallel!r}")
        _checked_by(PetraConfig, stages=self.stages, accumulation=self.accumulation, timeout=self.petra_timeout)
        if (self.model == "hf") != (self.hf is not None):
            raise ConfigError("--hf PATH and --model hf go together: give the Hugging Face model to fine-tune")
        if self.model == "revnet" and self.d_model % 2:
            raise ConfigError(f"revnet: d_model is the stem's channel count and must be even, got {self.d_model}")
        self.stage_sizes()  # a bad stage_split raises here
        if self.train_subset is not None and self.train_subset < 1:
            raise ConfigError(f"train_subset must be at least 1, got {self.train_subset}")

    def logs_at(self, step: int) -> bool:
        """Whether the training loss of ``step`` is logged: every ``log_interval`` steps and the last."""
        return step % self.log_interval == 0 or step == self.steps

    def stage_sizes(self) -> list[int] | None:
        """The pieces per PETRA stage that ``stage_split`` gives, or None for "time" and "params"."""
        if self.stage_split in ("time", "params"):
            return None
        try:
            sizes = [int(part) for part in self.stage_split.split(",")]
        except ValueError:
            sizes = []
        if len(sizes) != self.stages or min(sizes) < 1:
            raise ConfigError(
                f"stage_split must be time, params or {self.stages} positive piece counts such as "
                f"{','.join(['2'] * self.stages)} (one per stage), got {self.stage_split!r}"
            )
        return sizes

    def _check_types(self) -> None:
        """Each option has the type its default has (an int is accepted for a float)."""
        for f in fields(self):
            value, (expected, optional) = getattr(self, f.name), option_type(f)
            if value is None and (optional or f.name == "data"):
                continue
            ok = isinstance(value, expected) and not (expected is int and isinstance(value, bool))
            if expected is float and isinstance(value, int) and not isinstance(value, bool):
                ok = True
            if not ok:
                raise ConfigError(f"{f.name} must be {expected.__name__}, got {value!r} ({type(value).__name__})")

    def _check_numbers(self) -> None:
        """Every float option is finite, and the options without a check elsewhere are in range."""
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{f.name} must be a finite number, got {value}")
        if not 0 <= self.seed < 2**63:
            raise ConfigError(f"seed must be from 0 to 2**63 - 1, got {self.seed}")

    def _batch_chunks(self) -> int | str:
        """``batch_chunks`` as BDIAStack takes it: "auto" or an integer (BDIAStack checks it)."""
        return int(self.batch_chunks) if self.batch_chunks.strip().isdigit() else self.batch_chunks

    def _keep_last_graph(self) -> bool | str:
        """``keep_last_graph`` as BDIAStack takes it: "on" is True, "off" False, "auto" itself."""
        return {"on": True, "off": False}.get(self.keep_last_graph, self.keep_last_graph)

    def _mesa_options(self) -> dict[str, Any]:
        """The MesaConfig fields: every ``mesa_<name>`` option is MesaConfig's ``<name>``; the seed is the run's."""
        mesa = [f.name for f in fields(self) if f.name.startswith("mesa_")]
        return {name.removeprefix("mesa_"): getattr(self, name) for name in mesa} | {"seed": self.seed}

    @property
    def memory_options(self) -> dict[str, Any]:
        """The keyword options ``revbits.stack`` takes for this memory mode."""
        options: dict[str, Any] = {}
        if self.memory.startswith("bdia"):
            options.update(bits=self.bits, gamma=self.gamma, quantize_eval=self.quantize_eval)
            options.update(batch_chunks=self._batch_chunks())
            if self.keep_last_graph != "auto":  # "auto": the builder's default (the stack's rule; off for --hf)
                options.update(keep_last_graph=self._keep_last_graph())
        if "mesa" in self.memory:
            options.update(self._mesa_options())
        return options

    def to_dict(self) -> dict[str, Any]:
        """The options as text holds them (forget_bits None as 0; see the class docstring)."""
        values = asdict(self)
        if values["forget_bits"] is None:
            values["forget_bits"] = 0
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> TrainConfig:
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigError(f"{source}: unknown option(s) {', '.join(unknown)}; known: {', '.join(known)}")
        try:
            return cls(**values)
        except TypeError as error:
            raise ConfigError(f"{source}: {error}") from None


def _checked_by(check: Callable[..., Any], *args: Any, **options: Any) -> None:
    """Run ``check(*args, **options)`` (a check, or a class built only for its own checks): its ValueError
    is a ConfigError with the same message."""
    try:
        check(*args, **options)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The options in a JSON (.json) or TOML (.toml) file, as a dict."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text()
    try:
        values = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as error:
        kind = "JSON" if path.suffix == ".json" else "TOML"
        raise ConfigError(f"config file {path} is not valid {kind}: {error}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a table of options")
    return values
