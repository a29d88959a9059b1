"""A Llama-style decoder layer run in token slices, attention included (issue 22, batch 1 at long context).

Token slices (:mod:`revbits.bdia.token_slices`) run a layer's MLP in slices of the positions; the rest of the
layer runs whole, and BDIA's backward then holds, per token, the attention sublayer's graph: the input norm's
output, q, k and v before and after their norms and rotary, the attention's output and its copy, the residual
and the post-attention norm. For the decoders whose layer is known term by term (model types llama, mistral,
qwen2, qwen3, SDPA attention), a BDIA stack's training passes run the layer as

    (K, V) = cat_j rotary_k(norm_k(proj_k(n_j))), proj_v(n_j)      n_j = input_norm(h[s_j])     for each slice s_j
    q_j    = rotary_q(norm_q(proj_q(n_j)))
    o_j    = SDPA(q_j, K, V, mask[s_j])       (no mask: causal, over K[:end_j], V[:end_j], end_j = the slice's end)
    y[s_j] = g_j + mlp(post_norm(g_j)),  g_j = h[s_j] + o_proj(o_j)

In the backward's recomputation the slices of K and V run under non-reentrant checkpoint, and each query slice
is back-propagated as soon as it is recomputed (the gradient of y is known by then:
:mod:`revbits.bdia.slice_backward`), so the recomputed graph holds the slices' inputs (views of h, cos and sin),
K and V whole, and one slice's graph at a time, and each query slice runs twice per step, as under gradient
checkpointing. Each query row of causal attention depends on its own query and on the keys and values up to its
position only, so the query slices compute the same rows; on CPU (torch 2.13, float32 and float64) SDPA over
query slices with the mask's rows was bitwise equal to SDPA over the whole sequence with ``is_causal`` in every
case tried, but a kernel may block differently, so it is
not assumed. Every part is the layer's own module or function (its norms, projections with their LoRA
adapters, the model's rotary function), called as the layer calls them. The passes that must agree bit for bit
(the reversible forward, the recomputation, and the plain-autograd reference ``reversible = False``) all run it
alike, so the stack stays exact; evaluation and anything outside a stack's training passes run the layer's own
forward.

A layer call the slices do not know (a cache holding past tokens, output_attentions, attention dropout, another
attention implementation than SDPA, a mask that is not 4-d over the call's positions, positional arguments) runs
the layer's own forward, in every pass alike. At conversion the sliced form is compared with the layer's own
forward on five random positions (with an additive causal mask, and under SDPA also without a mask); if they
differ beyond rounding (a transformers version that changed the layer), the layer is not sliced and a warning
says so.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..bdia import token_slices
from .caches import past_length

logger = logging.getLogger("revbits.hf")

#: model types whose decoder layer is input_norm -> attention -> residual -> post_norm -> mlp -> residual,
#: with q/k/v/o projections, optional q/k RMSNorms over the head dimension, and rotary q and k.
MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
_KNOWN_KWARGS = frozenset({"attention_mask", "position_ids", "position_embeddings", "use_cache", "cache",
                           "past_key_values", "cache_position"})
_PARTS = ("input_layernorm", "post_attention_layernorm", "self_attn", "mlp")
_ATTENTION_PARTS = ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling", "config")


def _rotary_of(attention: nn.Module) -> Callable[..., Any] | None:
    return getattr(sys.modules.get(type(attention).__module__), "apply_rotary_pos_emb", None)


def structure_known(layer: nn.Module, model_type: str) -> bool:
    """Whether ``layer`` has the parts the sliced form calls."""
    attention = getattr(layer, "self_attn", None)
    return (
        model_type in MODEL_TYPES
        and all(hasattr(layer, part) for part in _PARTS)
        and all(hasattr(attention, part) for part in _ATTENTION_PARTS)
        and _rotary_of(attention) is not None
    )


def _accepts(layer: nn.Module, hidden: torch.Tensor, args: list[Any], kwargs: dict[str, Any]) -> bool:
    """Whether this call is one the sliced form computes as the layer does."""
    attention = layer.self_attn
    embeddings = kwargs.get("position_embeddings")
    return (
        not args
        and set(kwargs) <= _KNOWN_KWARGS
        and all(past_length(kwargs[n]) == 0 for n in ("cache", "past_key_values") if kwargs.get(n) is not None)
        and getattr(attention.config, "_attn_implementation", None) == "sdpa"
        and isinstance(embeddings, (tuple, list))
        and len(embeddings) == 2
        and all(isinstance(t, torch.Tensor) and t.dim() == 3 for t in embeddings)
        and not (attention.training and getattr(attention, "attention_dropout", 0.0))
        and getattr(attention, "is_causal", True)
        and _mask_known(kwargs.get("attention_mask"), hidden)
    )


def _mask_known(mask: Any, hidden: torch.Tensor) -> bool:
    """None (causal, as transformers passes it to SDPA) or a 4-d mask over the call's positions."""
    if mask is None:
        return True
    return isinstance(mask, torch.Tensor) and mask.dim() == 4 and mask.shape[-2:] == (hidden.shape[1],) * 2


