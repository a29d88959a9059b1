#!/usr/bin/env bash
# Set up .venv (scripts/setup.sh), then lint and run the whole test suite; the 20 slowest tests are
# listed at the end. Extra arguments go to pytest: `bash scripts/test.sh -m "not slow"` is the quick
# subset for development (the tests marked slow left out).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check src tests benchmarks
.venv/bin/python -m pytest -q --durations=20 "$@"
