#!/usr/bin/env bash
# The runs behind docs/long_context.md and the K = 24 rows of docs/benchmarks.md (issue 17), back to back on an
# idle machine: the GPT stack at K = 24 with MemTracker and the targets, then the long-context decoder.
# About 15 minutes on 2 cores. The step times are ratios within each run.
set -euo pipefail
cd "$(dirname "$0")/.."
IDLE="${IDLE:-unknown}"
echo "load before: $(cat /proc/loadavg)"
OMP_NUM_THREADS=2 timeout 900 .venv/bin/python benchmarks/memory_modes.py --depths 24 --repeats 3 --memtracker \
    --targets --modes standard checkpoint "bdia (chunks=1)" bdia bdia+mesa --idle "$IDLE" \
    --out benchmarks/results/memory_modes_k24
echo "load between: $(cat /proc/loadavg)"
OMP_NUM_THREADS=2 timeout 900 .venv/bin/python benchmarks/long_context.py --idle "$IDLE" "$@"
echo "load after: $(cat /proc/loadavg)"
