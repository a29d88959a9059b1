"""BDIA, Mesa and reversible RNNs against standard training on real data, at equal steps, data and seeds.

Experiments (each trains the chosen memory modes from the same seeds; by default standard and bdia,
or standard and reversible for the RNN experiments):
- vit:        ViT on a 10k-image subset of Fashion-MNIST; test accuracy; gamma swept at inference for
              both models (the paper's robustness figure); BDIA evaluated with and without the quantiser.
- gpt:        character GPT on a 20k-character slice of Shakespeare, trained long enough to overfit;
              test loss.
- translator: encoder-decoder on Bible en-fr; test loss and BLEU (greedy).
- rnnlm:      word-level language model on Shakespeare (10k vocabulary), 2-layer GRU, 256 wide,
              1,000 steps; test perplexity. rnnlm-500 and rnnlm-3000: the same for 500 and 3,000 steps.
- rnn-translator: attention seq2seq on (reversible) GRUs on Bible en-fr; test loss and BLEU (greedy).

The options of each experiment are in benchmarks/configs/quality-<experiment>.toml, which
``revbits train --config`` also reads.
Writes <out>/results.json (every run's numbers), <out>/summary.md (mean +- std tables) and
<out>/<experiment>_curves.png; the run directories (checkpoints, metrics) go to --runs.
Needs the data sets: revbits data fetch fashion-mnist shakespeare bible-en-fr.

    python benchmarks/quality.py                       # all experiments, 3 seeds
    python benchmarks/quality.py --experiments vit --seeds 0 --scale 0.1   # a quick look
    python benchmarks/quality.py --experiments vit gpt --modes mesa        # add Mesa runs
    python benchmarks/quality.py --experiments rnnlm rnn-translator
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
from revbits import BDIAStack
from revbits.train import TrainConfig, load_checkpoint, train
from revbits.train.loop import evaluate
from revbits.train.plot import plot_runs
from revbits.train.tasks import make_task
from revbits.train.translation_eval import bleu

#: Each experiment's options: benchmarks/configs/quality-<name>.toml (the memory mode and seed are set per run).
EXPERIMENTS = {
    name: experiment_config(f"quality-{name}")
    for name in ("vit", "gpt", "translator", "rnnlm", "rnnlm-500", "rnnlm-3000", "rnn-translator")
}
MODES = ("standard", "checkpoint", "mesa", "bdia", "bdia+mesa", "reversible")
TRANSLATORS = ("translator", "rnn-translator")
GAMMAS = [-0.5, -0.4, -0.3, -0.2, -0.1, 0.0, 0.1, 0.2, 0.3, 0.4, 0.5]


def bdia_stacks(model: torch.nn.Module) -> list[BDIAStack]:
    return [m for m in model.modules() if isinstance(m, BDIAStack)]


def as_float_bdia(config: TrainConfig, task, run_dir: Path) -> torch.nn.Module:
    """The run's weights in a BDIA-mode model without the quantiser (state dicts agree across modes),
    so that eval_gamma = 0 is exactly the trained model in floating point."""
    model = make_task(replace(config, memory="bdia", quantize_eval=False)).build_model()
    load_checkpoint(run_dir, model)
    return model.eval()


def one_run(name: str, config: TrainConfig, seed: int, memory: str, root: Path, from_runs: bool = False) -> dict:
    """Train one run (or, with ``from_runs``, take its finished run directory) and evaluate it."""
    run_dir = root / name / f"{memory}-seed{seed}"
    config = replace(config, memory=memory, seed=seed, out=str(run_dir))
    if not from_runs:
        shutil.rmtree(run_dir, ignore_errors=True)
        valid = train(config, quiet=True)
    task = make_task(config)
    model = task.build_model()
    state = load_checkpoint(run_dir, model)
    model.eval()
    if from_runs:
        if int(state["step"]) != config.steps:
            raise SystemExit(f"{run_dir} stopped at step {state['step']}, not {config.steps}: train it first")
        valid = {"step": config.steps, "split": "valid", **evaluate(task, model, "valid")}
    row = {
        "experiment": name,
        "memory": memory,
        "seed": seed,
        "valid": valid,
        "test": evaluate(task, model, "test"),
        "valid_curve": valid_curve(run_dir),
    }
    if name == "vit":
        bdia_model = as_float_bdia(config, task, run_dir)
        sweep = {}
        for gamma in GAMMAS:
            for stack in bdia_stacks(bdia_model):
                stack.eval_gamma = gamma
            sweep[str(gamma)] = evaluate(task, bdia_model, "test")["accuracy"]
        row["gamma_sweep"] = sweep
        if memory == "bdia":
            for stack in bdia_stacks(bdia_model):
                stack.eval_gamma = 0.0
            row["test_no_quantizer"] = evaluate(task, bdia_model, "test")
    if name in TRANSLATORS:
        row["bleu"] = bleu(task, model, "test", "greedy", 4, 300)
    if name == "gpt" and memory == "bdia":
        for stack in bdia_stacks(model):
            stack.quantize_eval = False
        row["test_no_quantizer"] = evaluate(task, model, "test")
    print(json.dumps({k: row[k] for k in ("experiment", "memory", "seed", "test")}), flush=True)
    return row


def valid_curve(run_dir: Path) -> dict[str, float]:
    """Validation loss by step, from the run's metrics."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    return {str(r["step"]): r["loss"] for r in records if r.get("split") == "valid"}


