"""Training-step time of the reversible RNNs against nn.GRU / nn.LSTM, measured interleaved in one process.

Cases (each a forward and a backward):
- the recurrent stack alone, GRU and LSTM: hidden 256, 2 layers, T = 35, batch 20, forget_bits = 3,
  loss = sum(out * a fixed random probe) (issue 25's setting; --hidden, --layers, --steps, --batch change it);
- with --product-paths, the stacks again with every product of the reversible cells on oneDNN, then
  every one on MKL (``revbits.revrnn.linear`` picks oneDNN for layers of 512 outputs and more);
- with --models rnnlm rnn-translator, the whole word LM (benchmarks/configs/revrnn-speed-rnnlm.toml, GRU)
  and the whole rnn-translator (revrnn-speed-rnn-translator.toml, GRU) on a real batch; they need
  ``revbits data fetch shakespeare`` and ``bible-en-fr``.

Each repeat times one standard step and then one reversible step, after a warm-up step of each, so both
arms see the same machine state; a case's ratio is the median of the per-repeat ratios (with its
quartiles). One more untimed step of each arm counts the ATen operators it dispatches (what the
per-op overhead of eager PyTorch is paid on). Every value of --threads is measured in turn
(torch.set_num_threads). The 1-minute load average is read before and after each case: the run
counts as idle when it stayed below --idle-load, and only an idle run's ratios should be quoted.
Each arm's minor page faults per step are counted too (getrusage): glibc's malloc serves large blocks
from fresh mmap-ed pages unless told otherwise, and a step that faults its working memory in anew runs
slower (benchmarks/run_revrnn_speed.sh runs the benchmark with glibc's defaults and without that).
Writes <out>.json (raw) and <out>.md (table).

    python benchmarks/revrnn_speed.py                      # on an idle machine
    python benchmarks/revrnn_speed.py --models rnnlm rnn-translator   # also the whole models
    python benchmarks/revrnn_speed.py --product-paths      # also every cell product on oneDNN, then on MKL
    python benchmarks/revrnn_speed.py --profile            # also where the reversible step's time goes

With --profile, 5 more reversible steps of each case run under torch.profiler, and their self time is split
into the products (oneDNN's and MKL's), tanh and sigmoid, the integer divisions, all other ATen operators,
and the Python between operators (the self time of the autograd.Function's forward and backward).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

import revbits.revrnn.linear as cell_linear
from report import experiment_config, write_results
from revbits.measure import OperatorCount
from revbits.revrnn import make_rnn
from revbits.train import TrainConfig
from revbits.train.commands import make_task_model
from revbits.train.tasks import make_task

RNNLM = experiment_config("revrnn-speed-rnnlm")  # benchmarks/configs/revrnn-speed-*.toml
TRANSLATOR = experiment_config("revrnn-speed-rnn-translator")
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}  # cpu: this process's CPU time (1 thread only)
Step = Callable[[], None]


def training_step(model: torch.nn.Module, loss_fn: Callable[[], torch.Tensor]) -> Step:
    def step() -> None:
        model.zero_grad(set_to_none=True)
        loss_fn().backward()

    return step



def operators_per_step(step: Step) -> int:
    with OperatorCount() as counter:
        step()
    return counter.count


PRODUCTS = ("mkldnn::_linear_pointwise", "aten::addmm_", "aten::addmm", "aten::mm")
PROFILE_GROUPS = (
    "products",
    "tanh and sigmoid",
    "integer division",
    "other ATen operators",
    "Python between operators",
)


def profile_groups(step: Step, steps: int = 5) -> dict[str, float]:
    """Milliseconds of profiled self time per step in each of PROFILE_GROUPS."""
    from torch.profiler import profile

    with profile() as prof:
        for _ in range(steps):
            step()
    found = dict.fromkeys(PROFILE_GROUPS, 0.0)
    for event in prof.key_averages():
        name = event.key
        if name in PRODUCTS:
            group = "products"
        elif name in ("aten::tanh", "aten::sigmoid"):
            group = "tanh and sigmoid"
        elif name == "aten::div":
            group = "integer division"
        elif name.startswith("_ReversibleRNN"):
            group = "Python between operators"
        else:
            group = "other ATen operators"
        found[group] += event.self_cpu_time_total / steps / 1e3
    return found


def page_faults() -> int:
    """This process's minor page faults so far: each is a fresh page the kernel maps (and zeroes) on first touch,
    which is what an allocation from newly mmap-ed memory costs; ``benchmarks/run_revrnn_speed.sh`` explains why
    they matter here."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def interleaved(standard: Step, reversible: Step, repeats: int, clock: Callable[[], float]) -> dict:
    """Median seconds and page faults per step of each arm, and the median of the per-repeat ratios."""
    standard(), reversible()  # warm-up
    times: dict[str, list[float]] = {"standard": [], "reversible": []}
    faults: dict[str, list[int]] = {"standard": [], "reversible": []}
    for _ in range(repeats):
        for arm, step in (("standard", standard), ("reversible", reversible)):
            faults_before, start = page_faults(), clock()
            step()
            times[arm].append(clock() - start)
            faults[arm].append(page_faults() - faults_before)
    ratios = [r / s for s, r in zip(times["standard"], times["reversible"])]
    quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    return {
        "standard_s": statistics.median(times["standard"]),
        "reversible_s": statistics.median(times["reversible"]),
        "ratio": statistics.median(ratios),
        "ratio_quartiles": [quartiles[0], quartiles[2]],
        "repeats": repeats,
        "page_faults": {arm: statistics.median(found) for arm, found in faults.items()},
    }


