"""``revbits train --parallel petra --stages J``: a revbits model trained by PETRA, one process per stage.

The model is cut into pieces that share its modules (by the cut its kind registers,
:class:`revbits.train.kinds.PetraCut`: a ViT's by :func:`revbits.petra.pieces.vit.vit_pieces`, a RevNet's by
:func:`revbits.petra.pieces.revnet.revnet_pieces`),
the pieces into J stages (``stage_split``: balanced by the cost of each piece measured on one micro-batch, by
parameter count, or given sizes), and :func:`launch` runs the stages. Optimiser updates are ``steps``; each uses
``accumulation`` micro-batches of ``batch_size`` examples, so micro-batch m is the training batch drawn
from seed (seed, m). AdamW (betas 0.9, 0.95, decay on matrices) with the training command's warm-up and
cosine schedule runs per stage. Gradient clipping is not applied (a global norm would need every
stage's gradients at once). Every ``eval_interval`` steps the pipeline drains, every stage saves, and
the trained weights are gathered into the plain model, evaluated, and saved as a checkpoint that
``revbits eval`` reads like any other run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import re
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..data.cache import data_root
from ..data.errors import DataError
from ..interrupt import Interrupted, StopFlag
from ..io import (
    IntegrityError,
    WriteError,
    atomic_write_json,
    atomic_write_text,
    fault_point,
    read_json,
    remove_tree,
    verify_manifest,
    write_manifest,
)
from ..petra.comm import PeerError, transport_reason
from ..petra.launch import StageError, die_with_parent, launch
from ..petra.profile import sizes_by_time
from ..petra.record import load_records
from ..petra.runtime import PetraConfig, join_process_group, run_stage
from ..petra.stages import sizes_by_params, split
from ..rng import derive_seed
from .checkpoint import save_checkpoint
from .config import ConfigError, TrainConfig
from .kinds import model_kind, petra_kinds
from .loop import DivergenceError, adamw, evaluate
from .lr_schedule import lr_factor
from .metrics import MetricsLog
from .rundir import InheritedLock, RunLock, check_resumable, check_start, hold_run, latest_good
from .tasks import Task, make_task

STAGES_DIR = re.compile(r"stages-\d{8}-\d{8}")  # a segment's stage states: stages-<from>-<to>
_TASKS: dict[str, Task] = {}  # per process: the task of a config, built once


def task_of(config: TrainConfig) -> Task:
    key = json.dumps(config.to_dict(), sort_keys=True)
    if key not in _TASKS:
        _TASKS[key] = make_task(config)
    return _TASKS[key]


class TaskBatches(Sequence):
    """Micro-batch m = the task's training batch drawn with seed (config.seed, m); built lazily in each
    stage process, so only the configuration crosses process boundaries."""

    def __init__(self, config: TrainConfig, count: int) -> None:
        self.config, self.count = config, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, m: int) -> tuple[Tensor, Tensor]:
        if not 0 <= m < self.count:
            raise IndexError(m)
        sampler = torch.Generator().manual_seed(derive_seed(self.config.seed, m))
        return task_of(self.config).train_batch(sampler, torch.device("cpu"))


def model_pieces(model: nn.Module, config: TrainConfig) -> list[nn.Module]:
    """The PETRA pieces of a task's model; they share its modules, so training them trains the model."""
    return model_kind(config.model).petra.pieces(model, config.seed)


def build_stages(config: TrainConfig, J: int, sizes: list[int]) -> tuple[nn.Module, list[nn.Module]]:
    """(model, its J stages of ``sizes`` pieces each); the caller seeds torch first, so every process
    builds the same weights."""
    model = task_of(config).build_model(config)
    return model, split(model_pieces(model, config), J, sizes)


def stage_builder(config: TrainConfig, J: int, sizes: list[int]) -> list[nn.Module]:
    return build_stages(config, J, sizes)[1]


def stage_sizes(config: TrainConfig, data: Sequence[tuple[Tensor, Tensor]]) -> list[int]:
    """Pieces per stage for ``config.stage_split``: the given sizes; balanced by parameter count for
    "params"; for "time", balanced by each piece's PETRA cost (f + r + g + b) measured on the first
    micro-batch with a throw-away copy of the model, on ``config.device``, once (:func:`timed_split`)."""
    given = config.stage_sizes()
    if given is not None:
        return given
    torch.manual_seed(config.seed)
    pieces = model_pieces(task_of(config).build_model(config), config)
    if config.stage_split == "params" or config.stages == 1:
        return sizes_by_params(pieces, config.stages)
    return timed_split(config, data)


def stage_adamw(params: list[nn.Parameter], petra: PetraConfig) -> torch.optim.Optimizer:
    """The training command's optimiser over one stage's parameters (revbits.train.loop.adamw)."""
    return adamw(params, petra.lr, petra.weight_decay)


