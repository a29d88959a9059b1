"""scripts/setup.sh installs the torch build it was asked for and pins everything else.

The environment's python is a stub that records each pip call and the constraints file it was given, so
the script runs in a second, without installing anything."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

STUB = """#!/usr/bin/env bash
# A stand-in for the environment's python: "import torch" fails (nothing installed); pip calls are logged
# with the text of any constraints file they name.
[ "$1" = -c ] && exit 1
echo "CALL $*" >>"$STUB_LOG"
while [ $# -gt 0 ]; do
    if [ "$1" = -c ]; then cat "$2" >>"$STUB_LOG"; fi
    shift
done
"""


def run_setup(tmp_path: Path, **env: str) -> list[str]:
    """The lines the stub logged while scripts/setup.sh ran with ``env`` added."""
    venv, log = tmp_path / "venv", tmp_path / "pip.log"
    (venv / "bin").mkdir(parents=True)
    stub = venv / "bin" / "python"
    stub.write_text(STUB)
    stub.chmod(0o755)
    environment = {**os.environ, "REVBITS_VENV": str(venv), "STUB_LOG": str(log), **env}
    environment.pop("REVBITS_UNPINNED", None)
    subprocess.run(["bash", str(ROOT / "scripts" / "setup.sh")], env=environment, check=True, timeout=60)
    return log.read_text().splitlines()


def pinned_lines(lines: list[str]) -> list[str]:
    return [line for line in lines if not line.startswith("CALL")]


def test_default_installs_the_pinned_cpu_torch_and_keeps_its_pin(tmp_path):
    lines = run_setup(tmp_path)
    assert lines[0] == "CALL -m pip install -q torch==2.13.0"
    assert "torch==2.13.0" in pinned_lines(lines)


@pytest.mark.parametrize("requirement", ["torch==2.14.1", "torch==2.13.0+cu126"])
def test_a_chosen_torch_is_not_replaced_by_the_pinned_one(tmp_path, requirement):
    lines = run_setup(tmp_path, REVBITS_TORCH=requirement)
    assert lines[0] == f"CALL -m pip install -q {requirement}"
    pins = pinned_lines(lines)
    assert not [pin for pin in pins if pin.startswith("torch==")]  # nothing may reinstall another torch
    assert "transformers==" in "\n".join(pins)  # the other pins still hold
