"""The training loop: AdamW, warm-up + cosine, gradient clipping, periodic eval, atomic checkpoints.

A run directory holds ``config.json``, ``metrics.jsonl`` (one JSON object per log or eval) and
``checkpoints/``. ``resume=True`` continues the newest checkpoint of ``config.out`` exactly:
weights, optimiser, scheduler, the global RNG and the data sampler's RNG are all restored, so
on CPU 20 steps plus a resume to 40 give the same weights, bit for bit, as 40 straight steps.
A run stopped by SIGINT or SIGTERM saves at the step it was in; one killed outright resumes from
its newest checkpoint, or from step 0. A non-finite loss, gradient norm or weight stops the run
before anything of that step is saved.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import resource
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from ..interrupt import Interrupted, StopFlag
from ..io import IntegrityError, atomic_write_text, fault_point, read_json
from ..mesa import compressors_in
from .checkpoint import clean_run_dir, latest_checkpoint, load_checkpoint, save_checkpoint
from .config import ConfigError, TrainConfig
from .lr_schedule import lr_factor
from .metrics import MetricsLog
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


class DivergenceError(FloatingPointError):
    """Training produced a non-finite loss, gradient or weight; nothing of that step was saved."""


def check_finite(step: int, loss: torch.Tensor, grad_norm: torch.Tensor, model: nn.Module) -> None:
    """:class:`DivergenceError` naming ``step`` and the cause unless the loss, the gradient norm and
    every weight are finite."""
    hint = "lower --lr, set --grad-clip, or check the data; the checkpoints already saved are kept"
    if not math.isfinite(loss.item()):
        raise DivergenceError(f"step {step}: the training loss is {loss.item()}; {hint}")
    if not math.isfinite(grad_norm.item()):
        raise DivergenceError(f"step {step}: the gradient norm is {grad_norm.item()} before the update; {hint}")
    params = dict(model.named_parameters())
    # fast path: one fused norm over all weights (inf or nan if any weight is; it may also overflow for
    # huge finite weights, so the exact check below decides)
    if params and not math.isfinite(nn.utils.get_total_norm(list(params.values())).item()):
        bad = next((name for name, p in params.items() if not torch.isfinite(p).all()), None)
        if bad is not None:
            raise DivergenceError(f"step {step}: weight {bad} holds non-finite values after the update; {hint}")


def prepare_out(out: Path) -> None:
    """Create the run directory, or a ConfigError in one line saying why ``--out`` cannot be used."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a directory for the run")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise ConfigError(f"--out {out}: cannot write there ({error.strerror or error})") from None


def start_state(out: Path, resume: bool) -> Path | None:
    """The checkpoint a run starts from (None: from step 0), after cleaning an interrupted write's
    leftovers. A run killed before its first checkpoint resumes from the start."""
    if out.is_dir():
        clean_run_dir(out)
    newest = latest_checkpoint(out)
    if resume and newest is None and not (out / "config.json").is_file():
        raise ConfigError(f"--resume: {out} holds no run to continue (no config.json); check --out")
    if not resume and (newest is not None or (out / "metrics.jsonl").exists()):
        raise ConfigError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    return newest if resume else None


def build_model(task: Task, config: TrainConfig | None = None) -> nn.Module:
    """The task's model under ``config`` (by default the task's own); a model constructor's refusal of
    the options (a ValueError raised while the model checks its configuration) becomes a ConfigError
    naming it."""
    try:
        return task.build_model(task.config if config is None else config)
    except ValueError as error:
        raise ConfigError(f"the model cannot be built with these options: {error}") from None


def train(config: TrainConfig, resume: bool = False, quiet: bool = False) -> dict[str, Any]:
    """Train ``config.model`` on ``config.data``; returns the last evaluation and run facts.

    ``resume``: continue from the newest checkpoint of ``config.out``, or from step 0 when the run was
    stopped before its first one. SIGINT or SIGTERM during the loop saves a checkpoint at the current
    step and raises :class:`revbits.interrupt.Interrupted`.
    """
    out = Path(config.out)
    device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda asked for, but torch sees no CUDA device")
    start = start_state(out, resume)
    prepare_out(out)
    if resume and (out / "config.json").exists():
        saved = read_json(out / "config.json", "run configuration")
        if not isinstance(saved, dict):
            raise IntegrityError(f"{out / 'config.json'} is damaged: it holds no table of options")
        _check_resumable(saved, config)
    task = make_task(config)
    torch.manual_seed(config.seed)
    model = build_model(task).to(device)
    optimizer = make_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, warmup=config.warmup, total=config.steps, lr=config.lr, min_lr=config.min_lr)
    )
    sampler = torch.Generator().manual_seed(config.seed + 1)
    metrics = MetricsLog(out / "metrics.jsonl")
    step = 0
    if start is not None:
        state = load_checkpoint(out, model)
        _check_resumable(state["config"], config)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _restore_rng(state["rng"], device, sampler)
        for name, compressor in compressors_in(model).items():
            compressor.load_state_dict(state.get("mesa", {}).get(name, {}))
        step = int(state["step"])
    elif resume and not quiet:
        print(f"revbits train: {out} holds no checkpoint yet; starting from step 0", file=sys.stderr)
    metrics.truncate_after(step)
    atomic_write_text(out / "config.json", json.dumps(config.to_dict(), indent=1))
    task.save_assets(out)

    def save(step: int) -> Path:
        metrics.sync()
        return save_checkpoint(
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

    last_step = config.stop_at or config.steps
    model.train()
    result: dict[str, Any] = {"step": step}
    progress = tqdm(total=last_step, initial=step, disable=quiet, desc=f"{config.model}/{config.memory}", unit="step")
    window_start, window_items = time.perf_counter(), 0
    with StopFlag() as stop:
        while step < last_step:
            batch = task.train_batch(sampler, device)
            loss = task.loss(model, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            params = [p for p in model.parameters() if p.grad is not None]
            if config.grad_clip:
                grad_norm = nn.utils.clip_grad_norm_(params, config.grad_clip)
            else:
                grad_norm = nn.utils.get_total_norm([p.grad for p in params])
            if not math.isfinite(loss.item()) or not math.isfinite(grad_norm.item()):
                check_finite(step + 1, loss, grad_norm, model)
            try:
                optimizer.step()
            except RuntimeError as error:  # torch refuses an update that overflows float32 (a huge --lr)
                if "overflow" not in str(error):
                    raise
                message = f"step {step + 1}: the optimiser's update overflows ({error}); lower --lr"
                raise DivergenceError(message) from None
            scheduler.step()
            check_finite(step + 1, loss, grad_norm, model)
            step += 1
            window_items += task.items(batch)
            if config.logs_at(step):
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
            fault_point("train.step")
            if step % config.eval_interval == 0 or step == last_step or stop.signum:
                saved = save(step)
            if stop.signum and step < last_step:
                progress.close()
                raise Interrupted(
                    stop.signum,
                    f"{stop.name} at step {step}: saved {saved}; continue with "
                    f"revbits train --out {out} --resume",
                )
    progress.close()
    return result
