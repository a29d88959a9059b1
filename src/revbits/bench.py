"""Compare memory modes on a stack of GPT-style blocks: memory of one step and step time.

Every mode starts from the same weights and the same batch; memory is measured with
:func:`revbits.measure.measure_training_step` and time as the median of interleaved steps, so
the ratios between modes come from one run on one machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

import torch
from torch import nn

from .cli_args import add_json_option, add_modes_option, at_least, write_rows
from .measure import measure_training_step
from .models import TransformerBlock
from .modes import MEMORY_MODES, stack

RNG_STATE_BYTES = torch.get_rng_state().numel()
#: Benchmark modes that are a memory mode with options: BDIA with the whole batch at once (revbits 0.1).
VARIANTS: dict[str, tuple[str, dict]] = {"bdia (chunks=1)": ("bdia", {"batch_chunks": 1})}


@dataclass
class BenchConfig:
    depths: tuple[int, ...] = (6, 12, 24, 48)
    modes: tuple[str, ...] = MEMORY_MODES
    d_model: int = 256
    n_heads: int = 4
    seq_len: int = 1024
    batch: int = 8
    repeats: int = 3
    device: str = "cpu"
    seed: int = 0

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> BenchConfig:
        """The configuration of parsed :func:`add_arguments` flags; raises ValueError naming the flags
        when ``--d-model`` is not a multiple of ``--heads``."""
        if args.d_model % args.heads:
            raise ValueError(f"--d-model {args.d_model} is not divisible by --heads {args.heads}")
        return cls(
            depths=tuple(args.depths),
            modes=tuple(args.modes),
            d_model=args.d_model,
            n_heads=args.heads,
            seq_len=args.seq_len,
            batch=args.batch,
            repeats=args.repeats,
            device=args.device,
            seed=args.seed,
        )


def _depth(text: str) -> int:
    value = at_least(1)(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"a BDIA stack needs at least 2 blocks, got {text}")
    return value


def add_arguments(
    parser: argparse.ArgumentParser, defaults: BenchConfig | None = None, variants: bool = False
) -> None:
    """Add the flags of :class:`BenchConfig` (read back by :meth:`BenchConfig.from_args`) to ``parser``,
    with ``defaults``' values as defaults; ``variants`` also accepts the :data:`VARIANTS` as modes."""
    d = defaults or BenchConfig()
    choices = [*MEMORY_MODES, *VARIANTS] if variants else list(MEMORY_MODES)
    positive = at_least(1)
    parser.add_argument("--depths", type=_depth, nargs="+", default=list(d.depths), help="numbers of blocks K")
    add_modes_option(parser, choices, d.modes, help="memory modes compared (default: every one)")
    parser.add_argument("--d-model", type=positive, default=d.d_model)
    parser.add_argument("--heads", type=positive, default=d.n_heads)
    parser.add_argument("--seq-len", type=positive, default=d.seq_len)
    parser.add_argument("--batch", type=positive, default=d.batch)
    parser.add_argument("--repeats", type=positive, default=d.repeats, help="timed steps per mode (median)")
    parser.add_argument("--device", default=d.device)
    parser.add_argument("--seed", type=int, default=d.seed)


#: The defaults of ``revbits bench``: a quicker run than the full benchmark's (benchmarks/memory_modes.py).
CLI_DEFAULTS = replace(BenchConfig(), depths=(6, 12, 24), seq_len=256)


