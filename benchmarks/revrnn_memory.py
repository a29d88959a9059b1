"""What RevGRU and RevLSTM store, against the standard nn.GRU / nn.LSTM.

For each cell (gru, lstm) and each forget_bits (1, 2, 3, 5, none): a word-level LM on
Shakespeare (10k vocabulary, 2 layers of 256, T = 35, batch 32) is trained for --steps steps with
the reversible RNN, then on one batch:
- buffer bits: what the information buffers actually hold (64-bit words, live and spilled, and
  one flag bit per push), against 32 bits per unit per step for h (and c for the LSTM): the
  paper's accounting;
- optimal bits: the information the gates destroyed, sum of -log2 z;
- measured memory of one training step of the recurrent stack alone (LiveBytes), reversible
  against the standard nn.GRU / nn.LSTM of the same width: activations at the peak and held
  between forward and backward. The loss is a fixed random projection of the outputs, so the
  outputs themselves are not kept by the loss.
Writes <out>.json and <out>.md. Needs: revbits data fetch shakespeare.

    python benchmarks/revrnn_memory.py
    python benchmarks/revrnn_memory.py --cells lstm --out benchmarks/results/revrnn_memory_lstm   # one cell
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import torch

from report import experiment_config, train_briefly, write_results
from revbits.measure import measure_training_step
from revbits.revrnn import make_rnn
from revbits.train import TrainConfig

BASE = experiment_config("revrnn-memory")  # benchmarks/configs/revrnn-memory.toml


def buffer_accounting(model, batch) -> dict:
    model.train()
    model.rnn.track_information = True
    with torch.no_grad():
        embedded = model.embedding(batch[0])
    with torch.enable_grad():
        out, _ = model.rnn(embedded.requires_grad_())
    run = model.rnn.last_run
    steps, rows = embedded.shape[1], embedded.shape[0]
    parts = model.rnn.cells[0].state_parts
    baseline = 32 * steps * rows * model.rnn.hidden_size * parts * model.rnn.num_layers
    stored = sum(b.stored_bits() for b in run.buffers)
    optimal = sum(float(b.lost_bits) for b in run.buffers)
    out.sum().backward()  # reverses the run, emptying the buffers
    return {
        "baseline_bits": baseline,
        "buffer_bits": stored,
        "optimal_bits": optimal,
        "saving": baseline / stored,
        "optimal_saving": baseline / max(optimal, 1.0),
        "bits_per_unit_step": stored / (baseline / 32),
    }


def measured_memory(config: TrainConfig, memory: str) -> dict:
    torch.manual_seed(0)
    rnn = make_rnn(config.cell, memory, config.d_model, config.n_layer, config.forget_bits or None)
    x = torch.randn(config.batch_size, config.block_size, config.d_model, requires_grad=True)
    probe = torch.randn(config.batch_size, config.block_size, config.d_model)
    report = measure_training_step(rnn, lambda: (rnn(x)[0] * probe).sum())
    return {"activations": report.activations, "held_after_forward": report.held_after_forward}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--cells", nargs="+", choices=["gru", "lstm"], default=["gru", "lstm"])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "revrnn_memory")
    args = parser.parse_args()
    rows = []
    for cell in args.cells:
        standard = measured_memory(replace(BASE, cell=cell, memory="standard"), "standard")
        for forget_bits in (1, 2, 3, 5, 0):
            config = replace(BASE, cell=cell, forget_bits=forget_bits, steps=args.steps, warmup=20)
            _, model, batch = train_briefly(config, args.steps)
            accounting = buffer_accounting(model, batch)
            reversible = measured_memory(config, "reversible")
            row = {
                "cell": cell,
                "forget_bits": forget_bits or "none",
                "trained_steps": args.steps,
                **accounting,
                "reversible": reversible,
                "standard": standard,
                "activations_vs_standard": reversible["activations"] / standard["activations"],
                "held_vs_standard": reversible["held_after_forward"] / standard["held_after_forward"],
            }
            print(json.dumps({k: v for k, v in row.items() if not isinstance(v, dict)}), flush=True)
            rows.append(row)
    lines = [
        "| cell | forget bits | buffer bits per unit-step | saving vs 32 bits | optimal saving "
        "| activations vs standard (measured) | held after forward vs standard (measured) |",
        "|---" * 7 + "|",
    ]
    for r in rows:
        lines.append(
            f"| {r['cell']} | {r['forget_bits']} | {r['bits_per_unit_step']:.2f} | {r['saving']:.1f}x "
            f"| {r['optimal_saving']:.1f}x | {r['activations_vs_standard']:.3f} | {r['held_vs_standard']:.3f} |"
        )
    write_results(args.out, rows, lines)


if __name__ == "__main__":
    main()
