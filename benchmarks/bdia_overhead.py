"""BDIA's step overhead at the main job's model: interleaved step times and profiles of one BDIA step.

The model is the main job's (scripts/main.sh): a character-level GPT (vocabulary 65), 2 blocks,
d = 128, 4 heads, T = 64, batch 32, dropout 0, AdamW (--n-layer, --d-model, --n-head, --block-size,
--batch, --vocab and --dropout change it; bdia_overhead_before, _after and _quiet were taken at 6 blocks,
T = 256, batch 16, dropout 0.1). Every mode starts from the same weights and trains on the same
batch; the steps are interleaved (one step of each mode per round), so a drift in machine speed hits
every mode alike. Two clocks per step: wall time and the process's CPU time (on a shared machine the
CPU time is far less disturbed by other processes' load).

Modes: standard, checkpoint, bdia (the defaults), and BDIA variants: 8 batch chunks (what
``batch_chunks="auto"`` chose at the earlier model before chunks had to hold 2**18 elements), the
whole batch in one chunk, and every block recomputed (``keep_last_graph=False``; the default keeps
the top block's graph where that cannot raise the peak, docs/bdia.md). "stack forward (no grad)" times
the block stack's forward alone, without a graph: a method that recomputes every block once in
backward (checkpoint, BDIA) does that work on top of standard's, so (standard + it) / standard
estimates what the recomputation alone costs. It is an estimate, not a bound: standard's forward also
writes every activation it keeps, which checkpoint's and BDIA's forward do not. Each mode's
activations at the peak of one step (revbits.measure, bytes counted) are listed beside.

Then one BDIA step runs under torch.profiler (top ops by self CPU time, with call counts) and
under cProfile (Python functions by own time). Writes <out>.txt (the report) and <out>.json.
``--memory-only`` skips timing and profiles and writes each mode's peak, activations at the peak and
bytes held after the forward (LiveBytes), and ``--count-ops`` the ATen operators each mode dispatches per step
(OperatorCount); any machine may run either. ``REVBITS_NATIVE=0`` runs BDIA's step on the PyTorch operators
instead of its native kernel (the report's first line says which ran).

    python benchmarks/bdia_overhead.py --out benchmarks/results/bdia_overhead_main
    python benchmarks/bdia_overhead.py --memory-only --out benchmarks/results/bdia_memory_main
    python benchmarks/bdia_overhead.py --count-ops --out benchmarks/results/bdia_ops_main
    REVBITS_NATIVE=0 python benchmarks/bdia_overhead.py --count-ops --out benchmarks/results/bdia_ops_native_off
    python benchmarks/bdia_overhead.py --tiny --rounds 2 --out /some/scratch/check   # a quick run
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import platform
import pstats
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from revbits.bdia import native_step
from revbits.measure import OperatorCount, measure_training_step
from revbits.models.gpt import GPT, GPTConfig

MODES = ("standard", "checkpoint", "bdia", "bdia (recompute top)", "bdia (8 chunks)", "bdia (1 chunk)")
FORWARD_ONLY = "stack forward (no grad)"
#: Benchmark modes that are a memory mode with options: BDIA in 8 batch chunks of 2 samples (what "auto" chose
#: at this model before chunks of 2**18 elements at least), and on the whole batch without token slices.
VARIANTS: dict[str, tuple[str, dict]] = {
    "bdia (recompute top)": ("bdia", {"keep_last_graph": False}),
    "bdia (8 chunks)": ("bdia", {"batch_chunks": 8, "token_slice": 512}),
    "bdia (1 chunk)": ("bdia", {"batch_chunks": 1, "token_slice": None}),
}
MAIN_JOB = dict(vocab_size=65, block_size=64, n_layer=2, n_head=4, d_model=128, batch=32)  # scripts/main.sh
TINY = dict(vocab_size=65, block_size=32, n_layer=3, n_head=2, d_model=32, batch=4)


def native_state() -> str:
    """Whether BDIA's step runs the native kernel (revbits.bdia.native_step; REVBITS_NATIVE=0 turns it off)."""
    return f"native BDIA step {'on' if native_step.available() else 'off'}"


def build(shape: dict, mode: str, dropout: float, seed: int) -> torch.nn.Module:
    memory, options = VARIANTS.get(mode, (mode, {}))
    config = GPTConfig(
        vocab_size=shape["vocab_size"],
        block_size=shape["block_size"],
        n_layer=shape["n_layer"],
        n_head=shape["n_head"],
        d_model=shape["d_model"],
        dropout=dropout,
        memory=memory,
        memory_options=options,
    )
    torch.manual_seed(seed)
    return GPT(config).train()


