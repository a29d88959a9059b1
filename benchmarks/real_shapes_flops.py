"""BDIA's recomputation against transformers' gradient checkpointing at real LLM shapes, counted.

``bdia_recompute_work.py`` counts it on a small stack: torch's non-reentrant checkpoint (transformers'
``gradient_checkpointing_enable(use_reentrant=False)``) stops recomputing a layer once every tensor its
backward saved exists again, so the layer's last product (the MLP's down projection, whose output no
backward needs) is never recomputed; BDIA's inverse needs the layer's whole output, so it recomputes it.
This script counts the same at the shapes of ``real_shapes.py`` (Qwen3-0.6B, Llama-3.2-1B; random weights,
LoRA r = 16 on every linear or full fine-tuning; batch and length as given), end to end: embeddings,
layers, the LM head and the loss. Arms, from the same weights (``real_shapes.MODES``):

- ``transformers``: plain autograd, nothing recomputed (the arithmetic floor);
- ``gc+fused``: transformers' checkpointing with the fused loss, torch's default (early stop);
- ``gc+fused, full recompute``: the same under ``torch.utils.checkpoint.set_checkpoint_early_stop(False)``;
- ``checkpoint+fused``, ``bdia+fused``: ``revbits.hf.convert(model, mode)`` with the fused loss.

Per arm: the floating-point operations of one forward and backward as torch's FlopCounterMode counts them,
the CPU's attention kernel included (``flops.py``: causal calls over their causal triangle, masked calls
whole), in all, in products and in attention, as ratios to ``gc+fused``. The counts are exact and
independent of the machine, so this needs no idle machine; a kernel's time need not follow its count (the
CPU's causal kernel computes whole blocks of keys up to the diagonal). Writes <out>.txt.

    python benchmarks/real_shapes_flops.py --out benchmarks/results/real_shapes_flops
    python benchmarks/real_shapes_flops.py --runs qwen3-0.6b:lora --layers 2 --vocab 512 --length 64 \\
        --out runs/real_shapes_flops_smoke                                               # a smoke run
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable
from pathlib import Path

import torch
import torch.utils.checkpoint as torch_checkpoint

from flops import attention_flops, flop_counter
from real_shapes import build, mode_applied, step_fn, task_of, tokens
from report import write_text_report

ARMS: dict[str, tuple[str, Callable[[], contextlib.AbstractContextManager]]] = {
    "transformers": ("transformers", contextlib.nullcontext),
    "gc+fused": ("gc+fused", contextlib.nullcontext),
    "gc+fused, full recompute": ("gc+fused", lambda: torch_checkpoint.set_checkpoint_early_stop(False)),
    "checkpoint+fused": ("checkpoint+fused", contextlib.nullcontext),
    "bdia+fused": ("bdia+fused", contextlib.nullcontext),
}
REFERENCE = "gc+fused"


def count(model: torch.nn.Module, arm: str, ids: torch.Tensor) -> tuple[int, int]:
    """(all operations, the attention kernels' operations) of one forward and backward of ``arm``."""
    mode, context = ARMS[arm]
    counter = flop_counter()
    with mode_applied(model, mode), context(), counter:
        step_fn(model, ids, autocast=False)().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops(), attention_flops(counter)


def measure_run(spec: str, args: argparse.Namespace) -> list[str]:
    shape, setup = spec.split(":")
    model = build(shape, setup, args.layers, args.vocab, "cpu")
    ids = tokens(args.batch, args.length, task_of(model).config.vocab_size, "cpu")
    results = {arm: count(model, arm, ids) for arm in ARMS}
    total_ref, attention_ref = results[REFERENCE]
    lines = [f"{spec}, batch {args.batch}, T {args.length}" + (f", {args.layers} layers" if args.layers else "")]
    for arm, (total, attention) in results.items():
        products = total - attention
        lines.append(
            f"  {arm:26s} {total / 1e12:7.3f} TFLOP ({total / total_ref:.3f}x {REFERENCE}): products"
            f" {products / 1e12:7.3f} ({products / (total_ref - attention_ref):.3f}x), attention"
            f" {attention / 1e12:6.3f} ({attention / attention_ref:.3f}x)"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", default=["qwen3-0.6b:lora", "llama-3.2-1b:lora", "qwen3-0.6b:full"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--layers", type=int, help="truncate every model to N layers (a smoke run)")
    parser.add_argument("--vocab", type=int, help="replace the vocabulary size (a smoke run)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "real_shapes_flops")
    args = parser.parse_args()
    lines = [
        f"torch {torch.__version__}; FlopCounterMode of one forward and backward (no optimizer step), "
        "the CPU's attention kernel counted (flops.py)"
    ]
    for spec in args.runs:
        lines += measure_run(spec, args)
    write_text_report(args.out, lines)


if __name__ == "__main__":
    main()
