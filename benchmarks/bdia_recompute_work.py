"""How much work BDIA's backward recomputes against torch's checkpoint, counted and timed.

torch.utils.checkpoint (non-reentrant, what ``memory="checkpoint"`` and transformers' gradient checkpointing
use) stops a block's recomputation as soon as every tensor its backward saved exists again ("early stop",
on by default), so the block's last product (the MLP's output projection, whose output no backward needs)
is not recomputed. BDIA cannot skip it: its inverse, x_{k-1} = (x_{k+1} - (1 - gamma) x_k - h(x_k)) / gamma,
needs the block's whole output h(x_k). This script measures what that costs, with three arms:

- ``checkpoint``: torch's default (early stop on);
- ``checkpoint, full recompute``: the same with ``torch.utils.checkpoint.set_checkpoint_early_stop(False)``
  (what reentrant checkpointing does too);
- ``bdia``: BDIAStack with its defaults.

For each arm: the floating-point operations of one training step as torch's FlopCounterMode counts them
(the CPU's attention kernel included, ``flops.py``; exact, machine-independent), and the median of
interleaved step times (after a warm-up round; timings need an idle machine, and the output says the load
average before and after). The configuration is
memory_modes.py's (d 256, 4 heads, T 1024, batch 8, AdamW) at ``--depth`` blocks; ``--repeats 0`` counts
without timing. Writes <out>.txt.

    python benchmarks/bdia_recompute_work.py --out benchmarks/results/bdia_recompute_work
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
from collections.abc import Callable
from pathlib import Path

import torch
import torch.utils.checkpoint as torch_checkpoint

from flops import flop_counter
from report import write_text_report
from revbits import bench

ARMS: dict[str, tuple[str, Callable[[], contextlib.AbstractContextManager]]] = {
    "checkpoint": ("checkpoint", contextlib.nullcontext),
    "checkpoint, full recompute": ("checkpoint", lambda: torch_checkpoint.set_checkpoint_early_stop(False)),
    "bdia": ("bdia", contextlib.nullcontext),
}


def step_flops(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, context) -> int:
    """The floating-point operations FlopCounterMode counts in one training step of ``model`` under ``context``."""
    counter = flop_counter()
    with context(), counter:
        bench._timed_step(model, optimizer, x)
    return counter.get_total_flops()


def step_times(models: dict, optimizers: dict, x: torch.Tensor, repeats: int) -> dict[str, list[float]]:
    """Each arm's step times over ``repeats`` interleaved rounds, after a warm-up round."""
    times: dict[str, list[float]] = {name: [] for name in models}
    for repeat in range(repeats + 1):  # the first round warms up
        for name, model in models.items():
            with ARMS[name][1]():
                seconds = bench._timed_step(model, optimizers[name], x)
            if repeat:
                times[name].append(seconds)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=24)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=7, help="timed steps per arm (median)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bdia_recompute_work")
    args = parser.parse_args()
    config = bench.BenchConfig(seq_len=args.seq_len)
    x = torch.randn(config.batch, config.seq_len, config.d_model, generator=torch.Generator().manual_seed(0))
    lines = [
        f"K = {args.depth}, d {config.d_model}, T {config.seq_len}, batch {config.batch}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; load average before {os.getloadavg()}"
    ]
    models = {name: bench.build(config, args.depth, mode) for name, (mode, _) in ARMS.items()}
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=1e-4) for name, m in models.items()}
    flops = {name: step_flops(models[name], optimizers[name], x, ARMS[name][1]) for name in ARMS}
    times = step_times(models, optimizers, x, args.repeats) if args.repeats else {}
    for name in ARMS:
        ratio = flops[name] / flops["checkpoint"]
        line = f"{name:28s} {flops[name] / 1e9:9.1f} GFLOP per step ({ratio:.3f}x checkpoint)"
        if times:
            median = statistics.median(times[name])
            line += f"  median step {median:6.2f} s ({median / statistics.median(times['checkpoint']):.3f}x checkpoint)"
        lines.append(line)
    write_text_report(args.out, lines)


if __name__ == "__main__":
    main()
