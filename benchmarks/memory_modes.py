"""Memory and step time of stacks of GPT-style blocks under every memory mode.

Modes: standard, checkpoint, mesa, bdia and bdia+mesa (by default). d=256, 4 heads, causal
attention, 4x MLP, T=1024, batch 8, K = 6, 12, 24, 48, AdamW.
Writes <out>.json (raw rows), <out>.md (table) and <out>.png (memory against depth).

    python benchmarks/memory_modes.py                 # the full run (about 30 min on 2 cores)
    python benchmarks/memory_modes.py --device cuda --out benchmarks/results/memory_modes_cuda
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from revbits import bench  # noqa: E402


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
    parser.add_argument("--depths", type=int, nargs="+", default=[6, 12, 24, 48])
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "memory_modes")
    parser.add_argument("--modes", nargs="+", default=list(bench.BenchConfig.modes), choices=bench.MEMORY_MODES)
    args = parser.parse_args()
    config = bench.BenchConfig(
        depths=tuple(args.depths),
        modes=tuple(args.modes),
        d_model=args.d_model,
        seq_len=args.seq_len,
        batch=args.batch,
        repeats=args.repeats,
        device=args.device,
    )
    rows = bench.run(config)
    meta = {
        "config": vars(config),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    args.out.with_suffix(".md").write_text(bench.table(rows) + "\n")
    plot(rows, args.out.with_suffix(".png"))
    print(bench.table(rows))


if __name__ == "__main__":
    main()