def make_steps(
    shape: dict, modes: list[str], dropout: float, seed: int, memory: dict[str, int] | None = None
) -> dict[str, Callable[[], None]]:
    """One training step (AdamW) per mode on one fixed batch, and the no-grad stack forward; with ``memory``,
    each mode's activations at the peak of one step (bytes) go in it."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(shape["vocab_size"], (shape["batch"], shape["block_size"] + 1), generator=generator)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    steps: dict[str, Callable[[], None]] = {}
    for mode in modes:
        model = build(shape, mode, dropout, seed)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
        if memory is not None:
            loss = lambda model=model: model(inputs, targets=targets).loss  # noqa: E731
            memory[mode] = measure_training_step(model, loss, optimizer).activations

        def step(model: torch.nn.Module = model, optimizer: torch.optim.Optimizer = optimizer) -> None:
            optimizer.zero_grad(set_to_none=True)
            model(inputs, targets=targets).loss.backward()
            optimizer.step()

        steps[mode] = step
    plain = build(shape, "standard", dropout, seed)
    with torch.no_grad():
        x = plain.token_embedding(inputs) + plain.position_embedding(torch.arange(inputs.shape[1]))

    def forward_only() -> None:
        with torch.no_grad():
            plain.stack(x)

    steps[FORWARD_ONLY] = forward_only
    return steps


def interleaved_times(steps: dict[str, Callable[[], None]], rounds: int, warmup: int) -> dict[str, dict]:
    """Median wall and CPU seconds per mode over ``rounds`` interleaved rounds, after ``warmup`` rounds."""
    samples: dict[str, dict[str, list[float]]] = {m: {"wall": [], "cpu": []} for m in steps}
    for r in range(warmup + rounds):
        for mode, step in steps.items():
            wall, cpu = time.perf_counter(), time.process_time()
            step()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            if r >= warmup:
                samples[mode]["wall"].append(wall)
                samples[mode]["cpu"].append(cpu)
    return {
        m: {"wall_s": statistics.median(s["wall"]), "cpu_s": statistics.median(s["cpu"]), **s}
        for m, s in samples.items()
    }


def ratio_lines(times: dict[str, dict], memory: dict[str, int]) -> list[str]:
    """A table of median wall and CPU time per mode, against standard and checkpoint, and activations."""
    lines = [
        f"{'mode':26s} {'wall (s)':>9s} {'cpu (s)':>9s} {'wall/std':>9s} {'cpu/std':>8s} {'wall/ckpt':>10s} "
        f"{'cpu/ckpt':>9s} {'activations at peak (MiB)':>26s}"
    ]
    for mode, t in times.items():
        cells = [f"{mode:26s} {t['wall_s']:9.3f} {t['cpu_s']:9.3f}"]
        for base in ("standard", "checkpoint"):
            ref = times.get(base)
            wide = 9 if base == "standard" else 10
            cells.append(f"{t['wall_s'] / ref['wall_s']:{wide}.3f}" if ref else " " * wide)
            cells.append(f"{t['cpu_s'] / ref['cpu_s']:{wide - 1}.3f}" if ref else " " * (wide - 1))
        cells.append(f"{memory[mode] / 2**20:26.1f}" if mode in memory else "")
        lines.append(" ".join(cells))
    if "standard" in times and FORWARD_ONLY in times:
        std = times["standard"]
        floor_wall = (std["wall_s"] + times[FORWARD_ONLY]["wall_s"]) / std["wall_s"]
        floor_cpu = (std["cpu_s"] + times[FORWARD_ONLY]["cpu_s"]) / std["cpu_s"]
        lines.append(
            f"one recomputation, estimated: (standard + stack forward) / standard: wall {floor_wall:.3f}, "
            f"cpu {floor_cpu:.3f}"
        )
    return lines


def profiles(step: Callable[[], None], rows: int) -> tuple[str, str, float]:
    """torch.profiler's top ops (by self CPU time) and cProfile's top functions (by own time) of one step,
    and the profiler's total self CPU seconds."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    averages = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in averages) / 1e6
    ops = averages.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=60)
    calls = sum(e.count for e in averages if e.key.startswith("aten::"))
    ops += f"\naten op calls in the step: {calls}\n"
    python = cProfile.Profile()
    python.enable()
    step()
    python.disable()
    out = io.StringIO()
    stats = pstats.Stats(python, stream=out)
    stats.strip_dirs().sort_stats("tottime").print_stats(rows)
    return ops, out.getvalue(), total


