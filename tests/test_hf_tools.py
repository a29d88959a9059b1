"""PyTorch's own measuring tools on a converted model: ``torch.utils.flop_counter.FlopCounterMode``
counts the forward, the recomputation and the backward, and
``torch.distributed._tools.mem_tracker.MemTracker`` follows a training step through every layer."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn
from torch.distributed._tools.mem_tracker import MemTracker
from torch.utils.flop_counter import FlopCounterMode

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import transformers  # noqa: E402

from revbits import hf  # noqa: E402

transformers.logging.set_verbosity_error()
pytestmark = pytest.mark.usefixtures("one_thread")


MEMORY = ["standard", "checkpoint", "bdia"]
IDS = torch.randint(3, 50, (2, 7), generator=torch.Generator().manual_seed(0))


def tiny_bert() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64
    )
    return transformers.BertForMaskedLM(config).train()


def counted_flops(model: nn.Module) -> int:
    with FlopCounterMode(display=False) as counter:
        model(input_ids=IDS, labels=IDS).loss.backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("memory", MEMORY)
def test_flop_counter_counts_forward_recomputation_and_backward(memory):
    plain = tiny_bert()
    standard = counted_flops(plain)
    flops = counted_flops(hf.convert(copy.deepcopy(plain), memory))
    if memory == "standard":
        assert flops == standard
        return
    # checkpointing and BDIA both run every layer once more, in backward: the same count
    checkpoint = counted_flops(hf.convert(copy.deepcopy(plain), "checkpoint"))
    assert checkpoint > standard
    assert flops == checkpoint


@pytest.mark.parametrize("memory", MEMORY)
def test_mem_tracker_follows_a_training_step_through_every_layer(memory):
    model = hf.convert(tiny_bert(), memory)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = MemTracker()
    tracker.track_external(model, optimizer)
    with tracker:
        model(input_ids=IDS, labels=IDS).loss.backward()
        optimizer.step()
    peak = tracker.get_tracker_snapshot("peak")
    assert peak[torch.device("cpu")]["Total"] > 0
    for layer in model.bert.encoder.layer:
        states = {state.value for state in tracker.memory_tracking[layer].snapshots}
        # BDIA recomputes each layer inside the stack's backward, where ModTracker's pre-backward hook finds
        # no module to attach to; the layer's backward is still seen (Post-Backward).
        backward = {"Post-Backward"} if memory == "bdia" else {"Pre-Backward"}
        assert {"Pre-Forward", "Post-Forward"} | backward <= states, states
