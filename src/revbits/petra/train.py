"""``revbits train --parallel petra --stages J``: a revbits model trained by PETRA, one process per stage.

The model is cut into pieces (:func:`revbits.petra.vit.vit_pieces`, or a RevNet's own pieces), the pieces
into J stages (``stage_split``: balanced by the cost of each piece measured on one micro-batch, by
parameter count, or given sizes), and :func:`launch` runs the stages. Optimiser updates are ``steps``; each uses
``accumulation`` micro-batches of ``batch_size`` examples, so micro-batch m is the training batch drawn
from seed (seed, m). AdamW (betas 0.9, 0.95, decay on matrices) with the training command's warm-up and
cosine schedule runs per stage. Gradient clipping is not applied (a global norm would need every
stage's gradients at once). The trained weights are gathered into the plain model, evaluated, and
saved as a checkpoint that ``revbits eval`` reads like any other run.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..train.checkpoint import save_checkpoint
from ..train.config import ConfigError, TrainConfig
from ..train.loop import adamw, evaluate
from ..train.metrics import MetricsLog
from ..train.schedule import lr_factor
from ..train.tasks import Task, make_task
from .launch import launch
from .profile import sizes_by_time
from .record import load_records
from .runtime import PetraConfig, join_process_group, run_stage
from .stages import sizes_by_params, split
from .vit import vit_pieces

PETRA_MODELS = ("vit", "revnet")
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
        sampler = torch.Generator().manual_seed(self.config.seed * 1_000_003 + m)
        return task_of(self.config).train_batch(sampler, torch.device("cpu"))


def model_pieces(model: nn.Module, config: TrainConfig) -> list[nn.Module]:
    """The PETRA pieces of a task's model; they share its modules, so training them trains the model."""
    if config.model == "revnet":
        return list(model.pieces)
    return vit_pieces(model, config.seed)


def build_stages(config: TrainConfig, J: int, sizes: list[int]) -> tuple[nn.Module, list[nn.Module]]:
    """(model, its J stages of ``sizes`` pieces each); the caller seeds torch first, so every process
    builds the same weights."""
    model = task_of(config).build_model()
    return model, split(model_pieces(model, config), J, sizes)


def stage_builder(config: TrainConfig, J: int, sizes: list[int]) -> list[nn.Module]:
    return build_stages(config, J, sizes)[1]


def stage_sizes(config: TrainConfig, data: Sequence[tuple[Tensor, Tensor]]) -> list[int]:
    """Pieces per stage for ``config.stage_split``: the given sizes; balanced by parameter count for
    "params"; for "time", balanced by each piece's PETRA cost (f + r + g + b) measured on the first
    micro-batch with a throw-away copy of the model, on ``config.device``."""
    given = config.stage_sizes()
    if given is not None:
        return given
    torch.manual_seed(config.seed)
    pieces = model_pieces(task_of(config).build_model(), config)
    if config.stage_split == "params" or config.stages == 1:
        return sizes_by_params(pieces, config.stages)
    device = torch.device(config.device)
    pieces = [piece.to(device) for piece in pieces]
    x, target = (t.to(device) for t in data[0])
    return sizes_by_time(pieces, x, target, config.stages)


def stage_adamw(params: list[nn.Parameter], petra: PetraConfig) -> torch.optim.Optimizer:
    """The training command's optimiser over one stage's parameters (revbits.train.loop.adamw)."""
    return adamw(params, petra.lr, petra.weight_decay)


def check_petra_config(config: TrainConfig) -> None:
    if config.model not in PETRA_MODELS:
        raise ConfigError(f"--parallel petra trains {', '.join(PETRA_MODELS)} models so far, not {config.model}")
    if config.model == "vit" and config.memory != "bdia":
        raise ConfigError(f"--parallel petra needs reversible stages: --memory bdia, got {config.memory}")
    most = config.n_layer + 1 if config.model == "vit" else 2 * config.n_layer + 3  # (TrainConfig checks >= 1)
    if config.stages > most:
        raise ConfigError(f"--stages {config.stages} is more than the {most} stages {config.model} can be split into")


