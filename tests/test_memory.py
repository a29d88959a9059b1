"""Memory measurement: the tracker's arithmetic, and BDIA's stored bytes against the floor."""

from __future__ import annotations

import gc

import pytest
import torch

import revbits
from helpers import gpt_blocks
from revbits.bench import bdia_floor_bytes
from revbits.measure import LiveBytes, measure_training_step


def test_live_bytes_follow_allocation_and_release():
    tracker = LiveBytes()
    with tracker:
        a = torch.ones(1000)  # 4000 bytes
        b = a * 2
        view = b[10:]  # a view adds no storage
        assert tracker.current["activations"] == 8000
        del a
        gc.collect()
        assert tracker.current["activations"] == 4000
        del b, view
        gc.collect()
    assert tracker.current["activations"] == 0
    assert tracker.peak_total == 8000


def test_registered_tensors_are_counted_in_their_category():
    tracker = LiveBytes()
    weight = torch.zeros(10, 10)
    tracker.register(weight, "parameters")
    with tracker:
        grad = weight * 1
        tracker.register(grad, "gradients")  # moves from activations to gradients
    assert tracker.current == {"parameters": 400, "gradients": 400, "optimizer": 0, "activations": 0}
    with pytest.raises(ValueError, match="unknown category"):
        tracker.register(weight, "weights")


def _measure(mode: str, depth: int = 8, **options):
    torch.manual_seed(0)
    model = revbits.stack(gpt_blocks(depth, d_model=64), memory=mode, **options)
    optimizer = torch.optim.AdamW(model.parameters())
    x = torch.randn(4, 64, 64)
    report = measure_training_step(model, lambda: model(x).square().mean(), optimizer)
    return report, model, optimizer, x


def test_categories_match_the_tensors_they_count():
    report, model, optimizer, _ = _measure("standard", depth=2)
    params = sum(p.nbytes for p in model.parameters())
    state = sum(v.nbytes for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))
    assert report.parameters == params
    assert report.optimizer == state
    assert report.peak == report.parameters + report.gradients + report.optimizer + report.activations


def test_bdia_holds_its_analytic_floor_after_forward():
    """The floor is that of the recompute path; keeping the top block's graph (the default "auto" here, one batch
    chunk) holds that graph on top of it after the forward, at the same peak (revbits.bdia.top_graph)."""
    depth = 8
    report, _, _, x = _measure("bdia", depth, keep_last_graph=False)
    floor = bdia_floor_bytes(depth, x.shape[0], x.numel())
    assert floor <= report.held_after_forward <= 1.05 * floor, (report.held_after_forward, floor)
    kept = _measure("bdia", depth)[0]
    assert kept.held_after_forward > report.held_after_forward and kept.peak <= report.peak


def test_memory_modes_order_as_expected():
    recompute_all = {"bdia": {"keep_last_graph": False}}
    held = {mode: _measure(mode, **recompute_all.get(mode, {}))[0] for mode in revbits.MEMORY_MODES}
    # standard keeps every activation, checkpoint one state per block, BDIA two states and bits (recomputing every
    # block; keeping the top block's graph adds that graph, see test_bdia_holds_its_analytic_floor_after_forward)
    assert held["standard"].held_after_forward > 8 * held["checkpoint"].held_after_forward
    assert held["checkpoint"].held_after_forward > 2.5 * held["bdia"].held_after_forward
    working = {m: r.peak - r.parameters - r.optimizer for m, r in held.items()}
    assert working["bdia"] < 0.5 * working["standard"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_peak_is_reported_with_the_allocator():
    torch.manual_seed(0)
    model = revbits.stack(gpt_blocks(4, d_model=64), memory="bdia").cuda()
    x = torch.randn(4, 64, 64, device="cuda")
    report = measure_training_step(model, lambda: model(x).square().mean(), torch.optim.AdamW(model.parameters()))
    assert report.cuda_max_allocated is not None and report.cuda_max_allocated >= report.parameters


def test_a_gradient_computed_before_the_peak_is_attributed_as_gradient():
    tracker = LiveBytes()
    with tracker:
        grad = torch.ones(100)  # 400 bytes, later handed over as a gradient
        temp = torch.ones(50)  # 200 bytes
        del temp  # the peak (600 bytes) is behind us
        tracker.register(grad, "gradients")
    assert tracker.peak == {"parameters": 0, "gradients": 400, "optimizer": 0, "activations": 200}


def test_views_of_tensors_made_outside_are_not_counted():
    outside = torch.randn(100_000, 4)
    tracker = LiveBytes()
    with tracker:
        batch = outside[:8].view(8, 4)  # a view: no allocation
        out = batch * 2  # 128 bytes
    assert tracker.current["activations"] == out.nbytes
