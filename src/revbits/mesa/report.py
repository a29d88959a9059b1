"""What a Mesa context compressed: counts and bytes per op, and what it kept exact and why."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass


@dataclass
class Tally:
    count: int = 0
    bytes_before: int = 0
    bytes_after: int = 0

    def add(self, before: int, after: int) -> None:
        self.count += 1
        self.bytes_before += before
        self.bytes_after += after


class MesaReport:
    """Saved tensors seen since the last :meth:`clear`.

    - ``compressed[op]``: tensors stored as 8-bit codes, by the torch function that saved them;
    - ``kept[reason]``: tensors stored as they are (integer, small, parameter, statistic);
    - ``shared[op]``: saves of a tensor already stored, which cost nothing more.
    """

    def __init__(self) -> None:
        self.compressed: dict[str, Tally] = defaultdict(Tally)
        self.kept: dict[str, Tally] = defaultdict(Tally)
        self.shared: dict[str, Tally] = defaultdict(Tally)

    def clear(self) -> None:
        self.compressed.clear()
        self.kept.clear()
        self.shared.clear()

    @property
    def bytes_before(self) -> int:
        """What the compressed tensors would have held at full precision."""
        return sum(t.bytes_before for t in self.compressed.values())

    @property
    def bytes_after(self) -> int:
        """What their codes and group ranges hold."""
        return sum(t.bytes_after for t in self.compressed.values())

    def as_dict(self) -> dict[str, dict[str, dict[str, int]]]:
        return {
            "compressed": {op: asdict(t) for op, t in sorted(self.compressed.items())},
            "kept": {reason: asdict(t) for reason, t in sorted(self.kept.items())},
            "shared": {op: asdict(t) for op, t in sorted(self.shared.items())},
        }

    def table(self) -> str:
        """A plain-text table, one row per op and per reason."""
        rows = [("", "op / reason", "tensors", "MiB before", "MiB after")]
        for section, tallies in (("8-bit", self.compressed), ("exact", self.kept), ("shared", self.shared)):
            for name, t in sorted(tallies.items(), key=lambda item: -item[1].bytes_before):
                rows.append((section, name, str(t.count), _mib(t.bytes_before), _mib(t.bytes_after)))
        if self.compressed:
            ratio = self.bytes_after / max(self.bytes_before, 1)
            rows.append(("total", f"{ratio:.3f}x of full size", "", _mib(self.bytes_before), _mib(self.bytes_after)))
        widths = [max(len(row[i]) for row in rows) for i in range(5)]
        return "\n".join(
            "  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
            for row in rows
        )


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.2f}"
