"""PETRA: stages, schedule, and real multi-process runs over gloo checked against backprop.

The multi-process tests start one process per stage with :func:`launch`; models and data are tiny.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import replace
from functools import partial

import pytest
import torch
from torch import nn

from helpers import relative_error
from revbits.bdia.fixedpoint import quantize
from revbits.petra import (
    PetraConfig,
    PlainStage,
    RevCouplingBlock,
    RevNetStage,
    SequentialStage,
    StageFailure,
    backprop_reference,
    balanced_sizes,
    bdia_gpt_pipeline,
    delay,
    launch,
    load_records,
    revnet_pipeline,
    run_stage,
    small_revnet,
    split,
)
from revbits.petra.comm import decode_header, encode_header
from revbits.petra.optim import accumulate_, make_optimizer
from revbits.petra.schedule import backward_micro_batch, forward_micro_batch, steps
from revbits.petra.testing import FAIL_ENV, RECORD_ENV, InjectedFailure, PlannedFailure, planned_failure, recording

MODEL = dict(channels=8, levels=(3, 1))  # pieces: stem, rev, rev, rev, down, rev, head
LAUNCH_TIMEOUT = 120.0


pytestmark = pytest.mark.usefixtures("one_thread")


def images(n: int, batch: int = 4, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 1, 28, 28, generator=g), torch.randint(0, 10, (batch,), generator=g)) for _ in range(n)]


def pipeline(J: int, sizes: tuple[int, ...]) -> partial:
    return partial(revnet_pipeline, J, sizes=sizes, **MODEL)


def run_petra(build: partial, data: list, config: PetraConfig) -> list:
    return launch(config.stages, run_stage, (build, data, config), timeout=LAUNCH_TIMEOUT)


def petra_and_backprop(build: partial, data: list, config: PetraConfig, invertible: list[bool]) -> tuple[list, list]:
    """The stage records of a PETRA run over ``data`` and of single-process backprop on the same stages."""
    assert [s.invertible for s in build()[:-1]] == invertible
    run_petra(build, data, config)
    petra = load_records(config.out_dir, config.stages)
    torch.manual_seed(config.seed)
    return petra, backprop_reference(build(), data, config.accumulation, config)


# ---------------------------------------------------------------- in-process pieces


def test_schedule_matches_every_message_one_step_later():
    for J, M in itertools.product(range(1, 5), range(1, 5)):
        fwd = {(j, m): t for j in range(J) for t in steps(j, J, M) if (m := forward_micro_batch(t, j, M)) is not None}
        bwd = {
            (j, m): t for j in range(J) for t in steps(j, J, M) if (m := backward_micro_batch(t, j, J, M)) is not None
        }
        assert len(fwd) == len(bwd) == J * M
        for j, m in itertools.product(range(J), range(M)):
            assert bwd[j, m] - fwd[j, m] == delay(j, J) == 2 * (J - 1 - j)
            if j + 1 < J:
                assert fwd[j + 1, m] == fwd[j, m] + 1  # activation crosses one link per step
                assert bwd[j, m] == bwd[j + 1, m] + 1  # (input, gradient) pair crosses back
        assert all(len(steps(j, J, M)) == M + delay(j, J) for j in range(J))


def test_header_round_trip():
    tensors = [torch.zeros(3, 1, 5, dtype=torch.float32), torch.zeros((), dtype=torch.int64)]
    m, specs = decode_header(encode_header(17, tensors))
    assert m == 17 and specs == [(torch.float32, [3, 1, 5]), (torch.int64, [])]
    with pytest.raises(ValueError, match="dims"):
        encode_header(0, [torch.zeros([1] * 7)])


def test_coupling_block_inverts_and_passes_half_through_bitwise():
    torch.manual_seed(0)
    block = RevCouplingBlock(8)
    x = torch.randn(2, 8, 6, 6)
    y = block(x)
    assert torch.equal(y[:, 4:], x[:, :4])  # the swap: pass-through half
    with torch.no_grad():
        x_back = block.inverse(y)
    assert torch.equal(x_back[:, :4], x[:, :4])
    assert relative_error(x_back, x) <= 1e-6
    assert not torch.equal(y[:, :4], x[:, 4:])  # F is not trivially zero


def test_sequential_stage_invertible_iff_all_pieces_are():
    torch.manual_seed(0)
    rev = SequentialStage([RevNetStage(8, blocks=2), RevNetStage(8)])
    assert rev.invertible
    x = torch.randn(2, 8, 5, 5)
    assert relative_error(rev.inverse(rev(x, 0), 0), x) <= 1e-6
    mixed = SequentialStage([RevNetStage(8), PlainStage(nn.Identity())])
    assert not mixed.invertible
    with pytest.raises(NotImplementedError, match="PlainStage"):
        mixed.inverse(x, 0)
    with pytest.raises(NotImplementedError, match="PlainStage is not invertible"):
        PlainStage(nn.Identity()).inverse(x, 0)


def test_plain_stage_replays_dropout_from_micro_batch():
    stage = PlainStage(nn.Dropout(0.5), seed=3)
    x = torch.ones(1000)
    assert torch.equal(stage(x, 5), stage(x, 5))
    assert not torch.equal(stage(x, 5), stage(x, 6))


def test_split_groups_and_balances():
    stages = split(small_revnet(**MODEL), 3, sizes=(2, 2, 3))
    assert [s.invertible for s in stages] == [False, True, False]  # stem+rev is plain; the last has the loss
    assert [len(s.pieces) for s in stages[:-1]] == [2, 2] and len(stages[-1].body) == 2
    with pytest.raises(ValueError, match="sizes"):
        split(small_revnet(**MODEL), 3, sizes=(2, 2, 2))
    balanced = split(small_revnet(**MODEL), 3)
    assert sum(len(s.pieces) for s in balanced[:-1]) + len(balanced[-1].body) + 1 == 7
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        weights = torch.randint(0, 10, (6,), generator=g).tolist()
        sizes = balanced_sizes(weights, 3)
        best = min(
            max(sum(weights[:a]), sum(weights[a:b]), sum(weights[b:]))
            for a, b in itertools.combinations(range(1, 6), 2)
        )
        ends = list(itertools.accumulate(sizes))
        assert max(sum(weights[e - s : e]) for s, e in zip(sizes, ends)) == best and min(sizes) >= 1


# ---------------------------------------------------------------- multi-process runs


@pytest.mark.parametrize(
    "J, sizes, invertible",
    [
        (2, (1, 6), [False]),  # stem | revnets, downsampling, head
        (3, (2, 2, 3), [False, True]),  # stem+rev (plain FIFO) | 2 rev blocks (inverted) | down, rev, head
        (4, (1, 1, 2, 3), [False, True, True]),  # two invertible stages: stage 1 inverts a reconstruction
    ],
)
@pytest.mark.slow
def test_lr0_gradients_and_reconstructions_equal_backprop(tmp_path, petra_record, J, sizes, invertible):
    data = images(5)  # 5 micro-batches, k = 2: two full windows and a final partial one
    config = PetraConfig(stages=J, accumulation=2, lr=0.0, out_dir=str(tmp_path))
    build = pipeline(J, sizes)
    petra, reference = petra_and_backprop(build, data, config, invertible)
    for j, (got, want) in enumerate(zip(petra, reference)):
        assert len(got.grads) == len(want.grads) == 3
        for g_got, g_want in zip(got.grads, want.grads):
            assert g_want and g_got.keys() == g_want.keys()
            for name, g in g_want.items():
                assert relative_error(g_got[name], g) <= 1e-5, (j, name)
        assert sorted(got.inputs) == list(range(5))
        for m, x in want.inputs.items():
            assert relative_error(got.inputs[m], x) <= 1e-5
            if j < J - 1:  # the input the backward used: inverted (invertible) or from the FIFO
                assert relative_error(got.reconstructed[m], x) <= 1e-5, (j, m)
    assert petra[-1].losses == pytest.approx(reference[-1].losses, rel=1e-5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_lr0_gradients_of_stages_on_cuda_equal_cpu_backprop(tmp_path, petra_record, monkeypatch):
    """Stages on GPUs (messages over gloo through host memory) give backprop's gradients."""
    monkeypatch.setenv("NVIDIA_TF32_OVERRIDE", "0")  # the stage processes inherit it: fp32 convolutions
    data = images(5)
    config = PetraConfig(stages=2, accumulation=2, lr=0.0, out_dir=str(tmp_path), device="cuda")
    petra, reference = petra_and_backprop(pipeline(2, (1, 6)), data, config, [False])
    for got, want in zip(petra, reference):
        for g_got, g_want in zip(got.grads, want.grads):
            for name, g in g_want.items():
                assert relative_error(g_got[name], g) <= 1e-4, name
    assert petra[-1].losses == pytest.approx(reference[-1].losses, rel=1e-4)


