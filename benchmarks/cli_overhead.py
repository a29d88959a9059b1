"""The command line's training step against a plain PyTorch loop, and a step's slow-down when another
process shares the cores, under each OpenMP thread policy.

    python benchmarks/cli_overhead.py --mode overhead   # revbits train against a plain loop (target: at most 1.1x)
    python benchmarks/cli_overhead.py --mode busy       # each policy idle and beside a busy process (at most 2.5x)
    python benchmarks/cli_overhead.py                   # both; writes benchmarks/results/cli_overhead.{json,md}

The model is the main job's: scripts/main.sh's ``model=(...)`` flags, under ``--memory bdia``, unless
``--train-args`` gives others. Every arm runs in its own process (the OpenMP runtime reads its wait
policy once, when torch loads), and the arms alternate over --repeats rounds.

- overhead: ``revbits train`` (its default policy) reports throughput in metrics.jsonl every
  --window steps; the plain loop (batch, loss, zero_grad, backward, clip, AdamW step on the same task,
  model and optimiser) measures the same windows, once with torch's defaults as a user's script has
  them, once with the command line's policy. A step's time is the median window's; the first window
  (warm-up) is left out. Ratio = the command line's step time / the plain loop's.
- busy: the plain loop under each policy (torch's default: 2 threads spinning at OpenMP barriers;
  revbits' default, OMP_WAIT_POLICY=PASSIVE; one thread; a short spin, GOMP_SPINCOUNT=10000), alone
  and beside a busy process (--busy python: a pure-Python loop holding one core; --busy torch: a plain
  loop of the same model with torch's defaults, another user's training). Slow-down = busy / alone.

The parent process never imports torch. Run on an idle machine: the ratios are the result, and the
load average before and after each mode is printed with it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAIN_JOB = ROOT / "scripts" / "main.sh"

# name -> (environment changes, --threads); None removes the variable
POLICIES = {
    "torch default": ({"OMP_WAIT_POLICY": None}, None),
    "passive (revbits default)": ({"OMP_WAIT_POLICY": "PASSIVE"}, None),
    "1 thread": ({"OMP_WAIT_POLICY": None}, 1),
    "GOMP_SPINCOUNT=10000": ({"OMP_WAIT_POLICY": None, "GOMP_SPINCOUNT": "10000"}, None),
}
BUSY = {
    "python": [sys.executable, "-c", "while True: pass"],
    "torch": None,  # filled in by main(): a plain loop of the same model, torch's defaults, many steps
}


def main_job_args() -> list[str]:
    """The model flags of scripts/main.sh (its ``model=(...)`` line)."""
    found = re.search(r"^model=\((.*)\)$", MAIN_JOB.read_text(), re.M)
    if found is None:
        raise SystemExit(f"{MAIN_JOB} has no model=(...) line")
    return shlex.split(found.group(1))


def environment(changes: dict[str, str | None]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    for name, value in changes.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


def run(command: list[str], env: dict[str, str]) -> str:
    """The command's stdout; its stderr in the error when it fails."""
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{shlex.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done.stdout


def window_rates(records: list[dict]) -> list[float]:
    """The items-per-second of each logged training window but the first (warm-up)."""
    rates = [next(v for k, v in r.items() if k.endswith("_per_s")) for r in records if r.get("split") == "train"]
    return rates[1:]


def run_plain(train_args: list[str], steps: int, window: int, env: dict[str, str], threads: int | None) -> float:
    """Items per second of the plain loop (median window) in a fresh process."""
    command = [sys.executable, __file__, "--worker", "--steps", str(steps), "--window", str(window)]
    command += ["--threads", str(threads)] if threads else []
    out = run([*command, "--", *train_args], env)
    return statistics.median(json.loads(out.splitlines()[-1])["rates"])


def run_cli(train_args: list[str], steps: int, window: int, env: dict[str, str]) -> float:
    """Items per second of ``revbits train`` (median logged window), with the command line's own policy."""
    with tempfile.TemporaryDirectory() as folder:
        command = [sys.executable, "-m", "revbits.cli", "train", *train_args, "--steps", str(steps)]
        command += ["--log-interval", str(window), "--eval-interval", str(steps), "--out", folder]
        run(command, env)
        lines = (Path(folder) / "metrics.jsonl").read_text().splitlines()
        return statistics.median(window_rates([json.loads(line) for line in lines]))


def overhead(args: argparse.Namespace) -> dict:
    rates: dict[str, list[float]] = {"revbits train": [], "plain, torch default": [], "plain, revbits policy": []}
    cli_env = environment({"OMP_WAIT_POLICY": None})  # the command line sets its own default
    for _ in range(args.repeats):
        rates["revbits train"].append(run_cli(args.train_args, args.steps, args.window, cli_env))
        rates["plain, torch default"].append(run_plain(args.train_args, args.steps, args.window, cli_env, None))
        passive = environment({"OMP_WAIT_POLICY": "PASSIVE"})
        rates["plain, revbits policy"].append(run_plain(args.train_args, args.steps, args.window, passive, None))
    step = {name: 1 / statistics.median(values) for name, values in rates.items()}  # seconds per item
    table = [
        "| arm | items/s (median of rounds) | step time / plain loop, torch default | / plain loop, revbits policy |",
        "|---|---|---|---|",
    ]
    for name, values in rates.items():
        ratios = [step[name] / step[base] for base in ("plain, torch default", "plain, revbits policy")]
        table.append(f"| {name} | {statistics.median(values):.0f} | {ratios[0]:.3f} | {ratios[1]:.3f} |")
    return {"rates": rates, "table": table}


def busy(args: argparse.Namespace) -> dict:
    neighbour = BUSY[args.busy]
    rates: dict[str, dict[str, list[float]]] = {name: {"alone": [], "busy": []} for name in POLICIES}
    for _ in range(args.repeats):
        for name, (changes, threads) in POLICIES.items():
            env = environment(changes)
            rates[name]["alone"].append(run_plain(args.train_args, args.steps, args.window, env, threads))
            spinner = subprocess.Popen(neighbour, env=environment({"OMP_WAIT_POLICY": None}))
            try:
                rates[name]["busy"].append(run_plain(args.train_args, args.steps, args.window, env, threads))
            finally:
                spinner.kill()
                spinner.wait()
    base = statistics.median(rates["torch default"]["alone"])
    header = f"| policy | items/s alone | items/s beside a busy {args.busy} process | slow-down |"
    table = [header + " busy vs torch default alone |", "|---|---|---|---|---|"]
    for name, arms in rates.items():
        alone, crowded = statistics.median(arms["alone"]), statistics.median(arms["busy"])
        table.append(f"| {name} | {alone:.0f} | {crowded:.0f} | {alone / crowded:.2f}x | {base / crowded:.2f}x |")
    return {"busy": args.busy, "rates": rates, "table": table}


def worker(args: argparse.Namespace) -> None:
    """The plain loop: the task, model and optimiser revbits train builds from the same flags."""
    import torch

    from revbits.cli import build_parser
    from revbits.train.commands import _config_from_args
    from revbits.train.loop import build_model, make_optimizer
    from revbits.train.tasks import make_task

    if args.threads:
        torch.set_num_threads(args.threads)
    config = _config_from_args(build_parser(["train"]).parse_args(["train", *args.train_args]))
    task = make_task(config)
    torch.manual_seed(config.seed)
    model = build_model(task).train()
    optimizer = make_optimizer(model, config)
    sampler, device = torch.Generator().manual_seed(config.seed + 1), torch.device(config.device)
    rates, start, items = [], time.perf_counter(), 0
    for step in range(1, args.steps + 1):
        batch = task.train_batch(sampler, device)
        loss = task.loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        loss.item()
        items += task.items(batch)
        if step % args.window == 0:
            rates.append(items / (time.perf_counter() - start))
            start, items = time.perf_counter(), 0
    print(json.dumps({"rates": rates[1:], "threads": torch.get_num_threads()}))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=["overhead", "busy", "all"], default="all")
    parser.add_argument("--steps", type=int, default=60, help="training steps per arm and round")
    parser.add_argument("--window", type=int, default=10, help="steps per timed window (the first is warm-up)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds over the arms")
    parser.add_argument("--busy", choices=sorted(BUSY), default="python", help="the neighbour process")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cli_overhead")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, help=argparse.SUPPRESS)
    parser.add_argument("train_args", nargs="*", help="revbits train flags (after --); default: the main job's model")
    args = parser.parse_args()
    if not args.train_args:
        args.train_args = [*main_job_args(), "--memory", "bdia"]
    if args.steps < 2 * args.window:
        parser.error("--steps must be at least twice --window (the first window is warm-up)")
    return args


def main() -> None:
    args = parse_args()
    if args.worker:
        worker(args)
        return
    many = ["--steps", "1000000", "--window", "1000000"]
    BUSY["torch"] = [sys.executable, __file__, "--worker", *many, "--", *args.train_args]
    results: dict = {"train_args": args.train_args, "steps": args.steps, "window": args.window, "cpus": os.cpu_count()}
    lines = [f"revbits train {shlex.join(args.train_args)}: {args.steps} steps per arm, windows of {args.window}", ""]
    for mode, measure in (("overhead", overhead), ("busy", busy)):
        if args.mode in (mode, "all"):
            before = os.getloadavg()
            results[mode] = measure(args)
            results[mode]["load_before_after"] = [before, os.getloadavg()]
            lines += [f"## {mode} (load average before {before[0]:.2f}, after {os.getloadavg()[0]:.2f})", ""]
            lines += [*results[mode].pop("table"), ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    args.out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
