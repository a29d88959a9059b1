#!/usr/bin/env bash
# Create .venv and install revbits with its test tools, at the versions pinned in constraints.txt,
# so the same commit installs the same packages next month. Safe to run again.
# torch is installed first, pinned: set REVBITS_TORCH to another requirement (for example a
# CUDA build's version) to change it. A plain `torch` requirement would pull the CUDA wheels.
# REVBITS_VENV names another environment folder; REVBITS_UNPINNED=1 skips constraints.txt and
# takes the newest releases (scripts/test-latest.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${REVBITS_VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    "$VENV/bin/python" -m pip install -q "${REVBITS_TORCH:-torch==2.13.0}"
fi
# The pins, less torch's when REVBITS_TORCH chose the build: constraints.txt's torch==2.13.0 would
# otherwise replace the chosen torch with the CPU build without a word.
pins=constraints.txt
if [ -n "${REVBITS_TORCH:-}" ]; then
    pins=$(mktemp)
    trap 'rm -f "$pins"' EXIT
    grep -v '^torch==' constraints.txt >"$pins"
fi
if [ "${REVBITS_UNPINNED:-0}" = 1 ]; then
    "$VENV/bin/python" -m pip install -q --upgrade -e ".[dev,hf]"
    pin=(--upgrade)
else
    "$VENV/bin/python" -m pip install -q -c "$pins" -e ".[dev,hf]"
    pin=(-c "$pins")
fi
# timm (the `timm` extra, tests only) without its dependencies: it asks for torchvision, whose
# wheels here are built for CUDA torch; pip would replace the pinned torch and the broken
# torchvision would break `import transformers`. Its other needs come with transformers.
"$VENV/bin/python" -m pip install -q --no-deps "${pin[@]}" timm
