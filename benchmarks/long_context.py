"""Long-context fine-tuning of a Llama-style decoder with LoRA: peak bytes and the longest context per mode.

The model is transformers' LlamaForCausalLM from a random config (RMSNorm, rotary positions, SwiGLU,
grouped-query attention through scaled_dot_product_attention): 24 layers, d = 128, 4 query heads and
2 key/value heads, SwiGLU width 352, 256 tokens. The base is frozen and PEFT LoRA adapters (r = 8)
sit on every linear layer of every decoder layer. One training step is
``model(input_ids, labels=input_ids).loss.backward()`` (no optimiser: the adapters' state is tiny).

Modes, all in one run from the same weights and tokens:

- standard: plain autograd;
- checkpoint: ``revbits.hf.convert(model, "checkpoint")``, every layer checkpointed;
- save_on_cpu: plain autograd with every saved tensor moved off the device. On this CPU-only machine
  the move is emulated: the pack hook copies the tensor into host memory the tracker does not count
  (a NumPy array), the unpack hook copies it back through torch (counted), as save_on_cpu does
  between a GPU and pinned host memory;
- mesa: 8-bit saved activations;
- bdia (chunks=1): BDIA with the backward of revbits 0.1, every layer on the whole batch;
- bdia: BDIA with its defaults (batch_chunks="auto");
- bdia+mesa: BDIA with its defaults and 8-bit recomputed activations.

Memory is counted by revbits.measure.LiveBytes (every storage an operator creates, until freed): the
peak of one step, parameters included. Peaks are measured at several sequence lengths per batch
size; each mode's peak is then fitted by a line a + b T (attention runs as a fused kernel, so no
tensor grows faster than T; the fit's largest residual is reported), and the longest context under
the budget is (budget - a) / b, marked as extrapolated where it lies beyond the measured lengths.
Step time: the median of interleaved untracked steps at one common length, as ratios in one run.

    python benchmarks/long_context.py                      # about 10 minutes on 2 idle cores
    python benchmarks/long_context.py --batches 1 --lengths 256 512 --time-length 256   # a smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from torch import nn  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from revbits import hf  # noqa: E402
from revbits.measure import LiveBytes, measure_training_step  # noqa: E402

MIB = 2**20
MODEL = dict(
    vocab_size=256,
    hidden_size=128,
    intermediate_size=352,
    num_hidden_layers=24,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1 << 17,
    attn_implementation="sdpa",
)
LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA = dict(r=8, lora_alpha=16, target_modules=LINEARS)
MODES: dict[str, tuple[str, dict]] = {
    "standard": ("standard", {}),
    "checkpoint": ("checkpoint", {}),
    "save_on_cpu": ("standard", {}),
    "mesa": ("mesa", {}),
    "bdia (chunks=1)": ("bdia", {"batch_chunks": 1}),
    "bdia": ("bdia", {}),
    "bdia+mesa": ("bdia+mesa", {}),
}


def build(mode: str, layers: int = MODEL["num_hidden_layers"]) -> nn.Module:
    """The LoRA model of ``mode`` from seed 0 (the same weights in every mode)."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**MODEL, "num_hidden_layers": layers}))
    model = get_peft_model(model, LoraConfig(**LORA))
    memory, options = MODES[mode]
    if memory != "standard":
        hf.convert(model, memory, **options)
    return model.train()


class HostOffload(torch.autograd.graph.saved_tensors_hooks):
    """save_on_cpu emulated on a CPU: saved tensors live in host arrays the tracker does not see, and
    come back as a counted copy when backward unpacks them."""

    def __init__(self) -> None:
        super().__init__(self._pack, self._unpack)

    @staticmethod
    def _pack(t: torch.Tensor) -> tuple[np.ndarray, torch.dtype]:
        return t.detach().numpy().copy(), t.dtype

    @staticmethod
    def _unpack(packed: tuple[np.ndarray, torch.dtype]) -> torch.Tensor:
        array, dtype = packed
        return torch.from_numpy(array).to(dtype).clone()


def loss_fn(model: nn.Module, mode: str, ids: torch.Tensor):
    def run() -> torch.Tensor:
        with HostOffload() if mode == "save_on_cpu" else contextlib.nullcontext():
            return model(input_ids=ids, labels=ids).loss

    return run


