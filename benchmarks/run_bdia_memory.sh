#!/usr/bin/env bash
# The run behind docs/benchmarks.md section 1 (about 17 minutes on 2 cores; keep the machine idle,
# the step times are ratios measured in this one run). Extra arguments go to bdia_memory.py.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python benchmarks/bdia_memory.py --out benchmarks/results/bdia_memory "$@"