def check_petra_config(config: TrainConfig) -> None:
    """A ConfigError unless ``config.model``'s kind registers a PETRA cut whose needs ``config`` meets."""
    cut = model_kind(config.model).petra
    if cut is None:
        raise ConfigError(f"--parallel petra trains {', '.join(petra_kinds())} models so far, not {config.model}")
    if cut.memory is not None and config.memory != cut.memory:
        raise ConfigError(f"--parallel petra needs reversible stages: --memory {cut.memory}, got {config.memory}")
    most = cut.most_stages(config)  # (TrainConfig checks n_layer >= 1)
    if config.stages > most:
        raise ConfigError(f"--stages {config.stages} is more than the {most} stages {config.model} can be split into")


def torchrun_rank(J: int) -> int | None:
    """This process's stage when started by torchrun (RANK and WORLD_SIZE set), else None."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    if int(os.environ["WORLD_SIZE"]) != J:
        raise ConfigError(f"torchrun started {os.environ['WORLD_SIZE']} processes for --stages {J}")
    return int(os.environ["RANK"])


def timed_split(config: TrainConfig, data: Sequence[tuple[Tensor, Tensor]]) -> list[int]:
    """The "time" split, measured once per model shape, device, stage count and machine and then reused
    (``$REVBITS_DATA/petra-splits/<key>.json``), so the same command always trains the same split.

    Measured times vary from run to run, so two machines (or a re-measurement after deleting the file)
    may choose different splits; the split a run used is also recorded in its ``progress.json``.
    """
    ignored = {"out", "seed", "steps", "stop_at", "lr", "min_lr", "warmup", "weight_decay", "grad_clip"}
    ignored |= {"eval_interval", "eval_batches", "log_interval", "accumulation", "stage_split", "train_subset"}
    shape = {k: v for k, v in config.to_dict().items() if k not in ignored}
    shape |= {"torch": torch.__version__, "machine": platform.node(), "cpu": platform.machine()}
    key = hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:16]
    path = data_root() / "petra-splits" / f"{key}.json"
    with contextlib.suppress(IntegrityError, KeyError, TypeError):
        sizes = read_json(path, "measured split")["sizes"]
        if isinstance(sizes, list) and len(sizes) == config.stages and all(isinstance(n, int) for n in sizes):
            return sizes
    torch.manual_seed(config.seed)
    pieces = model_pieces(task_of(config).build_model(config), config)
    device = torch.device(config.device)
    pieces = [piece.to(device) for piece in pieces]
    x, target = (t.to(device) for t in data[0])
    sizes = sizes_by_time(pieces, x, target, config.stages)
    with contextlib.suppress(OSError):  # a read-only cache only means measuring again next time
        atomic_write_json(path, {"sizes": sizes, "measured_for": shape})
    return sizes


def read_progress(out: Path) -> dict[str, Any] | None:
    """The PETRA run's ``progress.json`` (None if there is none); IntegrityError naming it if damaged."""
    path = out / "progress.json"
    if not path.exists():
        return None
    progress = read_json(path, "PETRA progress record")
    if not isinstance(progress, dict) or not {"step", "stages", "accumulation", "stages_dir"} <= progress.keys():
        raise IntegrityError(f"{path} is damaged: it does not name a step and a stage-state directory")
    return progress


def train_petra(config: TrainConfig, resume: bool = False, quiet: bool = False) -> dict[str, Any]:
    """Train ``config`` with PETRA over ``config.stages`` processes up to ``stop_at`` (or ``steps``),
    from the saved stage states when ``resume``; returns the evaluation at the end.

    The processes are started here (:func:`launch`), or, under ``torchrun --nproc-per-node J``, this
    process is stage RANK: stage 0 measures the split and sends it to the others. Either way every stage
    runs :func:`petra_process`, and the last stage writes the run.

    The run goes in segments of ``eval_interval`` steps. At the end of each the pipeline drains, every
    stage saves its state to a new ``stages-*`` directory, and the last stage writes the directory's
    manifest, evaluates, saves the gathered weights as a checkpoint and names the set in
    ``progress.json`` (written last, atomically): a crash loses at most one segment. SIGINT or SIGTERM
    ends the current segment early, at an update boundary, and raises
    :class:`revbits.interrupt.Interrupted` once it is saved.
    """
    check_petra_config(config)
    out = Path(config.out)
    rank = torchrun_rank(config.stages)
    writer = rank is None or rank == config.stages - 1  # the last stage has the losses; it writes the run
    with hold_run(out) if writer else contextlib.nullcontext() as lock:
        try:
            return _train_petra(config, resume, quiet, rank, lock)
        except WriteError as error:
            raise (error if error.note else error.noted(petra_standing(out, error.errno))) from None


