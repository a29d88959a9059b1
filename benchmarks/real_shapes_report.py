"""The report of benchmarks/real_shapes.py: the fitted lines, the longest contexts, the table and the plot."""

from __future__ import annotations

import argparse
import json
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
    """Per (run, batch, mode): the forward-and-backward peak = a + b T over the measured lengths (``_line``),
    and the same per phase (forward, head-and-loss backward, layers backward) where the rows have
    ``phase_peaks``. The longest T under each budget, with the parameters counted at 2 bytes (bf16) instead
    of 4, is the shortest over the phases' lines (over the step's line without phases); 0 where the
    optimizer step's own peak, which does not grow with T, exceeds the budget."""
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
        half = mine[-1]["parameters"] / 2
        step_bf16 = max(r["optimizer_step_peak"] for r in mine) - half
        phased = [r for r in mine if "phase_peaks" in r]
        lines = {"step": (a, b)}
        if len(phased) >= 2 and len(phased) == len(mine):
            lines = {name: _line(t, np.array([r["phase_peaks"][name] for r in phased], dtype=float))[:2]
                     for name in phased[-1]["phase_peaks"]}
        if len(lines) > 1 and min(pb for _, pb in lines.values()) <= 0:
            how = "flat phase"  # it grows somewhere beyond the measured lengths, at a slope not yet measured
        longest, limiting = dict.fromkeys(map(str, budgets)), dict.fromkeys(map(str, budgets))
        for g in budgets if how != "flat phase" else ():
            each = {name: _longest(g * GIB, pa - half, pb, step_bf16) for name, (pa, pb) in lines.items()}
            bounded = {name: v for name, v in each.items() if v is not None}
            limiting[str(g)] = min(bounded, key=bounded.get) if bounded else None
            longest[str(g)] = bounded[limiting[str(g)]] if bounded else None
        steepest = max(pb for _, pb in lines.values())
        out.append({
            "run": key[0], "batch": key[1], "mode": key[2], "measured": True, "line": how, "intercept": float(a),
            "intercept_bf16_weights": float(a - half), "bytes_per_position": float(b),
            "bytes_per_token": float(b) / key[1], "max_residual": float(np.max(np.abs(a + b * t - p) / p)),
            "phase_lines": {n: [float(pa), float(pb)] for n, (pa, pb) in lines.items()},
            "steepest_bytes_per_token": float(steepest) / key[1], "limiting_phase": limiting,
            "measured_up_to": int(t.max()), "peak_at_longest": float(p[-1]), "longest_length": longest,
            "extrapolated": {str(g): bool(longest.get(str(g)) and longest[str(g)] > t.max()) for g in budgets},
            "at_longest_measured": {k: mine[-1][k] for k in ("parameters", "gradients", "optimizer", "activations")},
        })
    return out


def _line(t: np.ndarray, p: np.ndarray) -> tuple[float, float, str]:
    """(a, b, how) of peak = a + b T: least squares over every length, or, where that misses a point by more
    than 2 % (a constant peak, e.g. the gradients of full fine-tuning, dominates the short lengths), the line
    through the two longest; b = 0 where the peak does not grow over the measured lengths."""
    if len(t) < 2:
        return float(p.max()), 0.0, "one length"
    if p[-1] - p[0] <= 1e-6 * p[-1]:
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


