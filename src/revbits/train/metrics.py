"""Metrics as JSON lines: one object per record, appended and flushed as training goes."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


class MetricsLog:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def truncate_after(self, step: int) -> None:
        """Drop records past ``step`` (a resumed run writes them again), atomically."""
        if not self.path.exists():
            return
        keep = [json.dumps(r) for r in read_metrics(self.path) if r.get("step", 0) <= step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, self.path)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All records of a metrics file; a clear error if it is missing or damaged."""
    if not path.exists():
        raise FileNotFoundError(f"no metrics file at {path}: is this a revbits run directory?")
    records = []
    lines = path.read_text().splitlines()
    for number, line in enumerate(lines, 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                if number == len(lines):  # a line cut short by a crash mid-write
                    break
                raise ValueError(f"{path}, line {number}: not JSON ({error})") from None
    return records
