"""Metrics as JSON lines: one object per record, appended and flushed as training goes.

A crash can cut the last line short; readers skip such a line, and a resumed run rewrites the file
(atomically, :mod:`revbits.io`) without it and without the records past its checkpoint, so no record
is ever there twice. A record that cannot be written (disk full...) is a
:class:`revbits.io.WriteError` naming the file.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from ..io import IntegrityError, WriteError, atomic_write_text, fault_point


def perplexity(loss: float) -> float:
    """exp(loss), or inf where it overflows (a diverged or untrained model), never an error."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


class MetricsLog:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict[str, Any]) -> None:
        """Append ``record`` as one line (one write: a crash leaves at most that line cut short)."""
        try:
            with self.path.open("ab") as f:
                fault_point(f"write:{self.path.name}")
                f.write((json.dumps(record) + "\n").encode("utf-8"))
        except OSError as error:
            raise WriteError(self.path, error.errno or 0) from None

    def sync(self) -> None:
        """Make the records written so far durable (called before a checkpoint is written)."""
        if self.path.exists():
            try:
                with self.path.open("a") as f:
                    os.fsync(f.fileno())
            except OSError as error:
                raise WriteError(self.path, error.errno or 0) from None

    def truncate_after(self, step: int) -> None:
        """Drop records past ``step`` (a resumed run writes them again), atomically."""
        if not self.path.exists():
            return
        keep = [json.dumps(r) for r in read_metrics(self.path) if r.get("step", 0) <= step]
        atomic_write_text(self.path, "".join(line + "\n" for line in keep))


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All records of a metrics file; an error naming the file if it is missing or damaged."""
    if not path.exists():
        raise FileNotFoundError(f"no metrics file at {path}: is this a revbits run directory?")
    try:
        lines = path.read_bytes().decode("utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise IntegrityError(f"{path} is damaged: not UTF-8 text ({error})") from None
    records = []
    for number, line in enumerate(lines, 1):
        if line.strip():
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                if number == len(lines):  # a line cut short by a crash mid-write
                    break
                raise IntegrityError(f"{path}, line {number}: damaged, not JSON ({error})") from None
            if not isinstance(record, dict):
                raise IntegrityError(f"{path}, line {number}: damaged, not a JSON object")
            records.append(record)
    return records