def write_op_counts(args: argparse.Namespace, shape: dict) -> None:
    """<out>.txt and <out>.json: ATen operators dispatched per training step, per mode (revbits.measure.OperatorCount,
    after two warm-up steps). Deterministic, so any machine may run it: eager PyTorch pays a fixed cost per operator,
    which at small sizes is much of BDIA's overhead."""
    steps = make_steps(shape, args.modes, args.dropout, args.seed)
    steps.pop(FORWARD_ONLY)
    header = (
        f"model: GPT {shape}, dropout {args.dropout}, AdamW; torch {torch.__version__}; {native_state()}; "
        "ATen operators per step"
    )
    lines = [header, f"{'mode':26s} {'ops':>6s}"]
    rows = {}
    for mode, step in steps.items():
        step()
        step()
        with OperatorCount() as counter:
            step()
        rows[mode] = {"ops": counter.count, "by_name": dict(counter.by_name.most_common())}
        lines.append(f"{mode:26s} {counter.count:6d}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".txt").write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps({"shape": shape, "rows": rows}, indent=1) + "\n")
    print("\n".join(lines))


def write_memory(args: argparse.Namespace, shape: dict) -> None:
    """<out>.txt and <out>.json: each mode's peak, activations at the peak and bytes held after the forward."""
    generator = torch.Generator().manual_seed(args.seed)
    tokens = torch.randint(shape["vocab_size"], (shape["batch"], shape["block_size"] + 1), generator=generator)
    lines = [
        f"model: GPT {shape}, dropout {args.dropout}, AdamW; torch {torch.__version__}; bytes (revbits.measure)",
        f"{'mode':26s} {'peak':>12s} {'activations at peak':>20s} {'held after forward':>19s}",
    ]
    rows = {}
    for mode in args.modes:
        model = build(shape, mode, args.dropout, args.seed)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
        report = measure_training_step(model, lambda m=model: m(tokens[:, :-1], targets=tokens[:, 1:]).loss, optimizer)
        rows[mode] = {"peak": report.peak, "activations": report.activations, "held": report.held_after_forward}
        lines.append(f"{mode:26s} {report.peak:12d} {report.activations:20d} {report.held_after_forward:19d}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".txt").write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps({"shape": shape, "rows": rows}, indent=1) + "\n")
    print("\n".join(lines))


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="writes <out>.txt and <out>.json")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=[*MODES, "mesa", "bdia+mesa"])
    parser.add_argument("--rounds", type=int, default=15, help="interleaved timed rounds (median)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: stable on a shared machine)")
    parser.add_argument("--dropout", type=float, default=0.0, help="the main job's is 0")
    for name in ("n_layer", "d_model", "n_head", "block_size", "batch", "vocab"):
        parser.add_argument("--" + name.replace("_", "-"), type=int, help="overrides the model's (default: main job's)")
    parser.add_argument("--memory-only", action="store_true", help="only the LiveBytes table, no timing")
    parser.add_argument("--count-ops", action="store_true", help="only ATen operators per step, no timing")
    parser.add_argument("--rows", type=int, default=30, help="rows of each profile table")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="a tiny model, to check that the script runs")
    return parser.parse_args()


def main() -> None:
    args = parse()
    torch.set_num_threads(args.threads)
    shape = dict(TINY if args.tiny else MAIN_JOB)
    for name in ("n_layer", "d_model", "n_head", "block_size", "batch"):
        shape[name] = getattr(args, name) or shape[name]
    shape["vocab_size"] = args.vocab or shape["vocab_size"]
    if args.memory_only:
        write_memory(args, shape)
        return
    if args.count_ops:
        write_op_counts(args, shape)
        return
    memory: dict[str, int] = {}
    steps = make_steps(shape, args.modes, args.dropout, args.seed, memory)
    load_before = os.getloadavg()
    times = interleaved_times(steps, args.rounds, args.warmup)
    load_after = os.getloadavg()
    bdia = next((m for m in args.modes if m.startswith("bdia")), args.modes[-1])
    ops, python, total = profiles(steps[bdia], args.rows)
    header = [
        f"model: GPT {shape}, dropout {args.dropout}, AdamW; torch {torch.__version__}, {args.threads} thread(s), "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; {native_state()}",
        f"load average (1, 5, 15 min) before timing: {load_before}, after: {load_after}",
        f"interleaved rounds: {args.rounds} timed after {args.warmup} warm-up",
        "",
        *ratio_lines(times, memory),
        "",
        f"== torch.profiler, one '{bdia}' step: top ops by self CPU time (total {total:.3f} s) ==",
        ops,
        f"== cProfile, one '{bdia}' step: Python functions by own time ==",
        python,
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".txt").write_text("\n".join(header) + "\n")
    record = {
        "shape": shape,
        "args": {k: str(v) for k, v in vars(args).items() if k != "out"},
        "times": times,
        "activations_at_peak": memory,
        "load_before": load_before,
        "load_after": load_after,
        "profile_self_cpu_s": total,
    }
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    print("\n".join(header[: 4 + len(times) + 2]))


if __name__ == "__main__":
    main()
