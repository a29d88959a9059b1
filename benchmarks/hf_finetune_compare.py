"""How far the MiniLM quality numbers of ``hf_finetune.py`` moved between two results files, e.g. when
the wiki-extract text changed: for each (training data, arm, seed) in both, the final and best
validation MLM loss before and after, and per arm the mean move and the move of the paired gap to
standard.

    python benchmarks/hf_finetune_compare.py results/hf_finetune_quality_old_filter.json \\
        results/hf_finetune_quality.json --out results/hf_finetune_quality_filter_change
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from report import write_results


def keyed(rows: list[dict]) -> dict[tuple[str, str, int], dict]:
    return {(r["data"], r["memory"], r["seed"]): r for r in rows}


def compare(before: list[dict], after: list[dict]) -> dict:
    """Rows present in both files, before and after, and per (data, arm) the mean moves."""
    old, new = keyed(before), keyed(after)
    rows = []
    for key in sorted(old.keys() & new.keys()):
        data, arm, seed = key
        row = {"data": data, "memory": arm, "seed": seed}
        for field in ("valid_loss", "best_valid_loss"):
            row |= {f"{field}_before": old[key][field], f"{field}_after": new[key][field]}
        standard = (data, "standard", seed)
        if arm != "standard" and standard in old and standard in new:
            row["gap_before"] = old[key]["valid_loss"] - old[standard]["valid_loss"]
            row["gap_after"] = new[key]["valid_loss"] - new[standard]["valid_loss"]
        rows.append(row)
    arms = []
    for data, arm in dict.fromkeys((r["data"], r["memory"]) for r in rows):
        group = [r for r in rows if (r["data"], r["memory"]) == (data, arm)]
        moves = [r["valid_loss_after"] - r["valid_loss_before"] for r in group]
        gaps = [r["gap_after"] - r["gap_before"] for r in group if "gap_after" in r]
        arms.append(
            {
                "data": data,
                "memory": arm,
                "seeds": [r["seed"] for r in group],
                "mean_move": statistics.mean(moves),
                "mean_gap_move": statistics.mean(gaps) if gaps else None,
            }
        )
    only = {
        "only_before": sorted(map(list, old.keys() - new.keys())),
        "only_after": sorted(map(list, new.keys() - old.keys())),
    }
    return {"rows": rows, "arms": arms} | only


def table(result: dict) -> list[str]:
    lines = [
        "| training data | memory | seed | final before | final after | move | gap to standard before | after |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        gap = f"{r['gap_before']:+.4f} | {r['gap_after']:+.4f}" if "gap_after" in r else " | "
        lines.append(
            f"| {r['data']} | {r['memory']} | {r['seed']} | {r['valid_loss_before']:.4f} | {r['valid_loss_after']:.4f} "
            f"| {r['valid_loss_after'] - r['valid_loss_before']:+.4f} | {gap} |"
        )
    lines += [
        "",
        "| training data | memory | seeds | mean move of the final loss | mean move of the gap to standard |",
        "|---|---|---|---|---|",
    ]
    for a in result["arms"]:
        gap = "" if a["mean_gap_move"] is None else f"{a['mean_gap_move']:+.4f}"
        lines.append(
            f"| {a['data']} | {a['memory']} | {', '.join(map(str, a['seeds']))} | {a['mean_move']:+.4f} | {gap} |"
        )
    lines += [
        "",
        f"Only before (not rerun): {len(result['only_before'])} runs; only after: {len(result['only_after'])}.",
    ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="writes OUT.json and OUT.md")
    args = parser.parse_args()
    before, after = (json.loads(path.read_text())["rows"] for path in (args.before, args.after))
    result = {"before": args.before.name, "after": args.after.name} | compare(before, after)
    write_results(args.out, result, table(result))


if __name__ == "__main__":
    main()
