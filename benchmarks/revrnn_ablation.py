"""Where the reversible GRU LM's perplexity gap comes from: the architecture or the exact arithmetic?

Trains the word LM of benchmarks/quality.py (Shakespeare, 10k words, 2 x 256, dropout 0.2) for
--steps steps with four recurrent stacks, same seed and data order:
- standard:         nn.GRU;
- float-revgru:     the RevGRU equations in plain floating point (no fixed point, no buffer),
                    forget gate unconstrained;
- float-revgru-k3:  the same with the forget gate bounded below by 1/8 (forget_bits = 3);
- reversible:       revbits.RevGRU, forget_bits = 3 (exact fixed point, information buffer).
If float-revgru matches reversible and both trail standard, the gap is the RevGRU architecture
(each half's gates see only the other half), not the exactness.
Writes <out>.json and <out>.md. Needs: revbits data fetch shakespeare.

    python benchmarks/revrnn_ablation.py
"""

from __future__ import annotations

import argparse
import shutil
from dataclasses import replace
from pathlib import Path
from unittest import mock

import torch
from torch import nn

import revbits.models.rnn as rnn_models
from quality import EXPERIMENTS
from report import write_results
from revbits.train import TrainConfig, train

CONFIG = EXPERIMENTS["rnnlm"]  # the word LM of benchmarks/quality.py


class FloatRevGRU(nn.Module):
    """RevGRU in floating point: h1 <- z1 h1 + (1 - z1) g1 from [x; h2], then h2 from [x; h1_new],
    with z = (1 - floor) sigma(a) + floor; batch-first, returns (outputs, None)."""

    def __init__(self, size: int, layers: int, floor: float) -> None:
        super().__init__()
        half, self.floor = size // 2, floor
        self.gates = nn.ModuleList([nn.Linear(size + half, 2 * half) for _ in range(2 * layers)])
        self.candidates = nn.ModuleList([nn.Linear(size + half, half) for _ in range(2 * layers)])

    def half_step(self, i: int, x: torch.Tensor, h: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        z, r = self.gates[i](torch.cat([x, other], -1)).chunk(2, -1)
        z = (1 - self.floor) * torch.sigmoid(z) + self.floor
        g = torch.tanh(self.candidates[i](torch.cat([x, torch.sigmoid(r) * other], -1)))
        return z * h + (1 - z) * g

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        for layer in range(len(self.gates) // 2):
            h1 = h2 = x.new_zeros(x.shape[0], x.shape[-1] // 2)
            outputs = []
            for t in range(x.shape[1]):
                h1 = self.half_step(2 * layer, x[:, t], h1, h2)
                h2 = self.half_step(2 * layer + 1, x[:, t], h2, h1)
                outputs.append(torch.cat([h1, h2], -1))
            x = torch.stack(outputs, 1)
        return x, None


def run_arm(arm: str, config: TrainConfig, runs: Path) -> dict:
    out = runs / arm
    shutil.rmtree(out, ignore_errors=True)
    config = replace(config, out=str(out), memory="standard" if arm == "standard" else "reversible")
    if arm.startswith("float"):
        floor = 1 / 8 if arm.endswith("k3") else 0.0

        def float_rnn(cell, memory, size, layers, forget_bits):
            return FloatRevGRU(size, layers, floor)

        with mock.patch.object(rnn_models, "make_rnn", float_rnn):
            result = train(config, quiet=True)
    else:
        result = train(config, quiet=True)
    return {"arm": arm, "steps": config.steps, "valid_loss": result["loss"], "valid_perplexity": result["perplexity"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--runs", type=Path, default=Path("runs") / "revrnn_ablation")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "revrnn_ablation")
    args = parser.parse_args()
    config = replace(CONFIG, steps=args.steps, eval_interval=args.steps)
    rows = []
    for arm in ("standard", "float-revgru", "float-revgru-k3", "reversible"):
        rows.append(run_arm(arm, config, args.runs))
        print(rows[-1], flush=True)
    lines = ["| recurrent stack | steps | valid perplexity |", "|---|---|---|"]
    lines += [f"| {r['arm']} | {r['steps']} | {r['valid_perplexity']:.1f} |" for r in rows]
    write_results(args.out, rows, lines)


if __name__ == "__main__":
    main()
