"""The ``revbits`` command line.

    revbits train --model gpt --memory bdia ...     (revbits --help lists every command)

The parser of a command is built only when that command runs: ``revbits --help`` lists the commands
from :data:`COMMANDS` without importing torch, and ``revbits train ...`` builds the train commands'
parsers (which import torch). Before torch is imported, the command line sets OpenMP's wait policy
(:mod:`revbits.threads`), and every command that computes takes ``--threads N``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from . import __version__
from .threads import prefer_passive_waiting, use_threads

# Every command, its one-line help (as its own parser states it; a test compares the two), and the group
# whose function adds its parser.
COMMANDS: dict[str, tuple[str, str]] = {
    "bench": ("measure memory and step time of a block stack under each memory mode", "bench"),
    "train": ("train a model on a data set under a memory mode", "train"),
    "eval": ("evaluate a trained run", "train"),
    "sample": ("generate text from a trained gpt run", "train"),
    "memory": ("measure one training step of a model under each memory mode", "train"),
    "export": ("write a --hf run as a plain Hugging Face model directory (save_pretrained)", "train"),
    "plot": ("plot train and valid curves of one or more runs", "train"),
    "data": ("fetch and list the real data sets", "data"),
}
COMPUTING = ("bench", "train", "eval", "sample", "memory", "export")  # the commands that take --threads


def _bench(args: argparse.Namespace) -> int:
    import torch

    from . import bench

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


def _add_bench_command(commands: argparse._SubParsersAction) -> None:
    from . import bench

    bench_parser = commands.add_parser(
        "bench",
        help=COMMANDS["bench"][0],
        description="One training step of a stack of GPT-style blocks under each memory mode: peak "
        "memory (parameters, gradients, optimiser state, activations), bytes held between forward "
        "and backward, and step time as a ratio measured in the same run.",
    )
    bench.add_arguments(bench_parser, bench.CLI_DEFAULTS)
    bench_parser.add_argument("--json", type=Path, help="also write the raw rows here")
    bench_parser.set_defaults(run=_bench)


def _add_train_commands(commands: argparse._SubParsersAction) -> None:
    from .train.commands import add_train_commands

    add_train_commands(commands)


def _add_data_commands(commands: argparse._SubParsersAction) -> None:
    from .data.cli import add_data_commands

    add_data_commands(commands)


GROUPS: dict[str, Callable[[argparse._SubParsersAction], None]] = {
    "bench": _add_bench_command,
    "train": _add_train_commands,
    "data": _add_data_commands,
}


def thread_count(text: str) -> int:
    """argparse type of --threads: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def build_parser(commands: Iterable[str] | None = None) -> argparse.ArgumentParser:
    """The parser with every command's full parser, or, given ``commands``, only those commands' (and the
    others of their groups); every other command is listed by name and help alone, so that ``--help``
    and a mistyped command need no import of the modules behind them."""
    wanted = set(COMMANDS) if commands is None else set(commands)
    groups = [group for group in GROUPS if any(COMMANDS.get(name, ("", ""))[1] == group for name in wanted)]
    parser = argparse.ArgumentParser(prog="revbits", description="Memory-saving exact training.")
    parser.add_argument("--version", action="version", version=f"revbits {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for group in groups:
        GROUPS[group](subparsers)
    for name, (help_text, group) in COMMANDS.items():
        if group not in groups:
            subparsers.add_parser(name, help=help_text, add_help=False)
    order = {name: index for index, name in enumerate(COMMANDS)}
    subparsers._choices_actions.sort(key=lambda action: order.get(action.dest, len(order)))
    for name in COMPUTING:
        if COMMANDS[name][1] in groups:
            subparsers.choices[name].add_argument(
                "--threads",
                type=thread_count,
                default=None,
                help="torch's CPU threads in this process (default: OMP_NUM_THREADS, else one per core)",
            )
    return parser


def _command_in(argv: Sequence[str]) -> str | None:
    """The command named on the line: the first argument that is not an option (the top level's
    options, --help and --version, take no value)."""
    return next((arg for arg in argv if not arg.startswith("-")), None)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; user errors, interrupts and failed PETRA stages end in one line on stderr
    (exit 2, 128 + the signal, and 1); anything else is a revbits bug and keeps its traceback."""
    prefer_passive_waiting()  # before torch is imported (revbits.threads)
    argv = list(sys.argv[1:] if argv is None else argv)
    command = _command_in(argv)
    args = build_parser([command] if command in COMMANDS else []).parse_args(argv)
    use_threads(getattr(args, "threads", None))
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print(
            f"revbits {args.command}: interrupted (SIGINT) outside a training loop; saved files are unchanged",
            file=sys.stderr,
        )
        return 130
    except Exception as error:
        code = _report(args.command, error)
        if code is None:
            raise
        return code


def _report(command: str, error: Exception) -> int | None:
    """Print a user's error, an interrupt or a failed PETRA stage in one line and return its exit code;
    None for anything else (a revbits bug, which keeps its traceback)."""
    from .interrupt import Interrupted
    from .petra.launch import StageFailure
    from .train.commands import RUN_ERRORS

    if isinstance(error, RUN_ERRORS):
        print(f"revbits {command}: error: {error}", file=sys.stderr)
        return 2
    if isinstance(error, Interrupted):
        print(f"revbits {command}: {error}", file=sys.stderr)
        return error.exit_code
    if isinstance(error, StageFailure):
        print(f"revbits {command}: error: {error}", file=sys.stderr)
        return 1
    return None


if __name__ == "__main__":
    sys.exit(main())
