"""What a stage keeps for inspection, saved with safetensors: final parameters, the accumulated
gradients of every update (taken just before the optimizer step), forward inputs, the inputs used in the
backward (reconstructed or buffered) and the losses."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn


@dataclass
class StageRecord:
    """One stage's record. ``grads[w][name]`` is the gradient applied by update w; ``inputs[m]`` and
    ``reconstructed[m]`` are the stage's input of micro-batch m in the forward and in the backward."""

    stage: int
    params: dict[str, Tensor] = field(default_factory=dict)
    grads: list[dict[str, Tensor]] = field(default_factory=list)
    inputs: dict[int, Tensor] = field(default_factory=dict)
    reconstructed: dict[int, Tensor] = field(default_factory=dict)
    losses: list[float] = field(default_factory=list)

    def add_grads(self, module: nn.Module) -> None:
        """Keep a copy of the accumulated ``.grad`` of every parameter that has one."""
        self.grads.append({n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None})

    def set_params(self, module: nn.Module) -> None:
        self.params = {n: p.detach().clone() for n, p in module.named_parameters()}

    def save(self, path: str | Path) -> None:
        tensors = {f"param/{n}": t for n, t in self.params.items()}
        for w, grads in enumerate(self.grads):
            tensors |= {f"grad/{w}/{n}": t for n, t in grads.items()}
        tensors |= {f"input/{m}": t for m, t in self.inputs.items()}
        tensors |= {f"recon/{m}": t for m, t in self.reconstructed.items()}
        tensors["loss"] = torch.tensor(self.losses, dtype=torch.float64)
        tensors = {k: t.detach().cpu().contiguous() for k, t in tensors.items()}
        metadata = {"stage": str(self.stage), "updates": str(len(self.grads))}
        save_file(tensors, str(path), metadata=metadata)

    @classmethod
    def load(cls, path: str | Path) -> StageRecord:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata()
        record = cls(stage=int(metadata["stage"]))
        record.grads = [{} for _ in range(int(metadata["updates"]))]
        for key, t in load_file(str(path)).items():
            kind, _, rest = key.partition("/")
            if kind == "param":
                record.params[rest] = t
            elif kind == "grad":
                w, _, name = rest.partition("/")
                record.grads[int(w)][name] = t
            elif kind == "input":
                record.inputs[int(rest)] = t
            elif kind == "recon":
                record.reconstructed[int(rest)] = t
            elif kind == "loss":
                record.losses = t.tolist()
        return record


def record_path(out_dir: str | Path, stage: int) -> Path:
    return Path(out_dir) / f"stage{stage}.safetensors"


def load_records(out_dir: str | Path, J: int) -> list[StageRecord]:
    """The records written by the J stages of a run into ``out_dir``."""
    return [StageRecord.load(record_path(out_dir, j)) for j in range(J)]