def bdia_floor_bytes(depth: int, batch: int, numel: int, gamma_bits: int = 1, cuda: bool = False) -> int:
    """What BDIA must keep: x_{K-1} and x_K in fp32, K-1 planes of b bits per element, the
    signs of g (batch bits per block) and one RNG state per block (host memory on CUDA)."""
    planes = (depth - 1) * gamma_bits * -(-numel // 8)
    signs = -(-(depth - 1) * batch // 8)
    rng = 0 if cuda else depth * RNG_STATE_BYTES
    return 2 * 4 * numel + planes + signs + rng


def build(config: BenchConfig, depth: int, mode: str) -> nn.Module:
    torch.manual_seed(config.seed)
    blocks = [TransformerBlock(config.d_model, config.n_heads, causal=True) for _ in range(depth)]
    memory, options = VARIANTS.get(mode, (mode, {}))
    return stack(blocks, memory=memory, **options).to(config.device).train()


def _timed_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor) -> float:
    cuda = x.is_cuda
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    model(x).square().mean().backward()
    optimizer.step()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def run(config: BenchConfig, progress: Callable[[str], None] = print) -> list[dict]:
    """One row per (depth, mode) with memory, time and ratios against standard and checkpoint."""
    rows: list[dict] = []
    generator = torch.Generator().manual_seed(config.seed)
    for depth in config.depths:
        x = torch.randn(config.batch, config.seq_len, config.d_model, generator=generator).to(config.device)
        models = {m: build(config, depth, m) for m in config.modes}
        optimizers = {m: torch.optim.AdamW(models[m].parameters(), lr=1e-4) for m in config.modes}
        by_mode: dict[str, dict] = {}
        for mode in config.modes:
            model = models[mode]
            report = measure_training_step(model, lambda model=model, x=x: model(x).square().mean(), optimizers[mode])
            by_mode[mode] = {
                "depth": depth,
                "mode": mode,
                **report.as_dict(),
                "peak_minus_parameters": report.peak_minus_parameters,
                "times": [],
            }
            progress(
                f"K={depth:3d} {mode:10s} peak-params {report.peak_minus_parameters / 2**20:9.1f} MiB"
                f"  held {report.held_after_forward / 2**20:9.2f} MiB"
            )
        for _ in range(config.repeats):  # interleaved, so drift in machine speed hits every mode
            for mode in config.modes:
                by_mode[mode]["times"].append(_timed_step(models[mode], optimizers[mode], x))
        for mode in config.modes:
            row = by_mode[mode]
            times = row.pop("times")
            row["step_seconds"] = statistics.median(times) if times else float("nan")
            if mode.startswith("bdia"):
                row["floor_bytes"] = bdia_floor_bytes(depth, config.batch, x.numel(), cuda=x.is_cuda)
            rows.append(row)
        _add_ratios([r for r in rows if r["depth"] == depth])
        del models, optimizers
    return rows


def _add_ratios(rows: Iterable[dict]) -> None:
    rows = list(rows)
    ref = {r["mode"]: r for r in rows}
    for row in rows:
        for base in ("standard", "checkpoint"):
            if base in ref:
                for key in ("activations", "peak_minus_parameters", "held_after_forward", "step_seconds"):
                    row[f"{key}_vs_{base}"] = row[key] / ref[base][key] if ref[base][key] else float("nan")


COLUMNS = [
    ("peak (MiB)", lambda r: f"{r['peak'] / 2**20:.1f}"),
    ("activations at peak (MiB)", lambda r: f"{r['activations'] / 2**20:.1f}"),
    ("peak - params (MiB)", lambda r: f"{r['peak_minus_parameters'] / 2**20:.1f}"),
    ("held after fwd (MiB)", lambda r: f"{r['held_after_forward'] / 2**20:.2f}"),
    ("act / std", lambda r: f"{r.get('activations_vs_standard', float('nan')):.3f}"),
    ("act / ckpt", lambda r: f"{r.get('activations_vs_checkpoint', float('nan')):.3f}"),
    ("peak-params / std", lambda r: f"{r.get('peak_minus_parameters_vs_standard', float('nan')):.3f}"),
    ("peak-params / ckpt", lambda r: f"{r.get('peak_minus_parameters_vs_checkpoint', float('nan')):.3f}"),
    ("held / ckpt", lambda r: f"{r.get('held_after_forward_vs_checkpoint', float('nan')):.4f}"),
    ("time / std", lambda r: f"{r.get('step_seconds_vs_standard', float('nan')):.2f}"),
    ("time / ckpt", lambda r: f"{r.get('step_seconds_vs_checkpoint', float('nan')):.2f}"),
]


def table(rows: list[dict]) -> str:
    """A Markdown table of the rows: MiB and ratios within each depth."""
    lines = ["| K | mode | " + " | ".join(name for name, _ in COLUMNS) + " |", "|---" * (len(COLUMNS) + 2) + "|"]
    for r in rows:
        lines.append(f"| {r['depth']} | {r['mode']} | " + " | ".join(cell(r) for _, cell in COLUMNS) + " |")
    return "\n".join(lines)


def add_bench(parser: argparse.ArgumentParser) -> None:
    """The ``revbits bench`` command: :func:`add_arguments` with :data:`CLI_DEFAULTS`, ``--json``."""
    parser.description = (
        "Compare the memory modes themselves on a bare stack of GPT-style blocks (no data set, no model of "
        "revbits train), at several depths: the peak memory of one training step (parameters, gradients, "
        "optimiser state, activations), the bytes held between forward and backward, BDIA against its floor, "
        "and step time as ratios measured in the same run. For the memory of a model you train, use revbits memory."
    )
    add_arguments(parser, CLI_DEFAULTS)
    add_json_option(parser)
    parser.set_defaults(run=run_command)


def run_command(args: argparse.Namespace) -> int:
    """``revbits bench``: measure, print the table and BDIA's held bytes against its floor."""
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("revbits bench: --device cuda asked for, but torch sees no CUDA device", file=sys.stderr)
        return 2
    try:
        config = BenchConfig.from_args(args)
    except ValueError as error:
        print(f"revbits bench: {error}", file=sys.stderr)
        return 2
    print(
        f"GPT-style blocks: d={config.d_model}, {config.n_heads} heads, causal, 4x MLP, "
        f"T={config.seq_len}, batch {config.batch}, AdamW, on {config.device} "
        f"({torch.get_num_threads()} threads)"
    )
    rows = run(config)
    print()
    print(table(rows))
    for row in rows:
        if row["mode"] == "bdia":
            print(
                f"K={row['depth']}: BDIA holds {row['held_after_forward'] / 2**20:.2f} MiB after forward "
                f"({row['held_after_forward'] / row['floor_bytes']:.3f}x its floor of "
                f"{row['floor_bytes'] / 2**20:.2f} MiB)"
            )
    write_rows(args.json, rows)
    return 0
