"""The pieces of argparse the commands share, defined once: value types that refuse a bad number when the
flag is parsed (argparse names the flag: ``--top-k: must be at least 1, got 0``), and the options that
more than one command takes: ``--modes`` and ``--json`` of the two measuring commands (``revbits memory``
and ``revbits bench``), ``--threads`` of every command that computes. No torch here: ``revbits --help``
imports this module.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


def at_least(least: int) -> Callable[[str], int]:
    """argparse type: an integer of at least ``least``."""

    def parse(text: str) -> int:
        value = int(text)
        if value < least:
            raise argparse.ArgumentTypeError(f"must be at least {least}, got {text}")
        return value

    parse.__name__ = "int"  # argparse names the type in its message for text that is no integer
    return parse


def finite_float(text: str) -> float:
    """argparse type: a finite float (nan and inf are refused when the flag is parsed)."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite float above 0."""
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def add_threads(parser: argparse.ArgumentParser) -> None:
    """``--threads N``: torch's CPU threads in this process (the command line applies it before running)."""
    parser.add_argument(
        "--threads",
        type=at_least(1),
        default=None,
        help="torch's CPU threads in this process (default: OMP_NUM_THREADS, else one per core)",
    )


def add_modes_option(
    parser: argparse.ArgumentParser, choices: Sequence[str], default: Sequence[str] | None, help: str
) -> None:
    """``--modes``: the memory modes a measuring command measures, in this order (the first is the base of
    its ratios)."""
    default = None if default is None else list(default)
    parser.add_argument("--modes", nargs="+", choices=list(choices), default=default, help=help)


def add_json_option(parser: argparse.ArgumentParser) -> None:
    """``--json PATH``: where a measuring command also writes its rows (:func:`write_rows`)."""
    parser.add_argument("--json", type=Path, help="also write the measured rows here, as JSON")


def write_rows(path: Path | None, rows: list[dict[str, Any]]) -> None:
    """Write the measured rows to ``--json``'s ``path`` (if given), its folder created as needed."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=1))
    print(f"rows written to {path}")
