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
if [ "${REVBITS_UNPINNED:-0}" = 1 ]; then
    "$VENV/bin/python" -m pip install -q --upgrade -e ".[dev,hf]"
    pin=(--upgrade)
else
    # Where REVBITS_TORCH chose the build, the pins hold the torch it installed instead of constraints.txt's
    # torch==2.13.0 (which would replace it with the CPU build without a word) and leave out the packages that
    # torch requires itself (its sympy, its CUDA libraries); a package that needs a newer torch then stops pip
    # with the conflict, instead of pulling another torch.
    pins=constraints.txt
    if [ -n "${REVBITS_TORCH:-}" ]; then
        pins=$(mktemp)
        trap 'rm -f "$pins"' EXIT
        "$VENV/bin/python" -c "
import re, sys
from importlib.metadata import requires, version
name = lambda line: re.split(r'[\s;<>=!~\[]', line.strip(), maxsplit=1)[0].lower().replace('_', '-')
own = {name(r) for r in requires('torch') or [] if 'extra ==' not in r} | {'torch'}
kept = [line for line in open('constraints.txt') if name(line) not in own]
sys.stdout.write(''.join(kept) + f'torch=={version(\"torch\")}\n')
" >"$pins"
    fi
    "$VENV/bin/python" -m pip install -q -c "$pins" -e ".[dev,hf]"
    pin=(-c "$pins")
fi
# timm (the `timm` extra, tests only) without its dependencies: it asks for torchvision, whose
# wheels here are built for CUDA torch; pip would replace the pinned torch and the broken
# torchvision would break `import transformers`. Its other needs come with transformers.
"$VENV/bin/python" -m pip install -q --no-deps "${pin[@]}" timm
