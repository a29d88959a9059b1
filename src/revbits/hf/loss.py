"""The chunked linear cross-entropy (:func:`revbits.losses.linear_cross_entropy`) in a transformers causal LM.

A causal LM's forward computes ``logits = lm_head(hidden_states)`` for every position (a post-head
transform where the family has one: Gemma 2's soft-cap, Granite's scaling) and then
``loss_function(logits, labels)``. With the fused loss enabled, a training call with ``labels``
(the model in train mode, gradients enabled) runs instead:

1. the model's own forward, without ``labels``, while a pre-hook on the LM head takes the hidden
   states it is given and lets it project zero positions of them (so no logits are computed);
2. ``linear_cross_entropy(hidden, lm_head, labels, shift=True)`` with the family's post-head transform,
   ``ignore_index``, ``shift_labels`` and ``num_items_in_batch`` as transformers' ``ForCausalLMLoss``
   reads them.

The output is the model's own output class with that ``loss`` and ``logits=None``: the point is not
to hold them. Everything else is untouched: calls without labels (``generate``, a custom loss that
reads the logits), evaluation (``model.eval()`` or ``torch.no_grad()``: Trainer's evaluation gets its
logits), a ``loss_function`` replaced by the user, ``return_dict=False``, and TRL's own fused head
(``fused_lm_head=True``) run the model's forward unchanged. To get logits while training with labels,
call without labels and compute the loss from them, or convert with ``fused_loss=False``.

The hooks sit on the task model (below a PEFT wrapper), so a LoRA adapter on ``lm_head``, a head tied
to the embedding, or a PEFT wrapper added after conversion all work: the head is looked up per call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import nn

from ..losses import CHUNK_LOGITS, linear_cross_entropy

ModelT = TypeVar("ModelT", bound=nn.Module)

#: Model types whose causal LM computes ``logits = lm_head(hidden_states)`` and nothing else before the loss.
PLAIN_HEAD_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "olmo2", "starcoder2", "gpt2")
#: ... then ``logits = c * tanh(logits / c)`` with c = ``config.final_logit_softcapping`` (when not None).
SOFTCAPPED_TYPES = ("gemma2", "gemma3_text")
#: ... then ``logits = logits / config.logits_scaling``.
SCALED_TYPES = ("granite",)


def supports_fused_loss(model: nn.Module) -> bool:
    """Whether ``model`` (or the model inside a PEFT wrapper) is a causal LM whose head and loss
    :func:`enable_fused_loss` knows."""
    task = _task_model(model)
    model_type = getattr(getattr(task, "config", None), "model_type", None)
    name = type(task).__name__
    causal = name.endswith("ForCausalLM") or name == "GPT2LMHeadModel"
    return causal and model_type in PLAIN_HEAD_TYPES + SOFTCAPPED_TYPES + SCALED_TYPES


def enable_fused_loss(model: ModelT, chunk_tokens: int | None = None) -> ModelT:
    """Compute the loss of ``model``'s training calls with labels by the chunked linear cross-entropy
    (module docstring), in place. ``chunk_tokens``: tokens per chunk (default: about
    :data:`revbits.losses.CHUNK_LOGITS` logits per chunk). Returns ``model``.

    Raises:
        ValueError: the model is not a supported causal LM, or its fused loss is already enabled.
    """
    if not supports_fused_loss(model):
        raise ValueError(
            f"revbits.hf: the fused loss supports the causal LMs of model types "
            f"{', '.join(PLAIN_HEAD_TYPES + SOFTCAPPED_TYPES + SCALED_TYPES)}; got {type(_task_model(model)).__name__}"
        )
    if has_fused_loss(model):
        raise ValueError(f"revbits.hf: {type(model).__name__} already computes its loss by the fused loss")
    task = _task_model(model)
    hooks = FusedLossHooks(chunk_tokens)
    task.register_forward_pre_hook(hooks.before_forward, with_kwargs=True)
    task.register_forward_hook(hooks.after_forward, with_kwargs=True, always_call=True)
    return model


def disable_fused_loss(model: ModelT) -> ModelT:
    """Undo :func:`enable_fused_loss` in place (nothing to undo is not an error). Returns ``model``."""
    task = _task_model(model)
    for hooks, kwargs_hooks in (
        (task._forward_pre_hooks, task._forward_pre_hooks_with_kwargs),
        (task._forward_hooks, task._forward_hooks_with_kwargs),
    ):
        for key in [k for k, h in hooks.items() if isinstance(getattr(h, "__self__", None), FusedLossHooks)]:
            hooks[key].__self__.release_head()
            hooks.pop(key)
            kwargs_hooks.pop(key, None)
            task._forward_hooks_always_called.pop(key, None)
    return model


def has_fused_loss(model: nn.Module) -> bool:
    """Whether :func:`enable_fused_loss` is in effect on ``model``."""
    task = _task_model(model)
    return any(isinstance(getattr(h, "__self__", None), FusedLossHooks) for h in task._forward_pre_hooks.values())


def attach_fused_loss(model: nn.Module) -> None:
    """:func:`enable_fused_loss` where ``model`` supports it and has none yet (for ``hf.convert``)."""
    if supports_fused_loss(model) and not has_fused_loss(model):
        enable_fused_loss(model)


class FusedLossHooks:
    """The pre-hook and forward hook on the causal LM, and the pre-hook they put on its LM head per call."""

    def __init__(self, chunk_tokens: int | None) -> None:
        self.chunk_tokens = chunk_tokens
        self.call: dict[str, Any] | None = None  # the current call: its labels, loss options, hidden states
        self.head_hook: torch.utils.hooks.RemovableHandle | None = None

    def before_forward(self, model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict] | None:
        self.release_head()  # a call that raised in torch.compile (no always_call hook) leaves nothing behind
        if not _fuses(model, kwargs):
            return None
        kwargs = dict(kwargs)
        self.call = {"labels": kwargs.pop("labels"), "options": kwargs, "hidden": None}
        self.head_hook = model.get_output_embeddings().register_forward_pre_hook(self.take_hidden)
        return args, kwargs

    def take_hidden(self, head: nn.Module, args: tuple) -> tuple:
        """Keep the head's input and let the head project none of its positions."""
        if self.call is None or self.call["hidden"] is not None or len(args) != 1:
            raise RuntimeError(
                "revbits.hf fused loss: the LM head was called more than once, or with other arguments, in one "
                "forward; this model's forward is not the one the fused loss supports (disable_fused_loss(model))"
            )
        (hidden,) = args
        self.call["hidden"] = hidden
        return (hidden[..., :0, :],)

    def after_forward(self, model: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
        call, self.call = self.call, None
        self.release_head()
        if call is None or output is None:  # not a fused call, or the forward raised
            return None
        if call["hidden"] is None:
            raise RuntimeError("revbits.hf fused loss: the model's forward never called its LM head")
        loss = _loss(model, call["hidden"], call["labels"], call["options"], self.chunk_tokens)
        fields = {k: v for k, v in output.items() if k not in ("logits", "loss")}
        return type(output)(loss=loss, logits=None, **fields)

    def release_head(self) -> None:
        if self.head_hook is not None:
            self.head_hook.remove()
            self.head_hook = None


def _fuses(model: nn.Module, kwargs: dict[str, Any]) -> bool:
    """Whether this call's loss is the fused one (module docstring: when it is not)."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    return (
        kwargs.get("labels") is not None
        and model.training
        and torch.is_grad_enabled()
        and not kwargs.get("fused_lm_head", False)
        and _returns_dict(model, kwargs)
        and model.loss_function is ForCausalLMLoss
    )


def _returns_dict(model: nn.Module, kwargs: dict[str, Any]) -> bool:
    """Whether the call returns a ModelOutput: ``return_dict`` as given, else the config's (PEFT passes None)."""
    return_dict = kwargs.get("return_dict")
    return bool(getattr(model.config, "return_dict", True) if return_dict is None else return_dict)


def _loss(
    model: nn.Module, hidden: torch.Tensor, labels: torch.Tensor, options: dict[str, Any], chunk_tokens: int | None
) -> torch.Tensor:
    """transformers' ForCausalLMLoss of the head's logits, chunked: labels shifted by one (or
    ``shift_labels`` as given), mean over the non-ignored tokens or over ``num_items_in_batch``."""
    config = model.config
    shift_labels = options.get("shift_labels")
    return linear_cross_entropy(
        hidden,
        _head(model),
        labels if shift_labels is None else shift_labels,
        chunk_tokens=chunk_tokens or max(1, CHUNK_LOGITS // config.vocab_size),
        ignore_index=options.get("ignore_index", -100),
        shift=shift_labels is None,
        softcap=getattr(config, "final_logit_softcapping", None) if config.model_type in SOFTCAPPED_TYPES else None,
        num_items_in_batch=options.get("num_items_in_batch"),
    )


def _head(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    head = model.get_output_embeddings()
    if model.config.model_type in SCALED_TYPES:
        scaling = model.config.logits_scaling
        return lambda h: head(h) / scaling
    return head


def _task_model(model: nn.Module) -> nn.Module:
    get_base = getattr(model, "get_base_model", None)  # PEFT's PeftModel
    return get_base() if callable(get_base) else model


__all__ = [
    "attach_fused_loss",
    "disable_fused_loss",
    "enable_fused_loss",
    "has_fused_loss",
    "supports_fused_loss",
]