def _train_petra(
    config: TrainConfig, resume: bool, quiet: bool, rank: int | None, lock: RunLock | None
) -> dict[str, Any]:
    """:func:`train_petra` in a run directory locked by this process (``lock``; None for a torchrun
    stage other than the last, which writes nothing but its stage states)."""
    out = Path(config.out)
    J, k = config.stages, config.accumulation
    check_start(out, config, resume)  # the rule of every training command (options, checkpoint, no run over a run)
    begin, resume_from, sizes = 0, None, None
    progress = read_progress(out) if resume else None  # None: stopped before its first segment ended
    if progress is not None:  # its stage states fit only the stages and accumulation they were trained with
        trained = {"stages": progress["stages"], "accumulation": progress["accumulation"]}
        check_resumable({**config.to_dict(), **trained}, config, str(out / "progress.json"))
        begin, resume_from = progress["step"], out / progress["stages_dir"]
        verify_manifest(resume_from)
        # the stage states only fit the split they were trained with (runs saved before splits were
        # recorded were split by parameter count)
        sizes = progress.get("sizes") or stage_sizes(replace(config, stage_split="params"), [])
    end = config.stop_at or config.steps
    if end <= begin:
        raise ConfigError(f"the run is already at step {begin}; raise --steps to continue it")
    if lock is not None:
        lock.proceed(quiet)
        for old in out.iterdir():  # a segment that was killed before progress.json named it
            if STAGES_DIR.fullmatch(old.name) and (resume_from is None or old.name != resume_from.name):
                remove_tree(old)
        atomic_write_text(out / "config.json", json.dumps(config.to_dict(), indent=1))
    data = TaskBatches(config, config.steps * k)
    task_of(config)  # every process loads the data before any waits on another
    args = (config, begin, end, None if resume_from is None else str(resume_from))
    if rank is None:
        sizes = sizes or stage_sizes(config, data)
        fault_point("petra.launch")
        stage_args = (*args, sizes, lock.inheritable())
        result = launch(J, petra_process, stage_args, on_start=lock.note_stages, stall_timeout=config.petra_timeout)[-1]
    else:
        die_with_parent(os.getppid())
        join_process_group(rank, J, PetraConfig(stages=J))
        decided = [sizes or (stage_sizes(config, data) if rank == 0 else None)]
        dist.broadcast_object_list(decided, src=0)  # every stage must cut the model the same way
        sizes = decided[0]
        result = petra_process(rank, J, *args, sizes)
        dist.destroy_process_group()
        if lock is None:
            return {}
    interrupted, seconds = result.pop("interrupted"), result.pop("seconds", 0.0)
    if interrupted:
        raise Interrupted(
            interrupted,
            f"{signal.Signals(interrupted).name}: every PETRA stage stopped and saved at step {result['step']} "
            f"({out / 'progress.json'}); continue with revbits train --out {out} --resume",
        )
    if not quiet:
        print(f"PETRA, {J} stages of {sizes} pieces: steps {begin}-{end} in {seconds:.0f} s; valid {result}")
    return result


def petra_standing(out: Path, error_number: int | None) -> str:
    """Where a PETRA run stands after a failed write: the step it resumes from, and how."""
    try:
        progress = read_progress(out)
    except IntegrityError:
        progress = None
    saved = f"the run resumes from step {progress['step']} ({out / 'progress.json'})" if progress else ""
    return latest_good(out, error_number, saved)


def petra_process(
    rank: int,
    J: int,
    config: TrainConfig,
    begin: int,
    end: int,
    resume_from: str | None,
    sizes: list[int],
    run_lock: InheritedLock | None = None,
) -> dict[str, Any]:
    """Stage ``rank``'s whole run, segment by segment (see :func:`train_petra`); the last stage returns
    the last evaluation with ``step``, ``seconds`` and ``interrupted`` (the signal that stopped the run,
    or 0), the others ``{"interrupted": signal}``. ``run_lock``: the run directory's lock, held by this
    process too until it exits. An error that is the user's data, options or disk is raised as a
    :class:`revbits.petra.launch.StageError`, so that the launcher reports it in one line."""
    try:
        return _segments(rank, J, config, begin, end, resume_from, sizes)
    except WriteError as error:
        standing = petra_standing(Path(config.out), error.errno)
        raise StageError(str(error if error.note else error.noted(standing))) from None
    except (ConfigError, DataError) as error:
        raise StageError(str(error)) from None


