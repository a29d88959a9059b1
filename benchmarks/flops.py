"""A FlopCounterMode that also counts the CPU's attention kernel, for the benchmarks that count work.

torch's FlopCounterMode has formulas for the GPU attention kernels (flash, memory-efficient, cuDNN) but not for
``aten::_scaled_dot_product_flash_attention_for_cpu`` and its backward, which SDPA runs on the CPU, so on the
CPU it counts a transformer's products and leaves its attention out. :func:`flop_counter` adds them with
torch's own formulas (query times keys, scores times values, and the backward's five products), scaled for a
causal call (``is_causal=True``) to the causal triangle, the part of the score matrix the kernel computes:
sum_i min(i + 1, T_k) / (T_q T_k) of it, about half for a square one. A call with an explicit mask is counted
whole, as the kernel computes every score whatever the mask holds.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

aten = torch.ops.aten


def causal_fraction(queries: int, keys: int) -> float:
    """The share of a [queries, keys] score matrix on or below the diagonal (top-left aligned, as torch's
    ``is_causal``): sum_i min(i + 1, keys) / (queries keys)."""
    below = sum(min(i + 1, keys) for i in range(queries))
    return below / (queries * keys)


def _share(query_shape: Any, key_shape: Any, is_causal: bool) -> float:
    return causal_fraction(query_shape[-2], key_shape[-2]) if is_causal else 1.0


def _query_heads(query_shape: Any, shape: Any) -> list[int]:
    """``shape`` with the query's head count: grouped-query attention does the products of every query head
    (torch's formulas before 2.13 refuse fewer key/value heads; the count is the same)."""
    return [*shape[:-3], query_shape[-3], *shape[-2:]]


def cpu_attention_flops(query_shape, key_shape, value_shape, dropout_p=0.0, is_causal=False, *args, out_shape=None,
                        **kwargs) -> int:
    """The forward of the CPU's flash attention: Q K^T and P V over the scores it computes."""
    share = _share(query_shape, key_shape, is_causal)
    keys, values = _query_heads(query_shape, key_shape), _query_heads(query_shape, value_shape)
    return round(sdpa_flop_count(query_shape, keys, values) * share)


def cpu_attention_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, out_shape_arg=None,
                                 logsumexp_shape=None, dropout_p=0.0, is_causal=False, *args, out_shape=None,
                                 **kwargs) -> int:
    """Its backward: the scores recomputed, and the gradients of the scores, V, Q and K."""
    share = _share(query_shape, key_shape, is_causal)
    keys, values = _query_heads(query_shape, key_shape), _query_heads(query_shape, value_shape)
    return round(sdpa_backward_flop_count(grad_out_shape, query_shape, keys, values) * share)


CPU_ATTENTION = {
    aten._scaled_dot_product_flash_attention_for_cpu: cpu_attention_flops,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: cpu_attention_backward_flops,
}


def flop_counter() -> FlopCounterMode:
    """torch's FlopCounterMode (no display) with the CPU's attention kernel counted."""
    return FlopCounterMode(display=False, custom_mapping=dict(CPU_ATTENTION))


def attention_flops(counter: FlopCounterMode) -> int:
    """The operations a :func:`flop_counter` counted in attention kernels (the rest are products)."""
    return sum(n for op, n in counter.get_flop_counts()["Global"].items() if "scaled_dot_product" in str(op))
