"""Convert a transformers model to run its layers as a revbits stack, and restore it."""

from __future__ import annotations

from typing import Any, TypeVar

from torch import nn

from ..bdia.fixedpoint import SIGNIFICAND_BITS
from .families import family_of, locate_layers, transformers_base
from .layers import Conversion, conversion_of, convert_layer_list
from .loss import attach_fused_loss, disable_fused_loss

ModelT = TypeVar("ModelT", bound=nn.Module)

_BDIA_MODES = ("bdia", "bdia+mesa")
#: BDIA's |g| for a converted (pretrained) model unless ``gamma`` is given: 3 bits per element per
#: layer. Fine-tuning a pretrained decoder at 1/8 stays within the seed noise of standard training,
#: at 1/2 (the paper's value, for training from scratch) it trails (docs/hf.md,
#: benchmarks/hf_llama_finetune.py): evaluation runs g = 0, and a large |g| takes the training
#: forward far from that function.
FINE_TUNING_GAMMA = 0.125
_OUTPUT_FLAGS = ("output_hidden_states", "output_attentions")


def convert(model: ModelT, memory: str = "bdia", *, fused_loss: bool = True, **options: Any) -> ModelT:
    """Run the layer stack of a transformers ``model`` as ``revbits.stack(layers, memory, **options)``.

    In place: the model keeps its list of K layers, but calling them in its loop now records
    each call, and the call to the last layer runs all K layers (the same objects, with their
    weights) as one revbits stack, each with the arguments the loop gave it. The model's own
    ``forward`` (embeddings, masks, rotary tables, final norm, heads, loss) is unchanged, and so
    are its module tree, parameter names and ``state_dict()``: ``save_pretrained``, Trainer
    checkpoints and PEFT adapters written while converted are plain transformers files.

    The stack computes, from the hidden states x_0 that enter the first layer, the x_K that
    leaves the last one under the memory mode ``memory``
    (see :func:`revbits.stack`): for ``"standard"``, ``"checkpoint"`` and ``"mesa"`` the layers
    in sequence; for ``"bdia"`` the BDIA recurrence in a training forward with gradients and, at
    evaluation or without gradients (``no_grad``, ``generate``), the layers in sequence: the plain
    model bit for bit, since ``quantize_eval`` defaults to False here (a pretrained model is
    evaluated, and deployed, as itself; ``quantize_eval=True`` rounds each output to the 2**-bits grid).

    transformers' own activation checkpointing (``gradient_checkpointing_enable()``, the Trainer's and
    TRL's ``gradient_checkpointing=True``), on before or after converting, is left to the stack, which
    already decides what is kept for backward: one info line on the ``revbits.hf`` logger says so, and
    :func:`restore` hands the request back to the plain layers.

    Args:
        model: a transformers model of a supported family (:func:`supported_model_types`), or a
            PEFT model wrapping one.
        memory: one of :data:`revbits.MEMORY_MODES`.
        **options: passed to the stack (e.g. ``bits``, ``gamma``, ``quantize_eval``, ``check`` for
            BDIA, where ``gamma`` defaults to :data:`FINE_TUNING_GAMMA` = 1/8, ``quantize_eval`` and ``keep_last_graph``
            (:mod:`revbits.bdia.top_graph`: the head of a language model is large) to False, and
            ``token_slice``, the slices of positions the layers' MLPs run in during BDIA training
            (:mod:`revbits.bdia.token_slices`);
            :class:`revbits.mesa.MesaConfig` fields for mesa). Also ``layer_slices`` (default True): in
            the BDIA modes, layers of model types llama, mistral, qwen2 and qwen3 with SDPA attention run
            whole in those slices, attention as query slices against the whole keys and values
            (:mod:`revbits.hf.layer_slices`); False keeps only the MLPs in slices.
        fused_loss: for a causal LM, compute the loss of training calls with labels by the chunked
            linear cross-entropy, which never holds the logits, and return ``logits=None`` for them
            (:mod:`revbits.hf.loss`). Calls without labels, and evaluation, return the logits as before.

    Returns:
        ``model`` itself. Call :func:`restore` before ``save_pretrained`` to write a plain checkpoint.

    Raises:
        ValueError: the model type is not supported, the model is already converted, BDIA is asked
            for a model with fewer than 2 layers or with weights that are not float32/float64. Errors
            of ``memory`` and of
            the stack's options (e.g. ``bits``) are raised as :func:`revbits.stack` raises them
            (ValueError, TypeError). The model is left unchanged on any error.
    """
    if is_converted(model):
        raise ValueError(
            f"{type(model).__name__} is already converted to a revbits stack; call revbits.hf.restore(model) "
            "before converting it again"
        )
    family = family_of(model)
    _, _, layers = locate_layers(model)
    _check_layers(model, memory, layers, family.name)
    layer_slices = options.pop("layer_slices", True)
    if memory in _BDIA_MODES:
        options.setdefault("gamma", FINE_TUNING_GAMMA)
        options.setdefault("quantize_eval", False)
        options.setdefault("keep_last_graph", False)  # a language model's head region is large (bdia.top_graph)
    conversion = convert_layer_list(layers, memory, **options)
    if memory in _BDIA_MODES:
        conversion.slice_tokens(family.token_wise)  # the MLPs run in token slices in training
        if layer_slices:  # and, where the layer is known term by term, everything around the attention
            conversion.slice_layers(model.config.model_type)
    base = transformers_base(model)
    conversion.guard = base.register_forward_pre_hook(_PerLayerOutputGuard(conversion), with_kwargs=True)
    if fused_loss:
        attach_fused_loss(model)
    return model


