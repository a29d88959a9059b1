"""Small pieces (docs/design.md): no Python file of src/, tests/ or benchmarks/ over 500 lines, no function
over 80 (its decorators included). The same check from the command line, listing every offender:
``python tests/test_sizes.py``."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("src", "tests", "benchmarks")
MOST_FILE_LINES = 500
MOST_FUNCTION_LINES = 80


def oversized(text: str, name: str) -> list[str]:
    """One line per file over MOST_FILE_LINES or function over MOST_FUNCTION_LINES in source ``text``."""
    found = []
    lines = len(text.splitlines())
    if lines > MOST_FILE_LINES:
        found.append(f"{name}: {lines} lines (at most {MOST_FILE_LINES})")
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            start = min([node.lineno, *(decorator.lineno for decorator in node.decorator_list)])
            length = node.end_lineno - start + 1
            if length > MOST_FUNCTION_LINES:
                found.append(f"{name}:{node.lineno} {node.name}: {length} lines (at most {MOST_FUNCTION_LINES})")
    return found


def every_oversized() -> list[str]:
    return [
        line
        for folder in FOLDERS
        for path in sorted((ROOT / folder).rglob("*.py"))
        for line in oversized(path.read_text(), str(path.relative_to(ROOT)))
    ]


def test_no_file_over_500_lines_and_no_function_over_80():
    assert every_oversized() == []


def test_the_check_finds_a_long_function_and_a_long_file():
    body = "".join(f"    x = {k}\n" for k in range(79))  # with its def line: 80 lines, the most allowed
    assert oversized(f"def short():\n{body}", "m.py") == []
    assert oversized(f"@decorator\ndef long():\n{body}", "m.py") == ["m.py:2 long: 81 lines (at most 80)"]
    assert oversized("x = 1\n" * 501, "m.py") == ["m.py: 501 lines (at most 500)"]


if __name__ == "__main__":
    offenders = every_oversized()
    print("\n".join(offenders) or "no file over 500 lines, no function over 80")
    sys.exit(1 if offenders else 0)
