"""Bytes per rank under FSDP2 (``fully_shard`` on each block and on the root): standard, checkpoint and bdia.

2 gloo processes on CPU, each with its half of the batch. A GPT-style stack (d=128, T=256, 4 samples per
rank, 8 blocks) between a linear embedding and a linear head; one measured step (forward, backward) after a
warm-up step. Bytes are counted by revbits.measure.LiveBytes, a dispatch-mode tracker, in each rank:

- ``held_after_forward``: activation bytes alive between the end of forward and the start of backward;
- ``peak``: the most bytes alive at once during the step, and the activations part of it.

The tracker counts the plain tensors that operators create (activations, temporaries, gradients before
FSDP reduce-scatters them). It does not count FSDP's all-gather buffers for the unsharded parameters,
which FSDP resizes in place rather than allocating, nor the sharded parameters and gradients. Those are
the same bytes in every mode. Ratios are against standard in the same run.

    python benchmarks/engines_fsdp_memory.py [--out benchmarks/results/engines_fsdp_memory]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import revbits
from revbits.measure import LiveBytes
from revbits.models import TransformerBlock

WORLD, D, T, LOCAL_BATCH, DEPTH = 2, 128, 256, 4, 8
MODES = ("standard", "checkpoint", "bdia")


class PlainTensorBytes(LiveBytes):
    """LiveBytes over plain tensors only: a wrapper subclass (FSDP's sharded DTensors) has no storage of its own."""

    def _track(self, tensor: torch.Tensor, inputs: set[int]) -> None:
        if type(tensor) is torch.Tensor or type(tensor) is nn.Parameter:
            super()._track(tensor, inputs)


class Model(nn.Module):
    def __init__(self, memory: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(16, D)
        self.stack = revbits.stack([TransformerBlock(D, 4, causal=True) for _ in range(DEPTH)], memory=memory)
        self.head = nn.Linear(D, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stack(self.embed(x))).square().mean()


def measure(rank: int, memory: str) -> dict[str, int]:
    from torch.distributed.fsdp import fully_shard

    model = Model(memory)
    for block in model.stack.blocks:
        fully_shard(block)
    fully_shard(model)
    x = torch.randn(LOCAL_BATCH, T, 16, generator=torch.Generator().manual_seed(rank))
    model(x).backward()  # warm-up
    model.zero_grad(set_to_none=True)
    tracker = PlainTensorBytes()
    with tracker:
        loss = model(x)
        held = tracker.current["activations"]
        loss.backward()
        del loss
    return {"held_after_forward": held, "peak": tracker.peak_total, "peak_activations": tracker.peak["activations"]}


def worker(rank: int, port: int, path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    results = {}
    for memory in MODES:
        results[memory] = measure(rank, memory)
        dist.barrier()
    gathered: list = [None] * WORLD
    dist.all_gather_object(gathered, results)
    dist.destroy_process_group()
    if rank == 0:
        Path(path).write_text(json.dumps(gathered))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/engines_fsdp_memory")
    args = parser.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    raw = out.with_suffix(".ranks.json")
    mp.spawn(worker, args=(port, str(raw)), nprocs=WORLD, join=True)
    ranks = json.loads(raw.read_text())
    raw.unlink()
    meta = {
        "torch": torch.__version__,
        "shape": {"d": D, "T": T, "batch_per_rank": LOCAL_BATCH, "blocks": DEPTH, "world": WORLD},
        "wrapping": "fully_shard on each block and on the root",
        "machine_idle": "yes (exclusive lock held; other engineers' editors may have been running)",
    }
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "ranks": ranks}, indent=2) + "\n")
    mib = 2.0**20
    lines = [
        f"# Bytes per rank under FSDP2 (2 gloo ranks, d={D}, T={T}, {LOCAL_BATCH} samples per rank, {DEPTH} blocks)",
        f"machine idle: {meta['machine_idle']}",
        "",
        "| rank | mode | held after forward (MiB) | ratio | peak (MiB) | ratio | activations at peak (MiB) |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for rank, results in enumerate(ranks):
        base = results["standard"]
        for memory in MODES:
            r = results[memory]
            lines.append(
                f"| {rank} | {memory} | {r['held_after_forward'] / mib:.2f} | "
                f"{r['held_after_forward'] / base['held_after_forward']:.3f} | {r['peak'] / mib:.2f} | "
                f"{r['peak'] / base['peak']:.3f} | {r['peak_activations'] / mib:.2f} |"
            )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
