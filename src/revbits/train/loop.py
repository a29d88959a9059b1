"""The training loop: AdamW, warm-up + cosine, gradient clipping, periodic eval, atomic checkpoints.

A run directory holds ``config.json``, ``metrics.jsonl`` (one JSON object per log or eval) and
``checkpoints/``. ``resume=True`` continues the newest checkpoint of ``config.out`` exactly:
weights, optimiser, scheduler, the global RNG and the data sampler's RNG are all restored, so
on CPU 20 steps plus a resume to 40 give the same weights, bit for bit, as 40 straight steps.
A run stopped by SIGINT or SIGTERM saves at the step it was in; one killed outright resumes from
its newest checkpoint, or from step 0. A non-finite loss, gradient norm or weight stops the run
before anything of that step is saved. The run holds the directory's lock from start to end
(:mod:`.rundir`): a second run there is refused.
"""

from __future__ import annotations

import json
import math
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
from ..io import WriteError, atomic_write_text, fault_point
from ..mesa import compressors_in
from .checkpoint import load_checkpoint_weights, save_checkpoint
from .config import ConfigError, TrainConfig
from .lr_schedule import lr_factor
from .metrics import MetricsLog
from .rundir import RunLock, check_start, hold_run, noted_write_error
from .tasks import Task, make_task


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


DIVERGENCE_HINT = "lower --lr, set --grad-clip, or check the data; the checkpoints already saved are kept"


def check_finite(step: int, loss: torch.Tensor, grad_norm: torch.Tensor, model: nn.Module) -> None:
    """:class:`DivergenceError` naming ``step`` and the cause unless the loss, the gradient norm and
    every weight are finite (:func:`check_update` then :func:`check_weights`; the loop runs each once
    per step, on either side of the optimiser's update)."""
    check_update(step, loss, grad_norm)
    check_weights(step, model)


