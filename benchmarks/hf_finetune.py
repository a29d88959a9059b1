"""Continued masked-LM training of the pretrained all-MiniLM-L6-v2 on the Wikipedia extract: BDIA against
standard fine-tuning.

Three parts, each written to its own results file:

- quality (``hf_finetune_quality``): ``revbits train --hf all-MiniLM-L6-v2 --data wiki-extract`` under
  ``--memory standard`` and ``--memory bdia`` at equal steps, 3 seeds, on the full training split and on
  reduced ones (its first 20,000 or 5,000 tokens: 5 and 20 epochs in 200 steps), to test the claim that
  BDIA's regularisation helps most with little data. Validation MLM loss (fixed masking,
  ``eval_batches`` windows) at the end and its best along the run.
- memory (``hf_finetune_memory``): :func:`revbits.memory.measure_training_step` (LiveBytes) of one AdamW
  step per mode at the training shape: the peak, split into parameters, gradients, optimiser state and
  activations, and the bytes held between forward and backward. Then the largest batch whose step
  fits under ``--budget-mib`` of peak, found by secant steps over measured peaks and confirmed by a
  measured step at it (under the budget) and at one more (over it).
- speed (``hf_finetune_speed``): median seconds of a training step per mode, the modes alternating step
  by step in one process, and their ratio (run it on an otherwise idle machine).

    python benchmarks/hf_finetune.py                     # all three parts
    python benchmarks/hf_finetune.py --parts memory speed
    python benchmarks/hf_finetune.py --steps 4 --seeds 0 --parts quality --out runs/hf_smoke   # smoke run
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from report import mean_std, write_results
from revbits.data import wiki
from revbits.measure import measure_training_step
from revbits.train import TrainConfig
from revbits.train.commands import make_task_model
from revbits.train.loop import make_optimizer, train
from revbits.train.tasks import make_task

MIB = 2**20
MODES = ("standard", "bdia")
# Quality arms: a label and the options it changes. "bdia gamma 0.25" stores 2 bits per element per
# layer instead of 1, and its training forward stays closer to the pretrained one (g = +-0.25).
ARMS = {
    "standard": {"memory": "standard"},
    "bdia": {"memory": "bdia"},
    "bdia gamma 0.25": {"memory": "bdia", "gamma": 0.25},
    "bdia gamma 0.125": {"memory": "bdia", "gamma": 0.125},
    "bdia gamma 0.0625": {"memory": "bdia", "gamma": 0.0625},
}
BASE = TrainConfig(
    model="hf",
    hf="all-MiniLM-L6-v2",
    data="wiki-extract",
    gamma=0.5,  # the "bdia" arm: the paper's value (revbits train --hf defaults to 0.125 since)
    steps=200,
    batch_size=8,
    block_size=64,
    lr=1e-4,
    min_lr=1e-5,
    warmup=20,
    weight_decay=0.01,
    eval_interval=50,
    eval_batches=25,
    log_interval=10,
)


def quality_row(config: TrainConfig, arm: str, runs: Path, data: str) -> dict:
    run_dir = runs / data / f"{arm.replace(' ', '-')}-seed{config.seed}"
    shutil.rmtree(run_dir, ignore_errors=True)
    config = replace(config, out=str(run_dir), **ARMS[arm])
    final = train(config, quiet=True)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    curve = {r["step"]: r["loss"] for r in records if r["split"] == "valid"}
    row = {"data": data, "memory": arm, "seed": config.seed, "valid_loss": final["loss"]}
    row |= {"best_valid_loss": min(curve.values()), "valid_curve": curve}
    print(json.dumps({k: v for k, v in row.items() if k != "valid_curve"}), flush=True)
    return row


def setting(config: TrainConfig) -> dict:
    """What the quality rows are saved under: the run's configuration and the format of the extracted text."""
    return replace(config, out="").to_dict() | {"data_format": wiki.FORMAT}


def same_setting(saved: dict | None, current: dict) -> bool:
    """Whether rows saved under ``saved`` came from the setting ``current`` (options added to
    TrainConfig since, absent from ``saved``, are at their defaults and do not count; a setting
    without ``data_format`` is from the text of the earlier, hand-written wikitext filter)."""
    return saved is None or all(current.get(k) == v for k, v in {"data_format": None, **saved}.items())


DATA = {"full": None, "small": 20_000, "tiny": 5_000}  # training tokens: the whole split, or the first N


