"""Where BDIA's step at K = 24 spends more than checkpoint's, and what the number of batch chunks changes.

The configuration of memory_modes.py (d 256, 4 heads, T 1024, batch 8, AdamW) at one depth:

1. one profiled training step of checkpoint and of bdia (torch.profiler, after a warm-up step): the
   operators whose self time differs most, with their call counts, and the share of the native BDIA step
   operators (``revbits_bdia_step::*``) in bdia's step;
2. bdia with batch_chunks "auto", 4, 2 and 1 beside checkpoint: activations at the peak (LiveBytes, via
   revbits.measure) and the median of interleaved step times.

Timings need an idle machine; the output says the load average before and after. Writes <out>.txt.

    python benchmarks/bdia_k24_breakdown.py --out benchmarks/results/bdia_k24_breakdown
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

import torch
from torch.profiler import profile

from report import write_text_report
from revbits import bench
from revbits.measure import measure_training_step

CHUNKS = ("auto", 4, 2, 1)


def profiled_step(model: torch.nn.Module, x: torch.Tensor) -> dict[str, tuple[float, int]]:
    """Self CPU milliseconds and calls per operator of one training step (after a warm-up step)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    bench._timed_step(model, optimizer, x)
    with profile() as prof:
        bench._timed_step(model, optimizer, x)
    return {e.key: (e.self_cpu_time_total / 1e3, e.count) for e in prof.key_averages()}


def profile_lines(config: bench.BenchConfig, depth: int, x: torch.Tensor, top: int) -> list[str]:
    times = {mode: profiled_step(bench.build(config, depth, mode), x) for mode in ("checkpoint", "bdia")}
    totals = {mode: sum(ms for ms, _ in ops.values()) for mode, ops in times.items()}
    lines = [f"profiled step, self CPU time: checkpoint {totals['checkpoint']:.0f} ms, bdia {totals['bdia']:.0f} ms"]
    native = sum(ms for key, (ms, _) in times["bdia"].items() if key.startswith("revbits_bdia_step::"))
    lines.append(f"native BDIA step operators in bdia's step: {native:.0f} ms ({100 * native / totals['bdia']:.1f} %)")
    keys = set(times["checkpoint"]) | set(times["bdia"])
    differences = sorted(
        ((times["bdia"].get(k, (0.0, 0))[0] - times["checkpoint"].get(k, (0.0, 0))[0], k) for k in keys), reverse=True
    )
    lines.append(f"{'bdia - checkpoint (ms)':>24}  operator (calls bdia / checkpoint)")
    for difference, key in differences[:top]:
        calls = (times["bdia"].get(key, (0, 0))[1], times["checkpoint"].get(key, (0, 0))[1])
        lines.append(f"{difference:24.1f}  {key} ({calls[0]} / {calls[1]})")
    return lines


def chunk_lines(config: bench.BenchConfig, depth: int, x: torch.Tensor, repeats: int) -> list[str]:
    models = {"checkpoint": bench.build(config, depth, "checkpoint")}
    for chunks in CHUNKS:
        model = bench.build(config, depth, "bdia")
        model.batch_chunks = chunks
        models[f"bdia, batch_chunks={chunks}"] = model
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=1e-4) for name, m in models.items()}
    lines = []
    for name, model in models.items():
        report = measure_training_step(model, lambda m=model: m(x).square().mean(), optimizers[name])
        lines.append(f"{name:28s} activations at the peak {report.activations / 2**20:7.1f} MiB")
    times: dict[str, list[float]] = {name: [] for name in models}
    for repeat in range(repeats + 1):  # the first round warms up
        for name, model in models.items():
            seconds = bench._timed_step(model, optimizers[name], x)
            if repeat:
                times[name].append(seconds)
    reference = statistics.median(times["checkpoint"])
    for name in models:
        median = statistics.median(times[name])
        lines.append(f"{name:28s} median step {median:6.2f} s  {median / reference:.3f}x checkpoint")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per variant (median)")
    parser.add_argument("--top", type=int, default=15, help="operators listed in the profile comparison")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bdia_k24_breakdown")
    args = parser.parse_args()
    config = bench.BenchConfig()
    x = torch.randn(config.batch, config.seq_len, config.d_model, generator=torch.Generator().manual_seed(0))
    lines = [
        f"K = {args.depth}, d {config.d_model}, T {config.seq_len}, batch {config.batch}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; load average before {os.getloadavg()}"
    ]
    lines += profile_lines(config, args.depth, x, args.top)
    lines += chunk_lines(config, args.depth, x, args.repeats)
    write_text_report(args.out, lines)


if __name__ == "__main__":
    main()
