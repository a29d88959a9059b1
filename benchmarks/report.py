"""What the benchmark scripts share: their experiments' configuration files, writing raw rows beside their
table, and a short training run."""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path
from typing import Any

import torch

from revbits.train import TrainConfig
from revbits.train.config import read_config_file
from revbits.train.loop import make_optimizer
from revbits.train.tasks import Task, make_task

#: The experiments as configuration files that ``revbits train --config`` reads (docs/benchmarks.md).
CONFIGS = Path(__file__).resolve().parent / "configs"


def experiment_config(name: str) -> TrainConfig:
    """The options of benchmarks/configs/<name>.toml, read as ``revbits train --config`` reads them."""
    path = CONFIGS / f"{name}.toml"
    return TrainConfig.from_dict(read_config_file(path), source=str(path))


def mean_std(values: list[float], digits: int = 4) -> str:
    """``mean ± sample standard deviation`` of ``values`` (the value alone for one)."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def write_results(out: Path, results: Any, table: list[str]) -> None:
    """<out>.json holds the raw results and <out>.md the markdown table, which is also printed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    out.with_suffix(".md").write_text("\n".join(table) + "\n")
    print("\n".join(table))


def train_briefly(config: TrainConfig, steps: int) -> tuple[Task, torch.nn.Module, tuple[torch.Tensor, ...]]:
    """(task, model, the next training batch) after ``steps`` AdamW steps from seed 0 (gates and
    ranges then look like a trained model's, not an initial one's)."""
    task = make_task(config)
    torch.manual_seed(0)
    model = task.build_model()
    optimizer = make_optimizer(model, config)
    sampler = torch.Generator().manual_seed(0)
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        task.loss(model, task.train_batch(sampler, torch.device("cpu"))).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    return task, model, task.train_batch(sampler, torch.device("cpu"))


def write_text_report(out: Path, lines: list[str]) -> None:
    """Ends ``lines`` with the load average after the run, writes them to <out>.txt and prints them."""
    lines = [*lines, f"load average after {os.getloadavg()}"]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