def quality_table(rows: list[dict]) -> list[str]:
    lines = [
        "| training data | memory | seeds | final valid MLM loss | best valid MLM loss | − standard (final, paired) |",
        "|---|---|---|---|---|---|",
    ]
    for data, tokens in DATA.items():
        finals = {m: {r["seed"]: r["valid_loss"] for r in rows if (r["data"], r["memory"]) == (data, m)} for m in ARMS}
        for memory in ARMS:
            group = [r for r in rows if (r["data"], r["memory"]) == (data, memory)]
            if not group:
                continue
            paired = [v - finals["standard"][s] for s, v in finals[memory].items() if s in finals["standard"]]
            delta = f"{statistics.mean(paired):+.4f}" if memory != "standard" and paired else ""
            label = "full train split" if tokens is None else f"first {tokens:,} tokens"
            lines.append(
                f"| {label} | {memory} | {len(group)} | {mean_std([r['valid_loss'] for r in group])} | "
                f"{mean_std([r['best_valid_loss'] for r in group])} | {delta} |"
            )
    return lines


def measured_step(task, config: TrainConfig, batch_size: int) -> dict:
    """LiveBytes of one AdamW step of ``config.memory`` at ``batch_size`` (after one warm-up step)."""
    config = replace(config, batch_size=batch_size)
    _ = task.splits  # tokenised once, on the task every copy shares
    task = copy.copy(task)  # the same data, drawing batches of this size
    task.config = config
    torch.manual_seed(0)
    model = task.build_model(config).train()
    batch = task.train_batch(torch.Generator().manual_seed(0), torch.device("cpu"))
    memory = measure_training_step(model, lambda: task.loss(model, batch), make_optimizer(model, config))
    return memory.as_dict()