def with_products(step: Step, products: str) -> Step:
    """``step`` with the reversible cells' products forced through oneDNN or MKL (``cell_linear``'s
    switches, read at each run), or as the library chooses ("default")."""
    if products == "default":
        return step

    def forced() -> None:
        saved = cell_linear.use_onednn, cell_linear.ONEDNN_MIN_OUTPUTS
        cell_linear.use_onednn, cell_linear.ONEDNN_MIN_OUTPUTS = products == "onednn", 0
        try:
            step()
        finally:
            cell_linear.use_onednn, cell_linear.ONEDNN_MIN_OUTPUTS = saved

    return forced


def stack_steps(cell: str, args: argparse.Namespace, products: str = "default") -> tuple[Step, Step]:
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.steps, args.hidden, requires_grad=True)
    probe = torch.randn(args.batch, args.steps, args.hidden)
    arms = []
    for memory in ("standard", "reversible"):
        torch.manual_seed(0)
        rnn = make_rnn(cell, memory, args.hidden, args.layers, 3)
        arms.append(training_step(rnn, lambda r=rnn: (r(x)[0] * probe).sum()))
    return arms[0], with_products(arms[1], products)


def model_steps(config: TrainConfig) -> tuple[Step, Step]:
    task = make_task(config)
    batch = task.train_batch(torch.Generator().manual_seed(0), torch.device("cpu"))
    arms = []
    for memory in ("standard", "reversible"):
        torch.manual_seed(0)
        model = make_task_model(task, replace(config, memory=memory)).train()
        arms.append(training_step(model, lambda m=model: task.loss(m, batch)))
    return arms[0], arms[1]


