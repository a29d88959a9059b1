"""The report of benchmarks/real_shapes.py: the fitted lines, the longest contexts, the table and the plot."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

GIB = 2**30

#: mode -> (how the layers run, revbits memory mode or None, fused loss)
MODES: dict[str, tuple[str, str | None, bool]] = {
    "transformers": ("plain", None, False),
    "gc": ("gc", None, False),
    "gc+offload": ("offload", None, False),
    "gc+fused": ("gc", None, True),
    "gc+offload+fused": ("offload", None, True),
    **{m: ("revbits", m, False) for m in ("checkpoint", "mesa", "bdia", "bdia+mesa")},
    **{f"{m}+fused": ("revbits", m, True) for m in ("checkpoint", "mesa", "bdia", "bdia+mesa")},
}


def fit(rows: list[dict], budgets: list[float]) -> list[dict]:
    """Per (run, batch, mode): the forward-and-backward peak = a + b T by least squares over the measured
    lengths; the longest T under each budget with the parameters counted at 2 bytes (bf16) instead of 4
    (0 where the optimizer step's own peak, which does not grow with T, exceeds the budget)."""
    out = []
    for key in dict.fromkeys((r["run"], r["batch"], r["mode"]) for r in rows):
        mine = sorted((r for r in rows if (r["run"], r["batch"], r["mode"]) == key and "peak" in r),
                      key=lambda r: r["length"])
        if not mine:
            out.append({"run": key[0], "batch": key[1], "mode": key[2], "measured": False})
            continue
        t = np.array([r["length"] for r in mine], dtype=float)
        p = np.array([r["peak"] for r in mine], dtype=float)
        a, b, how = _line(t, p)
        a_bf16 = a - mine[-1]["parameters"] / 2
        step_bf16 = max(r["optimizer_step_peak"] for r in mine) - mine[-1]["parameters"] / 2
        longest = {str(g): _longest(g * GIB, a_bf16, b, step_bf16) for g in budgets}
        out.append({
            "run": key[0], "batch": key[1], "mode": key[2], "measured": True,
            "line": how, "intercept": float(a), "intercept_bf16_weights": float(a_bf16), "bytes_per_position": float(b),
            "bytes_per_token": float(b) / key[1], "max_residual": float(np.max(np.abs(a + b * t - p) / p)),
            "measured_up_to": int(t.max()), "peak_at_longest": float(p[-1]), "longest_length": longest,
            "extrapolated": {g: bool(v is not None and v > t.max()) for g, v in longest.items()},
            "at_longest_measured": {k: mine[-1][k] for k in ("parameters", "gradients", "optimizer", "activations")},
        })
    return out


def _line(t: np.ndarray, p: np.ndarray) -> tuple[float, float, str]:
    """(a, b, how) of peak = a + b T: least squares over every length, or, where that misses a point by more
    than 2 % (a constant peak, e.g. the gradients of full fine-tuning, dominates the short lengths), the line
    through the two longest; b = 0 where the peak does not grow over the measured lengths."""
    if len(t) < 2 or p[-1] - p[0] <= 1e-6 * p[-1]:
        return float(p.max()), 0.0, "flat"
    b, a = np.polyfit(t, p, 1)
    if np.max(np.abs(a + b * t - p) / p) <= 0.02:
        return float(a), float(b), "least squares"
    b = (p[-1] - p[-2]) / (t[-1] - t[-2])
    return float(p[-1] - b * t[-1]), float(b), "two longest"


def _longest(budget: float, a: float, b: float, step_peak: float) -> int | None:
    """The longest T with a + b T <= budget, 0 where the optimizer step alone exceeds it; None without a slope."""
    if step_peak > budget:
        return 0
    return int((budget - a) // b) if b > 0 else None


def head_share(fits: list[dict], heads: list[dict]) -> None:
    """Add to each fit the head and loss's peak (plain, or fused for +fused modes) over the mode's
    activations at the longest measured length."""
    for f in (f for f in fits if f["measured"]):
        fused = MODES[f["mode"]][2]
        match = [h for h in heads if (h["run"], h["batch"], h["length"], h["fused"]) ==
                 (f["run"], f["batch"], f["measured_up_to"], fused)]
        f["head_and_loss_share"] = match[0]["peak"] / f["at_longest_measured"]["activations"] if match else None


def table(fits: list[dict], times: dict, budgets: list[float], time_shape: tuple[int, int]) -> list[str]:
    g1, g2 = (str(g) for g in budgets[:2])
    lines = [
        f"Peak: measured at the longest measured T (float32 weights). Longest T: where the fitted peak, weights "
        f"counted in bf16, reaches {g1} / {g2} GiB; * extrapolated beyond the measured lengths; 'flat': the peak "
        "does not grow over the measured lengths; '>': beyond 64 times the longest measured T, not extrapolated. "
        "Head+loss: its activations at their peak over the mode's, at the longest measured T. Step time at batch "
        f"{time_shape[0]}, T = {time_shape[1]}, relative to gc.",
        "",
        f"| run | batch | mode | T | peak GiB | KiB per token | head+loss | longest T {g1} GiB | {g2} GiB | vs gc "
        "| vs gc+offload | step / gc |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for f in fits:
        if not f["measured"]:
            lines.append(f"| {f['run']} | {f['batch']} | {f['mode']} | not measured | | | | | | | | |")
            continue
        same = {g["mode"]: g for g in fits if (g["run"], g["batch"]) == (f["run"], f["batch"]) and g["measured"]}
        ratio = {a: _ratio(_trusted(f, g1), _trusted(same[a], g1)) if a in same else "-" for a in ("gc", "gc+offload")}
        run_times = times.get(f["run"], {})
        timed = f["mode"] in run_times and "gc" in run_times and f["batch"] == time_shape[0]
        step = run_times[f["mode"]] / run_times["gc"] if timed else None
        longest = [_length(f["longest_length"][g], f["extrapolated"][g], f["measured_up_to"]) for g in (g1, g2)]
        share = f"{f['head_and_loss_share']:.0%}" if f.get("head_and_loss_share") is not None else "-"
        lines.append(
            f"| {f['run']} | {f['batch']} | {f['mode']} | {f['measured_up_to']} | {f['peak_at_longest'] / GIB:.2f} | "
            f"{f['bytes_per_token'] / 1024:,.1f} | {share} | "
            f"{longest[0]} | {longest[1]} | {ratio['gc']} | {ratio['gc+offload']} | "
            f"{'-' if step is None else f'{step:.2f}'} |"
        )
    return lines


def _length(length: int | None, extrapolated: bool, measured: int) -> str:
    """The longest T for the table: 'flat' without a slope, '>' beyond 64 times the measured lengths."""
    if length is None:
        return "flat"
    return f"> {64 * measured:,}" if length > 64 * measured else f"{length:,}{'*' if extrapolated else ''}"


def _trusted(fit: dict, budget: str) -> int | None:
    """The longest T where it is extrapolated at most 64 times beyond the measured lengths, else None."""
    length = fit["longest_length"][budget]
    return length if length is not None and length <= 64 * fit["measured_up_to"] else None


def _ratio(mine: int | None, theirs: int | None) -> str:
    return f"{mine / theirs:.2f}x" if mine and theirs and mine > 0 and theirs > 0 else "-"


def state_lines(fits: list[dict]) -> list[str]:
    """What the weights, gradients and optimizer state take, per run (from the gc rows)."""
    lines = ["", "| run | weights float32 (bf16) GiB | gradients GiB | AdamW state GiB | 8-bit moments would take |",
             "|---|---|---|---|---|"]
    for f in fits:
        if f["mode"] == "gc" and f["measured"] and f["batch"] == min(g["batch"] for g in fits if g["run"] == f["run"]):
            s = {k: v / GIB for k, v in f["at_longest_measured"].items()}
            lines.append(f"| {f['run']} | {s['parameters']:.2f} ({s['parameters'] / 2:.2f}) | {s['gradients']:.2f} | "
                         f"{s['optimizer']:.2f} | {s['optimizer'] / 4:.2f} (two 1-byte moments for two 4-byte) |")
    return lines


def plot(rows: list[dict], fits: list[dict], budgets: list[float], path: Path) -> None:
    runs, batches = (list(dict.fromkeys(r[k] for r in rows)) for k in ("run", "batch"))
    fig, axes = plt.subplots(len(runs), len(batches), figsize=(7 * len(batches), 5 * len(runs)), squeeze=False)
    for ax, (run, batch) in zip(axes.flat, [(run, batch) for run in runs for batch in batches]):
        colors = plt.get_cmap("tab20")
        for f in (f for f in fits if (f["run"], f["batch"]) == (run, batch) and f["measured"]):
            mine = [r for r in rows if (r["run"], r["batch"], r["mode"]) == (run, batch, f["mode"]) and "peak" in r]
            half = mine[-1]["parameters"] / 2
            style = "--" if MODES[f["mode"]][2] else "-"
            ax.plot([r["length"] for r in mine], [(r["peak"] - half) / GIB for r in mine], "o" + style,
                    color=colors(list(MODES).index(f["mode"])), label=f["mode"], markersize=3)
        for g in budgets:
            ax.axhline(g, color="black", linestyle=":", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context length T (measured)")
        ax.set_ylabel("peak of one step, weights counted in bf16 (GiB)")
        ax.set_title(f"{run}, batch {batch}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
