"""The training loop: AdamW, warm-up + cosine, gradient clipping, periodic eval, atomic checkpoints.

A run directory holds ``config.json``, ``metrics.jsonl`` (one JSON object per log or eval) and
``checkpoints/``. ``resume=True`` continues the newest checkpoint of ``config.out`` exactly:
weights, optimiser, scheduler, the global RNG and the data sampler's RNG are all restored, so
on CPU 20 steps plus a resume to 40 give the same weights, bit for bit, as 40 straight steps.
"""

from __future__ import annotations

import dataclasses
import json
import math
import resource
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from ..mesa import compressors_in
from .checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from .config import ConfigError, TrainConfig
from .metrics import MetricsLog
from .schedule import lr_factor
from .tasks import Task, make_task

# Options that may differ between a run and its resumption (everything else must match).
RESUMABLE_CHANGES = {"steps", "stop_at", "eval_interval", "log_interval", "device", "out"}


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the model's parameters (see :func:`adamw`)."""
    return adamw(model.parameters(), config.lr, config.weight_decay)


def adamw(parameters: Iterable[nn.Parameter], lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW (betas 0.9, 0.95) with weight decay on matrices only (not on biases, norms, or embeddings' positions)."""
    trainable = [p for p in parameters if p.requires_grad]
    decay = [p for p in trainable if p.dim() >= 2]
    no_decay = [p for p in trainable if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))


def peak_memory_mib(device: torch.device) -> float:
    """CUDA: torch.cuda.max_memory_allocated; CPU: the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rng_state(device: torch.device, sampler: torch.Generator) -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state(), "sampler": sampler.get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _restore_rng(state: dict[str, torch.Tensor], device: torch.device, sampler: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    sampler.set_state(state["sampler"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _check_resumable(saved: dict[str, Any], config: TrainConfig) -> None:
    """Refuse to resume with changed options. An option the saved run does not name (one added to
    revbits after it was written) counts as its default."""
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    saved = {**defaults, **saved}
    changed = sorted(k for k, v in config.to_dict().items() if k not in RESUMABLE_CHANGES and saved.get(k) != v)
    if changed:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {getattr(config, k)!r}" for k in changed)
        raise ConfigError(
            f"cannot resume with changed options ({details}); only {sorted(RESUMABLE_CHANGES)} may change"
        )


def evaluate(task: Task, model: nn.Module, split: str) -> dict[str, float]:
    """Metrics on ``split`` in eval mode, without touching the training RNG."""
    was_training = model.training
    model.eval()
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.no_grad(), torch.random.fork_rng(devices=devices):
        metrics = task.evaluate(model, split)
    model.train(was_training)
    return metrics


def train(config: TrainConfig, resume: bool = False, quiet: bool = False) -> dict[str, Any]:
    """Train ``config.model`` on ``config.data``; returns the last evaluation and run facts."""
    out = Path(config.out)
    device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda asked for, but torch sees no CUDA device")
    has_checkpoint = latest_checkpoint(out) is not None if out.exists() else False
    if resume and not has_checkpoint:
        raise CheckpointError(f"--resume: no checkpoint in {out}")
    if not resume and (has_checkpoint or (out / "metrics.jsonl").exists()):
        raise ConfigError(f"{out} already holds a run; pass --resume to continue it or choose another --out")

    if resume and (out / "config.json").exists():
        _check_resumable(json.loads((out / "config.json").read_text()), config)
    task = make_task(config)
    torch.manual_seed(config.seed)
    model = task.build_model().to(device)
    optimizer = make_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, warmup=config.warmup, total=config.steps, lr=config.lr, min_lr=config.min_lr)
    )
    sampler = torch.Generator().manual_seed(config.seed + 1)
    metrics = MetricsLog(out / "metrics.jsonl")
    step = 0
    if resume:
        state = load_checkpoint(out, model)
        _check_resumable(state["config"], config)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _restore_rng(state["rng"], device, sampler)
        for name, compressor in compressors_in(model).items():
            compressor.load_state_dict(state.get("mesa", {}).get(name, {}))
        step = int(state["step"])
        metrics.truncate_after(step)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config.to_dict(), indent=1))
    task.save_assets(out)

    last_step = config.stop_at or config.steps
    model.train()
    result: dict[str, Any] = {"step": step}
    progress = tqdm(total=last_step, initial=step, disable=quiet, desc=f"{config.model}/{config.memory}", unit="step")
    window_start, window_items = time.perf_counter(), 0
    while step < last_step:
        batch = task.train_batch(sampler, device)
        loss = task.loss(model, batch)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"training loss is {loss.item()} at step {step + 1}; lower --lr or check the data")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        scheduler.step()
        step += 1
        window_items += task.items(batch)
        if step % config.log_interval == 0 or step == config.steps:
            elapsed = time.perf_counter() - window_start
            record = {
                "step": step,
                "split": "train",
                "loss": loss.item(),
                "lr": scheduler.get_last_lr()[0],
                f"{task.item_name}_per_s": window_items / elapsed,
                "peak_mib": peak_memory_mib(device),
            }
            metrics.write(record)
            progress.set_postfix(
                loss=f"{record['loss']:.3f}",
                mem=f"{record['peak_mib']:.0f}MiB",
                **{f"{task.item_name}/s": f"{window_items / elapsed:.0f}"},
            )
            window_start, window_items = time.perf_counter(), 0
        progress.update(1)
        if step % config.eval_interval == 0 or step == config.steps:
            result = {"step": step, "split": "valid", **evaluate(task, model, "valid")}
            metrics.write(result)
            progress.write(
                f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in result.items() if isinstance(v, float))
            )
        if step % config.eval_interval == 0 or step == last_step:
            save_checkpoint(
                out,
                step,
                model,
                {
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "rng": _rng_state(device, sampler),
                    "mesa": {name: c.state_dict() for name, c in compressors_in(model).items()},
                    "config": config.to_dict(),
                },
            )
    progress.close()
    return result
