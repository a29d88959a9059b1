"""Accuracy of PETRA against plain backprop at equal epochs, Fashion-MNIST, 3 seeds.

Two models, each trained by both methods with the same configuration (steps, batch, optimiser, schedule):

- vit:    the revbits ViT with its blocks in a BDIAStack (memory bdia); PETRA stages are the stem, the BDIA
          entry, steps and exit, and the head (revbits.petra.pieces.vit);
- revnet: the small RevNet of revbits.petra (additive coupling stages, stride-2 convs between levels).

Arms, all with 64 examples per update and the same number of updates (so equal epochs):

- "backprop": ``revbits train`` on one process, batches of 64;
- "petra J=2 k=8": ``revbits train --parallel petra --stages 2 --accumulation 8 --batch-size 8`` (split by
  measured time): 8 micro-batches of 8 per update, so stage 0's delay of 2 micro-batches is a quarter
  of an update;
- "petra J=2 k=1": ``--accumulation 1 --batch-size 64``: the same delay is two whole updates.

Gradient clipping is off in every arm, because PETRA's stages cannot compute a global gradient norm.
The batches differ between the arms (all draw random training batches, from different streams), as
they do between seeds.

    python benchmarks/petra_accuracy.py                            # about 45 minutes on an idle 2-core machine
    python benchmarks/petra_accuracy.py --models vit --arms "petra J=2 k=1"   # the stale arm
    python benchmarks/petra_accuracy.py --seeds 0 --scale 0.05     # a quick look
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
from dataclasses import replace
from pathlib import Path

import torch

from report import experiment_config, mean_std
from revbits.train import TrainConfig
from revbits.train.checkpoint import load_checkpoint
from revbits.train.loop import evaluate, train
from revbits.train.petra import train_petra
from revbits.train.tasks import make_task

#: The "backprop" arm of each model: benchmarks/configs/petra-accuracy-<model>.toml (the seed is set per run).
MODELS = {name: experiment_config(f"petra-accuracy-{name}") for name in ("vit", "revnet")}
ARMS = {"backprop": None, "petra J=2 k=8": (2, 8), "petra J=2 k=1": (2, 1)}  # (stages, accumulation)
DEFAULT_ARMS = ["backprop", "petra J=2 k=8"]


def one_run(name: str, config: TrainConfig, arm: str, seed: int, runs: Path) -> dict:
    """Train one arm from scratch and evaluate its final weights on the test split."""
    run_dir = runs / name / f"{arm.replace(' ', '_').replace('=', '')}-seed{seed}"  # e.g. petra_J2_k8-seed0
    shutil.rmtree(run_dir, ignore_errors=True)
    config = replace(config, seed=seed, out=str(run_dir))
    if ARMS[arm] is None:
        train(config, quiet=True)
    else:
        stages, k = ARMS[arm]
        petra = replace(config, parallel="petra", stages=stages, accumulation=k, batch_size=config.batch_size // k)
        train_petra(petra, quiet=True)
    task = make_task(config)
    model = task.build_model()
    load_checkpoint(run_dir, model)
    model.eval()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    row = {
        "model": name,
        "arm": arm,
        "seed": seed,
        "epochs": config.steps * config.batch_size / len(task.splits["train"][0]),
        "valid": evaluate(task, model, "valid"),
        "test": evaluate(task, model, "test"),
        "valid_curve": {r["step"]: r["accuracy"] for r in records if r["split"] == "valid"},
    }
    if arm != "backprop":
        row["sizes"] = json.loads((run_dir / "progress.json").read_text())["sizes"]
    print(json.dumps({k: row[k] for k in ("model", "arm", "seed", "test")}), flush=True)
    return row


def summary(rows: list[dict]) -> str:
    lines = ["| model | method | seeds | epochs | test accuracy | valid accuracy | PETRA − backprop (test, points) |"]
    lines.append("|---|---|---|---|---|---|---|")
    for name in MODELS:
        by_arm = {
            arm: sorted((r for r in rows if (r["model"], r["arm"]) == (name, arm)), key=lambda r: r["seed"])
            for arm in ARMS
        }
        base = {r["seed"]: r["test"]["accuracy"] for r in by_arm["backprop"]}
        for arm, group in by_arm.items():
            if not group:
                continue
            tests = [r["test"]["accuracy"] for r in group]
            valids = [r["valid"]["accuracy"] for r in group]
            paired = [100 * (r["test"]["accuracy"] - base[r["seed"]]) for r in group if r["seed"] in base]
            delta = (
                ""
                if arm == "backprop" or not paired
                else (f"{statistics.mean(paired):+.2f} (per seed: {', '.join(f'{d:+.2f}' for d in paired)})")
            )
            lines.append(
                f"| {name} | {arm} | {len(group)} | {group[0]['epochs']:.1f} | {mean_std(tests)} | "
                f"{mean_std(valids)} | {delta} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--arms", nargs="+", default=DEFAULT_ARMS, choices=list(ARMS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the number of steps (quick looks)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "petra_accuracy")
    parser.add_argument("--fresh", action="store_true", help="train again rows already in results.json")
    parser.add_argument("--runs", type=Path, default=Path("runs") / "petra_accuracy", help="run directories")
    args = parser.parse_args()
    torch.set_num_threads(1)  # two stage processes share two cores; keep the arms alike
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "results.json"
    for name in args.models:
        steps = max(4, int(MODELS[name].steps * args.scale))
        config = replace(MODELS[name], steps=steps, warmup=min(100, steps // 4), eval_interval=min(500, steps))
        for seed in args.seeds:
            for arm in args.arms:
                saved = json.loads(results.read_text()) if results.exists() else {"configs": {}, "rows": []}
                done = any((r["model"], r["arm"], r["seed"]) == (name, arm, seed) for r in saved["rows"])
                if done and not args.fresh and saved["configs"].get(name) == config.to_dict():
                    continue  # this row was measured with this configuration already
                row = one_run(name, config, arm, seed, args.runs)
                # read again: another invocation of this script may have added rows meanwhile
                saved = json.loads(results.read_text()) if results.exists() else {"configs": {}, "rows": []}
                key = (name, arm, seed)
                saved["rows"] = [r for r in saved["rows"] if (r["model"], r["arm"], r["seed"]) != key] + [row]
                saved["configs"][name] = config.to_dict()
                results.write_text(json.dumps(saved, indent=1))
                (args.out / "summary.md").write_text(summary(saved["rows"]))
    print(summary(json.loads(results.read_text())["rows"]))


if __name__ == "__main__":
    main()