def table(fits: list[dict], times: dict, budgets: list[float]) -> list[str]:
    g1, g2 = (str(g) for g in budgets[:2])
    lines = [
        "Peak: measured at the longest measured T (float32 weights). KiB per token: the slope of the step's peak "
        "over the measured lengths, and of the steepest of its phases (forward, head-and-loss backward, layers "
        "backward), which governs long contexts. Longest T: where the first phase's fitted line (the step's line "
        f"for rows without phases), weights counted in bf16, reaches {g1} / {g2} GiB; * extrapolated beyond the "
        "measured lengths; 'flat': the peak "
        "does not grow over the measured lengths "
        "('one length': one measured; 'a phase flat': one phase's peak does not grow yet, so its slope "
        "beyond is unknown); '>': beyond 64 times the longest "
        "measured T, not extrapolated. "
        "Head+loss: its activations at their peak over the mode's, at the longest measured T. vs gc, vs "
        f"gc+offload+fused: the longest T in {g1} GiB over theirs. Step time: "
        + ("; ".join(f"{run} at batch {t['batch']}, T = {t['length']} (machine idle: {t['machine_idle']})"
                     for run, t in times.items()) or "not measured")
        + ", relative to gc's (to gc+fused's where gc was not timed; the cell names it).",
        "",
        f"| run | batch | mode | T | peak GiB | KiB per token: step / steepest phase | head+loss | longest T {g1} GiB "
        f"| {g2} GiB | vs gc | vs gc+offload+fused | step / gc |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for f in fits:
        if not f["measured"]:
            lines.append(f"| {f['run']} | {f['batch']} | {f['mode']} | not measured | | | | | | | | |")
            continue
        same = {g["mode"]: g for g in fits if (g["run"], g["batch"]) == (f["run"], f["batch"]) and g["measured"]}
        anchors = ("gc", "gc+offload+fused")
        ratio = {a: _versus(f, same[a], g1) if a in same else "-" for a in anchors}
        step = _step_ratio(f, times)
        longest = [_length(f["longest_length"][g], f["extrapolated"][g], f["measured_up_to"], f["line"])
                   for g in (g1, g2)]
        share = f"{f['head_and_loss_share']:.0%}" if f.get("head_and_loss_share") is not None else "-"
        lines.append(
            f"| {f['run']} | {f['batch']} | {f['mode']} | {f['measured_up_to']} | {f['peak_at_longest'] / GIB:.2f} | "
            f"{_per_token(f)} / {_per_token(f, 'steepest_bytes_per_token')} | {share} | "
            f"{longest[0]} | {longest[1]} | {ratio['gc']} | {ratio['gc+offload+fused']} | "
            f"{step} |"
        )
    return lines


def _length(length: int | None, extrapolated: bool, measured: int, line: str) -> str:
    """The longest T for the table: 'flat' without a slope (or 'one length' measured), '>' beyond 64 times the
    measured lengths."""
    if length is None:
        return {"flat": "flat", "flat phase": "a phase flat"}.get(line, "one length")
    return f"> {64 * measured:,}" if length > 64 * measured else f"{length:,}{'*' if extrapolated else ''}"


def _per_token(fit: dict, key: str = "bytes_per_token") -> str:
    return "-" if fit["line"] == "one length" else f"{fit[key] / 1024:,.1f}"


def _versus(mine: dict, theirs: dict, budget: str) -> str:
    """Mine's longest T over theirs: a ratio; a bound ('> Nx', '< Nx') where one of them lies beyond 64 times
    its longest measured T (there the ratio is taken at that limit); '-' without a slope or where neither fits."""
    limits, lengths = [64 * f["measured_up_to"] for f in (mine, theirs)], [f["longest_length"][budget] for f in
                                                                           (mine, theirs)]
    if None in lengths or 0 in lengths:
        return "-"
    beyond = [t > limit for t, limit in zip(lengths, limits)]
    a, b = (min(t, limit) for t, limit in zip(lengths, limits))
    if all(beyond):
        return "-"
    return f"{'> ' if beyond[0] else '< ' if beyond[1] else ''}{a / b:.2f}x"


def state_lines(fits: list[dict], parameters: dict, devices: int = 8) -> list[str]:
    """Weights, gradients and optimizer state per run: measured (LiveBytes, the gc row at the smallest batch)
    and computed from the parameter counts (bf16 weights, 8-bit AdamW moments, ZeRO over ``devices``)."""
    lines = [
        "", f"Weights, gradients and AdamW state. Measured: counted by LiveBytes (the gc step, or another mode's where "
        "gc was not run). Computed from the "
        f"parameter counts: bf16 weights (2 bytes per parameter); 8-bit AdamW (two 1-byte moments per trained "
        f"parameter, their block scales left out); ZeRO over {devices} devices (stage 1 splits the optimizer "
        "state, stage 2 also the gradients, stage 3 also the weights; per device, bf16 weights, float32 "
        "gradients and AdamW). What remains of 16 / 24 GiB for activations, per device.", "",
        "| run | parameters (trained) | weights float32 / bf16 GiB | gradients GiB | AdamW state GiB (measured) "
        "| 8-bit AdamW GiB (computed) | ZeRO-1 / 2 / 3 per device GiB (computed) | left of 16 / 24 GiB: plain "
        "bf16 + AdamW, 8-bit, ZeRO-3 |", "|---|---|---|---|---|---|---|---|"]
    for run, counts in parameters.items():
        gc = sorted((f for f in fits if f["run"] == run and f["measured"]), key=lambda f: f["mode"] != "gc")
        total, trained = counts["total"], counts["trainable"]
        weights, grads, adam = 2 * total / GIB, 4 * trained / GIB, 8 * trained / GIB
        measured = f"{gc[0]['at_longest_measured']['optimizer'] / GIB:.2f}" if gc else "-"
        eight_bit = 2 * trained / GIB
        zero = [weights + grads + adam / devices, weights + (grads + adam) / devices,
                (weights + grads + adam) / devices]
        plain, small = weights + grads + adam, weights + grads + eight_bit
        left = " / ".join(", ".join(f"{g - x:.1f}" for x in (plain, small, zero[2])) for g in (16, 24))
        lines.append(f"| {run} | {total / 1e6:,.0f} M ({trained / 1e6:,.1f} M) | {2 * weights:.2f} / {weights:.2f} | "
                     f"{grads:.2f} | {adam:.2f} ({measured}) | {eight_bit:.2f} | "
                     f"{' / '.join(f'{z:.2f}' for z in zero)} | {left} |")
    return lines


def notes(rows: list[dict]) -> list[str]:
    """The points not measured, with their reasons (skipped by prediction, out of memory, failed)."""
    out = [f"- {r['run']}, batch {r['batch']}, {r['mode']}, T = {r['length']}: "
           + (f"skipped ({r['skipped']})" if "skipped" in r else "out of memory" if r.get("oom") else
              f"FAILED: {r.get('failed')}") for r in rows if "peak" not in r]
    return ["", "Points not measured:", "", *out] if out else []


def _step_ratio(f: dict, times: dict) -> str:
    """The mode's step time over gc's (gc+fused's where gc was not timed, named), at the timed batch; '-' if none."""
    run_times = times.get(f["run"], {})
    seconds = run_times.get("seconds", {})
    anchor = next((a for a in ("gc", "gc+fused") if a in seconds), None)
    if f["mode"] not in seconds or anchor is None or f["batch"] != run_times["batch"]:
        return "-"
    return f"{seconds[f['mode']] / seconds[anchor]:.2f}" + ("" if anchor == "gc" else f" ({anchor})")


def readme_table(fits: list[dict], budgets: list[float], times: dict) -> list[str]:
    """The short table for README: per run and batch, the anchor gc and the fused modes, KiB per token, the
    longest context in the larger budget and the step time where one was measured."""
    g = str(budgets[-1])
    lines = [f"| run | batch | mode | measured up to T | KiB per token (steepest phase) | longest T in {g} GiB |"
             " vs gc | step time |", "|---|---|---|---|---|---|---|---|"]
    for f in (f for f in fits if f["measured"]):
        same = [x for x in fits if (x["run"], x["batch"], x["mode"]) == (f["run"], f["batch"], "gc") and x["measured"]]
        ratio = _versus(f, same[0], g) if same else "-"
        longest = _length(f["longest_length"][g], f["extrapolated"][g], f["measured_up_to"], f["line"])
        lines.append(f"| {f['run']} | {f['batch']} | {f['mode']} | {f['measured_up_to']:,} | "
                     f"{_per_token(f, 'steepest_bytes_per_token')} | "
                     f"{longest} | {ratio} | {_step_ratio(f, times)} |")
    return lines


def plot(rows: list[dict], fits: list[dict], budgets: list[float], path: Path) -> None:
    """Per run and batch, two panels against the measured lengths: the peak with the weights counted in bf16
    (the budgets dotted), and the activations at the peak alone (where the fused modes differ)."""
    pairs = list(dict.fromkeys((r["run"], r["batch"]) for f in fits if f["measured"] for r in rows
                               if (r["run"], r["batch"]) == (f["run"], f["batch"])))
    fig, axes = plt.subplots(len(pairs), 2, figsize=(13, 4.5 * len(pairs)), squeeze=False)
    names = list(MODES)
    palette = [plt.get_cmap("tab10")(i) for i in range(10)] + ["black", "darkgoldenrod", "navy"]
    for (peak_ax, act_ax), (run, batch) in zip(axes, pairs):
        for f in (f for f in fits if (f["run"], f["batch"]) == (run, batch) and f["measured"]):
            mine = sorted((r for r in rows if (r["run"], r["batch"], r["mode"]) == (run, batch, f["mode"])
                           and "peak" in r), key=lambda r: r["length"])
            t = [r["length"] for r in mine]
            style = dict(marker="o", linestyle="--" if MODES[f["mode"]][2] else "-", markersize=3, label=f["mode"],
                         color=palette[names.index(f["mode"]) % len(palette)])
            peak_ax.plot(t, [(r["peak"] - r["parameters"] / 2) / GIB for r in mine], **style)
            act_ax.plot(t, [r["activations"] / GIB for r in mine], **style)
        for g in budgets:
            peak_ax.axhline(g, color="black", linestyle=":", linewidth=0.8)
        for ax, what in ((peak_ax, "peak of one step, weights counted in bf16"), (act_ax, "activations at the peak")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("context length T (measured points)")
            ax.set_ylabel(f"{what} (GiB)")
            ax.set_title(f"{run}, batch {batch}: {what}", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def write_report(path: Path) -> list[str]:
    """Fit the rows of the JSON at ``path``, write the fits into it, and write the table (``.md``) and the plot
    (``.png``) beside it. Returns the table's lines."""
    raw = json.loads(path.read_text())
    budgets = raw["meta"].get("budgets", [16.0, 24.0])
    rows = [r for r in raw["rows"]]
    order = ["qwen3-0.6b:lora", "llama-3.2-1b:lora", "qwen3-0.6b:full"]
    fits = sorted(fit(rows, budgets), key=lambda f: (order.index(f["run"]) if f["run"] in order else len(order),
                                                     f["run"], f["batch"], list(MODES).index(f["mode"])))
    head_share(fits, raw["head_and_loss"])
    lines = table(fits, raw["step_seconds"], budgets) + state_lines(fits, raw["meta"].get("parameters", {}))
    lines += notes(rows) + ["", "README table:", ""] + readme_table(fits, budgets, raw["step_seconds"])
    devices = "; ".join(dict.fromkeys(f"{i['device_name']} ({i['device']}, {i['threads']} threads, idle: "
                                      f"{i['machine_idle']})" for i in raw["meta"].get("invocations", [])))
    lines += ["", f"Measured on: {devices}"]
    raw["fits"] = fits
    path.write_text(json.dumps(raw, indent=1))
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    if any("peak" in r for r in rows):
        plot(rows, fits, budgets, path.with_suffix(".png"))
    return lines


def replace_between_markers(path: Path, marker: str, lines: list[str]) -> None:
    """Put ``lines`` between ``<!-- marker -->`` and ``<!-- /marker -->`` in the file at ``path``."""
    text = path.read_text()
    start, end = f"<!-- {marker} -->\n", f"<!-- /{marker} -->"
    if start not in text or end not in text:
        raise SystemExit(f"{path} has no {start.strip()} ... {end} block")
    before, rest = text.split(start, 1)
    path.write_text(before + start + "\n".join(lines) + "\n" + end + rest.split(end, 1)[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("json", type=Path, nargs="?", default=Path(__file__).parent / "results" / "real_shapes.json")
    parser.add_argument("--readme", type=Path, help="also put the README table between <!-- real-shapes --> markers")
    args = parser.parse_args()
    lines = write_report(args.json)
    print("\n".join(lines))
    if args.readme:
        raw = json.loads(args.json.read_text())
        table_lines = readme_table(raw["fits"], raw["meta"]["budgets"], raw["step_seconds"])
        replace_between_markers(args.readme, "real-shapes", table_lines)


if __name__ == "__main__":
    main()
