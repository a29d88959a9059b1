"""The ``revbits`` command line.

revbits bench [--depths 6 12 24] [--seq-len 256] ...   memory and time of each memory mode
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from . import __version__, bench
from .data.cli import add_data_commands
from .interrupt import Interrupted
from .petra.launch import StageFailure
from .train.commands import RUN_ERRORS, add_train_commands


def _bench(args: argparse.Namespace) -> int:
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("revbits bench: --device cuda asked for, but torch sees no CUDA device", file=sys.stderr)
        return 2
    try:
        config = bench.BenchConfig.from_args(args)
    except ValueError as error:
        print(f"revbits bench: {error}", file=sys.stderr)
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
    bench_parser = commands.add_parser(
        "bench",
        help="measure memory and step time of a block stack under each memory mode",
        description="One training step of a stack of GPT-style blocks under each memory mode: peak "
        "memory (parameters, gradients, optimiser state, activations), bytes held between forward "
        "and backward, and step time as a ratio measured in the same run.",
    )
    bench.add_arguments(bench_parser, bench.CLI_DEFAULTS)
    bench_parser.add_argument("--json", type=Path, help="also write the raw rows here")
    bench_parser.set_defaults(run=_bench)
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
