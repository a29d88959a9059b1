"""Memory and step time of stacks of GPT-style blocks under every memory mode.

Modes: standard, checkpoint, mesa, bdia and bdia+mesa (by default), and "bdia (chunks=1)", BDIA
with every block on the whole batch (the backward of revbits 0.1). d=256, 4 heads, causal
attention, 4x MLP, T=1024, batch 8, K = 6, 12, 24, 48, AdamW.
With --memtracker, each mode's peak is also measured by PyTorch's own MemTracker over a step
with gradients and no optimiser. With --targets, the targets of issue 17 are checked for
"bdia" (the defaults of revbits.stack) at the largest depth and written beside the table.
Writes <out>.json (raw rows), <out>.md (table) and <out>.png (memory against depth).

    python benchmarks/memory_modes.py                 # the full run (about 30 min on 2 cores)
    python benchmarks/memory_modes.py --depths 24 --memtracker --targets \
        --modes standard checkpoint "bdia (chunks=1)" bdia bdia+mesa --out benchmarks/results/memory_modes_k24
    python benchmarks/memory_modes.py --device cuda --out benchmarks/results/memory_modes_cuda
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from revbits import bench  # noqa: E402
from revbits.measure import LiveBytes  # noqa: E402

#: Issue 17's targets for "bdia" at K = 24: (row key, bound).
TARGETS = [
    ("activations_vs_checkpoint", 0.30),
    ("activations_vs_standard", 0.03),
    ("memtracker_peak_vs_checkpoint", 0.5),
    ("step_seconds_vs_checkpoint", 1.25),
]


def memtracker_peak(config: bench.BenchConfig, depth: int, mode: str, x: torch.Tensor) -> int:
    """PyTorch MemTracker's peak over one step with gradients and no optimiser (parameters counted,
    the input batch not), after one untracked warm-up step."""
    from torch.distributed._tools.mem_tracker import MemTracker

    model = bench.build(config, depth, mode)
    model(x).square().mean().backward()
    model.zero_grad(set_to_none=True)
    tracker = MemTracker()
    tracker.track_external(model)
    with tracker:
        model(x).square().mean().backward()
    peak = tracker.get_tracker_snapshot("peak")
    return max(snapshot["Total"] for snapshot in peak.values())


def chunk_graph_bytes(config: bench.BenchConfig, x: torch.Tensor, samples: int) -> int:
    """What one block's recomputation keeps for backward on ``samples`` samples (its graph, without its output)."""
    block = bench.build(config, 2, "standard").blocks[0]
    xc = x[:samples].clone().requires_grad_()
    tracker = LiveBytes()
    with tracker:
        y = block(xc)
    return tracker.current["activations"] - y.numel() * y.element_size()


def write_times(config: bench.BenchConfig, out: Path, idle: str) -> None:
    """Median step time (zero_grad, forward, backward, AdamW step) per mode, interleaved, as ratios to
    checkpoint; one warm-up step per mode first."""
    x = torch.randn(config.batch, config.seq_len, config.d_model, generator=torch.Generator().manual_seed(config.seed))
    rows = []
    for depth in config.depths:
        models = {m: bench.build(config, depth, m) for m in config.modes}
        optimizers = {m: torch.optim.AdamW(models[m].parameters(), lr=1e-4) for m in config.modes}
        times: dict[str, list[float]] = {m: [] for m in config.modes}
        for repeat in range(config.repeats + 1):
            for m in config.modes:
                seconds = bench._timed_step(models[m], optimizers[m], x)
                if repeat:
                    times[m].append(seconds)
        ref = statistics.median(times["checkpoint"]) if "checkpoint" in times else float("nan")
        for m in config.modes:
            median = statistics.median(times[m])
            rows.append({"depth": depth, "mode": m, "times": times[m], "step_seconds": median,
                         "step_seconds_vs_checkpoint": median / ref})
    text = "| K | mode | median step (s) | / checkpoint |\n|---|---|---|---|\n"
    for r in rows:
        text += f"| {r['depth']} | {r['mode']} | {r['step_seconds']:.2f} | {r['step_seconds_vs_checkpoint']:.2f} |\n"
    text += f"\nmachine idle: {idle}\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"config": vars(config), "torch": torch.__version__, "threads": torch.get_num_threads()}
    meta["machine_idle"] = idle
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    out.with_suffix(".md").write_text(text)
    print(text)


