"""The ``revbits`` command line.

    revbits train --model gpt --memory bdia ...     (revbits --help lists every command)

Every command is registered one way: a row of :data:`COMMANDS` gives its one-line help and the function
that adds its flags and handler to its parser (``module:function``, the function taking the parser and
setting the parser's ``run``). A command's module is imported only when that command runs:
``revbits --help`` lists the commands from the table without importing torch. Before torch is imported,
the command line sets OpenMP's wait policy (:mod:`revbits.threads`), and every command that computes
takes ``--threads N``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

from . import __version__
from .cli_args import add_threads
from .threads import prefer_passive_waiting, use_threads


class Command(NamedTuple):
    """One row of :data:`COMMANDS`."""

    help: str  # the one line ``revbits --help`` lists
    adds: str  # "module:function": the function that adds the command's flags and sets the parser's run
    computes: bool = True  # takes --threads


COMMANDS: dict[str, Command] = {
    "train": Command("train a model on a data set under a memory mode", "revbits.train.commands:add_train"),
    "eval": Command("evaluate a trained run", "revbits.train.commands:add_eval"),
    "sample": Command("generate text from a trained gpt run", "revbits.train.commands:add_sample"),
    "export": Command(
        "write a --hf run as a plain Hugging Face model directory (save_pretrained)",
        "revbits.train.commands:add_export",
    ),
    "plot": Command("plot train and valid curves of one or more runs", "revbits.train.commands:add_plot", False),
    "memory": Command(
        "memory of one training step of your model (train's options) under each memory mode: to choose its mode",
        "revbits.train.commands:add_memory",
    ),
    "bench": Command(
        "memory and step time of a bare GPT-block stack at several depths under each memory mode: to compare modes",
        "revbits.bench:add_bench",
    ),
    "data": Command("fetch, list and verify the real data sets", "revbits.data.cli:add_data", False),
}


def registration(name: str) -> Callable[[argparse.ArgumentParser], None]:
    """The function that adds command ``name``'s flags and handler to its parser (imports its module)."""
    module, function = COMMANDS[name].adds.split(":")
    return getattr(importlib.import_module(module), function)


def build_parser(commands: Iterable[str] | None = None) -> argparse.ArgumentParser:
    """The parser with every command's full parser, or, given ``commands``, only those commands'; every
    other command is listed by name and help alone, so that ``--help`` and a mistyped command need no
    import of the modules behind them."""
    wanted = set(COMMANDS) if commands is None else set(commands)
    parser = argparse.ArgumentParser(prog="revbits", description="Memory-saving exact training.")
    parser.add_argument("--version", action="version", version=f"revbits {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name, command in COMMANDS.items():
        if name not in wanted:
            subparsers.add_parser(name, help=command.help, add_help=False)
            continue
        command_parser = subparsers.add_parser(name, help=command.help, description=command.help)
        registration(name)(command_parser)
        if command.computes:
            add_threads(command_parser)
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
