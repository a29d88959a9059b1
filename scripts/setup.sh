#!/usr/bin/env bash
# Create .venv and install revbits with its test tools. Safe to run again.
# torch is installed first, pinned: set REVBITS_TORCH to another requirement (for example a
# CUDA build's version) to change it. A plain `torch` requirement would pull the CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    .venv/bin/python -m pip install -q "${REVBITS_TORCH:-torch==2.13.0}"
fi
.venv/bin/python -m pip install -q -e ".[dev,hf]"
