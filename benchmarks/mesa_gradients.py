"""How close Mesa's gradients are to exact ones: per parameter tensor, on the same batch.

For each model (GPT on Shakespeare characters, ViT on Fashion-MNIST images; both need the data
sets fetched) and each precision (fp32, bf16 autocast), one training batch goes through the same
weights under the exact mode and under its 8-bit mode:
    standard  vs  mesa          (ranges from each batch; running ranges after 20 steps;
                                 64-channel groups as in Mesa's code instead of per channel)
    bdia      vs  bdia+mesa
Reported per parameter tensor: cosine similarity and relative error |g - g_exact| / |g_exact|.
Writes <out>.json (every tensor) and <out>.md (worst and median per comparison).

    python benchmarks/mesa_gradients.py
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from report import experiment_config, write_results
from revbits.train import TrainConfig
from revbits.train.tasks import make_task

CONFIGS = {name: experiment_config(f"mesa-gradients-{name}") for name in ("gpt", "vit")}  # benchmarks/configs/
PAIRS = [
    ("standard", "mesa", {}),
    ("standard", "mesa", {"mesa_ranges": "ema"}),
    ("standard", "mesa", {"mesa_channel_group": 64}),  # Mesa's own grouping, for comparison
    ("bdia", "bdia+mesa", {}),
]


def gradients(task, config: TrainConfig, batch, warm_batches: list, autocast: bool) -> list[tuple[str, torch.Tensor]]:
    torch.manual_seed(config.seed)
    model = task.build_model().train()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        for warm in warm_batches:  # forward passes only: they fill the running ranges, no weight changes
            task.loss(model, warm)
        torch.manual_seed(1)
        loss = task.loss(model, batch)
    loss.backward()
    return [(name, p.grad.detach().double()) for name, p in model.named_parameters()]


def compare(exact: list, approx: list) -> list[dict]:
    rows = []
    for (name, a), (_, b) in zip(exact, approx):
        rows.append(
            {
                "tensor": name,
                "cosine": F.cosine_similarity(a.flatten(), b.flatten(), dim=0).item(),
                "relative_error": ((b - a).norm() / a.norm()).item() if a.norm() > 0 else 0.0,
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "mesa_gradients")
    args = parser.parse_args()
    results = []
    for model_name, base in CONFIGS.items():
        sampler = torch.Generator().manual_seed(0)
        task = make_task(base)
        warm = [task.train_batch(sampler, torch.device("cpu")) for _ in range(20)]
        batch = task.train_batch(sampler, torch.device("cpu"))
        for autocast in (False, True):
            for exact_mode, approx_mode, options in PAIRS:
                ema = options.get("mesa_ranges") == "ema"
                grads = []
                for memory in (exact_mode, approx_mode):
                    config = replace(base, memory=memory, **options)
                    grads.append(gradients(make_task(config), config, batch, warm if ema else [], autocast))
                rows = compare(*grads)
                cosines = [r["cosine"] for r in rows]
                errors = [r["relative_error"] for r in rows]
                summary = {
                    "model": model_name,
                    "precision": "bf16 autocast" if autocast else "fp32",
                    "exact": exact_mode,
                    "compressed": approx_mode
                    + (" (ema ranges)" if ema else "")
                    + (" (64-channel groups)" if "mesa_channel_group" in options else ""),
                    "tensors": len(rows),
                    "min_cosine": min(cosines),
                    "median_cosine": statistics.median(cosines),
                    "max_relative_error": max(errors),
                    "median_relative_error": statistics.median(errors),
                    "worst_tensor": rows[cosines.index(min(cosines))]["tensor"],
                }
                print(json.dumps(summary), flush=True)
                results.append({**summary, "per_tensor": rows})
    lines = [
        "| model | precision | exact | compressed | tensors | min cosine | median cosine "
        "| max rel. error | median rel. error | worst tensor |",
        "|---" * 10 + "|",
    ]
    for r in results:
        lines.append(
            f"| {r['model']} | {r['precision']} | {r['exact']} | {r['compressed']} | {r['tensors']} "
            f"| {r['min_cosine']:.5f} | {r['median_cosine']:.5f} | {r['max_relative_error']:.4f} "
            f"| {r['median_relative_error']:.4f} | {r['worst_tensor']} |"
        )
    write_results(args.out, results, lines)


if __name__ == "__main__":
    main()