def tokens(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, MODEL["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed))


def measure(batches: list[int], lengths: dict[int, list[int]], modes: list[str], log) -> list[dict]:
    rows = []
    for batch in batches:
        for mode in modes:
            model = build(mode)
            small = tokens(batch, 32)
            loss_fn(model, mode, small)().backward()  # warm-up: lazy initialisation outside the measured steps
            for length in lengths[batch]:
                ids = tokens(batch, length)
                start = time.perf_counter()
                report = measure_training_step(model, loss_fn(model, mode, ids), warmup_steps=0)
                rows.append(
                    {
                        "mode": mode,
                        "batch": batch,
                        "length": length,
                        "peak": report.peak,
                        "parameters": report.parameters,
                        "gradients": report.gradients,
                        "activations": report.activations,
                        "held_after_forward": report.held_after_forward,
                        "seconds_tracked": time.perf_counter() - start,
                    }
                )
                log(f"B={batch} T={length:6d} {mode:16s} peak {report.peak / MIB:9.1f} MiB  "
                    f"held {report.held_after_forward / MIB:8.2f} MiB  ({rows[-1]['seconds_tracked']:.0f} s)")
            del model
    return rows


def head_and_loss(batches: list[int], lengths: dict[int, list[int]]) -> list[dict]:
    """Peak bytes of what follows the decoder layers in every mode: final RMSNorm, LM head and the loss,
    back-propagated to the hidden states (which arrive requiring grad, as they do from the layers)."""
    rows = []
    model = build("standard", layers=1).base_model.model
    for batch in batches:
        for length in lengths[batch]:
            ids = tokens(batch, length)
            hidden = torch.randn(batch, length, MODEL["hidden_size"])

            def loss(ids: torch.Tensor = ids, hidden: torch.Tensor = hidden) -> torch.Tensor:
                logits = model.lm_head(model.model.norm(hidden.requires_grad_()))
                return model.loss_function(logits=logits, labels=ids, vocab_size=MODEL["vocab_size"])

            tracker = LiveBytes()
            with tracker:
                loss().backward()
            rows.append({"batch": batch, "length": length, "peak": tracker.peak_total})
    return rows


def chunk_graph(batch: int, length: int) -> dict:
    """Bytes one decoder layer's recomputation keeps for backward on one chunk of the batch (what BDIA
    with its default chunks holds besides its state-sized buffers), and split into its sublayers."""
    torch.manual_seed(0)
    model = build("standard", layers=1)
    layer = model.base_model.model.model.layers[0]
    rotary = model.base_model.model.model.rotary_emb
    x = torch.randn(batch, length, MODEL["hidden_size"])
    position_ids = torch.arange(length)[None]
    cos_sin = rotary(x, position_ids)
    state = x.numel() * x.element_size()
    sizes = {}
    parts = {
        "layer": lambda h: layer(h, position_embeddings=cos_sin, position_ids=position_ids),
        "attention sublayer": lambda h: h
        + layer.self_attn(layer.input_layernorm(h), position_embeddings=cos_sin, attention_mask=None)[0],
        "MLP sublayer": lambda h: h + layer.mlp(layer.post_attention_layernorm(h)),
    }
    for name, fn in parts.items():
        tracker = LiveBytes()
        h = x.clone().requires_grad_()
        with tracker:
            y = fn(h)
        sizes[name] = (tracker.current["activations"] - y.numel() * y.element_size()) / state
        del y
    return {"batch": batch, "length": length, "state_bytes": state, "graph_in_states": sizes}


def step_times(batch: int, length: int, modes: list[str], repeats: int) -> dict[str, float]:
    models = {m: build(m) for m in modes}
    ids = tokens(batch, length)
    for m in modes:
        loss_fn(models[m], m, ids)().backward()  # warm-up
    times: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(repeats):  # interleaved, so drift in machine speed hits every mode
        for m in modes:
            models[m].zero_grad(set_to_none=True)
            start = time.perf_counter()
            loss_fn(models[m], m, ids)().backward()
            times[m].append(time.perf_counter() - start)
    return {m: statistics.median(t) for m, t in times.items()}


def fit(rows: list[dict], budget: int) -> list[dict]:
    """Per (mode, batch): peak = a + b T by least squares, its largest relative residual, and the longest
    T with peak <= budget."""
    out = []
    for key in dict.fromkeys((r["mode"], r["batch"]) for r in rows):
        mine = [r for r in rows if (r["mode"], r["batch"]) == key]
        t = np.array([r["length"] for r in mine], dtype=float)
        p = np.array([r["peak"] for r in mine], dtype=float)
        b, a = np.polyfit(t, p, 1) if len(mine) > 1 else (p[0] / t[0], 0.0)
        residual = float(np.max(np.abs(a + b * t - p) / p))
        longest = int((budget - a) // b) if b > 0 else None
        out.append(
            {
                "mode": key[0],
                "batch": key[1],
                "intercept": float(a),
                "bytes_per_position": float(b),
                "bytes_per_token": float(b) / key[1],
                "max_residual": residual,
                "longest_length": longest,
                "extrapolated": bool(longest is not None and longest > t.max()),
                "measured_up_to": int(t.max()),
            }
        )
    return out


def plot(rows: list[dict], fits: list[dict], budget: int, path: Path) -> None:
    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(6.5 * len(batches), 4.5), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        for f in [f for f in fits if f["batch"] == batch]:
            mine = [r for r in rows if r["mode"] == f["mode"] and r["batch"] == batch]
            (line,) = ax.plot([r["length"] for r in mine], [r["peak"] / MIB for r in mine], "o", label=f["mode"])
            span = np.geomspace(min(r["length"] for r in mine), max(f["longest_length"] or 0, 16384), 50)
            fitted = (f["intercept"] + f["bytes_per_position"] * span) / MIB
            ax.plot(span, fitted, "-", color=line.get_color(), alpha=0.5)
        ax.axhline(budget / MIB, color="black", linestyle=":", label=f"budget {budget / 2**30:g} GiB")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length T (points measured, lines fitted)")
        ax.set_ylabel("peak of one step (MiB)")
        ax.set_title(f"24-layer Llama-style decoder, LoRA, batch {batch}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def table(fits: list[dict], times: dict[str, float], time_shape: tuple[int, int], budget: int) -> list[str]:
    lines = [
        f"Budget {budget / 2**30:g} GiB. Longest T: (budget - a) / b from the fitted line; * = beyond the "
        f"measured lengths. Time at batch {time_shape[0]}, T = {time_shape[1]}.",
        "",
        "| batch | mode | a (MiB) | b (KiB per position) | fit residual | longest T | vs checkpoint | time / ckpt |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for f in fits:
        ckpt = next(g for g in fits if g["batch"] == f["batch"] and g["mode"] == "checkpoint")
        both = f["longest_length"] and ckpt["longest_length"]
        ratio = f["longest_length"] / ckpt["longest_length"] if both else float("nan")
        t = times.get(f["mode"], float("nan")) / times.get("checkpoint", float("nan"))
        star = "*" if f["extrapolated"] else ""
        lines.append(
            f"| {f['batch']} | {f['mode']} | {f['intercept'] / MIB:.1f} | {f['bytes_per_position'] / 1024:.1f} | "
            f"{f['max_residual']:.4f} | {f['longest_length']}{star} | {ratio:.2f}x | {t:.2f} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048], help="for batch 1")
    parser.add_argument("--lengths-batched", type=int, nargs="+", default=[256, 512], help="for batch > 1")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--budget-gib", type=float, default=2.0)
    parser.add_argument("--time-batch", type=int, default=1)
    parser.add_argument("--time-length", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--idle", default="unknown", help="written into the raw output: was the machine idle?")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "long_context")
    parser.add_argument("--time-only", action="store_true", help="only the step times at --time-batch/--time-length")
    args = parser.parse_args()
    if args.time_only:
        times = step_times(args.time_batch, args.time_length, args.modes, args.repeats)
        ref = times.get("checkpoint", float("nan"))
        text = f"Batch {args.time_batch}, T = {args.time_length}, median of {args.repeats} interleaved steps.\n\n"
        text += "| mode | step (s) | / checkpoint |\n|---|---|---|\n"
        text += "".join(f"| {m} | {t:.2f} | {t / ref:.2f} |\n" for m, t in times.items())
        text += f"\nmachine idle: {args.idle}\n"
        meta = {"time_batch": args.time_batch, "time_length": args.time_length, "repeats": args.repeats,
                "torch": torch.__version__, "threads": torch.get_num_threads(), "machine_idle": args.idle}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "step_seconds": times}, indent=1))
        args.out.with_suffix(".md").write_text(text)
        print(text)
        return
    lengths = {b: (args.lengths if b == 1 else args.lengths_batched) for b in args.batches}
    budget = int(args.budget_gib * 2**30)
    start = time.perf_counter()
    rows = measure(args.batches, lengths, args.modes, lambda s: print(s, flush=True))
    fits = fit(rows, budget)
    times = step_times(args.time_batch, args.time_length, args.modes, args.repeats) if args.repeats else {}
    extra = {
        "head_and_loss": head_and_loss(args.batches, lengths),
        "chunk_graph": [chunk_graph(1, max(lengths[b])) for b in args.batches[:1]],
    }
    meta = {
        "model": MODEL,
        "lora": LORA,
        "budget_bytes": budget,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "machine_idle": args.idle,
        "device": "cpu (no GPU was lent to this session)",
        "seconds": time.perf_counter() - start,
    }
    lines = table(fits, times, (args.time_batch, args.time_length), budget)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(
        json.dumps({"meta": meta, "rows": rows, "fits": fits, "step_seconds": times, **extra}, indent=1)
    )
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    plot(rows, fits, budget, args.out.with_suffix(".png"))
    print("\n".join(lines))
    print(json.dumps(extra, indent=1))


if __name__ == "__main__":
    main()