def test_one_stage_equals_plain_training(tmp_path, petra_record):
    data = images(5)
    config = PetraConfig(stages=1, accumulation=2, lr=0.1, out_dir=str(tmp_path))
    build = pipeline(1, (7,))
    (summary,) = run_petra(build, data, config)
    assert summary.updates == 3
    (got,) = load_records(tmp_path, 1)
    torch.manual_seed(config.seed)
    (want,) = backprop_reference(build(), data, config.accumulation, config)
    torch.manual_seed(config.seed)
    initial = dict(build()[0].named_parameters())
    for name, p in want.params.items():
        assert relative_error(got.params[name], p) <= 1e-5, name
        assert not torch.equal(p, initial[name])  # the optimizer did move it
    assert got.losses == pytest.approx(want.losses, rel=1e-5)


def simulate_petra(stages: list[nn.Module], data: list, config: PetraConfig) -> list[nn.Module]:
    """Algorithm 1 in one process, step by step for all stages at once, messages delivered a step later."""
    J, M, k = len(stages), len(data), config.accumulation
    params = [[p for p in s.parameters()] for s in stages]
    optimizers = [make_optimizer(p, config) for p in params]
    up, down = [{} for _ in range(J)], [{} for _ in range(J)]  # inboxes: micro-batch -> message
    fifos, backwards = [{} for _ in range(J)], [0] * J
    for t in range(M + 2 * (J - 1)):
        next_up, next_down = [{} for _ in range(J)], [{} for _ in range(J)]
        for j, stage in enumerate(stages):
            m = t - j
            if 0 <= m < M and j < J - 1:
                x = data[m][0] if j == 0 else up[j].pop(m)
                fifos[j][m] = x
                with torch.no_grad():
                    next_up[j + 1][m] = stage(x, m)
            if j == J - 1 and 0 <= m < M:
                x = (data[m][0] if j == 0 else up[j].pop(m)).detach().requires_grad_()
                loss = stage(x, data[m][1], m)
                grads = torch.autograd.grad(loss, [x, *params[j]])
            elif 0 <= (m := t - 2 * (J - 1) + j) < M:
                y, delta = down[j].pop(m)
                x = stage.inverse(y, m) if stage.invertible else fifos[j].pop(m)
                x = x.detach().requires_grad_()
                grads = torch.autograd.grad(stage(x, m), [x, *params[j]], delta)
            else:
                continue
            accumulate_(params[j], grads[1:], k)
            if j > 0:
                next_down[j - 1][m] = (x.detach(), grads[0])
            backwards[j] += 1
            if backwards[j] % k == 0 or backwards[j] == M:
                optimizers[j].step()
                stages[j].zero_grad(set_to_none=True)
        for j in range(J):
            up[j] |= next_up[j]
            down[j] |= next_down[j]
    return stages


