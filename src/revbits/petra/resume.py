"""A stage's training state between run segments: parameters (in its record, safetensors) and the
optimiser and learning-rate schedule (``stage<j>.state.pt``, loaded with ``weights_only=True``).

A PETRA run that is stopped drains first: every micro-batch forwarded has been back-propagated,
so no activation or residue is in flight and the parameters, optimiser and schedule are the
whole state. The next segment starts from them at micro-batch ``first_micro_batch``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..io import IntegrityError, atomic_write_stream, first_line, unsafe_pickle, verify_manifest
from .record import StageRecord, record_path


def state_path(out_dir: str | Path, stage: int) -> Path:
    return Path(out_dir) / f"stage{stage}.state.pt"


def save_stage_state(out_dir: str | Path, stage: int, optimizer: Any, scheduler: Any) -> None:
    """Write the optimiser and schedule state of ``stage`` atomically and durably (:mod:`revbits.io`)."""
    path = state_path(out_dir, stage)
    state = {
        "optimizer": None if optimizer is None else optimizer.state_dict(),
        "scheduler": None if scheduler is None else scheduler.state_dict(),
    }
    atomic_write_stream(path, lambda f: torch.save(state, f))


def load_stage_state(resume_from: str | Path, j: int, module: nn.Module, optimizer: Any, scheduler: Any) -> None:
    """Parameters, optimiser and schedule of stage j as the previous segment left them. Where the
    directory has a manifest (written once every stage has saved), both files are checked against it
    first; :class:`IntegrityError` names a file that is missing, damaged or does not fit."""
    params, state = record_path(resume_from, j), state_path(resume_from, j)
    for path in (params, state):
        if not path.is_file():
            raise IntegrityError(f"stage {j}: cannot resume, {path} is missing")
    if (Path(resume_from) / "manifest.json").exists():
        verify_manifest(resume_from, [params.name, state.name])
    try:
        saved = StageRecord.load(params).params
    except Exception as error:  # safetensors raises several types for a damaged file
        raise IntegrityError(f"stage {j}: {params} is not a readable stage record ({first_line(error)})") from None
    own = dict(module.named_parameters())
    if saved.keys() != own.keys():
        raise IntegrityError(f"stage {j}: {params} does not fit this stage's parameters (was the split changed?)")
    with torch.no_grad():
        for name, p in own.items():
            p.copy_(saved[name])
    try:
        loaded = torch.load(state, map_location="cpu", weights_only=True)
    except Exception as error:  # a damaged file, or a pickle that asks to run code
        reason = unsafe_pickle(error) or f"it is not a readable stage state ({first_line(error)})"
        raise IntegrityError(f"stage {j}: {state} is refused: {reason}") from None
    if optimizer is not None and loaded["optimizer"] is not None:
        optimizer.load_state_dict(loaded["optimizer"])
    if scheduler is not None and loaded["scheduler"] is not None:
        scheduler.load_state_dict(loaded["scheduler"])
