"""What the reversible attention translator stores, encoder and decoder apart, against the standard one.

For each forget_bits (1, 2, 3, 5, none): the rnn-translator (GRU, 1 layer of 256, attention over
[embedding; 20 units of the top encoder state]) is trained for --steps steps on the Bible en-fr
pairs with reversible RNNs, then on one batch of 32 training pairs:
- encoder bits: its buffer (64-bit words, live and spilled, plus flag bits) and the attention
  slice (32 bits per slice unit per source position), against 32 bits per unit per step for
  the hidden state of every layer: the paper's accounting;
- decoder bits: its buffer, against the same baseline over the target steps (its attention and
  loss run inside the reversible loop, so it keeps no hidden states);
- measured memory of one training step of the whole model (LiveBytes), reversible against the
  standard nn.GRU model with the same weights shape: held between forward and backward, and
  activations at the peak.
Writes <out>.json and <out>.md. Needs: revbits data fetch bible-en-fr.

    python benchmarks/revrnn_translator_memory.py
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import torch

from report import experiment_config, train_briefly, write_results
from revbits.measure import measure_training_step
from revbits.train.commands import make_task_model

BASE = experiment_config("revrnn-translator-memory")  # benchmarks/configs/revrnn-translator-memory.toml


def bit_accounting(model, batch) -> dict:
    """Bits the encoder and decoder keep, against 32 bits per hidden unit per step."""
    model.train()
    for rnn in (model.encoder, model.decoder):
        rnn.track_information = True
    loss = model(*batch[:-1], targets=batch[-1]).loss
    src, tgt_in = batch[0], batch[1]
    hidden, layers = model.config.d_model, model.config.n_layer
    encoder_baseline = 32 * src.numel() * hidden * layers
    decoder_baseline = 32 * tgt_in.numel() * hidden * layers
    slice_bits = 32 * src.numel() * model.config.attention_slice
    encoder_buffer = sum(b.stored_bits() for b in model.encoder.last_run.buffers)
    decoder_buffer = sum(b.stored_bits() for b in model.decoder.last_run.buffers)
    encoder_lost = sum(float(b.lost_bits) for b in model.encoder.last_run.buffers)
    decoder_lost = sum(float(b.lost_bits) for b in model.decoder.last_run.buffers)
    loss.backward()  # reverses both runs, emptying the buffers
    return {
        "encoder_baseline_bits": encoder_baseline,
        "encoder_buffer_bits": encoder_buffer,
        "encoder_slice_bits": slice_bits,
        "encoder_saving": encoder_baseline / (encoder_buffer + slice_bits),
        "encoder_optimal_saving": encoder_baseline / (encoder_lost + slice_bits),
        "decoder_baseline_bits": decoder_baseline,
        "decoder_buffer_bits": decoder_buffer,
        "decoder_saving": decoder_baseline / decoder_buffer,
        "decoder_optimal_saving": decoder_baseline / max(decoder_lost, 1.0),
    }


def measured(model: torch.nn.Module, batch) -> dict:
    model.train()
    report = measure_training_step(model, lambda: model(*batch[:-1], targets=batch[-1]).loss)
    return {"activations": report.activations, "held_after_forward": report.held_after_forward}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "revrnn_translator_memory")
    args = parser.parse_args()
    rows, standard = [], None
    for forget_bits in (1, 2, 3, 5, 0):
        config = replace(BASE, forget_bits=forget_bits, steps=args.steps, warmup=20)
        task, model, batch = train_briefly(config, args.steps)
        if standard is None:
            torch.manual_seed(0)
            standard = measured(make_task_model(task, replace(config, memory="standard")), batch)
        reversible = measured(model, batch)
        row = {
            "forget_bits": forget_bits or "none",
            "trained_steps": args.steps,
            "source_shape": list(batch[0].shape),
            "target_shape": list(batch[1].shape),
            **bit_accounting(model, batch),
            "reversible": reversible,
            "standard": standard,
            "held_vs_standard": reversible["held_after_forward"] / standard["held_after_forward"],
            "activations_vs_standard": reversible["activations"] / standard["activations"],
        }
        print(json.dumps({k: v for k, v in row.items() if not isinstance(v, dict)}), flush=True)
        rows.append(row)
    lines = [
        "| forget bits | encoder saving (buffer + slice) | encoder optimal | decoder saving (buffer) "
        "| decoder optimal | held after forward vs standard (measured) | activations vs standard (measured) |",
        "|---" * 7 + "|",
    ]
    for r in rows:
        lines.append(
            f"| {r['forget_bits']} | {r['encoder_saving']:.1f}x | {r['encoder_optimal_saving']:.1f}x "
            f"| {r['decoder_saving']:.1f}x | {r['decoder_optimal_saving']:.1f}x "
            f"| {r['held_vs_standard']:.3f} | {r['activations_vs_standard']:.3f} |"
        )
    write_results(args.out, rows, lines)


if __name__ == "__main__":
    main()
