"""scripts/setup.sh installs the torch build it was asked for and pins everything else.

The environment's python is a stub that records each pip call and the constraints file it was given, so
the script runs in a second, without installing anything."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

STUB = """#!/usr/bin/env bash
# A stand-in for the environment's python. Before any pip call "import torch" fails (nothing installed); after
# one, python runs for real with the metadata of a torch first on its path. pip calls are logged with the text
# of any constraints file they name.
if [ "$1" = -c ]; then
    [ -s "$STUB_LOG" ] || exit 1
    exec env PYTHONPATH="$STUB_TORCH_DIR" "$REAL_PYTHON" "$@"
fi
echo "CALL $*" >>"$STUB_LOG"
while [ $# -gt 0 ]; do
    if [ "$1" = -c ]; then cat "$2" >>"$STUB_LOG"; fi
    shift
done
"""


def run_setup(tmp_path: Path, torch_version: str = "2.13.0+cpu", **env: str) -> list[str]:
    """The lines the stub logged while scripts/setup.sh ran with ``env`` added."""
    venv, log, fake_torch = tmp_path / "venv", tmp_path / "pip.log", tmp_path / "fake_torch"
    (venv / "bin").mkdir(parents=True)
    fake_torch.mkdir()
    metadata = fake_torch / f"torch-{torch_version}.dist-info"
    metadata.mkdir()
    (metadata / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: torch\nVersion: {torch_version}\nRequires-Dist: sympy>=1.13.3\n"
        "Requires-Dist: nvidia-nccl-cu12==2.21.5; platform_system == 'Linux'\n"
        "Requires-Dist: opt-einsum; extra == 'opt'\n"
    )
    stub = venv / "bin" / "python"
    stub.write_text(STUB)
    stub.chmod(0o755)
    environment = {
        **os.environ,
        "REVBITS_VENV": str(venv),
        "STUB_LOG": str(log),
        "STUB_TORCH_DIR": str(fake_torch),
        "REAL_PYTHON": sys.executable,
        **env,
    }
    environment.pop("REVBITS_UNPINNED", None)
    subprocess.run(["bash", str(ROOT / "scripts" / "setup.sh")], env=environment, check=True, timeout=60)
    return log.read_text().splitlines()


def pinned_lines(lines: list[str]) -> list[str]:
    return [line for line in lines if not line.startswith("CALL")]


def test_default_installs_the_pinned_cpu_torch_and_keeps_its_pin(tmp_path):
    lines = run_setup(tmp_path)
    assert lines[0] == "CALL -m pip install -q torch==2.13.0"
    assert "torch==2.13.0" in pinned_lines(lines)


@pytest.mark.parametrize(
    "requirement, installed", [("torch==2.14.1", "2.14.1"), ("dist/torch-2.13.0+cu126-cp311-linux.whl", "2.13.0+cu126")]
)
def test_a_chosen_torch_is_pinned_instead_of_the_default(tmp_path, requirement, installed):
    lines = run_setup(tmp_path, torch_version=installed, REVBITS_TORCH=requirement)
    assert lines[0] == f"CALL -m pip install -q {requirement}"
    pins = pinned_lines(lines)
    assert [pin for pin in pins if pin.startswith("torch==")] == [f"torch=={installed}"] * 2  # both pinned calls
    assert not [pin for pin in pins if pin.startswith("sympy==")]  # torch's own requirement: its version rules
    assert "networkx==" in "\n".join(pins)  # a requirement of the pinned torch, not of this one
    assert "transformers==" in "\n".join(pins)  # the other pins still hold
