#!/usr/bin/env bash
# The run behind docs/benchmarks.md section 1 (about 20 minutes on 2 cores; keep the machine idle,
# the step times are ratios measured in this one run). Extra arguments go to memory_modes.py.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python benchmarks/memory_modes.py --depths 6 12 24 --out benchmarks/results/memory_modes "$@"
