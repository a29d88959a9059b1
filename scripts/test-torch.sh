#!/usr/bin/env bash
# The whole test suite against another torch: bash scripts/test-torch.sh REQUIREMENT [pytest arguments]
# REQUIREMENT is what pip takes (torch==2.15.0, a wheel's path); every other package keeps its pin from
# constraints.txt. The environment is .venv-torch (made anew when it holds another torch) and the native
# kernels are built into .venv-torch/native, so nothing of .venv is touched. Releases newer than the CPU
# build on this machine's disk are CUDA builds of several GB: a machine-wide pip configuration that caps
# torch refuses them unless PIP_CONFIG_FILE=/dev/null.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 1 ]; then
    echo "usage: bash scripts/test-torch.sh REQUIREMENT [pytest arguments]   (e.g. torch==2.15.0)" >&2
    exit 2
fi
requirement=$1
shift
VENV=.venv-torch
if [ -f "$VENV/requirement" ] && [ "$(cat "$VENV/requirement")" != "$requirement" ]; then
    rm -rf "$VENV"
fi
REVBITS_VENV=$VENV REVBITS_TORCH=$requirement bash scripts/setup.sh
echo "$requirement" >"$VENV/requirement"
"$VENV/bin/python" -c "import platform, torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__, '| python', platform.python_version())"
REVBITS_NATIVE_CACHE=$PWD/$VENV/native "$VENV/bin/python" -m pytest -q --durations=10 "$@"
