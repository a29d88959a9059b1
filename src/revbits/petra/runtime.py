"""One PETRA stage process: Algorithm 1 of Rivaud et al. (ICLR 2025), worker perspective.

At every step t (see :mod:`.schedule`) stage j of J (0-based) does

  (a) forward of the newest micro-batch m: x from the data (j = 0) or from stage j - 1; a plain stage
      pushes x into its FIFO; y = F_j(x) under no_grad; y goes to stage j + 1;
  (b) backward of micro-batch m - delay(j), delay(j) = 2 (J - 1 - j): (y~, delta) comes from stage j + 1;
      x~ = F_j^{-1}(y~) with the current weights (invertible) or x~ = FIFO.pop() (plain); then
          delta_in = (dF_j/dx (x~))^T delta,   Delta_j <- Delta_j + (1/k) (dF_j/dtheta_j (x~))^T delta,
      and (x~, delta_in) goes to stage j - 1 (stage 0 needs no delta_in);
  (c) after every k-th backward, its own optimizer steps theta_j with Delta_j, and Delta_j <- 0.

The last stage receives x, and in the same step computes the loss, its gradients, and sends (x, dL/dx)
back. There is one weight version per stage (no stash) and no flush: the forward and the backward of
step t both use the current theta_j. After the last forward, stages keep stepping with backwards only
until every micro-batch is back-propagated (drain); a final partial window of fewer than k backwards is
applied too (its gradient keeps the 1/k factor, so that step is proportionally smaller), so that no
computed gradient is dropped.

Choices: an invertible stage's backward reconstructs x~ under no_grad and then re-runs F_j(x~) with autograd, one
more F_j evaluation than the fused reconstruct-and-differentiate of a coupling block (as in the paper's
code). A plain stage 0 keeps its input in the FIFO like any plain stage, although it could re-read it.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..io import atomic_write, fault_point
from . import schedule
from .comm import Channel, DesyncError
from .config import PetraConfig
from .optim import accumulate_, make_optimizer, make_scheduler
from .record import StageRecord, record_path
from .resume import load_stage_state, save_stage_state
from .testing import planned_failure, recording


@dataclass
class StageSummary:
    """What a stage process returns: its index, steps run, optimizer updates, (last stage) losses, and
    the micro-batches trained (fewer than asked for when the run was stopped early)."""

    stage: int
    steps: int
    updates: int
    losses: list[float] = field(default_factory=list)
    micro_batches: int = 0
    stopped: bool = False


STOP_KEY = "revbits/petra/stop"  # the micro-batch count stage 0 stopped at (store of the process group)
STOP_REQUEST_KEY = "revbits/petra/stop-request"  # another stage got SIGINT or SIGTERM


def _store() -> dist.Store:
    """The key-value store of the default process group (its rendezvous)."""
    return dist.distributed_c10d._get_default_store()


def vjp(
    fn: Callable[[Tensor], Tensor],
    x: Tensor,
    params: Sequence[nn.Parameter],
    cotangent: Tensor | None,
    input_grad: bool,
) -> tuple[Tensor, Tensor | None, list[Tensor | None]]:
    """(y, dy/dx^T c, [dy/dtheta^T c]) for y = fn(x), recomputed from x with the current parameters
    (c = ``cotangent``; None when y is the scalar loss). dy/dx is not computed unless ``input_grad``
    (stage 0 has no use for it)."""
    x = x.detach().requires_grad_(input_grad)
    with torch.enable_grad():
        y = fn(x)
    wrt = [x] * input_grad + list(params)
    if not wrt or not y.requires_grad:
        return y.detach(), (torch.zeros_like(x) if input_grad else None), [None] * len(params)
    grads = list(torch.autograd.grad(y, wrt, cotangent, allow_unused=True))
    gx = grads.pop(0) if input_grad else None
    if input_grad and gx is None:
        gx = torch.zeros_like(x)
    return y.detach(), gx, grads


class StageWorker:
    """The state of stage j: its module, optimizer, FIFO, gradient-accumulation counter and record."""

    def __init__(self, stage: nn.Module, j: int, data: Sequence[tuple[Tensor, Tensor]], config: PetraConfig) -> None:
        self.stage, self.j, self.J, self.data, self.config = stage, j, config.stages, data, config
        self.M = len(data) if config.micro_batches is None else config.micro_batches
        if not len(data):
            raise ValueError("no data: data[m] must give micro-batch m's (input, target)")
        self.k = config.accumulation
        self.last = j == self.J - 1
        self.params = [p for p in stage.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(self.params, config) if self.params else None
        self.scheduler = make_scheduler(self.optimizer, config)
        if config.resume_from is not None:
            load_stage_state(config.resume_from, j, stage, self.optimizer, self.scheduler)
        self.first = config.first_micro_batch
        self.device = stage_device(config)
        self.channel = Channel(j, config.timeout, self.device, wire="cpu")  # gloo: see join_process_group
        self.fifo: deque[tuple[int, Tensor]] = deque()
        self.backwards = 0
        self.updates = 0
        self.record = StageRecord(stage=j)
        self.keeps_all = recording()  # test-only switches (revbits.petra.testing)
        self.failure = planned_failure()
        self.stop: Any = None
        self.stopped = False

    def run(self, stop: Any = None) -> StageSummary:
        """All steps of this stage. With ``stop`` (a :class:`revbits.interrupt.StopFlag`), a signal
        ends the run early at an update boundary: stage 0 forwards no micro-batch past the end of the
        current accumulation window and tells the others (the process group's store) before it sends
        that window's last one, so every stage knows the new end before it would wait for more; all
        stages then drain, and the state is a clean update boundary."""
        self.stop, self.stopped, t = stop, False, self.j
        while t < self.M + self.j + schedule.delay(self.j, self.J):
            # Step t only waits on neighbours' steps < t (messages of step t - 1, sends of step <= t - 2
            # are taken by step <= t - 1), so no cycle of waits can form: no deadlock.
            self.channel.flush(before_step=t - 1)
            self.maybe_fail(t)
            f = schedule.forward_micro_batch(t, self.j, self.M)
            b = schedule.backward_micro_batch(t, self.j, self.J, self.M)
            if self.last:
                self.loss_step(f, t)
            else:
                if f is not None:
                    self.forward(f, t)
                if b is not None:
                    self.backward(b, t)
            t += 1
        self.channel.flush()
        if self.backwards % self.k:
            self.update()
        return StageSummary(
            self.j, t - self.j, self.updates, list(self.record.losses), self.M, self.stopped
        )

    def check_stop(self, m: int) -> None:
        """After micro-batch m's forward input is known: if it ends an accumulation window, learn (stage
        0: decide) whether the run stops after it (see :meth:`run`)."""
        if self.stop is None or (m + 1) % self.k or m + 1 >= self.M:
            return
        store = _store()
        if self.j == 0:
            if self.stop.signum and not self.stopped:
                store.set(STOP_REQUEST_KEY, "1")
            if store.check([STOP_REQUEST_KEY]):
                store.set(STOP_KEY, str(m + 1))
                self.M, self.stopped = m + 1, True
        else:
            if self.stop.signum:
                store.set(STOP_REQUEST_KEY, "1")
            if store.check([STOP_KEY]):
                self.M, self.stopped = int(store.get(STOP_KEY)), True

    def input(self, m: int) -> Tensor:
        """Stage j's forward input of micro-batch m: from the data for stage 0, else from stage j - 1."""
        if self.j == 0:
            fault_point("petra.stage0.input")
            self.check_stop(m)
            return self.data[(self.first + m) % len(self.data)][0].to(self.device)
        x = self.channel.recv(self.j - 1, m, "activation")[0]
        self.check_stop(m)
        return x

    def forward(self, m: int, t: int) -> None:
        """y = F_j(x) under no_grad, sent to stage j + 1; a plain stage keeps x in its FIFO."""
        x = self.input(m)
        if self.keeps_all:
            self.record.inputs[m] = x.clone()
        if not self.stage.invertible:
            self.fifo.append((m, x))
        with torch.no_grad():
            y = self.stage(x, self.first + m)  # the global id: data index and random draws
        self.channel.send(self.j + 1, m, [y], t)

    def backward(self, m: int, t: int) -> None:
        """x~ from inverting y~ (or from the FIFO); delta_in and the (1/k)-scaled parameter gradients by
        recomputing F_j(x~) with the current weights; (x~, delta_in) sent to stage j - 1."""
        y, delta = self.channel.recv(self.j + 1, m, "backward pair (output, gradient)")
        g = self.first + m
        if self.stage.invertible:
            with torch.no_grad():
                x = self.stage.inverse(y, g)
        else:
            queued, x = self.fifo.popleft()
            if queued != m:
                raise DesyncError(f"stage {self.j}: FIFO holds micro-batch {queued}, backward wants {m}")
        if self.keeps_all:
            self.record.reconstructed[m] = x.clone()
        _, gx, grads = vjp(lambda x: self.stage(x, g), x, self.params, delta, input_grad=self.j > 0)
        self.accumulate(grads)
        if self.j > 0:
            self.channel.send(self.j - 1, m, [x, gx], t)

    def loss_step(self, m: int, t: int) -> None:
        """The last stage: L(x, target), its gradients, and (x, dL/dx) sent to stage j - 1, in one step."""
        x = self.input(m)
        g = self.first + m
        target = self.data[g % len(self.data)][1].to(self.device)
        if self.keeps_all:
            self.record.inputs[m] = x.clone()
        loss, gx, grads = vjp(lambda x: self.stage(x, target, g), x, self.params, None, input_grad=self.j > 0)
        self.record.losses.append(loss.item())
        self.accumulate(grads)
        if self.j > 0:
            self.channel.send(self.j - 1, m, [x, gx], t)

    def accumulate(self, grads: list[Tensor | None]) -> None:
        """Delta_j += (1/k) g; every k-th backward, step the optimizer."""
        accumulate_(self.params, grads, self.k)
        self.backwards += 1
        if self.backwards % self.k == 0:
            self.update()

    def update(self) -> None:
        """theta_j <- Optimizer(theta_j, Delta_j); Delta_j <- 0."""
        if self.keeps_all:
            self.record.add_grads(self.stage)
        if self.optimizer is not None:
            self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.stage.zero_grad(set_to_none=True)
        self.updates += 1

    def maybe_fail(self, t: int) -> None:
        """The test-only failure of ``REVBITS_PETRA_FAIL`` (:mod:`revbits.petra.testing`), if it is planned here."""
        if self.failure is not None:
            self.failure.strike(self.j, t)