def torchrun_rank(J: int) -> int | None:
    """This process's stage when started by torchrun (RANK and WORLD_SIZE set), else None."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    if int(os.environ["WORLD_SIZE"]) != J:
        raise ConfigError(f"torchrun started {os.environ['WORLD_SIZE']} processes for --stages {J}")
    return int(os.environ["RANK"])


def train_petra(config: TrainConfig, resume: bool = False, quiet: bool = False) -> dict[str, Any]:
    """Train ``config`` with PETRA over ``config.stages`` processes up to ``stop_at`` (or ``steps``),
    from the last segment's stage states when ``resume``; returns the evaluation at the end.

    The processes are started here (:func:`launch`), or, under ``torchrun --nproc-per-node J``, this
    process is stage RANK: stage 0 measures the split and sends it to the others, and the last stage
    gathers the weights, evaluates and writes the run (the others return an empty dict).

    Each call is one segment: the pipeline fills, runs and drains, then the stage states go to a new
    ``stages-<step>`` directory that ``progress.json`` names (written last, atomically), so a failed
    segment leaves the previous one intact.
    """
    check_petra_config(config)
    out = Path(config.out)
    progress_file = out / "progress.json"
    J, k = config.stages, config.accumulation
    begin, resume_from, sizes = 0, None, None
    if resume:
        if not progress_file.is_file():
            raise ConfigError(f"--resume: {out} holds no PETRA run to continue (no progress.json)")
        progress = json.loads(progress_file.read_text())
        if (progress["stages"], progress["accumulation"]) != (J, k):
            raise ConfigError(
                f"--resume: the run used --stages {progress['stages']} --accumulation {progress['accumulation']}"
            )
        begin, resume_from = progress["step"], str(out / progress["stages_dir"])
        # the stage states only fit the split they were trained with (runs saved before splits were
        # recorded were split by parameter count)
        sizes = progress.get("sizes") or stage_sizes(replace(config, stage_split="params"), [])
    elif (out / "metrics.jsonl").exists():
        raise ConfigError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    end = config.stop_at or config.steps
    if end <= begin:
        raise ConfigError(f"the run is already at step {begin}; raise --steps to continue it")
    stages_dir = out / f"stages-{end:08d}"
    petra = PetraConfig(
        stages=J,
        micro_batches=(end - begin) * k,
        accumulation=k,
        lr=config.lr,
        optimizer=stage_adamw,
        weight_decay=config.weight_decay,
        seed=config.seed,
        out_dir=str(stages_dir),
        lr_schedule=partial(lr_factor, warmup=config.warmup, total=config.steps, lr=config.lr, min_lr=config.min_lr),
        first_micro_batch=begin * k,
        resume_from=resume_from,
        device=config.device,
    )
    rank = torchrun_rank(J)
    writer = rank is None or rank == J - 1  # the last stage has the losses; it writes the run
    if writer:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(config.to_dict(), indent=1))
    data = TaskBatches(config, config.steps * k)
    task_of(config)  # every process loads the data before any waits on another
    start = time.perf_counter()
    if rank is None:
        sizes = sizes or stage_sizes(config, data)
        summaries = launch(J, run_stage, (partial(stage_builder, config, J, sizes), data, petra))
        losses = summaries[-1].losses
    else:
        join_process_group(rank, J, petra)
        decided = [sizes or (stage_sizes(config, data) if rank == 0 else None)]
        dist.broadcast_object_list(decided, src=0)  # every stage must cut the model the same way
        sizes = decided[0]
        losses = run_stage(None, None, partial(stage_builder, config, J, sizes), data, petra).losses
        dist.barrier()  # every stage has saved its record
        dist.destroy_process_group()
        if not writer:
            return {}
    seconds = time.perf_counter() - start
    torch.manual_seed(config.seed)
    model, stages = build_stages(config, J, sizes)
    gather_weights(model, stages, load_records(stages_dir, J))
    metrics = MetricsLog(out / "metrics.jsonl")
    metrics.truncate_after(begin)
    for step in range(begin + 1, end + 1):  # as the training loop logs: every log_interval steps and the last
        if step % config.log_interval == 0 or step == config.steps:
            window = losses[(max(begin, step - config.log_interval) - begin) * k : (step - begin) * k]
            metrics.write({"step": step, "split": "train", "loss": sum(window) / len(window)})
    model.to(config.device).eval()
    result = {"step": end, "split": "valid", **evaluate(task_of(config), model, "valid")}
    metrics.write({**result, "seconds": seconds, "stages": J})
    save_checkpoint(out, end, model, {"config": config.to_dict(), "parallel": "petra"})
    progress = {"step": end, "stages": J, "accumulation": k, "sizes": sizes, "stages_dir": stages_dir.name}
    tmp = progress_file.with_name("progress.json.tmp")
    tmp.write_text(json.dumps(progress))
    os.replace(tmp, progress_file)
    if resume_from is not None:
        shutil.rmtree(resume_from, ignore_errors=True)
    if not quiet:
        print(f"PETRA, {J} stages of {sizes} pieces: steps {begin}-{end} in {seconds:.0f} s; valid {result}")
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