@pytest.mark.slow
def test_stale_updates_match_a_single_process_simulation(tmp_path):
    """With lr > 0 PETRA differs from backprop (stale weights, approximate inputs); it must still be
    exactly Algorithm 1: the same as a step-by-step simulation of it in one process."""
    J, data = 3, images(6)
    config = PetraConfig(stages=J, accumulation=2, lr=0.05, out_dir=str(tmp_path))
    build = pipeline(J, (1, 3, 3))
    run_petra(build, data, config)
    petra = load_records(tmp_path, J)
    torch.manual_seed(config.seed)
    simulated = simulate_petra(build(), data, config)
    torch.manual_seed(config.seed)
    backprop = backprop_reference(build(), data, config.accumulation, config)
    for j in range(J):
        for name, p in simulated[j].named_parameters():
            assert relative_error(petra[j].params[name], p.detach()) <= 1e-5, (j, name)
    # and it is not backprop: the invertible middle stage saw stale weights
    assert max(relative_error(petra[1].params[n], p) for n, p in backprop[1].params.items()) > 1e-4


def toy_problem(n_batches: int, batch: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Four classes of noisy images: horizontal stripes, vertical stripes, a checkerboard, slow waves."""
    g = torch.Generator().manual_seed(1)
    fast, slow = torch.sin(torch.arange(28.0) * 3), torch.sin(torch.arange(28.0) * 0.4)
    patterns = torch.stack(
        [fast[:, None] + 0 * fast, 0 * fast[:, None] + fast, fast[:, None] * fast, slow[:, None] + 0 * slow]
    )
    data = []
    for _ in range(n_batches):
        y = torch.randint(0, 4, (batch,), generator=g)
        data.append((patterns[y, None] + 0.5 * torch.randn(batch, 1, 28, 28, generator=g), y))
    return data


def test_two_stages_learn_a_toy_problem():
    data = toy_problem(4)
    config = PetraConfig(stages=2, micro_batches=40, accumulation=1, lr=0.03)
    build = partial(revnet_pipeline, 2, sizes=(1, 3), channels=8, levels=(2,), num_classes=4)
    summaries = run_petra(build, data, config)
    losses = summaries[-1].losses
    assert len(losses) == 40 and summaries[0].updates == summaries[1].updates == 40
    first, last = sum(losses[:8]) / 8, sum(losses[-8:]) / 8
    assert last < 0.5 * first, losses


# ---------------------------------------------------------------- faults


def test_test_only_switches_live_in_the_environment_not_in_the_config(monkeypatch):
    """PetraConfig has production options only; failures and full records are switched on by variables that
    the stage processes inherit, and a value that does not parse names its variable."""
    for hook in ("record", "fail_at", "fail_mode"):
        with pytest.raises(TypeError, match=hook):
            PetraConfig(**{hook: None})
    monkeypatch.delenv(FAIL_ENV, raising=False)
    monkeypatch.delenv(RECORD_ENV, raising=False)
    assert planned_failure() is None and not recording()
    monkeypatch.setenv(FAIL_ENV, "2@5")
    monkeypatch.setenv(RECORD_ENV, "1")
    assert planned_failure() == PlannedFailure(2, 5, "raise") and recording()
    for bad in ("2", "2@x", "2@5:explode"):
        monkeypatch.setenv(FAIL_ENV, bad)
        with pytest.raises(ValueError, match=FAIL_ENV):
            planned_failure()
    monkeypatch.setenv(RECORD_ENV, "yes")
    with pytest.raises(ValueError, match=RECORD_ENV):
        recording()
    PlannedFailure(2, 5).strike(2, 4)  # not its step: nothing happens
    with pytest.raises(InjectedFailure, match="stage 2: injected failure at step 5"):
        PlannedFailure(2, 5).strike(2, 5)



@pytest.mark.parametrize("mode, stage, expect", [("raise", 1, "injected failure"), ("exit", 2, "exited with code 17")])
@pytest.mark.slow
def test_failed_stage_ends_the_run_and_is_named(monkeypatch, mode, stage, expect):
    monkeypatch.setenv(FAIL_ENV, f"{stage}@3:{mode}")
    config = PetraConfig(stages=3, lr=0.0, timeout=30.0)
    start = time.monotonic()
    with pytest.raises(StageFailure, match=expect) as info:
        run_petra(pipeline(3, (1, 3, 3)), images(6), config)
    assert time.monotonic() - start < 60
    assert info.value.stage == stage
    assert str(info.value).startswith(f"PETRA stage {stage} of 3 failed")


@pytest.mark.slow
def test_stalled_stage_times_out_its_neighbours_and_is_named(monkeypatch):
    monkeypatch.setenv(FAIL_ENV, "1@2:stall")
    config = PetraConfig(stages=3, lr=0.0, timeout=5.0)
    start = time.monotonic()
    expect = r"PETRA stage 1 of 3 stopped responding \(PID \d+\): stage [02] gave up on stage 1"
    with pytest.raises(StageFailure, match=expect) as info:
        run_petra(pipeline(3, (1, 3, 3)), images(6), config)
    assert time.monotonic() - start < 60
    assert info.value.stage == 1  # the stage that hung, not the neighbour that gave up waiting on it


# ---------------------------------------------------------------- BDIA stages


def token_batches(n: int, batch: int = 3, length: int = 12, vocab: int = 32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    rows = [torch.randint(0, vocab, (batch, length + 1), generator=g) for _ in range(n)]
    return [(r[:, :-1], r[:, 1:]) for r in rows]


BDIA_MODEL = dict(vocab=32, d_model=16, n_head=2, n_layer=4, max_len=12, dropout=0.1)


@pytest.mark.parametrize(
    "J, sizes, invertible",
    [
        (3, (1, 3, 3), [False, True]),  # embedding | entry, steps 1-2 (inverted) | step 3, exit, head
        (4, (2, 2, 1, 2), [False, True, True]),  # stage 1 inverts what stage 2 rebuilt by inversion
    ],
)
@pytest.mark.slow
def test_lr0_bdia_gradients_equal_backprop_and_inputs_are_rebuilt_exactly(
    tmp_path, petra_record, J, sizes, invertible
):
    data = token_batches(5)
    config = PetraConfig(stages=J, accumulation=2, lr=0.0, out_dir=str(tmp_path))
    build = partial(bdia_gpt_pipeline, J, sizes=sizes, **BDIA_MODEL)
    petra, reference = petra_and_backprop(build, data, config, invertible)
    for j, (got, want) in enumerate(zip(petra, reference)):
        for g_got, g_want in zip(got.grads, want.grads, strict=True):
            for name, g in g_want.items():
                assert relative_error(g_got[name], g) <= 1e-5, (j, name)
        if 0 < j < J - 1:  # BDIA stages rebuild their input bit for bit (the entry's as Q(x): states are on the grid)
            assert all(torch.equal(got.reconstructed[m], quantize(x, 9)) for m, x in want.inputs.items()), j
    assert petra[-1].losses == pytest.approx(reference[-1].losses, rel=1e-5)


@pytest.mark.slow
def test_a_resumed_run_continues_with_the_saved_optimiser_state(tmp_path):
    """J = 1 has no staleness, so two segments of 3 micro-batches must equal plain training over all 6:
    the second update depends on the first's momentum, which only the saved stage state carries over."""
    data = images(6)
    build = pipeline(1, (7,))
    first = PetraConfig(stages=1, micro_batches=3, accumulation=3, lr=0.1, out_dir=str(tmp_path / "a"))
    run_petra(build, data, first)
    second = replace(first, first_micro_batch=3, resume_from=first.out_dir, out_dir=str(tmp_path / "b"))
    run_petra(build, data, second)
    (got,) = load_records(tmp_path / "b", 1)
    torch.manual_seed(first.seed)
    (want,) = backprop_reference(build(), data, first.accumulation, first)
    for name, p in want.params.items():
        assert relative_error(got.params[name], p) <= 1e-5, name
    with pytest.raises(StageFailure, match="missing"):
        run_petra(build, data, replace(second, resume_from=str(tmp_path / "nothing")))
