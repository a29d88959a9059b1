"""Checkpoints that are complete or absent, verified on load.

A checkpoint is a directory ``checkpoints/step_NNNNNNNN`` holding ``model.safetensors`` (the weights),
``state.pt`` (optimizer, scheduler, RNG states, step and config; plain tensors and Python values, read
with ``torch.load(weights_only=True)``) and ``manifest.json`` (each file's size and sha256). It is
written under a temporary name, every file fsync'd, the manifest last, then renamed into place and the
directory fsync'd; ``checkpoints/latest`` is then replaced atomically. ``latest`` is only a hint for
people and tools: the newest checkpoint is the ``step_*`` directory with the highest step, so a crash
between the rename and the pointer loses nothing.

Loading takes the newest checkpoint and checks every file against its manifest. A damaged or missing
file is refused with a message that names it; an older checkpoint is never used in its place. The
state holds the run's options (``config``), so a resumed run is checked against the options its
checkpoint was trained with before any weight is loaded (:func:`read_checkpoint_state`).

A write that fails (disk full, ...) is a :class:`revbits.io.WriteError` naming the checkpoint's file;
the checkpoints saved before are untouched (nothing is pruned until the new one is in place).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model
from torch import nn

from ..io import (
    IntegrityError,
    WriteError,
    atomic_write,
    atomic_write_stream,
    atomic_write_text,
    fault_point,
    first_line,
    fsync_dir,
    remove_leftovers,
    remove_tree,
    temp_name,
    unsafe_pickle,
    verify_manifest,
    write_error,
    write_manifest,
)

STEP_DIR = re.compile(r"step_(\d{8})")
FILES = ("model.safetensors", "state.pt")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, damaged, or does not fit the model."""


def save_checkpoint(run_dir: Path, step: int, model: nn.Module, state: dict[str, Any], keep: int = 2) -> Path:
    """Write the weights and ``state`` as checkpoint ``step``; keep the newest ``keep`` checkpoints."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = temp_name(final)
    try:
        tmp.mkdir()
        atomic_write(tmp / FILES[0], lambda path: save_model(model, str(path)))
        fault_point("checkpoint.weights")
        atomic_write_stream(tmp / FILES[1], lambda f: torch.save({**state, "step": step}, f))
        fault_point("checkpoint.state")
        write_manifest(tmp, FILES, {"step": step})
        fault_point("checkpoint.manifest")
        if final.exists():  # the same step saved again (a resumed run that stopped where it began)
            remove_tree(final)
        tmp.rename(final)
    except BaseException as error:
        remove_tree(tmp)
        failed = write_error(error, tmp) if isinstance(error, Exception) else None
        if failed is None:
            raise
        # name the file as it would have been called, not its temporary name
        name = Path(failed.filename).name if Path(failed.filename).parent == tmp else ""
        raise WriteError(final / name if name else final, failed.errno) from None
    fsync_dir(root)
    fault_point("checkpoint.rename")
    atomic_write_text(root / "latest", final.name + "\n")
    fault_point("checkpoint.latest")
    for old in checkpoint_dirs(run_dir)[:-keep]:
        remove_tree(old)
        fault_point("checkpoint.prune")
    return final


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """The ``step_*`` directories of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(path for path in root.iterdir() if STEP_DIR.fullmatch(path.name) and path.is_dir())


def clean_run_dir(run_dir: Path) -> None:
    """Remove what an interrupted write left behind (temporary files and directories)."""
    for folder in (Path(run_dir), Path(run_dir) / "checkpoints"):
        remove_leftovers(folder)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint directory of a run (highest step), or None if there is none.

    ``checkpoints/latest`` is not needed: a missing or stale pointer changes nothing.
    """
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


def verify_checkpoint(path: Path) -> None:
    """:class:`CheckpointError` naming the file, unless every file of checkpoint ``path`` matches its manifest."""
    try:
        verify_manifest(path, FILES)
    except IntegrityError as error:
        problem = str(error)
        if not (path / "manifest.json").exists() and all((path / name).is_file() for name in FILES):
            problem = (
                f"{path / 'manifest.json'} is missing: it was deleted, or the checkpoint was written by a revbits "
                "older than manifests (which cannot be checked, and is not loaded)"
            )
        older = [p.name for p in checkpoint_dirs(path.parent.parent) if p.name < path.name]
        way_out = f"; move {path.name} aside to use {older[-1]}" if older else ""
        raise CheckpointError(f"checkpoint {path.name} cannot be used: {problem}{way_out}") from None


def load_checkpoint(run_dir: Path, model: nn.Module) -> dict[str, Any]:
    """Load the newest checkpoint's weights into ``model`` (after verifying it) and return its state dict."""
    path = latest_checkpoint(run_dir)
    if path is None:
        raise CheckpointError(f"no checkpoint in {run_dir}: train first, or check the path")
    state = read_checkpoint_state(path)
    load_checkpoint_weights(path, model)
    return state


def read_checkpoint_state(path: Path) -> dict[str, Any]:
    """Verify every file of checkpoint ``path`` against its manifest, then read its state (optimiser,
    schedule, RNG states, step and the run's options, ``config``) with ``weights_only=True``. A
    pickle that asks to run code is refused naming the file."""
    verify_checkpoint(path)
    try:
        state = torch.load(path / FILES[1], weights_only=True, map_location="cpu")
    except Exception as error:  # torch raises several types for damaged or unsafe files
        reason = unsafe_pickle(error) or f"it is corrupt ({first_line(error)})"
        raise CheckpointError(f"{path / FILES[1]} is refused: {reason}") from None
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"{path / FILES[1]} is not a revbits training state")
    return state


def load_checkpoint_weights(path: Path, model: nn.Module) -> None:
    """Load the weights of checkpoint ``path`` (verified by :func:`read_checkpoint_state`) into ``model``;
    :class:`CheckpointError` if they do not fit it or are not finite."""
    try:
        missing, unexpected = load_model(model, str(path / FILES[0]), strict=False)
    except (SafetensorError, OSError, RuntimeError, ValueError) as error:
        raise CheckpointError(f"{path / FILES[0]} is corrupt or does not fit the model: {first_line(error)}") from None
    if missing or unexpected:
        raise CheckpointError(
            f"{path / FILES[0]} does not fit the model: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    bad = [name for name, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise CheckpointError(f"{path / FILES[0]} holds non-finite values (in {', '.join(bad[:3])})")
