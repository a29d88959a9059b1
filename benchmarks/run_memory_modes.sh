#!/usr/bin/env bash
# The run behind docs/benchmarks.md section 1 (about 30 minutes on 2 cores; keep the machine idle,
# the step times are ratios measured in this one run). Extra arguments go to memory_modes.py.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python benchmarks/memory_modes.py --out benchmarks/results/memory_modes "$@"