def summary(rows: list[dict]) -> str:
    lines = []
    for name in dict.fromkeys(r["experiment"] for r in rows):
        mine = [r for r in rows if r["experiment"] == name]
        metrics = [k for k in mine[0]["test"] if k != "step"]
        lines += [
            f"### {name}",
            "",
            "| memory | seeds | "
            + " | ".join(f"test {m}" for m in metrics)
            + (" | test BLEU" if name in TRANSLATORS else "")
            + " | best valid loss | final valid loss |",
            "|---" * (len(metrics) + 4 + (name in TRANSLATORS)) + "|",
        ]
        for memory in MODES:
            group = [r for r in mine if r["memory"] == memory]
            if not group:
                continue
            cells = [mean_std([r["test"][m] for r in group]) for m in metrics]
            if name in TRANSLATORS:
                cells.append(mean_std([r["bleu"]["bleu"] for r in group]))
            cells.append(mean_std([min(r.get("valid_curve", {"end": r["valid"]["loss"]}).values()) for r in group]))
            cells.append(mean_std([r["valid"]["loss"] for r in group]))
            lines.append(f"| {memory} | {len(group)} | " + " | ".join(cells) + " |")
        quantizer = [r for r in mine if "test_no_quantizer" in r and r["memory"] == "bdia"]
        if quantizer:
            key = "accuracy" if name == "vit" else "loss"
            lines += [
                "",
                f"BDIA-trained, test {key} with the quantiser on: "
                f"{mean_std([r['test'][key] for r in quantizer])}; off: "
                f"{mean_std([r['test_no_quantizer'][key] for r in quantizer])}",
            ]
        if name == "vit":
            lines += [
                "",
                "Test accuracy with gamma fixed at inference (mean over seeds):",
                "",
                "| trained with | " + " | ".join(f"{g:+.1f}" for g in GAMMAS) + " |",
                "|---" * (len(GAMMAS) + 1) + "|",
            ]
            for memory in MODES:
                group = [r for r in mine if r["memory"] == memory]
                if group:
                    lines.append(
                        f"| {memory} | "
                        + " | ".join(f"{statistics.mean(r['gamma_sweep'][str(g)] for r in group):.4f}" for g in GAMMAS)
                        + " |"
                    )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiments", nargs="+", default=list(EXPERIMENTS), choices=list(EXPERIMENTS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--modes", nargs="+", choices=MODES, help="default: standard and bdia, or reversible for RNNs")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the number of steps (quick looks)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "quality")
    parser.add_argument("--runs", type=Path, default=Path("runs") / "quality", help="run directories (not committed)")
    parser.add_argument("--summary-only", action="store_true", help="rebuild summary.md from results.json")
    parser.add_argument(
        "--from-runs", action="store_true", help="evaluate the finished run directories in --runs instead of training"
    )
    args = parser.parse_args()
    if args.summary_only:
        saved = json.loads((args.out / "results.json").read_text())
        for row in saved["rows"]:
            if "valid_curve" not in row:
                row["valid_curve"] = valid_curve(args.runs / row["experiment"] / f"{row['memory']}-seed{row['seed']}")
        (args.out / "results.json").write_text(json.dumps(saved, indent=1))
        (args.out / "summary.md").write_text(summary(saved["rows"]))
        print(summary(saved["rows"]))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "results.json"
    saved = json.loads(results.read_text()) if results.exists() else {"configs": {}, "rows": []}
    for name in args.experiments:
        config = EXPERIMENTS[name]
        steps = max(2, int(config.steps * args.scale))
        config = replace(
            config, steps=steps, warmup=min(config.warmup, steps // 2), eval_interval=min(config.eval_interval, steps)
        )
        modes = args.modes or ["standard", "reversible" if name.startswith("rnn") else "bdia"]
        for seed in args.seeds:
            for memory in modes:
                row = one_run(name, config, seed, memory, args.runs, args.from_runs)
                # a new row replaces the earlier row of the same experiment, mode and seed, so runs can be
                # split; the file is read again, as another run of this script may have written meanwhile
                saved = json.loads(results.read_text()) if results.exists() else saved
                key = (name, memory, seed)
                saved["rows"] = [r for r in saved["rows"] if (r["experiment"], r["memory"], r["seed"]) != key] + [row]
                saved["configs"][name] = config.to_dict()
                results.write_text(json.dumps(saved, indent=1))
                (args.out / "summary.md").write_text(summary(saved["rows"]))
        plot_runs(sorted((args.runs / name).iterdir()), args.out / f"{name}_curves.png")
    print(summary(saved["rows"]))


if __name__ == "__main__":
    main()
