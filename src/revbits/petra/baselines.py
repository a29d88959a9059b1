"""Synchronous pipeline baselines for PETRA: GPipe and 1F1B from ``torch.distributed.pipelining``, on the same
stage split (:func:`split`), launcher (:func:`launch`) and :class:`PetraConfig` as :func:`run_stage`.

One process per stage, gloo. A mini-batch is M = ``config.accumulation`` micro-batches; each process runs one
``schedule.step`` per mini-batch (fill, drain and flush) and then its own optimizer step. Mini-batch w holds
micro-batches m = wM .. wM + M - 1, micro-batch m being ``data[m % len(data)]`` as in PETRA. The update is

    Delta_j = (1/M) sum_{m in mini-batch} dL_m/dtheta_j,      theta_j <- Optimizer_j(theta_j, Delta_j),

with L_m the loss of micro-batch m (a mean over its samples): pipelining accumulates sum_m dL_m/dtheta_j into
``.grad`` and divides by M (``scale_grads=True``), the same 1/k averaging as :func:`backprop_reference` with
k = M. Gradients are exact, so for any lr the parameters equal backprop's up to rounding.

Schedules (per mini-batch, J stages): GPipe runs the M forwards then the M backwards (M graphs alive);
1F1B warms up with J - j forwards at stage j (0-based), then alternates one backward and one forward
(at most J - j graphs alive) and needs M >= J. Both idle a fraction (J - 1)/(M + J - 1) of the time (bubble).

Adapters: pipelining calls ``submodule(*tensors)``; our stages take ``(x, micro_batch)`` and the last stage
``(x, target, micro_batch)``. :class:`StageAdapter` counts its forwards to know the micro-batch id (both
schedules forward micro-batches in order 0..M-1 on every stage, and pipelining never re-runs a forward), so
BDIA's per-micro-batch signs and seeded dropout match backprop's. :class:`LastStageAdapter` runs the last
stage's body; its head is the schedule's ``loss_fn(output, target)``, and is a submodule of the adapter, so its
gradients are scaled and stepped with the rest of the stage. Dropout is replayed per micro-batch, but nothing
here needs it: the backward uses the graph of the forward.

What works and what does not with torch.distributed.pipelining on gloo/CPU (checked on torch 2.13):

- Communication works. Older torch waited on one of the works ``batch_isend_irecv`` returns on gloo and hung
  (pytorch issue 132644, fixed by PR 152938 in May 2025, torch >= 2.8): :func:`gloo_pipelining_supported`.
- Dynamic shape inference (no ``input_args``) runs the stage forward and a backward once before the first
  micro-batch: on that micro-batch at stage 0 and on uninitialised tensors of the right shape
  (``torch.empty``) at later stages. A BDIA stack recognises it and computes its evaluation function there
  (:mod:`revbits.bdia.tools`; tested in tests/test_pipelining.py), but the adapters here would count it as a
  micro-batch. So the stages are built in static mode: every process runs stages 0..j once on micro-batch 0
  to get example tensors (:func:`example_tensors`).
- An error inside ``schedule.step`` reaches the caller as pipelining's "[Stage j] failed to run forward"
  with the cause only in its chain; :func:`pipeline_step` raises :class:`PipelineStageError` naming the
  stage and the cause in one line. The launcher (:func:`revbits.petra.launch`) then ends the other stages at
  once; they would otherwise wait on a receive until the process group's timeout.
- In static mode the example tensors must have ``requires_grad=True`` wherever a gradient crosses the
  boundary (every input but stage 0's, every output): the recv/send buffers for gradients are derived from
  that flag, and with plain example tensors the backward fails with "Output gradient: ('None',)".
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe
from torch.distributed.pipelining.schedules import PipelineScheduleSingle

from ..measure import tracking
from .optim import make_optimizer, make_scheduler
from .record import StageRecord, record_path
from .runtime import PetraConfig, build_all_stages, join_process_group
from .stages import LastStage
from .testing import recording

SCHEDULES = ("gpipe", "1f1b")


class PipelineStageError(RuntimeError):
    """A stage of a torch.distributed.pipelining schedule failed; ``stage`` is its index."""

    def __init__(self, message: str, stage: int) -> None:
        super().__init__(message)
        self.stage = stage


class PipelinePeerError(PipelineStageError):
    """A stage's connection to the process group broke: the echo of another stage's failure. ``peer`` (None:
    not known which neighbour) marks it so for the launcher, which then names the stage that failed first."""

    peer = None


def _transport_failure(cause: BaseException) -> bool:
    """Whether ``cause`` is the process group breaking under a stage (gloo's "Connection closed by peer")."""
    return isinstance(cause, dist.DistError) or "gloo/transport" in str(cause)


def pipeline_step(pipe: PipelineScheduleSingle, j: int, J: int, *args: Tensor, **kwargs) -> None:
    """``pipe.step(*args, **kwargs)`` at stage j of J; an error becomes :class:`PipelineStageError` naming the
    stage and the innermost cause (pipelining's own wrapper says only "failed to run forward")."""
    try:
        pipe.step(*args, **kwargs)
    except Exception as e:
        cause: BaseException = e
        while cause.__cause__ is not None:
            cause = cause.__cause__
        first_line = (str(cause).strip().splitlines() or [""])[0]
        error = PipelinePeerError if _transport_failure(cause) else PipelineStageError
        raise error(f"pipeline stage {j} of {J} failed: {type(cause).__name__}: {first_line}", j) from e


def gloo_pipelining_supported() -> bool:
    """Whether this torch has the gloo fix for pipelining's batched P2P (PR 152938, torch >= 2.8)."""
    major, minor = (int(v) for v in torch.__version__.split(".")[:2])
    return (major, minor) >= (2, 8)


class StageAdapter(nn.Module):
    """y = stage(x, m) for pipelining: m = ``next_micro_batch``, incremented by every forward."""

    def __init__(self, stage: nn.Module) -> None:
        super().__init__()
        self.stage = stage
        self.next_micro_batch = 0
        self.inputs: dict[int, Tensor] | None = None  # micro-batch -> forward input, when recording

    def take_micro_batch(self, x: Tensor) -> int:
        m = self.next_micro_batch
        self.next_micro_batch += 1
        if self.inputs is not None:
            self.inputs[m] = x.detach().clone()
        return m

    def forward(self, x: Tensor) -> Tensor:
        return self.stage(x, self.take_micro_batch(x))


class LastStageAdapter(StageAdapter):
    """The body of a :class:`LastStage` as the pipeline module, its head as the loss:
    ``loss(forward(x), target) = last(x, target, m)``."""

    def __init__(self, last: LastStage) -> None:
        super().__init__(last)

    def forward(self, x: Tensor) -> Tensor:
        m = self.take_micro_batch(x)
        for piece in self.stage.body:
            x = piece(x, m)
        return x

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        return self.stage.head(output, target)


def adapt(stage: nn.Module) -> StageAdapter:
    return LastStageAdapter(stage) if isinstance(stage, LastStage) else StageAdapter(stage)


def example_tensors(stages: Sequence[nn.Module], x: Tensor, j: int) -> tuple[Tensor, Tensor]:
    """(input, output) of stage j for micro-batch input ``x`` (the last stage's output is its body's), as
    static-shape examples for ``PipelineStage``: detached, requiring grad where a gradient crosses a boundary.
    Runs stages 0..j with autograd on (so that no stage keeps state, such as BDIA residue bits, for a backward
    that never comes)."""
    with torch.enable_grad():
        for i, stage in enumerate(stages[: j + 1]):
            if i == j:
                x_in = x.detach()
            x = adapt(stage)(x)  # as micro-batch 0, which x is
    if j > 0 and x_in.is_floating_point():
        x_in.requires_grad_(True)
    return x_in, x.detach().requires_grad_(True)


@dataclass
class PipelineSummary:
    """What a baseline stage process returns: ``step_seconds`` per mini-batch (the memory-measured step
    excluded) and, if measured, the bytes of one mini-batch step: the peak by category
    (:func:`revbits.measure.tracking`), ``recv_buffers`` (:func:`recv_buffer_bytes`, not in the peak) and
    the process's ``max_rss``."""

    stage: int
    schedule: str
    steps: int
    updates: int
    losses: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    memory: dict[str, int] | None = None


def recv_buffer_bytes(pipe: PipelineScheduleSingle) -> int:
    """Bytes of the receive buffers (activations and gradients, one per micro-batch) that pipelining
    allocates at its first step and keeps: live during every later step, but not created inside it, so
    :func:`revbits.measure.tracking` does not count them. Reads pipelining internals; -1 if they have changed."""
    try:
        infos = [*pipe._stage.args_recv_info.values(), *pipe._stage.grad_recv_info.values()]
        buffers = [info.buffer for group in infos for info in group if isinstance(info.buffer, Tensor)]
    except AttributeError:
        return -1
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in buffers}
    return sum(storages.values())