def _collective(rank: int, what: str, call: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    """``call(*args, **kwargs)``, a collective of every stage at ``what``; its failure means that another
    stage is gone: a PeerError (which blames no one stage)."""
    try:
        call(*args, **kwargs)
    except RuntimeError as error:
        message = f"stage {rank} lost the other stages at {what} ({transport_reason(error)})"
        raise PeerError(message, None, -1) from error


def _segments(
    rank: int, J: int, config: TrainConfig, begin: int, end: int, resume_from: str | None, sizes: list[int]
) -> dict[str, Any]:
    k, out = config.accumulation, Path(config.out)
    base = PetraConfig(
        stages=J,
        accumulation=k,
        lr=config.lr,
        optimizer=stage_adamw,
        weight_decay=config.weight_decay,
        seed=config.seed,
        lr_schedule=partial(lr_factor, warmup=config.warmup, total=config.steps, lr=config.lr, min_lr=config.min_lr),
        device=config.device,
        timeout=config.petra_timeout,
    )
    task_of(config)  # the data first: a stage that cannot load it fails before any other waits on it
    own_group = join_process_group(rank, J, base)
    data = TaskBatches(config, config.steps * k)
    build = partial(stage_builder, config, J, sizes)
    result: dict[str, Any] = {"step": begin}
    started, a, previous, signum = time.perf_counter(), begin, resume_from, 0
    with StopFlag() as stop:
        while a < end and not signum:
            planned = min(end, (a // config.eval_interval + 1) * config.eval_interval)
            stages_dir = out / f"stages-{a:08d}-{planned:08d}"
            petra = replace(
                base,
                micro_batches=(planned - a) * k,
                first_micro_batch=a * k,
                resume_from=previous,
                out_dir=str(stages_dir),
            )
            summary = run_stage(rank, J, build, data, petra, stop)
            b = a + summary.micro_batches // k
            _collective(rank, "the end of a segment", dist.barrier)  # every stage has saved its state
            if rank == J - 1:
                seconds = time.perf_counter() - started
                result = write_segment(config, sizes, a, b, summary.losses, stages_dir, previous, not summary.stopped)
                result["seconds"] = seconds
            agreed = torch.tensor([stop.signum or 0])
            # also waits for the writer
            _collective(rank, "the end of a segment", dist.all_reduce, agreed, op=dist.ReduceOp.MAX)
            signum = int(agreed.item())
            a, previous = b, str(stages_dir)
    if own_group:
        dist.destroy_process_group()
    return {**(result if rank == J - 1 else {}), "interrupted": signum}


def write_segment(
    config: TrainConfig,
    sizes: list[int],
    begin: int,
    end: int,
    losses: Sequence[float],
    stages_dir: Path,
    previous: str | None,
    evaluate_now: bool,
) -> dict[str, Any]:
    """The last stage's part of a segment's end: the stage-state manifest, the train (and valid)
    metrics, the gathered weights as checkpoint ``end``, then ``progress.json``; the previous segment's
    stage states go last."""
    J, k, out = config.stages, config.accumulation, Path(config.out)
    write_manifest(stages_dir, sorted(path.name for path in stages_dir.iterdir() if not path.name.startswith(".")))
    torch.manual_seed(config.seed)
    model, stages = build_stages(config, J, sizes)
    gather_weights(model, stages, load_records(stages_dir, J))
    bad = [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad or not all(math.isfinite(loss) for loss in losses):
        cause = f"weight {bad[0]} holds non-finite values" if bad else "a training loss is not finite"
        raise DivergenceError(f"PETRA steps {begin + 1}-{end}: {cause}; lower --lr or check the data")
    metrics = MetricsLog(out / "metrics.jsonl")
    metrics.truncate_after(begin)
    for step in range(begin + 1, end + 1):  # as the training loop logs (TrainConfig.logs_at)
        if config.logs_at(step):
            window = losses[(max(begin, step - config.log_interval) - begin) * k : (step - begin) * k]
            metrics.write({"step": step, "split": "train", "loss": sum(window) / len(window)})
    result: dict[str, Any] = {"step": end}
    if evaluate_now:
        model.to(config.device).eval()
        result = {"step": end, "split": "valid", **evaluate(task_of(config), model, "valid")}
        metrics.write({**result, "stages": J})
    metrics.sync()
    save_checkpoint(out, end, model, {"config": config.to_dict(), "parallel": "petra"})
    progress = {"step": end, "stages": J, "accumulation": k, "sizes": sizes, "stages_dir": stages_dir.name}
    atomic_write_json(out / "progress.json", progress)
    if previous is not None:
        remove_tree(Path(previous))
    return result


def gather_weights(model: nn.Module, stages: Sequence[nn.Module], records: Sequence[Any]) -> None:
    """Load each stage's trained parameters into ``model``, whose modules the stages share."""
    names = {id(p): name for name, p in model.named_parameters()}
    state = {}
    for stage, record in zip(stages, records, strict=True):
        for name, param in stage.named_parameters():
            state[names[id(param)]] = record.params[name]
    missing = set(names.values()) - set(state)
    if missing:
        raise RuntimeError(f"no stage trained these parameters: {sorted(missing)}")
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(state[name])


__all__ = ["TaskBatches", "train_petra"]
