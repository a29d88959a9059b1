"""Training-step time of the reversible RNNs against nn.GRU / nn.LSTM, as ratios measured in one run.

Times forward + backward (median of --repeats steps after a warm-up step) for:
- the recurrent stack alone: 2 layers of 256, T = 35, batch 32, GRU and LSTM, forget_bits = 3;
- the whole word LM (rnnlm, 10k-word softmax) and the whole attention translator
  (rnn-translator, 1 layer of 128) on real batches.
The reversible arm runs a Python loop per time step (forward, then reverse and re-run in
backward); the standard arm is one fused nn.GRU / nn.LSTM call. Run it on an idle machine: the
ratios are what to read, the absolute CPU times are noise.
Writes <out>.json and <out>.md. Needs: revbits data fetch shakespeare bible-en-fr.

    python benchmarks/revrnn_speed.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from report import experiment_config, write_results
from revbits.revrnn import make_rnn
from revbits.train import TrainConfig
from revbits.train.commands import make_task_model
from revbits.train.tasks import make_task

RNNLM = experiment_config("revrnn-speed-rnnlm")  # benchmarks/configs/revrnn-speed-*.toml
TRANSLATOR = experiment_config("revrnn-speed-rnn-translator")


def median_step_seconds(model: torch.nn.Module, loss_fn: Callable[[], torch.Tensor], repeats: int) -> float:
    times = []
    for i in range(repeats + 1):
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        loss_fn().backward()
        if i:  # the first step warms up
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def stack_times(cell: str, repeats: int) -> dict[str, float]:
    x = torch.randn(32, 35, 256, requires_grad=True)
    probe = torch.randn(32, 35, 256)
    times = {}
    for memory in ("standard", "reversible"):
        torch.manual_seed(0)
        rnn = make_rnn(cell, memory, 256, 2, 3)
        times[memory] = median_step_seconds(rnn, lambda r=rnn: (r(x)[0] * probe).sum(), repeats)
    return times


def model_times(config: TrainConfig, repeats: int) -> dict[str, float]:
    task = make_task(config)
    batch = task.train_batch(torch.Generator().manual_seed(0), torch.device("cpu"))
    times = {}
    for memory in ("standard", "reversible"):
        torch.manual_seed(0)
        model = make_task_model(task, replace(config, memory=memory)).train()
        times[memory] = median_step_seconds(model, lambda m=model: task.loss(m, batch), repeats)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "revrnn_speed")
    args = parser.parse_args()
    cases = {
        "GRU stack (2 x 256, T = 35, batch 32)": lambda: stack_times("gru", args.repeats),
        "LSTM stack (2 x 256, T = 35, batch 32)": lambda: stack_times("lstm", args.repeats),
        "rnnlm, whole model (GRU 2 x 256, 10k vocabulary)": lambda: model_times(RNNLM, args.repeats),
        "rnn-translator, whole model (GRU 1 x 128)": lambda: model_times(TRANSLATOR, args.repeats),
    }
    rows = []
    for name, measure in cases.items():
        times = measure()
        ratio = times["reversible"] / times["standard"]
        row = {"case": name, **times, "ratio": ratio, "threads": torch.get_num_threads()}
        print(json.dumps(row), flush=True)
        rows.append(row)
    lines = ["| case | reversible / standard step time |", "|---|---|"]
    lines += [f"| {r['case']} | {r['ratio']:.2f}x |" for r in rows]
    write_results(args.out, rows, lines)


if __name__ == "__main__":
    main()
