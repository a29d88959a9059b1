"""GPipe and 1F1B (torch.distributed.pipelining over gloo, one process per stage) against single-process backprop.

Synchronous pipelines compute the exact mini-batch gradient, (1/M) sum_m dL_m/dtheta, so every update's
gradients, and after a few optimizer steps with lr > 0 the parameters, must equal :func:`backprop_reference`
with k = M on the same micro-batches. Models and data are tiny; each launch takes a few seconds.
"""

from __future__ import annotations

import re
from functools import partial

import pytest
import torch

from helpers import relative_error
from revbits.petra import PetraConfig, backprop_reference, bdia_gpt_pipeline, launch, load_records, revnet_pipeline
from revbits.petra.baselines import (
    LastStageAdapter,
    StageAdapter,
    example_tensors,
    gloo_pipelining_supported,
    run_pipeline_baseline,
)

REVNET = dict(channels=8, levels=(3, 1))  # pieces: stem, rev, rev, rev, down, rev, head
BDIA = dict(vocab=32, d_model=16, n_head=2, n_layer=4, max_len=12, dropout=0.0)
LAUNCH_TIMEOUT = 120.0


pytestmark = pytest.mark.usefixtures("one_thread")


def images(n: int, batch: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(batch, 1, 28, 28, generator=g), torch.randint(0, 10, (batch,), generator=g)) for _ in range(n)]


def tokens(n: int, batch: int = 3, length: int = 12) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    rows = [torch.randint(0, BDIA["vocab"], (batch, length + 1), generator=g) for _ in range(n)]
    return [(r[:, :-1], r[:, 1:]) for r in rows]


def run_and_compare(tmp_path, build: partial, data: list, config: PetraConfig, schedule: str, memory: bool = False):
    """Run the baseline, then backprop from the same initial weights; compare every update's gradients, the
    stage inputs, the losses and the final parameters. Returns the stage summaries."""
    summaries = launch(
        config.stages, run_pipeline_baseline, (build, data, config, schedule, memory), timeout=LAUNCH_TIMEOUT
    )
    got = load_records(tmp_path, config.stages)
    torch.manual_seed(config.seed)
    want = backprop_reference(build(), data, config.accumulation, config)
    updates = len(data) // config.accumulation
    for j, (g, w) in enumerate(zip(got, want)):
        assert len(g.grads) == len(w.grads) == updates
        for g_update, w_update in zip(g.grads, w.grads):  # the first update is the lr = 0 comparison
            assert w_update and g_update.keys() == w_update.keys()
            for name, grad in w_update.items():
                assert relative_error(g_update[name], grad) <= 1e-5, (j, name)
        for m, x in w.inputs.items():
            assert torch.equal(g.inputs[m], x) if not x.is_floating_point() else relative_error(g.inputs[m], x) <= 1e-5
        initial = dict(build()[j].named_parameters()) if config.lr else {}
        for name, p in w.params.items():
            assert relative_error(g.params[name], p) <= 1e-5, (j, name)
            if name in initial and w.grads[0].get(name, torch.zeros(1)).abs().max() > 0:
                assert not torch.equal(p, initial[name].detach())  # the optimizer did move it
    assert got[-1].losses == pytest.approx(want[-1].losses, rel=1e-5)
    assert all(s.updates == updates and len(s.step_seconds) == updates - memory for s in summaries)
    return summaries


@pytest.mark.parametrize(
    "version, supported", [("2.7.1+cpu", False), ("1.13.0", False), ("2.8.0", True), ("2.13.0.dev20250101", True)]
)
def test_baselines_refuse_a_torch_without_the_gloo_fix(monkeypatch, version, supported):
    """Before torch 2.8 pipelining over gloo hangs; the baseline says so and names the version instead."""
    monkeypatch.setattr(torch, "__version__", version)
    assert gloo_pipelining_supported() is supported
    if not supported:
        config = PetraConfig(stages=1, accumulation=2)
        with pytest.raises(RuntimeError, match=rf"need torch >= 2\.8 .*this is torch {re.escape(version)}$"):
            run_pipeline_baseline(0, 1, partial(revnet_pipeline, 1, **REVNET), images(4), config)


def test_adapters_count_micro_batches_and_split_the_head_off():
    torch.manual_seed(0)
    stages = revnet_pipeline(2, sizes=(2, 5), **REVNET)
    x, target = images(1)[0]
    first, last = StageAdapter(stages[0]), LastStageAdapter(stages[1])
    first.next_micro_batch = last.next_micro_batch = 6
    y = first(x)
    assert torch.equal(y, stages[0](x, 6)) and first.next_micro_batch == 7
    assert torch.equal(last.loss(last(y), target), stages[1](y, target, 6)) and last.next_micro_batch == 7
    x_in, y_out = example_tensors(stages, x, 1)  # the last stage's example output is its body's output
    assert x_in.requires_grad and y_out.requires_grad and y_out.shape == (4, 16, 7, 7)
    x_in, _ = example_tensors(stages, x, 0)
    assert not x_in.requires_grad  # stage 0 sends no gradient back


def test_partial_mini_batch_is_rejected():
    config = PetraConfig(stages=1, micro_batches=5, accumulation=2)
    with pytest.raises(ValueError, match="whole mini-batches"):
        run_pipeline_baseline(0, 1, partial(revnet_pipeline, 1, **REVNET), images(5), config)
    with pytest.raises(ValueError, match="schedule"):
        run_pipeline_baseline(0, 1, partial(revnet_pipeline, 1, **REVNET), images(4), config, "pipedream")


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.slow
def test_revnet_pipeline_equals_backprop(tmp_path, petra_record, schedule):
    """J = 2, M = 2, three mini-batches, SGD with momentum and lr > 0: exact, unlike PETRA."""
    config = PetraConfig(stages=2, accumulation=2, lr=0.05, out_dir=str(tmp_path))
    run_and_compare(tmp_path, partial(revnet_pipeline, 2, sizes=(2, 5), **REVNET), images(6), config, schedule)


@pytest.mark.slow
def test_bdia_1f1b_equals_backprop_and_measures_memory(tmp_path, petra_record):
    """BDIA draws its signs g_k from the micro-batch id: the adapters must give every forward the right id
    under 1F1B's interleaving (M = 3 > J = 2). The last mini-batch is measured with LiveBytes."""
    config = PetraConfig(stages=2, accumulation=3, lr=0.05, out_dir=str(tmp_path))
    build = partial(bdia_gpt_pipeline, 2, sizes=(3, 4), **BDIA)
    summaries = run_and_compare(tmp_path, build, tokens(6), config, "1f1b", memory=True)
    for s in summaries:
        assert s.memory["activations"] > 0 and s.memory["parameters"] > 0
        assert s.memory["peak"] == sum(s.memory[c] for c in ("parameters", "gradients", "optimizer", "activations"))
