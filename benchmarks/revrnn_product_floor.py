"""How far batching its products could take the RevLSTM toward nn.LSTM's step: the products timed alone.

A RevLSTM layer has two halves, each with one gate matrix U of [x; other half] (input + H/2) to 5 H/2 outputs
(f, g, i, o, p). A training step multiplies by each U four times per time step (forward, reversal, the
input gradient and the weight gradient), as products of batch B. This script times, in one process, at the
stack of ``revrnn_speed.py`` (hidden 256, 2 layers, T = 35, batch 20):

- ``nn.LSTM`` and ``RevLSTM`` training steps (interleaved, median, page faults per step);
- **as run**: the RevLSTM's products as its cells call them (oneDNN for the forward, the reversal and the
  input gradient, ``addmm_`` into the gradient sum for the weight gradient), each timed alone, times their
  count per step;
- **batched**: the least product time this arithmetic allows when every product that does not depend on the
  step before is batched over the whole sequence: per half, U's input columns as one [T B, input] product in
  the forward and again in the reversal, the input gradient's input columns as one [T B, 5 H/2] product, the
  weight gradient as one product over T B rows, and only the other-half columns per step (the recurrence).
  Each product takes the faster of oneDNN and MKL. Building it would hold a layer's whole input sequence and
  its gate gradients during the backward, memory the reversible layer exists to avoid; this is a bound, not a
  design.

Timings need an idle machine; the output says the load average before and after, and the malloc settings
(``benchmarks/run_revrnn_speed.sh`` explains why nn.LSTM's step depends on them). Writes <out>.txt.

    python benchmarks/revrnn_product_floor.py --out benchmarks/results/revrnn_product_floor
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from report import write_text_report
from revrnn_speed import interleaved, stack_steps

_ONEDNN = torch.ops.mkldnn._linear_pointwise


def seconds(fn: Callable[[], object], repeats: int) -> float:
    """The median seconds of ``fn`` over ``repeats`` calls, after 10 warm-up calls."""
    for _ in range(10):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def product(rows: int, inputs: int, outputs: int, repeats: int, weight_gradient: bool = False) -> dict[str, float]:
    """Seconds of y = x W^T ([rows, inputs] -> outputs) by oneDNN and by MKL's addmm; with ``weight_gradient``,
    of G += dY^T X ([outputs, rows] x [rows, inputs]) by addmm_ and by oneDNN (then the sum added)."""
    g = torch.Generator().manual_seed(rows * 7 + inputs)
    x, w = torch.randn(rows, inputs, generator=g), torch.randn(outputs, inputs, generator=g)
    if weight_gradient:
        dy, total = torch.randn(rows, outputs, generator=g), torch.zeros(outputs, inputs)
        dy_t, x_t = dy.t().contiguous(), x.t().contiguous()
        return {
            "mkl": seconds(lambda: total.addmm_(dy.t(), x), repeats),
            "onednn": seconds(lambda: total.add_(_ONEDNN(dy_t, x_t, None, "none", [], "")), repeats),
        }
    bias, w_t = torch.zeros(outputs), w.t()
    return {
        "onednn": seconds(lambda: _ONEDNN(x, w, bias, "none", [], ""), repeats),
        "mkl": seconds(lambda: torch.addmm(bias, x, w_t), repeats),
    }


def products_as_run(batch: int, input_size: int, half: int, count: int, repeats: int) -> float:
    """Seconds per training step of the cells' products as called now: ``count`` half-updates, each with the
    forward's, the reversal's and the input gradient's product (oneDNN) and the weight-gradient sum (addmm_)."""
    joined, gates = input_size + half, 5 * half
    forward = product(batch, joined, gates, repeats)["onednn"]
    input_gradient = product(batch, gates, joined, repeats)["onednn"]
    weight_gradient = product(batch, joined, gates, repeats, weight_gradient=True)["mkl"]
    return count * (2 * forward + input_gradient + weight_gradient)


def products_batched(batch: int, steps: int, input_size: int, half: int, halves: int, repeats: int) -> float:
    """Seconds per training step of the same arithmetic with every product that does not wait on the step
    before batched over the sequence (module docstring); each product at the faster of oneDNN and MKL."""
    rows, gates = batch * steps, 5 * half
    sequence = 2 * min(product(rows, input_size, gates, repeats).values())  # forward and reversal
    sequence += min(product(rows, gates, input_size, repeats).values())  # input gradient, input columns
    sequence += min(product(rows, input_size + half, gates, repeats, weight_gradient=True).values())
    per_step = 2 * min(product(batch, half, gates, repeats).values())  # forward and reversal, recurrence
    per_step += min(product(batch, gates, half, repeats).values())  # input gradient, other-half columns
    return halves * (sequence + steps * per_step)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=35, help="T")
    parser.add_argument("--batch", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=21, help="interleaved training steps per arm")
    parser.add_argument("--product-repeats", type=int, default=200, help="calls per timed product")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "revrnn_product_floor")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    malloc = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")} or "glibc defaults"
    lines = [
        f"hidden {args.hidden}, {args.layers} layers, T {args.steps}, batch {args.batch}; torch {torch.__version__}, "
        f"{args.threads} thread(s); malloc: {malloc}; load average before {os.getloadavg()}"
    ]
    steps = interleaved(*stack_steps("lstm", args), args.repeats, time.perf_counter)
    lstm, rev = steps["standard_s"], steps["reversible_s"]
    lines.append(f"nn.LSTM step   {1e3 * lstm:7.1f} ms ({steps['page_faults']['standard']:.0f} page faults per step)")
    lines.append(f"RevLSTM step   {1e3 * rev:7.1f} ms ({rev / lstm:.2f}x; median ratio {steps['ratio']:.2f}x)")
    half, halves = args.hidden // 2, 2 * args.layers
    as_run = products_as_run(args.batch, args.hidden, half, halves * args.steps, args.product_repeats)
    batched = products_batched(args.batch, args.steps, args.hidden, half, halves, args.product_repeats)
    lines.append(f"RevLSTM products as run  {1e3 * as_run:7.1f} ms per step ({as_run / lstm:.2f}x nn.LSTM's step)")
    lines.append(f"the same batched (bound) {1e3 * batched:7.1f} ms per step ({batched / lstm:.2f}x nn.LSTM's step)")
    lines.append(
        f"at 2x nn.LSTM's step, {1e3 * (2 * lstm - batched):.1f} ms would be left for everything but the products "
        f"even batched; the RevLSTM's step spends {1e3 * (rev - as_run):.1f} ms on it now"
    )
    write_text_report(args.out, lines)


if __name__ == "__main__":
    main()