def resolve_rank(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """(rank, world_size), from the arguments or else from torchrun's RANK and WORLD_SIZE."""
    try:
        rank = int(os.environ["RANK"]) if rank is None else rank
        world_size = int(os.environ["WORLD_SIZE"]) if world_size is None else world_size
    except KeyError as e:
        raise RuntimeError(f"no rank given and {e.args[0]} is not set: launch with launch() or torchrun") from e
    return rank, world_size


def build_all_stages(
    rank: int | None, world_size: int | None, build_stages: Callable[[], Sequence[nn.Module]], config: PetraConfig
) -> tuple[int, int, list[nn.Module]]:
    """(rank, world_size, all J stages): every process seeds with ``config.seed`` and builds the same
    stages, then keeps its own."""
    rank, world_size = resolve_rank(rank, world_size)
    if world_size != config.stages:
        raise ValueError(f"config.stages = {config.stages} but {world_size} processes were started")
    torch.manual_seed(config.seed)
    stages = list(build_stages())
    if len(stages) != world_size:
        raise ValueError(f"build_stages() made {len(stages)} stages for {world_size} processes")
    return rank, world_size, stages


def stage_device(config: PetraConfig) -> torch.device:
    """Where this process's stage computes: the CPU, or GPU LOCAL_RANK mod the number of GPUs."""
    if torch.device(config.device).type == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("PetraConfig.device is cuda, but torch sees no CUDA device")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    torch.cuda.set_device(device)
    return device


def join_process_group(rank: int, world_size: int, config: PetraConfig) -> bool:
    """Join the gloo group (MASTER_ADDR/MASTER_PORT from the environment) unless this process already
    is in one; True if it joined, and so must leave it.

    gloo serves CPU and GPU stages alike (GPU stages send through host memory). NCCL is not used yet:
    its point-to-point sends block the GPU stream until the peer posts the matching receive, and
    PETRA's neighbours post them in crossing order (an activation one way, a gradient pair the other),
    so each step's messages would have to go out as one ``batch_isend_irecv`` group. That needs
    testing on two or more GPUs, which this project has not had.
    """
    if dist.is_initialized():
        return False
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=config.init_timeout))
    return True


