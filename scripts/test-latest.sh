#!/usr/bin/env bash
# The integration tests against the newest releases of transformers, peft and the other
# dependencies (not the pinned ones of constraints.txt), in a separate environment .venv-latest.
# Run it when you touch an integration; extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
REVBITS_VENV=.venv-latest REVBITS_UNPINNED=1 bash scripts/setup.sh
.venv-latest/bin/python -c "import transformers, peft; print('transformers', transformers.__version__, '| peft', peft.__version__)"
.venv-latest/bin/python -m pytest -q tests/test_hf*.py tests/test_trl.py tests/test_engines_*.py "$@"  # every integration test file
