"""The analytic floor of BDIA's training step against each mode's measured peak (docs/long_context.md).

Reads the raw output of memory_modes.py (--memtracker run at K = 24) and long_context.py and writes
<out>.md and <out>.json. With S the bytes of one state (batch x positions x d x 4), K blocks and b = 1
bit per element per block (gamma = 1/2), no exact reversible method can hold less than, at the
backward's peak,

    4 S                  x_k and x_{k+1} (the next rebuild needs both), dL/dx_{k+1} and dL/dx_{k+2}
                         (the gradient recurrence reaches two blocks back)
  + (K - 2) S / 32       the residue planes of the blocks not yet rebuilt (during block K-1)
  + one chunk's graph    the recomputation of one block on one slice of the batch (measured)

while the step's other phase, the head and loss back-propagated into x_K, holds 2 S + (K - 1) S / 32
plus the head's own working set (measured without any layer). The floor is the larger of the two.
What a measured peak holds beyond it is listed as "left".

    python benchmarks/floor.py
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

MIB = 2**20
RESULTS = Path(__file__).parent / "results"


def gpt_floor(data: dict) -> tuple[list[str], list[dict]]:
    config = data["meta"]["config"]
    depth = max(r["depth"] for r in data["rows"])
    rows = [r for r in data["rows"] if r["depth"] == depth]
    numel = config["batch"] * config["seq_len"] * config["d_model"]
    state = 4 * numel
    graph = next(r["chunk_graph_bytes"] for r in rows if r["mode"] == "bdia")
    parts = {"4 states": 4 * state, "unused planes": (depth - 2) * -(-numel // 8), "one chunk's graph": graph}
    floor = sum(parts.values())
    lines = [
        f"GPT stack, K = {depth}, batch {config['batch']}, T = {config['seq_len']}, d = {config['d_model']}: "
        f"S = {state / MIB:.1f} MiB; floor of the activations at the peak = "
        + " + ".join(f"{v / MIB:.1f} ({k})" for k, v in parts.items())
        + f" = {floor / MIB:.1f} MiB (the loss mean(x_K^2) has no head).",
        "",
        "| mode | activations at peak (MiB) | / floor | left above the floor (MiB) | in states S |",
        "|---|---|---|---|---|",
    ]
    out = []
    for r in rows:
        left = r["activations"] - floor
        lines.append(
            f"| {r['mode']} | {r['activations'] / MIB:.1f} | {r['activations'] / floor:.2f} | {left / MIB:.1f} | "
            f"{left / state:.2f} |"
        )
        out.append({"mode": r["mode"], "activations": r["activations"], "floor": floor, "parts": parts})
    return lines, out


def decoder_floor(data: dict) -> tuple[list[str], list[dict]]:
    model = data["meta"]["model"]
    depth, d = model["num_hidden_layers"], model["hidden_size"]
    per_token = 4 * d  # one state, per token
    graph = data["chunk_graph"][0]["graph_in_states"]["layer"]
    head_rows = data["head_and_loss"]
    lines = [
        f"Llama-style decoder, K = {depth}, d = {d}: one state is {per_token} bytes per token; one layer's "
        f"recomputed graph (LoRA, frozen base) is {graph:.2f} states (measured at batch 1).",
        "",
        "| batch | chunks | floor (states per token) | of which head phase | mode | measured (states per token) "
        "| / floor |",
        "|---|---|---|---|---|---|---|",
    ]
    out = []
    for batch in sorted({f["batch"] for f in data["fits"]}):
        head = [h for h in head_rows if h["batch"] == batch]
        head_states = max(h["peak"] / (h["batch"] * h["length"] * per_token) for h in head)
        chunks = min(batch, 8)
        stack_phase = 4 + (depth - 2) / 32 + graph / chunks
        head_phase = 2 + (depth - 1) / 32 + head_states
        floor = max(stack_phase, head_phase)
        for f in [f for f in data["fits"] if f["batch"] == batch]:
            measured = f["bytes_per_token"] / per_token
            lines.append(
                f"| {batch} | {chunks} | {floor:.2f} | {head_phase:.2f} | {f['mode']} | {measured:.2f} | "
                f"{measured / floor:.2f} |"
            )
            out.append({"batch": batch, "mode": f["mode"], "floor_states": floor, "measured_states": measured})
    return lines, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpt", type=Path, default=RESULTS / "memory_modes_k24.json")
    parser.add_argument("--decoder", type=Path, default=RESULTS / "long_context.json")
    parser.add_argument("--out", type=Path, default=RESULTS / "floor")
    args = parser.parse_args()
    gpt_lines, gpt_rows = gpt_floor(json.loads(args.gpt.read_text()))
    dec_lines, dec_rows = decoder_floor(json.loads(args.decoder.read_text()))
    lines = gpt_lines + [""] + dec_lines
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps({"gpt": gpt_rows, "decoder": dec_rows}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
