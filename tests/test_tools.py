"""PyTorch's own tools on a BDIA stack: FlopCounterMode, MemTracker and ModTracker run a training step (they crashed
with "Expected gradient function to be set"), count or track what BDIA does, and leave its gradients as they are;
torch.profiler shows BDIA's phases as named regions."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.distributed._tools.mem_tracker import MemTracker
from torch.distributed._tools.mod_tracker import ModTracker
from torch.utils.flop_counter import FlopCounterMode

import revbits
from helpers import gpt_blocks

pytestmark = pytest.mark.usefixtures("one_thread")

D, T, BATCH, DEPTH, CHUNKS = 16, 8, 4, 3, 2


class ScaledBlock(nn.Module):
    """y = x + scale * mlp(x), with a per-sample ``scale`` argument that requires grad (sliced with the batch)."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.LayerNorm(D), nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D))

    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return x + scale * self.mlp(x)


class Model(nn.Module):
    def __init__(self, memory: str, **options) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(D, D)
        self.attention = revbits.stack(gpt_blocks(DEPTH, D, 2), memory=memory, **options)
        self.scaled = revbits.stack([ScaledBlock() for _ in range(DEPTH)], memory=memory, **options)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, BATCH * D).view(BATCH, 1, D))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scaled(self.attention(self.embed(x)), self.scale * 1.0).square().mean()


def data() -> torch.Tensor:
    return torch.randn(BATCH, T, D, generator=torch.Generator().manual_seed(1))


def step(model: Model, optimizer: torch.optim.Optimizer | None = None) -> list[torch.Tensor]:
    """One training step with fixed signs (the same RNG state); the gradients, cloned."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(2)
    model(data()).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    if optimizer is not None:
        optimizer.step()
    return grads


def bdia() -> Model:
    return Model("bdia", batch_chunks=CHUNKS)


def test_flop_counter_counts_forward_recomputation_and_backward():
    counts = {}
    for memory in ("standard", "bdia"):
        model = Model(memory, batch_chunks=CHUNKS) if memory == "bdia" else Model(memory)
        with FlopCounterMode(display=False) as counter:
            step(model)
        counts[memory] = counter.get_total_flops()
        if memory == "standard":
            with FlopCounterMode(display=False) as counter, torch.no_grad():
                model(data())
            forward = counter.get_flop_counts()
            stacks = sum(sum(forward[f"Model.{name}"].values()) for name in ("attention", "scaled"))
        else:
            by_module = counter.get_flop_counts()
            assert all(sum(by_module[f"Model.attention.blocks.{k}"].values()) > 0 for k in range(DEPTH))
    # BDIA runs every block once more (the recomputation): standard's count plus one forward of the stacks
    assert counts["bdia"] == pytest.approx(counts["standard"] + stacks, rel=0.02)
    with FlopCounterMode(display=False):
        counted = step(bdia())
    assert all(torch.equal(a, b) for a, b in zip(counted, step(bdia())))  # counting changes no gradient


def test_mem_tracker_runs_a_training_step_and_tracks_the_blocks():
    want = step(bdia())
    model = bdia()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = MemTracker()
    tracker.track_external(model, optimizer)
    with tracker:
        got = step(model, optimizer)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
    assert peak["Total"] > 0
    tracked = set(tracker.memory_tracking)
    assert all(block in tracked for stack in (model.attention, model.scaled) for block in stack.blocks)


def test_mod_tracker_sees_every_block_in_the_forward_and_in_the_recomputation():
    model = bdia()
    seen: set[tuple[str, bool]] = set()
    tracker = ModTracker()

    def record(module: nn.Module, args) -> None:
        seen.add((tracker.get_known_fqn(module), tracker.is_bw))

    tracker.register_user_hooks(pre_fw_hook=record)
    with tracker:
        step(model)
    for stack in ("attention", "scaled"):
        for k in range(DEPTH):
            name = f"Model.{stack}.blocks.{k}"
            assert (name, False) in seen and (name, True) in seen, name


def test_profiler_shows_forward_recomputation_and_inverse_regions():
    model = bdia()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        step(model)
    calls = {event.key: event.count for event in profile.key_averages()}
    # per stack: one forward, each block recomputed once per chunk, each step k >= 1 inverted once per chunk
    assert calls.get("revbits.bdia.forward") == 2
    assert calls.get("revbits.bdia.recompute") == 2 * DEPTH * CHUNKS
    assert calls.get("revbits.bdia.inverse") == 2 * (DEPTH - 1) * CHUNKS


def test_flop_counter_and_mem_tracker_on_a_converted_bert():
    transformers = pytest.importorskip("transformers")
    from revbits import hf

    config = transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    ids = torch.randint(0, 100, (4, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0

    def build(convert: bool) -> nn.Module:
        torch.manual_seed(0)
        model = transformers.BertModel(config).train()
        return hf.convert(model, "bdia") if convert else model

    def bert_step(model: nn.Module) -> None:
        model.zero_grad(set_to_none=True)
        torch.manual_seed(2)
        model(input_ids=ids, attention_mask=mask).last_hidden_state.square().mean().backward()

    counts = {}
    for convert in (False, True):
        with FlopCounterMode(display=False) as counter:
            bert_step(build(convert))
        counts[convert] = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        build(False).encoder(torch.randn(4, 12, 32))
    assert counts[True] == pytest.approx(counts[False] + counter.get_total_flops(), rel=0.02)

    model = build(True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = MemTracker()
    tracker.track_external(model, optimizer)
    with tracker:
        bert_step(model)
        optimizer.step()
    assert tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"] > 0
