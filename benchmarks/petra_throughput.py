"""Throughput and per-stage memory of PETRA against GPipe, 1F1B and plain backprop, J = 2, on CPU over gloo.

Every method trains the same model, split the same way into J = 2 stages (balanced by measured time), on
micro-batches of the same size B, M micro-batches per mini-batch (= PETRA's accumulation k):

- backprop: one process, one thread, M micro-batches accumulated per optimizer step;
- GPipe, 1F1B: ``revbits.petra.baselines.run_pipeline_baseline`` (torch.distributed.pipelining), a process
  and a thread per stage;
- PETRA: ``revbits.petra.runtime.StageWorker`` (what ``run_stage`` runs), a process and a thread per stage.

samples/s: "steady" = B M / median mini-batch step (pipelines, backprop), or B / the slowest stage's median
time step while it does both a forward and a backward (PETRA, no flush); "end to end" = all samples / wall
time, PETRA's pipeline fill and drain included. Memory per stage: ``revbits.memory.LiveBytes`` (a
TorchDispatchMode; it does wrap the gloo send/recv calls) over one mini-batch step (pipelines, backprop,
after warm-up) or over a whole shorter run (PETRA), plus pipelining's receive buffers, which are allocated
once at its first step and so escape the tracker; max RSS is a (coarse) cross-check.

PETRA's held state: at the start of every time step (after the sends of step t - 2 completed) the bytes a
stage keeps between a micro-batch's forward and its backward: its input FIFO (plain stages) and the BDIA
residue bits in flight (invertible stages), besides the messages still being sent. A J = 3 run puts only
invertible pieces in stage 1 to show that an invertible stage keeps ~nothing (RevNet: 0; BDIA: the bits).

The cost MODEL (not a measurement) takes per-piece times measured in one process (f: forward without graph,
r: inversion, g: forward with graph, b: backward from the graph) and the one-way gloo time t_A of one
boundary activation, and predicts J = 4, 8, 16 assuming the total compute splits evenly into J stages, all
boundaries carry an activation of the same size and communication does not overlap compute:

    backprop:    B / sum(g + b)
    GPipe/1F1B:  B M / [(M + J - 1) (sum(g + b) / J + 2 t_A)]          bubble (J - 1) / (M + J - 1)
    PETRA:       B / [(sum_{not head} f + sum_{invertible} r + sum(g + b)) / J + 3 t_A]    no bubble

(PETRA's backward re-runs the forward with a graph, then back-propagates; it receives one activation and
the pair (x~, delta) per step.) At J = 2 it also predicts from the actual split, beside the measurement.

    python benchmarks/petra_throughput.py                          # about 5 minutes on an idle 2-core machine
    python benchmarks/petra_throughput.py --steps 2 --warmup 1 --micro-batches 2 --batch 4 --channels 8 \\
        --gpt-batch 2 --d-model 16 --n-head 2 --seq-len 8 --repeats 2 --memory-micro-batches 6 --pool 3 \\
        --out runs/petra_smoke                                     # smoke run (about a minute)
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import resource
import statistics
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

from report import write_results
from revbits.measure import LiveBytes, tracking
from revbits.petra import PetraConfig, balanced_sizes, launch, small_revnet, split
from revbits.petra.baselines import run_pipeline_baseline
from revbits.petra.optim import make_optimizer
from revbits.petra.pieces import BDIAStep, bdia_gpt_pieces
from revbits.petra.profile import profile_pieces
from revbits.petra.runtime import StageWorker, build_all_stages, join_process_group
from revbits.petra.schedule import delay

MIB = 2**20


# ---------------------------------------------------------------- models and data


def build_split(pieces_fn, sizes: tuple[int, ...]) -> list[nn.Module]:
    """The J = len(sizes) stages of ``pieces_fn()`` (picklable as a partial)."""
    return split(pieces_fn(), len(sizes), sizes)


def model_setup(name: str, args: argparse.Namespace) -> tuple[partial, list[tuple[Tensor, Tensor]]]:
    """(pieces factory, ``args.pool`` micro-batches) for "revnet" (random 1x28x28 images, 10 classes) or "gpt"
    (the BDIA GPT pieces, random tokens)."""
    g = torch.Generator().manual_seed(0)
    if name == "revnet":
        pieces = partial(small_revnet, channels=args.channels, levels=tuple(args.levels))
        shape, classes = (args.batch, 1, 28, 28), 10
        return pieces, [
            (torch.randn(shape, generator=g), torch.randint(0, classes, shape[:1], generator=g))
            for _ in range(args.pool)
        ]
    pieces = partial(bdia_gpt_pieces, args.vocab, args.d_model, args.n_head, args.n_layer, args.seq_len, dropout=0.0)
    rows = [torch.randint(0, args.vocab, (args.gpt_batch, args.seq_len + 1), generator=g) for _ in range(args.pool)]
    return pieces, [(r[:, :-1], r[:, 1:]) for r in rows]


# ---------------------------------------------------------------- single-process measurements


def backprop(build, data: list, config: PetraConfig, warmup: int, steps: int) -> dict:
    """Plain backprop in this process: M micro-batches, (1/M) sum of gradients, one optimizer step."""
    torch.manual_seed(config.seed)
    stages = list(build())
    params = [p for s in stages for p in s.parameters()]
    optimizer = make_optimizer(params, config)
    M, B = config.accumulation, data[0][0].shape[0]

    def mini_batch(w: int) -> None:
        for m in range(w * M, (w + 1) * M):
            x, target = data[m % len(data)]
            for stage in stages[:-1]:
                x = stage(x, m)
            (stages[-1](x, target, m) / M).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times = []
    for w in range(warmup + steps):
        start = time.perf_counter()
        mini_batch(w)
        times.append(time.perf_counter() - start)
    with tracking(params, optimizer) as tracker:
        mini_batch(warmup + steps)
    return {
        "steady": B * M / statistics.median(times[warmup:]),
        "end_to_end": B * M * len(times) / sum(times),
        "memory": [dict(tracker.peak, peak=tracker.peak_total, recv_buffers=0)],
    }


# ---------------------------------------------------------------- stage processes


def pingpong(rank: int, world_size: int, numel: int, repeats: int) -> float:
    """One-way seconds for a float32 tensor of ``numel`` elements between two gloo processes."""
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    t = torch.zeros(numel)
    times = []
    for i in range(repeats + 2):
        dist.barrier()
        start = time.perf_counter()
        for op in (dist.send, dist.recv) if rank == 0 else (dist.recv, dist.send):
            op(t, 1 - rank)
        if i > 1:
            times.append((time.perf_counter() - start) / 2)
    dist.destroy_process_group()
    return statistics.median(times)


class MeasuredWorker(StageWorker):
    """A PETRA stage that time-stamps every step and, with a tracker, samples what it holds at step starts.

    Hooks (reading StageWorker's internals): ``maybe_fail(t)`` is called at the start of every step, right
    after the sends of steps < t - 1 completed; ``accumulate`` and ``update`` register the gradients and the
    optimizer state with the tracker, so that "live activations" counts neither."""

    def __init__(self, *args, tracker: LiveBytes | None = None) -> None:
        super().__init__(*args)
        self.tracker, self.stamps, self.held = tracker, [], []

    def maybe_fail(self, t: int) -> None:
        self.stamps.append(time.perf_counter())
        if self.tracker is not None:
            self.held.append(self.held_bytes())
        super().maybe_fail(t)

    def held_bytes(self) -> dict[str, int]:
        residue = [b for m in self.stage.modules() if isinstance(m, BDIAStep) for b in m.in_flight.values()]
        return {
            "fifo": sum(x.numel() * x.element_size() for _, x in self.fifo),
            "residue": sum(b.nbytes for b in residue),
            "messages": sum(t.numel() * t.element_size() for *_, tensors in self.channel.pending for t in tensors),
            "live_activations": self.tracker.current["activations"],
        }

    def accumulate(self, grads: list[Tensor | None]) -> None:
        super().accumulate(grads)
        if self.tracker is not None:  # the accumulated gradients, unless this backward's update reset them
            for p in self.params:
                if p.grad is not None:
                    self.tracker.register(p.grad, "gradients")

    def update(self) -> None:
        super().update()
        if self.tracker is not None and self.optimizer is not None:
            for state in self.optimizer.state.values():
                for v in state.values():
                    if isinstance(v, Tensor):
                        self.tracker.register(v, "optimizer")


def petra_stage(rank: int, world_size: int, build, data: list, config: PetraConfig, measure: bool) -> dict:
    """Stage ``rank`` of a PETRA run, as ``run_stage`` sets it up; returns its timings and (``measure``) its
    memory: the LiveBytes peak over the run and the largest held bytes at a steady step's start."""
    rank, world_size, stages = build_all_stages(rank, world_size, build, config)
    stage = stages[rank]
    del stages
    stage.train()
    join_process_group(rank, world_size, config)
    tracker = LiveBytes() if measure else None
    worker = MeasuredWorker(stage, rank, data, config, tracker=tracker)
    if tracker is not None:
        for p in worker.params:
            tracker.register(p, "parameters")
    dist.barrier()
    start = time.perf_counter()
    with tracker if tracker is not None else contextlib.nullcontext():
        worker.run()
    end = time.perf_counter()
    dist.destroy_process_group()
    M, d = worker.M, delay(rank, world_size)
    stamps = worker.stamps + [end]  # stamps[i] starts step t = rank + i
    both = range(d, M) if d < M else range(len(worker.stamps))  # steps with a forward and a backward
    steps = [stamps[i + 1] - stamps[i] for i in both]
    out = {"stage": rank, "wall": end - start, "step": statistics.median(steps), "invertible": stage.invertible}
    if tracker is not None:
        out["memory"] = dict(tracker.peak, peak=tracker.peak_total, recv_buffers=0)
        out["memory"]["max_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        out["held"] = {k: max(worker.held[i][k] for i in both) for k in worker.held[0]}
    return out


# ---------------------------------------------------------------- the cost model (a MODEL, not a measurement)


def cost_model(profile: list[dict], sizes: tuple[int, ...], t_a: float, B: int, M: int, Js: list[int]) -> list[dict]:
    """Predicted samples/s (see the module docstring): J = 2 from the actual split, then even splits."""
    gb = [p["g"] + p["b"] for p in profile]
    petra_extra = [p["f"] + (p["r"] if p["invertible"] else 0.0) for p in profile]
    rows = []
    ends = [sum(sizes[: j + 1]) for j in range(len(sizes))]
    groups = [range(e - s, e) for s, e in zip(sizes, ends)]
    pipe = max(sum(gb[i] for i in g) for g in groups)
    petra = []
    for j, g in enumerate(groups):
        invertible = all(profile[i]["invertible"] for i in g)
        extra = 0.0 if j == len(groups) - 1 else sum(profile[i]["f"] + profile[i]["r"] * invertible for i in g)
        petra.append(sum(gb[i] for i in g) + extra)
    rows.append(model_row(len(sizes), "actual split", sum(gb), pipe, max(petra), t_a, B, M))
    for J in Js:
        rows.append(model_row(J, "even split", sum(gb), sum(gb) / J, (sum(gb) + sum(petra_extra)) / J, t_a, B, M))
    return rows


def model_row(J: int, how: str, total: float, pipe: float, petra: float, t_a: float, B: int, M: int) -> dict:
    pipe_step = (M + J - 1) * (pipe + 2 * t_a)
    return {
        "J": J,
        "split": how,
        "backprop": B / total,
        "pipeline": B * M / pipe_step,
        "bubble": (J - 1) / (M + J - 1),
        "petra": B / (petra + 3 * t_a),
    }


# ---------------------------------------------------------------- one model


def measure_model(name: str, args: argparse.Namespace) -> dict:
    pieces_fn, data = model_setup(name, args)
    B, M = data[0][0].shape[0], args.micro_batches
    torch.manual_seed(0)
    profile = profile_pieces(pieces_fn(), *data[0], args.repeats)
    times = [int(1e6 * (p["g"] + p["b"])) for p in profile]
    sizes = tuple(args.sizes) if args.sizes else tuple(balanced_sizes(times, 2))
    rev = [p["invertible"] for p in profile]
    run = (next(i for i in range(1, len(rev)) if not rev[i]) - 1) if rev[1] else 0  # invertible pieces after 0
    sizes3 = (1, run, len(rev) - 1 - run) if run else None
    build = partial(build_split, pieces_fn, sizes)
    total = (args.warmup + args.steps) * M
    config = PetraConfig(stages=2, accumulation=M, micro_batches=total, lr=args.lr, timeout=600.0)
    t_a = launch(2, pingpong, (profile[sizes[0] - 1]["out_bytes"] // 4, args.repeats), timeout=args.timeout)[0]
    print(f"[{name}] split {sizes}, B = {B}, M = {M}, t_A = {t_a * 1e3:.3f} ms", flush=True)
    results = {"backprop": backprop(build, data, config, args.warmup, args.steps)}
    for schedule in ("gpipe", "1f1b"):
        cfg = replace(config, micro_batches=total + M)  # + the memory-measured mini-batch
        out = launch(2, run_pipeline_baseline, (build, data, cfg, schedule, True), timeout=args.timeout)
        steady = max(statistics.median(s.step_seconds[args.warmup :]) for s in out)
        wall = max(sum(s.step_seconds) for s in out)
        results[schedule] = {
            "steady": B * M / steady,
            "end_to_end": B * total / wall,
            "memory": [s.memory for s in out],
        }
        print(f"[{name}] {schedule}: {results[schedule]['steady']:.1f} samples/s", flush=True)
    timed = launch(2, petra_stage, (build, data, config, False), timeout=args.timeout)
    mem_config = replace(config, micro_batches=args.memory_micro_batches)
    measured = launch(2, petra_stage, (build, data, mem_config, True), timeout=args.timeout)
    results["petra"] = {
        "steady": B / max(s["step"] for s in timed),
        "end_to_end": B * total / max(s["wall"] for s in timed),
        "memory": [s["memory"] for s in measured],
        "held": [dict(s["held"], invertible=s["invertible"]) for s in measured],
    }
    print(f"[{name}] petra: {results['petra']['steady']:.1f} samples/s", flush=True)
    held3 = None
    if sizes3 is not None:
        cfg3 = replace(mem_config, stages=3)
        out3 = launch(3, petra_stage, (partial(build_split, pieces_fn, sizes3), data, cfg3, True), timeout=args.timeout)
        held3 = {"sizes": sizes3, "stages": [dict(s["held"], invertible=s["invertible"]) for s in out3]}
    model = cost_model(profile, sizes, t_a, B, M, args.model_J)
    return {
        "B": B,
        "M": M,
        "sizes": sizes,
        "t_a": t_a,
        "profile": profile,
        "results": results,
        "held_J3": held3,
        "cost_model": model,
    }


# ---------------------------------------------------------------- report


def table(name: str, r: dict) -> list[str]:
    lines = [f"## {name}: J = 2, split {r['sizes']}, micro-batch B = {r['B']}, M = {r['M']} per mini-batch", ""]
    lines += [
        "| method | samples/s steady | samples/s end to end | per-stage peak MiB (activations at peak) | max RSS MiB |"
    ]
    lines += ["|---|---|---|---|---|"]
    for method, res in r["results"].items():
        peaks = " / ".join(
            f"{(m['peak'] + m['recv_buffers']) / MIB:.2f} ({(m['activations'] + m['recv_buffers']) / MIB:.2f})"
            for m in res["memory"]
        )
        rss = " / ".join(f"{m['max_rss'] / MIB:.0f}" for m in res["memory"] if "max_rss" in m) or "-"
        lines.append(f"| {method} | {res['steady']:.1f} | {res['end_to_end']:.1f} | {peaks} | {rss} |")
    lines += [
        "",
        "PETRA state held between a micro-batch's forward and backward (largest at a steady step's start):",
        "",
    ]
    lines += ["| run | stage | invertible | FIFO KiB | residue bits KiB | messages being sent KiB | all live KiB |"]
    lines += ["|---|---|---|---|---|---|---|"]
    runs = [("J = 2", r["results"]["petra"]["held"])]
    if r["held_J3"]:
        runs.append((f"J = 3 {tuple(r['held_J3']['sizes'])}", r["held_J3"]["stages"]))
    for run, stages in runs:
        for j, h in enumerate(stages):
            kib = [f"{h[k] / 1024:.1f}" for k in ("fifo", "residue", "messages", "live_activations")]
            lines.append(f"| {run} | {j} | {h['invertible']} | " + " | ".join(kib) + " |")
    lines += ["", f"Cost MODEL (predicted samples/s, not measured; t_A = {r['t_a'] * 1e3:.3f} ms):", ""]
    lines += [
        "| J | split | backprop | GPipe/1F1B | bubble | PETRA | PETRA / pipeline |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in r["cost_model"]:
        lines.append(
            f"| {m['J']} | {m['split']} | {m['backprop']:.1f} | {m['pipeline']:.1f} | {m['bubble']:.2f} | "
            f"{m['petra']:.1f} | {m['petra'] / m['pipeline']:.2f} |"
        )
    return lines + [""]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["revnet", "gpt"], choices=["revnet", "gpt"])
    p.add_argument("--batch", type=int, default=64, help="RevNet micro-batch size")
    p.add_argument("--channels", type=int, default=64)
    p.add_argument("--levels", type=int, nargs="+", default=[2, 2])
    p.add_argument("--gpt-batch", type=int, default=8, help="GPT micro-batch size (sequences)")
    p.add_argument("--vocab", type=int, default=64)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--sizes", type=int, nargs="+", help="pieces per stage (default: balanced by measured time)")
    p.add_argument("--micro-batches", type=int, default=8, help="M per mini-batch (PETRA's k)")
    p.add_argument("--steps", type=int, default=20, help="timed mini-batches")
    p.add_argument("--warmup", type=int, default=2, help="untimed mini-batches first")
    p.add_argument("--memory-micro-batches", type=int, default=16, help="micro-batches of PETRA's memory runs")
    p.add_argument("--pool", type=int, default=8, help="distinct micro-batches, cycled")
    p.add_argument("--repeats", type=int, default=20, help="repeats per timing of the single-process profile")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--model-J", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per launched run")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "petra_throughput")
    args = p.parse_args()
    if args.sizes and len(args.sizes) != 2:
        p.error("--sizes gives the pieces of each of the J = 2 stages")
    torch.set_num_threads(1)
    models = {name: measure_model(name, args) for name in args.models}
    results = {
        "torch": torch.__version__,
        "machine": platform.machine(),
        "processor": platform.processor(),
        "args": {k: v for k, v in vars(args).items() if k != "out"},  # no machine path in the results
        "memory_method": "revbits.memory.LiveBytes per process (+ pipelining receive buffers); max RSS cross-check",
        "models": models,
    }
    header = [
        "# PETRA vs GPipe / 1F1B / backprop on CPU (gloo), one thread per process",
        "",
        "Memory: LiveBytes (TorchDispatchMode) peak per stage process; pipelining's receive buffers added.",
        "Backprop runs in one process (its memory is the whole model's).",
        "",
    ]
    write_results(args.out, results, header + [line for name, r in models.items() for line in table(name, r)])


if __name__ == "__main__":
    main()
