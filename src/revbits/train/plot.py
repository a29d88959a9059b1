"""Training curves of one or more runs in one PNG: train loss and validation metrics against step."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .metrics import read_metrics  # noqa: E402


def plot_runs(run_dirs: list[Path], out: Path, metric: str = "loss") -> Path:
    """Left: training ``metric``; right: validation ``metric``; one line per run, labelled by its folder."""
    fig, (ax_train, ax_valid) = plt.subplots(1, 2, figsize=(11, 4))
    for run in run_dirs:
        records = read_metrics(Path(run) / "metrics.jsonl")
        for ax, split in ((ax_train, "train"), (ax_valid, "valid")):
            points = [(r["step"], r[metric]) for r in records if r.get("split") == split and metric in r]
            if points:
                ax.plot(*zip(*points), marker="o" if split == "valid" else None, markersize=3, label=Path(run).name)
    for ax, split in ((ax_train, "train"), (ax_valid, "valid")):
        ax.set_title(f"{split} {metric}")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