def _check_layers(model: Any, memory: str, layers: Any, family_name: str) -> None:
    """Refuse, naming the model, a layer list the memory mode cannot run: no layers, or BDIA with fewer
    than 2 layers or with weights whose dtype has no exact fixed-point grid (float32/float64 only)."""
    name = f"{type(model).__name__} (model type {model.config.model_type!r}, {family_name})"
    if len(layers) == 0:
        raise ValueError(f"cannot convert {name}: it has no layers")
    if memory in _BDIA_MODES and len(layers) < 2:
        raise ValueError(
            f"cannot convert {name} with memory={memory!r}: it has {len(layers)} layer(s) and a BDIA stack "
            "needs at least 2 (block 0 is a plain residual step; reversibility starts at block 1). "
            "Use memory='checkpoint', 'mesa' or 'standard' for it."
        )
    dtypes = {p.dtype for p in layers.parameters()}
    if memory in _BDIA_MODES and not dtypes <= set(SIGNIFICAND_BITS):
        raise ValueError(
            f"cannot convert {name} with memory={memory!r}: its layers hold {', '.join(sorted(map(str, dtypes)))} "
            "weights, and the residual stream of a BDIA stack must be float32 or float64 to be exactly reversible. "
            "Keep the model in float32 and train under torch.autocast for low-precision layer internals."
        )


def restore(model: ModelT) -> ModelT:
    """Undo :func:`convert` in place: the layers get their own classes back, and the fused loss is removed.

    The layers never left the model, so every change made while converted (training steps,
    ``load_state_dict``, ``.to()``, LoRA adapters) is kept. Afterwards the model is a plain
    transformers model again.

    Returns:
        ``model`` itself.

    Raises:
        ValueError: ``model`` is not converted.
        RuntimeError: the model's layer list was replaced after conversion.
    """
    conversion = _conversion(model)
    _, _, current = locate_layers(model)
    if list(current) != conversion.layers or any(a is not b for a, b in zip(current, conversion.layers)):
        raise RuntimeError("revbits.hf.restore: the model's layer list was replaced after convert(); cannot restore it")
    conversion.detach()
    disable_fused_loss(model)
    if conversion.guard is not None:
        conversion.guard.remove()
        conversion.guard = None
    return model


def is_converted(model: nn.Module) -> bool:
    """Whether ``model`` holds layers that :func:`convert` converted."""
    return any(conversion_of(m) is not None for m in model.modules())


def revbits_stack(model: nn.Module) -> nn.Module:
    """The revbits stack module of a converted ``model`` (a :class:`revbits.BDIAStack` for
    ``memory="bdia"``), e.g. to set ``revbits_stack(model).reversible = False``. Its
    ``blocks[k].layer`` is the model's k-th layer.

    Raises:
        ValueError: ``model`` is not converted.
    """
    return _conversion(model).stack


def _conversion(model: nn.Module) -> Conversion:
    for module in model.modules():
        conversion = conversion_of(module)
        if conversion is not None:
            return conversion
    raise ValueError(f"{type(model).__name__} is not converted to a revbits stack (revbits.hf.convert)")


class _PerLayerOutputGuard:
    """A forward pre-hook on the base model that refuses requests for per-layer outputs where a
    converted model cannot give them correctly.

    transformers 5.x records ``output_hidden_states`` / ``output_attentions`` with forward hooks on
    the layer classes, which still fire inside the stack: at evaluation the recorded values are
    the layers' own outputs. During BDIA training they are not the stream states x_k (BDIA mixes
    x_{k-1} into x_{k+1}) and the reversible forward keeps no graph for them, so the request is
    refused. transformers 4.x collects them in the layer loop, which a converted model bypasses.
    """

    def __init__(self, conversion: Conversion) -> None:
        self.conversion = conversion

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        requested = [flag for flag in _OUTPUT_FLAGS if _requested(module, kwargs, flag)]
        if not requested:
            return None
        asked = " and ".join(f"{flag}" for flag in requested)
        if _transformers_major() < 5:
            raise NotImplementedError(
                f"revbits.hf: {asked} is not available on a converted model with transformers 4.x, whose layer "
                "loop collects per-layer outputs; restore() the model first, or upgrade to transformers 5"
            )
        if self.conversion.memory in _BDIA_MODES and module.training:
            raise ValueError(
                f"revbits.hf: {asked} is not available while a BDIA stack trains: its states are not the layer "
                "outputs and the reversible forward keeps no graph for them. Request them in eval mode "
                "(model.eval()), or convert with memory='checkpoint', 'mesa' or 'standard'."
            )
        return None


def _requested(module: nn.Module, kwargs: dict[str, Any], flag: str) -> bool:
    value = kwargs.get(flag)
    if value is None:
        value = getattr(getattr(module, "config", None), flag, None)
    # transformers 5 also takes an index or a list of indices for output_hidden_states; 0 selects one
    return value is not None and value is not False


def _transformers_major() -> int:
    import transformers

    return int(transformers.__version__.split(".")[0])


__all__ = ["convert", "is_converted", "restore", "revbits_stack"]