def run_stage(
    rank: int | None,
    world_size: int | None,
    build_stages: Callable[[], Sequence[nn.Module]],
    data: Sequence[tuple[Tensor, Tensor]],
    config: PetraConfig,
    stop: Any = None,
) -> StageSummary:
    """Train stage ``rank`` of a J-stage PETRA pipeline in this process.

    Every process seeds with ``config.seed``, builds the full list of J stages with ``build_stages()``
    (e.g. ``functools.partial(revnet_pipeline, J)``) and keeps its own. ``data[m]`` is micro-batch m's
    (input, target); stage 0 reads the inputs and the last stage the targets. The process group (gloo)
    comes from the environment (MASTER_ADDR, MASTER_PORT), as set by :func:`launch` or torchrun; pass
    rank = world_size = None under torchrun. If ``config.out_dir`` is set, the stage's
    :class:`StageRecord` is saved there, with its optimiser state, each file atomically and fsync'd.
    ``stop``: a :class:`revbits.interrupt.StopFlag` that may end the run early (see :meth:`StageWorker.run`).
    """
    rank, world_size, stages = build_all_stages(rank, world_size, build_stages, config)
    stage = stages[rank].to(stage_device(config))
    del stages
    stage.train()
    own_group = join_process_group(rank, world_size, config)
    worker = StageWorker(stage, rank, data, config)
    summary = worker.run(stop)
    if config.out_dir is not None:
        worker.record.set_params(stage)
        Path(config.out_dir).mkdir(parents=True, exist_ok=True)
        atomic_write(record_path(config.out_dir, rank), worker.record.save)
        save_stage_state(config.out_dir, rank, worker.optimizer, worker.scheduler)
    if own_group:
        dist.destroy_process_group()
    return summary
