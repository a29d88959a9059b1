"""BDIA's token slices at batch 1: the backward peak of a decoder's layers with and without them.

At batch 1 BDIA's batch chunks have nothing to slice, and the backward holds one layer's recomputed graph
over the whole context; token slices (revbits.bdia.token_slices) run each layer's MLP in slices of the
positions, so that part of the graph is one slice's. This script counts it in bytes.

Model: transformers' Qwen3Model with Qwen3-0.6B's published shape (d 1024, SwiGLU 3072, 16 query and 8
key/value heads of 128, RMSNorm with q/k norms, rotary positions), random weights, no download. Two
layers (K = 2, the fewest a BDIA stack takes, so the backward holds the two states and one layer's graph)
and a 256-token vocabulary: only the layers are measured; the LM head and its loss are another part of
the step. PEFT LoRA (r = 16) on all seven linear layers, base frozen, float32, SDPA attention.

Step: ``model(input_ids).last_hidden_state.square().mean().backward()``. Memory is counted by
revbits.measure.LiveBytes (every storage an operator creates, until freed); ``activations`` is the peak
minus the weights. Modes, from the same weights and tokens: standard, checkpoint
(``hf.convert(model, "checkpoint")``), bdia without token slices (``token_slice=None``), and bdia with
slices of 512 (the default, "auto"), 256 and 128 positions.

The floor per position of a K-layer BDIA stack is 2 states and K - 1 residue planes: 2 * 4 d bytes +
(K - 1) * 3 d / 8 bytes (gamma 1/8, hf.convert's default: 3 bits per element per layer). Above it, the
backward holds one layer's recomputed graph, and what of it grows with the context is what slices cut.

    python benchmarks/token_slices.py                    # Qwen3-0.6B shape, batch 1, T = 2048
    python benchmarks/token_slices.py --tiny --length 256 # a smoke run (d 64)
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import Qwen3Config, Qwen3Model

from real_shapes import LORA, QWEN3_0_6B
from revbits import hf
from revbits.measure import measure_training_step

MIB = 2**20
TINY = dict(hidden_size=64, intermediate_size=192, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
MODES: dict[str, tuple[str, dict]] = {
    "standard": ("standard", {}),
    "checkpoint": ("checkpoint", {}),
    "bdia, no token slices": ("bdia", {"token_slice": None}),
    "bdia, slices of 512 (auto)": ("bdia", {}),
    "bdia, slices of 256": ("bdia", {"token_slice": 256}),
    "bdia, slices of 128": ("bdia", {"token_slice": 128}),
}
GAMMA_BITS = 3  # hf.convert's FINE_TUNING_GAMMA = 1/8


def build(mode: str, shape: dict, layers: int, device: str) -> nn.Module:
    """The LoRA model of ``mode`` from seed 0 (the same weights in every mode)."""
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=256, num_hidden_layers=layers, attn_implementation="sdpa", **shape)
    model = get_peft_model(Qwen3Model(config), LoraConfig(**LORA))
    memory, options = MODES[mode]
    if memory != "standard":
        hf.convert(model, memory, **options)
    return model.to(device).train()


def measure(mode: str, shape: dict, layers: int, length: int, device: str) -> dict:
    model = build(mode, shape, layers, device)
    ids = torch.randint(0, 256, (1, length), generator=torch.Generator().manual_seed(1)).to(device)

    def step() -> torch.Tensor:
        return model(input_ids=ids).last_hidden_state.square().mean()

    step().backward()  # warm-up: lazy initialisation outside the measured step
    report = measure_training_step(model, step, warmup_steps=0)
    return {"mode": mode, "length": length, **report.as_dict()}


def floor_per_position(d: int, layers: int) -> float:
    """Bytes per position BDIA cannot go below: two float32 states and K - 1 residue planes."""
    return 2 * 4 * d + (layers - 1) * GAMMA_BITS * d / 8


def table(rows: list[dict], d: int, layers: int) -> str:
    base = next(r["activations"] for r in rows if r["mode"] == "bdia, no token slices")
    floor = floor_per_position(d, layers)
    lines = [
        "| mode | activations at the peak, MiB | KiB per position | above the BDIA floor, KiB per position "
        "| vs bdia without slices |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        per = r["activations"] / r["length"]
        lines.append(
            f"| {r['mode']} | {r['activations'] / MIB:.1f} | {per / 1024:.2f} | {(per - floor) / 1024:.2f} "
            f"| {r['activations'] / base:.3f} |"
        )
    lines.append(f"\nBDIA floor: {floor / 1024:.3f} KiB per position (2 states + {layers - 1} residue plane(s)).")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="d 64 instead of Qwen3-0.6B's shape (smoke run)")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="benchmarks/results/token_slices")
    args = parser.parse_args()
    shape = {**QWEN3_0_6B, **TINY} if args.tiny else QWEN3_0_6B
    if "bdia, no token slices" not in args.modes:
        args.modes.insert(0, "bdia, no token slices")
    rows = []
    for mode in args.modes:
        rows.append(measure(mode, shape, args.layers, args.length, args.device))
        print(f"{mode}: {rows[-1]['activations'] / MIB:.1f} MiB of activations at the peak", flush=True)
    text = (
        f"# Token slices: {args.layers} layers of shape d={shape['hidden_size']}, "
        f"MLP {shape['intermediate_size']}, LoRA r=16, batch 1, T={args.length}, {args.device}\n\n"
        + table(rows, shape["hidden_size"], args.layers)
        + "\n"
    )
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "python": platform.python_version(), "shape": shape, "layers": args.layers}
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    out.with_suffix(".md").write_text(text)


if __name__ == "__main__":
    main()
