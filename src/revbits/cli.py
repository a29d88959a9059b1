"""The ``revbits`` command line.

revbits bench [--depths 6 12 24] [--seq-len 256] ...   memory and time of each memory mode
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from .data.cli import add_data_commands
from .interrupt import Interrupted
from .petra.launch import StageFailure
from .stack import MEMORY_MODES
from .train.commands import RUN_ERRORS, add_train_commands


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _depth(text: str) -> int:
    value = _positive(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"a BDIA stack needs at least 2 blocks, got {text}")
    return value


def _bench(args: argparse.Namespace) -> int:
    import torch

    from . import bench

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("revbits bench: --device cuda asked for, but torch sees no CUDA device", file=sys.stderr)
        return 2
    config = bench.BenchConfig(
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
    if args.d_model % args.heads:
        print(f"revbits bench: --d-model {args.d_model} is not divisible by --heads {args.heads}", file=sys.stderr)
        return 2
    print(
        f"GPT-style blocks: d={config.d_model}, {config.n_heads} heads, causal, 4x MLP, "
        f"T={config.seq_len}, batch {config.batch}, AdamW, on {config.device} "
        f"({torch.get_num_threads()} threads)"
    )
    rows = bench.run(config)
    print()
    print(bench.table(rows))
    for row in rows:
        if row["mode"] == "bdia":
            print(
                f"K={row['depth']}: BDIA holds {row['held_after_forward'] / 2**20:.2f} MiB after forward "
                f"({row['held_after_forward'] / row['floor_bytes']:.3f}x its floor of "
                f"{row['floor_bytes'] / 2**20:.2f} MiB)"
            )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1))
        print(f"rows written to {args.json}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="revbits", description="Memory-saving exact training.")
    parser.add_argument("--version", action="version", version=f"revbits {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    bench = commands.add_parser(
        "bench",
        help="measure memory and step time of a block stack under each memory mode",
        description="One training step of a stack of GPT-style blocks under each memory mode: peak "
        "memory (parameters, gradients, optimiser state, activations), bytes held between forward "
        "and backward, and step time as a ratio measured in the same run.",
    )
    bench.add_argument("--depths", type=_depth, nargs="+", default=[6, 12, 24], help="numbers of blocks K")
    bench.add_argument("--modes", nargs="+", default=list(MEMORY_MODES), choices=MEMORY_MODES)
    bench.add_argument("--d-model", type=_positive, default=256)
    bench.add_argument("--heads", type=_positive, default=4)
    bench.add_argument("--seq-len", type=_positive, default=256)
    bench.add_argument("--batch", type=_positive, default=8)
    bench.add_argument("--repeats", type=_positive, default=3, help="timed steps per mode (median)")
    bench.add_argument("--device", default="cpu")
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--json", type=Path, help="also write the raw rows here")
    bench.set_defaults(run=_bench)
    add_train_commands(commands)
    add_data_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; user errors, interrupts and failed PETRA stages end in one line on stderr
    (exit 2, 128 + the signal, and 1); anything else is a revbits bug and keeps its traceback."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except RUN_ERRORS as error:
        print(f"revbits {args.command}: error: {error}", file=sys.stderr)
        return 2
    except Interrupted as stop:
        print(f"revbits {args.command}: {stop}", file=sys.stderr)
        return stop.exit_code
    except StageFailure as failure:
        print(f"revbits {args.command}: error: {failure}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"revbits {args.command}: interrupted (SIGINT) outside a training loop; saved files are unchanged",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
