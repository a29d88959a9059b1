"""The work counts behind docs/bdia.md's recomputation figures: benchmarks/flops.py counts the CPU's attention
kernel as torch counts attention, and BDIA's backward recomputes exactly what checkpointing without early
stop recomputes (no block twice, none skipped)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torch.utils.checkpoint as torch_checkpoint

from helpers import benchmark_script
from revbits import bench


@pytest.fixture
def flops(monkeypatch):
    return benchmark_script("flops", monkeypatch)


def attention_inputs() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, 4, 24, 8, generator=g, requires_grad=True) for _ in range(3)]


def test_cpu_attention_is_counted_as_its_explicit_products(flops):
    q, k, v = attention_inputs()
    with flops.flop_counter() as fused:
        F.scaled_dot_product_attention(q, k, v)
    with flops.flop_counter() as explicit:  # Q K^T, softmax, P V: two counted matmuls
        torch.softmax(q @ k.transpose(-2, -1) / 8**0.5, -1) @ v
    assert fused.get_total_flops() == explicit.get_total_flops() > 0


def test_causal_attention_is_counted_over_its_triangle(flops):
    counts = {}
    for causal in (False, True):
        q, k, v = attention_inputs()
        with flops.flop_counter() as counter:
            F.scaled_dot_product_attention(q, k, v, is_causal=causal).sum().backward()
        counts[causal] = counter.get_total_flops()
    assert flops.causal_fraction(24, 24) == sum(range(1, 25)) / 24**2
    assert counts[True] == pytest.approx(counts[False] * flops.causal_fraction(24, 24), abs=2)


def step_flops(flops, mode: str, early_stop: bool, keep_last_graph: bool = False) -> int:
    config = bench.BenchConfig(d_model=32, n_heads=2, seq_len=16, batch=2)
    model = bench.build(config, 3, mode)
    if mode == "bdia":
        model.keep_last_graph = keep_last_graph
    x = torch.randn(config.batch, config.seq_len, config.d_model, generator=torch.Generator().manual_seed(1))
    with torch_checkpoint.set_checkpoint_early_stop(early_stop), flops.flop_counter() as counter:
        model(x).square().mean().backward()
    return counter.get_total_flops()


def test_bdia_recomputes_as_much_as_checkpoint_without_early_stop(flops):
    """BDIA's inverse needs each block's whole output, so it recomputes whole blocks: the work of checkpointing
    with early stop off, more than torch's default (which skips the MLP's output projection); keeping the top
    block's graph saves that block's recomputation."""
    bdia = step_flops(flops, "bdia", early_stop=True)
    assert bdia == step_flops(flops, "checkpoint", early_stop=False)
    assert bdia > step_flops(flops, "checkpoint", early_stop=True)
    assert step_flops(flops, "bdia", early_stop=True, keep_last_graph=True) < bdia


@pytest.fixture
def real_shapes_flops(monkeypatch):
    return benchmark_script("real_shapes_flops", monkeypatch)


@pytest.mark.parametrize("setup", ["lora", "full"])
def test_real_shape_layers_recompute_what_checkpointing_does(real_shapes_flops, setup):
    """Qwen3-0.6B's layer (2 of them, a small vocabulary, 64 tokens: no layer slices): BDIA recomputes exactly
    what gradient checkpointing without early stop recomputes. Under LoRA the early stop skips only the rank-r
    adapter's last product (the base down projection runs before the adapter saves its input); with every
    weight trained it skips the down projection, which BDIA's inverse cannot."""
    model = real_shapes_flops.build("qwen3-0.6b", setup, 2, 512, "cpu")
    ids = real_shapes_flops.tokens(1, 64, 512, "cpu")
    counts = {arm: real_shapes_flops.count(model, arm, ids)[0] for arm in real_shapes_flops.ARMS}
    assert counts["checkpoint+fused"] == counts["gc+fused"] > counts["transformers"]
    assert counts["bdia+fused"] == counts["gc+fused, full recompute"] > counts["gc+fused"]
    skipped = 1 - counts["gc+fused"] / counts["gc+fused, full recompute"]
    assert skipped < 1e-3 if setup == "lora" else skipped > 0.01