def largest_batch(peak_of, peaks: dict[int, int], budget: int, tries: int = 8) -> int | None:
    """The largest batch b with peak_of(b) <= budget < peak_of(b + 1), found by secant steps on the
    measured peaks (a convex, increasing, piecewise-linear function of b); ``peaks`` holds the
    measurements so far and gets every new one. None if ``tries`` rounds do not settle it."""
    for _ in range(tries):
        (b0, p0), (b1, p1) = _bracket(peaks, budget)
        slope = (p1 - p0) / (b1 - b0)
        guess = max(1, int(b1 + (budget - p1) // slope))
        for b in (guess, guess + 1):
            if b not in peaks:
                peaks[b] = peak_of(b)
        if peaks[guess] <= budget < peaks[guess + 1]:
            return guess
    return None


def _bracket(peaks: dict[int, int], budget: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """The two measured points nearest the budget from below and above (or the two largest below)."""
    below = sorted((b, p) for b, p in peaks.items() if p <= budget)
    above = sorted((b, p) for b, p in peaks.items() if p > budget)
    if below and above:
        return below[-1], above[0]
    return tuple(sorted(peaks.items())[-2:]) if not above else tuple(sorted(peaks.items())[:2])


def memory_part(args: argparse.Namespace) -> dict:
    task = make_task(BASE)
    out: dict = {"budget_mib": args.budget_mib, "block_size": BASE.block_size, "modes": {}}
    for memory in MODES:
        config = replace(BASE, memory=memory)
        at_shape = measured_step(task, config, BASE.batch_size)
        peaks = {b: measured_step(task, config, b)["peak"] for b in (4, 8)}

        def peak_of(batch: int, config: TrainConfig = config) -> int:
            return measured_step(task, config, batch)["peak"]

        largest = largest_batch(peak_of, peaks, args.budget_mib * MIB)
        out["modes"][memory] = {
            "at_training_shape": at_shape,
            "peaks_by_batch": {str(b): p for b, p in sorted(peaks.items())},
            "largest_batch": largest,
        }
        print(memory, json.dumps(out["modes"][memory]["peaks_by_batch"]), flush=True)
    return out


def memory_table(result: dict) -> list[str]:
    modes = result["modes"]
    lines = [
        f"One AdamW step of MiniLM (masked LM head), batch {BASE.batch_size} x {result['block_size']} tokens, "
        "LiveBytes (MiB):",
        "",
        "| memory | peak | parameters | gradients | optimizer | activations at peak | held after forward |",
        "|---|---|---|---|---|---|---|",
    ]
    for memory, r in modes.items():
        s = r["at_training_shape"]
        lines.append(
            f"| {memory} | {s['peak'] / MIB:.1f} | {s['parameters'] / MIB:.1f} | {s['gradients'] / MIB:.1f} | "
            f"{s['optimizer'] / MIB:.1f} | {s['activations'] / MIB:.1f} | {s['held_after_forward'] / MIB:.1f} |"
        )
    held = {m: r["at_training_shape"]["held_after_forward"] for m, r in modes.items()}
    peak = {m: r["at_training_shape"]["peak"] for m, r in modes.items()}
    lines += [
        "",
        f"bdia / standard: held after forward {held['bdia'] / held['standard']:.3f}, "
        f"peak {peak['bdia'] / peak['standard']:.3f}",
        "",
        f"Largest batch of {result['block_size']}-token windows whose step peaks under {result['budget_mib']} MiB:",
        "",
        "| memory | largest batch | measured peak at it / at one more (MiB) |",
        "|---|---|---|",
    ]
    for memory, r in modes.items():
        b = r["largest_batch"]
        if b is None:
            lines.append(f"| {memory} | not found | |")
            continue
        at, over = r["peaks_by_batch"][str(b)], r["peaks_by_batch"][str(b + 1)]
        lines.append(f"| {memory} | {b} | {at / MIB:.1f} / {over / MIB:.1f} |")
    return lines


def speed_part(args: argparse.Namespace) -> dict:
    task = make_task(BASE)
    models, optimizers = {}, {}
    for memory in MODES:
        torch.manual_seed(0)
        models[memory] = make_task_model(task, replace(BASE, memory=memory)).train()
        optimizers[memory] = make_optimizer(models[memory], replace(BASE, memory=memory))
    sampler = torch.Generator().manual_seed(0)
    times: dict[str, list[float]] = {m: [] for m in MODES}
    for i in range(args.speed_steps + 2):
        batch = task.train_batch(sampler, torch.device("cpu"))
        for memory in MODES:
            start = time.perf_counter()
            optimizers[memory].zero_grad(set_to_none=True)
            task.loss(models[memory], batch).backward()
            optimizers[memory].step()
            if i >= 2:  # two warm-up steps
                times[memory].append(time.perf_counter() - start)
    medians = {m: statistics.median(t) for m, t in times.items()}
    return {
        "threads": torch.get_num_threads(),
        "steps": args.speed_steps,
        "median_s": medians,
        "ratio_bdia_over_standard": medians["bdia"] / medians["standard"],
    }


def speed_table(result: dict) -> list[str]:
    return [
        f"Median training step, batch {BASE.batch_size} x {BASE.block_size}, {result['steps']} steps per mode, "
        f"alternating, {result['threads']} threads: bdia / standard = {result['ratio_bdia_over_standard']:.2f}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--parts", nargs="+", default=["quality", "memory", "speed"], choices=["quality", "memory", "speed"]
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--data", nargs="+", default=list(DATA), choices=list(DATA))
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(ARMS), help="quality arms")
    parser.add_argument("--table-only", action="store_true", help="rebuild the quality table from its json")
    parser.add_argument("--steps", type=int, default=BASE.steps)
    parser.add_argument("--budget-mib", type=int, default=1024)
    parser.add_argument("--speed-steps", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--runs", type=Path, default=Path("runs") / "hf_finetune")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.table_only:
        saved = json.loads((args.out / "hf_finetune_quality.json").read_text())
        write_results(args.out / "hf_finetune_quality", saved, quality_table(saved["rows"]))
        return
    if "quality" in args.parts:
        results = args.out / "hf_finetune_quality.json"
        for data in args.data:
            config = replace(BASE, steps=args.steps, eval_interval=min(BASE.eval_interval, args.steps))
            if DATA[data] is not None:
                config = replace(config, train_subset=DATA[data])
            for seed in args.seeds:
                for memory in args.modes:
                    row = quality_row(replace(config, seed=seed), memory, args.runs, data)
                    saved = json.loads(results.read_text()) if results.exists() else {"configs": {}, "rows": []}
                    if not same_setting(saved["configs"].get(data), setting(config)):
                        saved["rows"] = [r for r in saved["rows"] if r["data"] != data]  # another setting's rows
                    key = (data, memory, seed)
                    saved["rows"] = [r for r in saved["rows"] if (r["data"], r["memory"], r["seed"]) != key] + [row]
                    saved["configs"][data] = setting(config)
                    write_results(results.with_suffix(""), saved, quality_table(saved["rows"]))
    if "memory" in args.parts:
        result = memory_part(args)
        write_results(args.out / "hf_finetune_memory", result, memory_table(result))
    if "speed" in args.parts:
        torch.set_num_threads(2)
        result = speed_part(args)
        write_results(args.out / "hf_finetune_speed", result, speed_table(result))


if __name__ == "__main__":
    main()
