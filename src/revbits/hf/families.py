"""Where each supported transformers family keeps its list of layers.

A family is a set of ``config.model_type`` values whose base model runs a ``nn.ModuleList`` of
same-shape layers in a loop, ``hidden_states = layer(hidden_states, ...)``. Everything else a
converted model needs (the layer's call, its output, its cache) is read from the call itself,
so a family is only a name, its model types and the attribute path of the list.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Family:
    """One supported family.

    Attributes:
        name: a label for messages and docs.
        model_types: the ``config.model_type`` values it covers.
        layer_paths: dotted attribute paths of the layer list below ``model.base_model``, tried in
            order (the first that exists is used; transformers versions differ).
        token_wise: attribute names of a layer's token-wise submodules (output at a position from the
            input at that position only), which a BDIA stack runs in token slices in training
            (:mod:`revbits.bdia.token_slices`).
    """

    name: str
    model_types: tuple[str, ...]
    layer_paths: tuple[str, ...]
    token_wise: tuple[str, ...] = ()


DECODER_FAMILY = Family(
    "Llama-style decoders",
    ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "olmo2", "granite", "starcoder2"),
    ("layers",),
    token_wise=("mlp",),
)

FAMILIES: tuple[Family, ...] = (
    Family("BERT-style encoders", ("bert", "roberta", "xlm-roberta", "camembert", "electra"), ("encoder.layer",)),
    Family("DistilBERT", ("distilbert",), ("transformer.layer",)),
    Family("GPT-2", ("gpt2",), ("h",), token_wise=("mlp",)),
    Family("ViT", ("vit", "deit"), ("layers", "encoder.layer")),
    DECODER_FAMILY,
)


def supported_model_types() -> list[str]:
    """Every ``config.model_type`` that :func:`revbits.hf.convert` accepts, sorted."""
    return sorted(t for family in FAMILIES for t in family.model_types)


def transformers_base(model: nn.Module) -> nn.Module:
    """The transformers base model (e.g. ``LlamaModel``) of ``model``: a task model's
    ``base_model``, also through a PEFT wrapper (``PeftModel.get_base_model()``)."""
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base):  # PEFT's PeftModel
        model = get_base()
    return getattr(model, "base_model", model)


def family_of(model: nn.Module) -> Family:
    """The family of ``model``, from ``model.config.model_type``; ValueError if unsupported."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type is None:
        raise TypeError(
            f"revbits.hf converts transformers models (with a `config.model_type`), got {type(model).__name__}"
        )
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    raise ValueError(
        f"revbits.hf does not support model type {model_type!r} ({type(model).__name__}); "
        f"supported model types: {', '.join(supported_model_types())}"
    )


def _get_path(root: nn.Module, path: str) -> object | None:
    obj: object | None = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def locate_layers(model: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
    """``(parent, attribute, layers)``: the module that holds the layer list, the list's attribute
    name on it, and the list itself, for a model of a supported family."""
    family = family_of(model)
    base = transformers_base(model)
    for path in family.layer_paths:
        layers = _get_path(base, path)
        if isinstance(layers, nn.ModuleList):
            parent_path, _, attribute = path.rpartition(".")
            parent = _get_path(base, parent_path) if parent_path else base
            assert isinstance(parent, nn.Module)
            return parent, attribute, layers
    raise ValueError(
        f"revbits.hf: found no layer list in {type(model).__name__} (model type {model.config.model_type!r}) "
        f"at {' or '.join(family.layer_paths)} below its base model; this transformers version lays the "
        f"{family.name} family out differently"
    )