def make_schedule(
    stage: StageAdapter, j: int, J: int, M: int, example: tuple[Tensor, Tensor], schedule: str
) -> PipelineScheduleSingle:
    """The pipelining schedule of stage j of J for the adapted ``stage``, M micro-batches per step."""
    kinds = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}
    if schedule not in kinds:
        raise ValueError(f"unknown schedule {schedule!r}: use one of {SCHEDULES}")
    pipe = PipelineStage(stage, j, J, torch.device("cpu"), input_args=example[0], output_args=example[1])
    # Every stage needs a loss_fn, or its schedule runs forwards only; only the last stage's is called.
    loss_fn = stage.loss if isinstance(stage, LastStageAdapter) else _no_loss
    return kinds[schedule](pipe, M, loss_fn=loss_fn, scale_grads=True)


def _no_loss(output: Tensor, target: Tensor) -> Tensor:
    raise RuntimeError("the loss is computed on the last stage only")


def run_pipeline_baseline(
    rank: int | None,
    world_size: int | None,
    build_stages: Callable[[], Sequence[nn.Module]],
    data: Sequence[tuple[Tensor, Tensor]],
    config: PetraConfig,
    schedule: str = "gpipe",
    measure_memory: bool = False,
) -> PipelineSummary:
    """Train stage ``rank`` of a J-stage GPipe or 1F1B pipeline in this process, like :func:`run_stage`:
    every process seeds with ``config.seed``, builds all stages and keeps its own; M = ``config.accumulation``
    micro-batches per mini-batch, ``config.micro_batches`` (None: ``len(data)``) in all, a multiple of M.
    With ``config.out_dir`` the :class:`StageRecord` (losses, final parameters; gradients and inputs too
    under the test-only switch of :mod:`revbits.petra.testing`) is saved there. ``measure_memory`` runs the
    last mini-batch under :class:`LiveBytes` (not timed; needs at least two mini-batches so that the optimizer
    state exists)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}: use one of {SCHEDULES}")
    if not gloo_pipelining_supported():
        raise RuntimeError(
            f"the GPipe and 1F1B baselines need torch >= 2.8 (pipelining over gloo hangs before it, pytorch "
            f"issue 132644); this is torch {torch.__version__}"
        )
    M = config.accumulation
    total = len(data) if config.micro_batches is None else config.micro_batches
    if not len(data) or total % M:
        raise ValueError(f"{total} micro-batches do not make whole mini-batches of M = {M}")
    steps = total // M
    if measure_memory and steps < 2:
        raise ValueError("measure_memory needs at least two mini-batches (one to create the optimizer state)")
    rank, world_size, stages = build_all_stages(rank, world_size, build_stages, config)
    stages[rank].train()
    example = example_tensors(stages, data[0][0], rank)
    stage = adapt(stages[rank])
    del stages
    own_group = join_process_group(rank, world_size, config)
    params = [p for p in stage.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, config)
    scheduler = make_scheduler(optimizer, config)  # lr * lr_schedule(n) after n updates, as in PETRA
    pipe = make_schedule(stage, rank, world_size, M, example, schedule)
    record = StageRecord(stage=rank)
    keeps_all = recording()
    stage.inputs = {} if keeps_all else None
    summary = PipelineSummary(rank, schedule, steps, 0)
    dist.barrier()
    for w in range(steps):
        batch = [data[m % len(data)] for m in range(w * M, (w + 1) * M)]
        stage.next_micro_batch = w * M
        measure = measure_memory and w == steps - 1
        start = time.perf_counter()
        if measure:
            with tracking(params, optimizer) as tracker:
                losses = mini_batch_step(pipe, stage, rank, world_size, batch, optimizer, record, keeps_all)
            summary.memory = dict(tracker.peak, peak=tracker.peak_total)
        else:
            losses = mini_batch_step(pipe, stage, rank, world_size, batch, optimizer, record, keeps_all)
            summary.step_seconds.append(time.perf_counter() - start)
        if stage.next_micro_batch != (w + 1) * M:
            raise RuntimeError(f"stage {rank} ran {stage.next_micro_batch - w * M} forwards for {M} micro-batches")
        if scheduler is not None:
            scheduler.step()
        summary.losses += losses
        summary.updates += 1
    if summary.memory is not None:
        summary.memory["recv_buffers"] = recv_buffer_bytes(pipe)
        summary.memory["max_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    record.losses = list(summary.losses)
    if config.out_dir is not None:
        record.inputs = stage.inputs or {}
        record.set_params(stage.stage)
        Path(config.out_dir).mkdir(parents=True, exist_ok=True)
        record.save(record_path(config.out_dir, rank))
    if own_group:
        dist.destroy_process_group()
    return summary


def mini_batch_step(
    pipe: PipelineScheduleSingle,
    stage: StageAdapter,
    j: int,
    J: int,
    batch: Sequence[tuple[Tensor, Tensor]],
    optimizer: torch.optim.Optimizer,
    record: StageRecord,
    keep_grads: bool,
) -> list[float]:
    """One ``schedule.step`` over the M micro-batches of ``batch`` (stage 0 gives the inputs, the last stage
    the targets, concatenated; pipelining splits them back along dim 0), then the optimizer step. Returns the
    micro-batch losses on the last stage."""
    args = (torch.cat([x for x, _ in batch]),) if j == 0 else ()
    kwargs: dict = {}
    losses: list[Tensor] = []
    if j == J - 1:
        kwargs = dict(target=torch.cat([t for _, t in batch]), losses=losses, return_outputs=False)
    pipeline_step(pipe, j, J, *args, **kwargs)
    if keep_grads:
        record.add_grads(stage.stage)
    optimizer.step()
    stage.zero_grad(set_to_none=True)
    return [loss.item() for loss in losses]
