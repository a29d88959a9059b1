"""Checkpoints written atomically and loaded safely.

A checkpoint is a directory ``checkpoints/step_NNNNNNNN`` holding ``model.safetensors`` (the
weights) and ``state.pt`` (optimizer, scheduler, RNG states, step and config; plain tensors and
Python values, read with ``torch.load(weights_only=True)``). It is built under a temporary name
and renamed into place, then ``checkpoints/latest`` is replaced atomically; a crash at any
moment leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model
from torch import nn


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, damaged, or does not fit the model."""


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(run_dir: Path, step: int, model: nn.Module, state: dict[str, Any], keep: int = 2) -> Path:
    """Write the weights and ``state`` as checkpoint ``step``; keep the newest ``keep`` checkpoints."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp_step_{step:08d}_{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_model(model, str(tmp / "model.safetensors"))
    torch.save({**state, "step": step}, tmp / "state.pt")
    if final.exists():
        trash = root / f".old_{final.name}_{os.getpid()}"
        os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash)
    else:
        os.replace(tmp, final)
    _write_text_atomic(root / "latest", final.name)
    for old in sorted(root.glob("step_*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint ``checkpoints/latest`` names, or None if there is none.

    A pointer that is blank or names no checkpoint (a crash mid-write) falls back to the newest
    complete ``step_*`` directory.
    """
    root = Path(run_dir) / "checkpoints"
    pointer = root / "latest"
    if not pointer.exists():
        return None
    name = pointer.read_text().strip()
    if re.fullmatch(r"step_\d{8}", name) and _complete(root / name):
        return root / name
    complete = [path for path in sorted(root.glob("step_*")) if _complete(path)]
    if not complete:
        raise CheckpointError(f"{pointer} names {name!r}, and {root} holds no complete checkpoint")
    return complete[-1]


def _complete(path: Path) -> bool:
    return (path / "model.safetensors").is_file() and (path / "state.pt").is_file()


def load_checkpoint(run_dir: Path, model: nn.Module) -> dict[str, Any]:
    """Load the newest checkpoint's weights into ``model`` and return its state dict."""
    path = latest_checkpoint(run_dir)
    if path is None:
        raise CheckpointError(f"no checkpoint in {run_dir}: train first, or check the path")
    try:
        missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False)
    except (SafetensorError, OSError, RuntimeError, ValueError) as error:
        raise CheckpointError(f"{path / 'model.safetensors'} is corrupt or does not fit the model: {error}") from None
    if missing or unexpected:
        raise CheckpointError(
            f"{path / 'model.safetensors'} does not fit the model: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    try:
        state = torch.load(path / "state.pt", weights_only=True, map_location="cpu")
    except Exception as error:  # torch raises several types for damaged or unsafe files
        raise CheckpointError(f"{path / 'state.pt'} is corrupt or unsafe to load: {error}") from None
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"{path / 'state.pt'} is not a revbits training state")
    return state