def cases(args: argparse.Namespace) -> dict[str, Callable[[], tuple[Step, Step]]]:
    shape = f"{args.layers} x {args.hidden}, T = {args.steps}, batch {args.batch}"
    found = {
        f"GRU stack ({shape})": lambda: stack_steps("gru", args),
        f"LSTM stack ({shape})": lambda: stack_steps("lstm", args),
    }
    for products in ("onednn", "mkl") if args.product_paths else ():
        for cell in ("gru", "lstm"):
            found[f"{cell.upper()} stack ({shape}), every product on {products}"] = (
                lambda c=cell, p=products: stack_steps(c, args, p)
            )
    if "rnnlm" in args.models:
        found["rnnlm, whole model (GRU 2 x 256, 10k vocabulary, batch 32)"] = lambda: model_steps(RNNLM)
    if "rnn-translator" in args.models:
        found["rnn-translator, whole model (GRU 1 x 128, batch 32)"] = lambda: model_steps(TRANSLATOR)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch threads, each measured")
    parser.add_argument("--repeats", type=int, default=21, help="timed steps per arm after the warm-up")
    parser.add_argument("--batch", type=int, default=20)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=35, help="sequence length T")
    parser.add_argument("--models", nargs="*", choices=["rnnlm", "rnn-translator"], default=[], help="whole models too")
    parser.add_argument(
        "--product-paths",
        action="store_true",
        help="also time the stacks with every cell product on oneDNN, then on MKL (revbits.revrnn.linear's choice)",
    )
    parser.add_argument("--profile", action="store_true", help="also split the reversible step's profiled time")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall")
    parser.add_argument("--idle-load", type=float, default=0.5, help="the most 1-minute load average that is idle")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "revrnn_speed")
    args = parser.parse_args()
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for name, make in cases(args).items():
            load_before = os.getloadavg()[0]
            standard, reversible = make()
            row = {
                "case": name,
                "threads": threads,
                **interleaved(standard, reversible, args.repeats, CLOCKS[args.clock]),
            }
            row["operators"] = {"standard": operators_per_step(standard), "reversible": operators_per_step(reversible)}
            if args.profile:
                row["reversible_profile_ms"] = profile_groups(reversible)
            row["load_average"] = [load_before, os.getloadavg()[0]]
            print(json.dumps(row), flush=True)
            rows.append(row)
    loads = [load for row in rows for load in row["load_average"]]
    machine = {
        "idle": max(loads) < args.idle_load,
        "load_average_max": max(loads),
        "idle_load": args.idle_load,
        "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "clock": args.clock,
        "malloc": {name: value for name, value in os.environ.items() if name.startswith("MALLOC_")},
    }
    print(json.dumps({"machine": machine}), flush=True)
    lines = [
        f"Machine idle: {'yes' if machine['idle'] else 'NO'} (1-minute load average at most "
        f"{machine['load_average_max']:.2f}; {machine['cpu_count']} CPUs; torch {machine['torch']}; "
        f"glibc malloc settings: {machine['malloc'] or 'defaults'})",
        "",
        "| case | threads | standard step | reversible step | reversible / standard (quartiles) | operators per step "
        "| page faults per step |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        low, high = r["ratio_quartiles"]
        lines.append(
            f"| {r['case']} | {r['threads']} | {r['standard_s'] * 1e3:.1f} ms | {r['reversible_s'] * 1e3:.1f} ms "
            f"| {r['ratio']:.2f}x ({low:.2f}-{high:.2f}) "
            f"| {r['operators']['standard']} / {r['operators']['reversible']} "
            f"| {r['page_faults']['standard']:.0f} / {r['page_faults']['reversible']:.0f} |"
        )
    profiled = [r for r in rows if "reversible_profile_ms" in r]
    if profiled:
        lines += ["", "Reversible step, profiled self time per step (torch.profiler, 5 steps):", ""]
        lines += ["| case | threads | " + " | ".join(PROFILE_GROUPS) + " |", "|---" * (len(PROFILE_GROUPS) + 2) + "|"]
        for r in profiled:
            cells = " | ".join(f"{r['reversible_profile_ms'][g]:.1f} ms" for g in PROFILE_GROUPS)
            lines.append(f"| {r['case']} | {r['threads']} | {cells} |")
    write_results(args.out, {"machine": machine, "rows": rows}, lines)


if __name__ == "__main__":
    main()
