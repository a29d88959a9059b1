"""The reversible RNNs' layers on threads (revbits.revrnn.stages): the same bits as one after another,
and one thread wherever work on another thread would escape a thread-local tool."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import revbits.revrnn.layers as layers
from revbits.measure import LiveBytes
from revbits.revrnn import RevGRU, RevLSTM
from revbits.revrnn.stages import run_stages, workers_for

CLASSES = [RevGRU, RevLSTM]


@pytest.fixture
def two_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


def training_run(cls, workers, monkeypatch, num_layers=3, masked=True):
    """Outputs, finals and gradients with the layers' stages on ``workers`` threads (checked to be used)."""
    used = []

    def forced(count, allowed):
        used.append(workers if allowed and workers_for(count, allowed) > 1 else 1)
        return used[-1]

    monkeypatch.setattr(layers, "workers_for", forced)
    torch.manual_seed(0)
    rnn = cls(5, 8, num_layers=num_layers, forget_bits=None)
    x = torch.randn(23, 3, 5, requires_grad=True)
    lengths = torch.tensor([23, 4, 17]) if masked else None
    out, finals = rnn(x, lengths=lengths)
    finals = [finals] if isinstance(finals, torch.Tensor) else list(finals)
    (out.square().sum() + sum(f.sin().sum() for f in finals)).backward()
    assert used == [workers, workers]  # the forward and the backward
    return [out.detach(), *[f.detach() for f in finals], x.grad, *[p.grad for p in rnn.parameters()]]


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("num_layers", [2, 3])
def test_layers_on_threads_give_the_same_bits(cls, num_layers, monkeypatch, two_threads):
    threaded = training_run(cls, 2, monkeypatch, num_layers)
    alone = training_run(cls, 1, monkeypatch, num_layers)
    assert all(torch.equal(a, b) for a, b in zip(threaded, alone))
    assert torch.get_num_threads() == 2  # restored after the stages


def test_a_thread_local_tool_keeps_the_stages_on_one_thread(two_threads):
    """FlopCounterMode, revbits' LiveBytes, autocast and the profiler see work on this thread only."""
    assert workers_for(2, True) == 1  # grad mode is on here
    with torch.no_grad():
        assert workers_for(2, True) == 2 and workers_for(1, True) == 1 and workers_for(2, False) == 1
        for tool in (FlopCounterMode(display=False), LiveBytes(), torch.autocast("cpu"), torch.profiler.profile()):
            with tool:
                assert workers_for(2, True) == 1


@pytest.mark.parametrize("cls", CLASSES)
def test_flop_counter_counts_every_layer_with_two_threads(cls, two_threads):
    torch.manual_seed(0)
    rnn = cls(6, 10, num_layers=2)
    x = torch.randn(12, 2, 6, requires_grad=True)
    counts = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        with FlopCounterMode(display=False) as counter:
            rnn(x)[0].sum().backward()
        counts.append(counter.get_total_flops())
    assert counts[0] == counts[1] > 0


def test_an_error_in_a_stage_reaches_the_caller_after_its_stage_ends(two_threads):
    finished = []

    def fails():
        raise ValueError("layer 1 failed")

    with torch.no_grad(), pytest.raises(ValueError, match="layer 1 failed"):
        run_stages([[lambda: finished.append(0), fails], [lambda: finished.append(1)]], workers=2)
    assert finished == [0] and torch.get_num_threads() == 2