def check_targets(rows: list[dict]) -> list[dict]:
    deepest = max(r["depth"] for r in rows)
    row = next((r for r in rows if r["depth"] == deepest and r["mode"] == "bdia"), None)
    results = []
    for key, bound in TARGETS:
        value = row.get(key) if row else None
        results.append({"depth": deepest, "quantity": key, "bound": bound, "value": value,
                        "met": value is not None and value <= bound})
    return results


def plot(rows: list[dict], path: Path) -> None:
    panels = [
        ("peak_minus_parameters", "peak of one step minus parameters"),
        ("activations", "activations at the peak"),
        ("held_after_forward", "held between forward and backward"),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(15, 4))
    for mode in dict.fromkeys(r["mode"] for r in rows):
        mine = [r for r in rows if r["mode"] == mode]
        for ax, (key, _) in zip(axes, panels):
            ax.plot([r["depth"] for r in mine], [r[key] / 2**20 for r in mine], "o-", label=mode)
    for ax, (_, title) in zip(axes, panels):
        ax.set_xlabel("blocks K")
        ax.set_ylabel("MiB")
        ax.set_yscale("log")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_arguments(parser, bench.BenchConfig(), variants=True)  # the defaults of the full run
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "memory_modes")
    parser.add_argument("--memtracker", action="store_true", help="also measure each peak with PyTorch's MemTracker")
    parser.add_argument("--targets", action="store_true", help="check issue 17's targets for bdia at the largest K")
    parser.add_argument("--idle", default="unknown", help="written into the raw output: was the machine idle?")
    parser.add_argument("--time-only", action="store_true", help="only the interleaved step times (AdamW), no memory")
    args = parser.parse_args()
    config = bench.BenchConfig.from_args(args)
    if args.time_only:
        write_times(config, args.out, args.idle)
        return
    rows = bench.run(config)
    if args.memtracker:
        generator = torch.Generator().manual_seed(config.seed)  # the batch bench.run used
        x = torch.randn(config.batch, config.seq_len, config.d_model, generator=generator).to(config.device)
        for row in rows:
            row["memtracker_peak"] = memtracker_peak(config, row["depth"], row["mode"], x)
            print(f"K={row['depth']:3d} {row['mode']:16s} MemTracker peak {row['memtracker_peak'] / 2**20:9.1f} MiB")
        for row in rows:
            ref = next((r for r in rows if r["depth"] == row["depth"] and r["mode"] == "checkpoint"), None)
            if ref:
                row["memtracker_peak_vs_checkpoint"] = row["memtracker_peak"] / ref["memtracker_peak"]
        chunks = bench.build(config, 2, "bdia").batch_chunks
        samples = -(-config.batch // min(config.batch, 8 if chunks == "auto" else chunks))
        for row in rows:
            if row["mode"] in ("bdia", "bdia+mesa"):
                row["chunk_graph_bytes"] = chunk_graph_bytes(config, x, samples)
    targets = check_targets(rows) if args.targets else []
    meta = {
        "config": vars(config),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor(),
        "machine_idle": args.idle,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows, "targets": targets}, indent=1))
    text = bench.table(rows) + "\n"
    if args.memtracker:
        text += "\n| K | mode | MemTracker peak (MiB) | / checkpoint |\n|---|---|---|---|\n"
        for r in rows:
            ratio = r.get("memtracker_peak_vs_checkpoint", float("nan"))
            text += f"| {r['depth']} | {r['mode']} | {r['memtracker_peak'] / 2**20:.1f} | {ratio:.3f} |\n"
    if targets:
        text += "\n| target (bdia, K = {}) | bound | value | met |\n|---|---|---|---|\n".format(targets[0]["depth"])
        for t in targets:
            value = "n/a" if t["value"] is None else f"{t['value']:.3f}"
            text += f"| {t['quantity']} | <= {t['bound']} | {value} | {'yes' if t['met'] else 'NO'} |\n"
    text += f"\nmachine idle: {args.idle}\n"
    args.out.with_suffix(".md").write_text(text)
    plot(rows, args.out.with_suffix(".png"))
    print(text)


if __name__ == "__main__":
    main()