def check_update(step: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
    """:class:`DivergenceError` naming ``step`` unless the loss and the gradient norm are finite."""
    if not math.isfinite(loss.item()):
        raise DivergenceError(f"step {step}: the training loss is {loss.item()}; {DIVERGENCE_HINT}")
    if not math.isfinite(grad_norm.item()):
        message = f"step {step}: the gradient norm is {grad_norm.item()} before the update; {DIVERGENCE_HINT}"
        raise DivergenceError(message)


def check_weights(step: int, model: nn.Module) -> None:
    """:class:`DivergenceError` naming ``step`` and the first weight that holds a non-finite value."""
    hint = DIVERGENCE_HINT
    params = dict(model.named_parameters())
    # fast path: one fused norm over all weights (inf or nan if any weight is; it may also overflow for
    # huge finite weights, so the exact check below decides)
    if params and not math.isfinite(nn.utils.get_total_norm(list(params.values())).item()):
        bad = next((name for name, p in params.items() if not torch.isfinite(p).all()), None)
        if bad is not None:
            raise DivergenceError(f"step {step}: weight {bad} holds non-finite values after the update; {hint}")


def build_model(task: Task, config: TrainConfig | None = None) -> nn.Module:
    """The task's model under ``config`` (by default the task's own); a model constructor's refusal of
    the options (a ValueError raised while the model checks its configuration) becomes a ConfigError
    naming it."""
    try:
        return task.build_model(task.config if config is None else config)
    except ConfigError:  # already names its cause
        raise
    except ValueError as error:
        raise ConfigError(f"the model cannot be built with these options: {error}") from None


def train(config: TrainConfig, resume: bool = False, quiet: bool = False) -> dict[str, Any]:
    """Train ``config.model`` on ``config.data``; returns the last evaluation and run facts.

    ``resume``: continue from the newest checkpoint of ``config.out``, or from step 0 when the run was
    stopped before its first one. The run holds the lock of ``config.out`` throughout
    (:mod:`revbits.train.rundir`). SIGINT or SIGTERM during the loop saves a checkpoint at the current
    step and raises :class:`revbits.interrupt.Interrupted`; a failed write raises a
    :class:`revbits.io.WriteError` that names the file, the error and the newest checkpoint.
    """
    out = Path(config.out)
    device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda asked for, but torch sees no CUDA device")
    with hold_run(out) as lock:
        try:
            return Trainer.start(config, device, resume, quiet, lock).run()
        except WriteError as error:
            raise noted_write_error(error, out) from None


class Trainer:
    """A run under way: its task, model, optimiser, schedule, sampler, metrics and step."""

    @classmethod
    def start(cls, config: TrainConfig, device: torch.device, resume: bool, quiet: bool, lock: RunLock) -> Trainer:
        """Set up the run in ``config.out`` (``lock``: held by the caller): from the newest checkpoint when
        ``resume``, after checking the options against the ones it was trained with."""
        out = Path(config.out)
        start = check_start(out, config, resume)  # the rule the PETRA command keeps too
        lock.proceed(quiet)  # the checks passed: from here on the run writes
        if start.checkpoint is not None and not (out / "config.json").exists() and not quiet:
            rebuilt = f"{out / 'config.json'} was missing; rebuilt from {start.checkpoint.name}"
            print(f"revbits train: {rebuilt}", file=sys.stderr)
        trainer = cls(config, device, quiet)
        if start.checkpoint is not None:
            trainer.restore(start.checkpoint, start.state)
        elif resume and not quiet:
            print(f"revbits train: {out} holds no checkpoint yet; starting from step 0", file=sys.stderr)
        trainer.metrics.truncate_after(trainer.step)
        atomic_write_text(out / "config.json", json.dumps(config.to_dict(), indent=1))
        trainer.task.save_assets(out)
        return trainer

    def __init__(self, config: TrainConfig, device: torch.device, quiet: bool) -> None:
        self.config, self.device, self.quiet, self.out = config, device, quiet, Path(config.out)
        self.task = make_task(config)
        torch.manual_seed(config.seed)
        self.model = build_model(self.task).to(device)
        self.optimizer = make_optimizer(self.model, config)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda s: lr_factor(s, warmup=config.warmup, total=config.steps, lr=config.lr, min_lr=config.min_lr),
        )
        self.sampler = torch.Generator().manual_seed(config.seed + 1)
        self.metrics = MetricsLog(self.out / "metrics.jsonl")
        self.step = 0

    def restore(self, path: Path, state: dict[str, Any]) -> None:
        """Continue checkpoint ``path`` (``state``: its verified state): weights, optimiser, schedule,
        RNG states and Mesa's compressors."""
        load_checkpoint_weights(path, self.model)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        _restore_rng(state["rng"], self.device, self.sampler)
        for name, compressor in compressors_in(self.model).items():
            compressor.load_state_dict(state.get("mesa", {}).get(name, {}))
        self.step = int(state["step"])

    def save(self, step: int) -> Path:
        """Checkpoint ``step`` (the metrics written so far made durable first)."""
        self.metrics.sync()
        return save_checkpoint(
            self.out,
            step,
            self.model,
            {
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "rng": _rng_state(self.device, self.sampler),
                "mesa": {name: c.state_dict() for name, c in compressors_in(self.model).items()},
                "config": self.config.to_dict(),
            },
        )

    def train_step(self) -> tuple[torch.Tensor, Any]:
        """One optimiser step on the next training batch; :class:`DivergenceError` if it is not finite."""
        batch = self.task.train_batch(self.sampler, self.device)
        loss = self.task.loss(self.model, batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.config.grad_clip:
            grad_norm = nn.utils.clip_grad_norm_(params, self.config.grad_clip)
        else:
            grad_norm = nn.utils.get_total_norm([p.grad for p in params])
        check_update(self.step + 1, loss, grad_norm)  # before the update, so that nothing of it is applied
        try:
            self.optimizer.step()
        except RuntimeError as error:  # torch refuses an update that overflows float32 (a huge --lr)
            if "overflow" not in str(error):
                raise
            message = f"step {self.step + 1}: the optimiser's update overflows ({error}); lower --lr"
            raise DivergenceError(message) from None
        self.scheduler.step()
        check_weights(self.step + 1, self.model)
        self.step += 1
        return loss, batch

    def run(self) -> dict[str, Any]:
        """Train up to ``stop_at`` (or ``steps``), logging, evaluating and saving as configured; returns
        the last evaluation."""
        config = self.config
        last_step = config.stop_at or config.steps
        self.model.train()
        self.result: dict[str, Any] = {"step": self.step}
        self.progress = tqdm(
            total=last_step, initial=self.step, disable=self.quiet, desc=f"{config.model}/{config.memory}", unit="step"
        )
        self.window = (time.perf_counter(), 0)
        try:
            with StopFlag() as stop:
                while self.step < last_step:
                    loss, batch = self.train_step()
                    self.record(loss, batch)
                    fault_point("train.step")
                    step = self.step
                    if step % config.eval_interval == 0 or step == last_step or stop.signum:
                        saved = self.save(step)
                    if stop.signum and step < last_step:
                        raise Interrupted(
                            stop.signum,
                            f"{stop.name} at step {step}: saved {saved}; continue with "
                            f"revbits train --out {self.out} --resume",
                        )
        finally:  # the bar's line ends before any message
            self.progress.close()
        return self.result

    def record(self, loss: torch.Tensor, batch: Any) -> None:
        """The metrics of the step just taken: the training loss every ``log_interval`` steps (with the
        learning rate, throughput and peak memory), an evaluation every ``eval_interval``."""
        config, task, step, progress = self.config, self.task, self.step, self.progress
        started, items = self.window
        items += task.items(batch)
        self.window = (started, items)
        if config.logs_at(step):
            per_s = items / (time.perf_counter() - started)
            record = {
                "step": step,
                "split": "train",
                "loss": loss.item(),
                "lr": self.scheduler.get_last_lr()[0],
                f"{task.item_name}_per_s": per_s,
                "peak_mib": peak_memory_mib(self.device),
            }
            self.metrics.write(record)
            memory = f"{record['peak_mib']:.0f}MiB"
            progress.set_postfix(loss=f"{record['loss']:.3f}", mem=memory, **{f"{task.item_name}/s": f"{per_s:.0f}"})
            self.window = (time.perf_counter(), 0)
        progress.update(1)
        if step % config.eval_interval == 0 or step == config.steps:
            self.result = {"step": step, "split": "valid", **evaluate(task, self.model, "valid")}
            self.metrics.write(self.result)
            values = ", ".join(f"{k} {v:.4g}" for k, v in self.result.items() if isinstance(v, float))
            progress.write(f"step {step}: {values}")
