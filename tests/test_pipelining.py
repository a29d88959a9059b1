"""torch.distributed.pipelining with BDIA stages, built as a user would: no example tensors, so each PipelineStage
infers its shapes by running the stage forward and backward once, on the first micro-batch at stage 0 and on
uninitialised tensors (torch.empty) at stage 1. BDIA stages survive that (they compute their evaluation function
there, revbits.bdia.tools) and then train exactly: GPipe and 1F1B over 2 gloo processes equal the same model in one
process bit for bit. An error in a stage ends both processes at once, with a message that names the stage.
"""

from __future__ import annotations

import re
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

from revbits import BDIAStack
from revbits.petra import launch
from revbits.petra.baselines import gloo_pipelining_supported, pipeline_step
from revbits.petra.launch import StageFailure

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(not gloo_pipelining_supported(), reason="pipelining over gloo hangs before torch 2.8"),
]

D, T, MICRO, M, DEPTH = 8, 4, 2, 3, 3  # M micro-batches of MICRO samples
SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}
LAUNCH_TIMEOUT = 120.0


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.LayerNorm(D), nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(x)


class Stage(nn.Module):
    """Stage 0: a linear map, then a BDIA stack (its output times ``scale``); stage 1: a BDIA stack, then a head."""

    def __init__(self, j: int, scale: float = 1.0) -> None:
        super().__init__()
        torch.manual_seed(10 + j)
        self.j, self.scale = j, scale
        self.linear = nn.Linear(D, D)
        self.stack = BDIAStack([Residual() for _ in range(DEPTH)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.j == 0:
            return self.stack(self.linear(x)) * self.scale
        return self.linear(self.stack(x))


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(M * MICRO, T, D, generator=g), torch.randn(M * MICRO, T, D, generator=g)


def loss_fn(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (output - target).square().mean()


def run_stage(rank: int, world_size: int, schedules: tuple[str, ...], scale: float = 1.0) -> dict:
    """Train stage ``rank`` for one mini-batch of M micro-batches under each schedule (fresh weights each time);
    its parameters' gradients and, at the last stage, the micro-batch losses. BDIA draws its signs from the RNG,
    seeded per stage: shape inference must not draw any."""
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=30))
    x, target = data()
    results = {}
    for name in schedules:
        module = Stage(rank, scale)
        stage = PipelineStage(module, rank, world_size, torch.device("cpu"))  # no example tensors: shape inference
        pipe = SCHEDULES[name](stage, M, loss_fn=loss_fn, scale_grads=True)
        losses: list[torch.Tensor] = []
        torch.manual_seed(100 + rank)
        if rank == 0:
            pipeline_step(pipe, rank, world_size, x)
        else:
            pipeline_step(pipe, rank, world_size, target=target, losses=losses)
        grads = {n: p.grad.numpy() for n, p in module.named_parameters()}  # by value: the process ends at once
        results[name] = (grads, [loss.detach().numpy() for loss in losses])
    dist.destroy_process_group()
    return results


def one_process() -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """The same two stages in one process, each drawing its signs from its own seed, micro-batch by micro-batch:
    the gradients of (1/M) sum_m loss_m by stage-qualified name, and the losses."""
    stages = [Stage(0), Stage(1)]
    x, target = data()
    torch.manual_seed(100)
    middle = [stages[0](x[m * MICRO : (m + 1) * MICRO]) for m in range(M)]
    torch.manual_seed(101)
    losses = [loss_fn(stages[1](h), target[m * MICRO : (m + 1) * MICRO]) for m, h in enumerate(middle)]
    for loss in losses:
        loss.backward()
    grads = {f"{j}.{n}": p.grad / M for j, s in enumerate(stages) for n, p in s.named_parameters()}
    return grads, [loss.detach() for loss in losses]


def test_gpipe_and_1f1b_with_bdia_stages_equal_one_process():
    results = launch(2, run_stage, (tuple(SCHEDULES),), timeout=LAUNCH_TIMEOUT)
    want_grads, want_losses = one_process()
    for name in SCHEDULES:
        got = {f"{j}.{n}": torch.from_numpy(g) for j, r in enumerate(results) for n, g in r[name][0].items()}
        assert got.keys() == want_grads.keys()
        for key, grad in want_grads.items():
            assert torch.equal(got[key], grad), (name, key)
        losses = [torch.from_numpy(loss) for loss in results[1][name][1]]
        assert all(torch.equal(a, b) for a, b in zip(losses, want_losses, strict=True)), name


def test_an_error_in_a_stage_ends_both_processes_and_names_the_stage():
    """Stage 0's output is scaled beyond float32's exact range for the grid, so stage 1's first real forward raises
    StreamRangeError (shape inference does not); stage 0 is left waiting for a gradient, and must not hang."""
    start = time.monotonic()
    with pytest.raises(StageFailure) as failure:
        launch(2, run_stage, (("gpipe",), 2.0**20), timeout=LAUNCH_TIMEOUT)
    assert time.monotonic() - start < LAUNCH_TIMEOUT / 2
    message = str(failure.value)
    assert failure.value.stage == 1
    assert "pipeline stage 1 of 2 failed: StreamRangeError: the input of the stack (state x_0) reaches" in message
    reached = float(re.search(r"reaches \|x\| = ([0-9.e+]+)", message).group(1))
    assert 2.0**15 <= reached < 2.0**30  # the scaled activations, not uninitialised memory


def test_meta_tensors_take_the_evaluation_path():
    """A meta tensor has a shape but no values: the stack returns the shape training would give, draws nothing."""
    stack = BDIAStack([Residual() for _ in range(DEPTH)]).to("meta")
    state = torch.get_rng_state()
    out = stack(torch.empty(MICRO, T, D, device="meta", requires_grad=True))
    assert out.shape == (MICRO, T, D) and out.device.type == "meta" and out.requires_grad
    assert torch.equal(torch.get_rng_state(), state)