def _projected(layer: nn.Module, h: torch.Tensor, name: str) -> torch.Tensor:
    """``name`` (q, k or v) of positions h, laid out [batch, positions, heads, head_dim], after its norm."""
    attention = layer.self_attn
    x = layer.input_layernorm(h)
    out = getattr(attention, f"{name}_proj")(x).view(*x.shape[:-1], -1, attention.head_dim)
    norm = getattr(attention, f"{name}_norm", None)
    return out if norm is None or name == "v" else norm(out)


def _keys_values(layer: nn.Module, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Rotated k and v of positions h ([batch, positions, kv heads, head_dim])."""
    k = _projected(layer, h, "k")
    _, k = _rotary_of(layer.self_attn)(k, k, cos, sin, unsqueeze_dim=2)
    return k, _projected(layer, h, "v")


def _query_rows(
    layer: nn.Module, mask: torch.Tensor | None, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    keys: torch.Tensor, values: torch.Tensor, *, rows: slice,
) -> torch.Tensor:
    """The layer's output at the positions ``rows`` (h, cos, sin there): their queries attend to the keys and
    values under the mask's rows, then o_proj, residual, MLP, residual. Without a mask (causal), only the keys
    and values up to the slice's last position, which are all the causal rows see."""
    attention = layer.self_attn
    q = _projected(layer, h, "q")
    q, _ = _rotary_of(attention)(q, q, cos, sin, unsqueeze_dim=2)
    if mask is None:
        keys, values = keys[:, :, : rows.stop], values[:, :, : rows.stop]
        mask = torch.ones(rows.stop - rows.start, rows.stop, dtype=torch.bool, device=h.device)
        mask = mask.tril(diagonal=rows.start)
    else:
        mask = mask[..., rows, :]
    o = masked_attention(q.transpose(1, 2), keys, values, mask, attention.scaling)
    g = h + attention.o_proj(o.transpose(1, 2).reshape(*h.shape[:-1], -1))
    return g + layer.mlp(layer.post_attention_layernorm(g))


#: devices whose SDPA runs a masked grouped-query attention as stacked heads (see :func:`masked_attention`)
STACKED_HEADS_DEVICES = {"cuda", "xpu", "mps", "hpu", "npu"}


def masked_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """SDPA of queries [B, H, L, hd] against keys and values [B, Hkv, T, hd] under a mask [L, T] or
    [B or 1, 1 or H, L, T]; query head i reads key/value head i // (H / Hkv), as transformers' repeat_kv.

    On CPU through SDPA's own grouped-query attention (``enable_gqa``), whose CPU kernel takes a mask. On the
    devices of :data:`STACKED_HEADS_DEVICES` the fused kernels that take a mask do not take unequal head
    counts, and SDPA would fall back to its math kernel, which materializes the L x T scores of every head;
    there the H / Hkv query heads of each key/value head are stacked along the positions, [B, Hkv, (H/Hkv) L,
    hd], with the mask repeated, and the memory-efficient kernel runs it. Rows of attention are independent,
    so both compute the same rows; which one runs depends only on the device, alike in every pass."""
    batch, heads, length, head_dim = q.shape
    groups = heads // keys.shape[1]
    if groups == 1 or q.device.type not in STACKED_HEADS_DEVICES:
        return torch.nn.functional.scaled_dot_product_attention(
            q, keys, values, attn_mask=mask, scale=scale, enable_gqa=groups > 1
        )
    if mask.dim() == 2:
        mask = mask[None, None]
    if mask.shape[1] == 1:
        mask = mask.repeat(1, 1, groups, 1)
    else:
        mask = mask.reshape(mask.shape[0], keys.shape[1], groups * length, mask.shape[-1])
    stacked = q.reshape(batch, keys.shape[1], groups * length, head_dim)
    o = torch.nn.functional.scaled_dot_product_attention(stacked, keys, values, attn_mask=mask, scale=scale)
    return o.reshape(batch, heads, length, head_dim)


def sliced_forward(layer: nn.Module, hidden: torch.Tensor, length: int, kwargs: dict[str, Any]) -> torch.Tensor:
    """The layer's output for one call in slices of ``length`` positions (module docstring)."""
    attention = layer.self_attn
    cos, sin = kwargs["position_embeddings"]
    cos, sin = cos.expand(hidden.shape[0], -1, -1), sin.expand(hidden.shape[0], -1, -1)
    keys, values = token_slices.map_slices(
        functools.partial(_keys_values, layer), [hidden, cos, sin], 1, length
    )
    keys, values = keys.transpose(1, 2), values.transpose(1, 2)
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is not None:  # an empty cache (a fresh one per run in training): it hands back copies of k and v
        extra = {n: kwargs[n] for n in ("position_ids", "use_cache", "cache_position") if n in kwargs}
        keys, values = cache.update(keys, values, attention.layer_idx, kwargs=extra)
    rows_of = functools.partial(_query_rows, layer, kwargs.get("attention_mask"))
    (out,) = token_slices.map_slices(
        rows_of, [hidden, cos, sin], 1, length, shared=[keys, values], pass_rows=True, block_output=True
    )
    return out


class LayerSlicer:
    """Runs one converted layer list's calls in slices where :func:`_accepts` allows (see the module docstring)."""

    def __init__(self, layer: nn.Module) -> None:
        self.enabled = _matches_own_forward(layer)

    def run(self, layer: nn.Module, hidden: torch.Tensor, args: list[Any], kwargs: dict[str, Any]) -> Any:
        """The sliced output, or None where the call is to run as the layer's own forward."""
        if not self.enabled or hidden.dim() != 3:
            return None
        length = token_slices.active_length(hidden.shape[-1])
        if length is None or hidden.shape[1] <= length or not _accepts(layer, hidden, args, kwargs):
            return None
        return sliced_forward(layer, hidden, length, kwargs)


@torch.no_grad()
def _matches_own_forward(layer: nn.Module) -> bool:
    """One call of the sliced form (five random positions, slices of two) against the layer's own forward."""
    try:
        weight = next(p for p in layer.parameters() if p.is_floating_point())
        if weight.device.type == "meta":
            return False
        generator = torch.Generator(device="cpu").manual_seed(0)
        width, head_dim = layer.self_attn.config.hidden_size, layer.self_attn.head_dim
        hidden = torch.randn(1, 5, width, generator=generator, dtype=weight.dtype).to(weight.device)
        angles = torch.randn(1, 5, head_dim, generator=generator, dtype=weight.dtype).to(weight.device)
        causal = torch.full((5, 5), torch.finfo(weight.dtype).min, dtype=weight.dtype, device=weight.device)
        masks = [causal.triu(1)[None, None]]  # an additive causal mask, which every attention implementation takes
        if getattr(layer.self_attn.config, "_attn_implementation", None) == "sdpa":
            masks.append(None)  # and SDPA's own causal path, as transformers calls it without padding
        modes = [(module, module.training) for module in layer.modules()]
        layer.eval()  # no dropout
        close = True
        try:
            for mask in masks:
                kwargs = {"attention_mask": mask, "position_embeddings": (angles.cos(), angles.sin())}
                own = layer.forward(hidden, **kwargs)
                with token_slices.slicing(2, checkpoint=False):
                    sliced = sliced_forward(layer, hidden, 2, kwargs)
                scale = float(own.abs().max()) if isinstance(own, torch.Tensor) else 0.0
                close &= isinstance(own, torch.Tensor) and torch.allclose(sliced, own, rtol=1e-4, atol=1e-5 * scale)
        finally:
            for module, training in modes:
                module.training = training
    except Exception as error:  # noqa: BLE001 - any failure means: do not slice this layer
        logger.warning("revbits.hf: %s is not run in layer slices (%s: %s)", type(layer).__name__,
                       type(error).__name__, error)
        return False
    if not close:
        logger.warning(
            "revbits.hf: %s computes something else than the sliced form revbits knows (this transformers version "
            "changed the layer); it runs whole, with only its MLP in token slices", type(layer).__name__)
    return close
