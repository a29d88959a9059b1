#!/usr/bin/env bash
# The runs behind docs/long_context.md and the K = 24 rows of docs/benchmarks.md (issue 17).
# Bytes (deterministic, counted by the live-bytes tracker, any load):
#   memory_modes.py --depths 24 --repeats 0 --memtracker --targets  -> results/memory_modes_k24
#   long_context.py --repeats 0                                      -> results/long_context
# Step times (ratios within one run; run this script on an idle machine, IDLE says whether it was):
#   memory_modes.py --time-only -> results/memory_modes_k24_time; long_context.py --time-only -> results/long_context_time
# Then: python benchmarks/floor.py -> results/floor
set -euo pipefail
cd "$(dirname "$0")/.."
IDLE="${IDLE:-unknown}"
MODES=(standard checkpoint mesa "bdia (chunks=1)" bdia bdia+mesa)
echo "load before: $(cat /proc/loadavg)"
if [ "${1:-}" != "--time-only" ]; then
    .venv/bin/python benchmarks/memory_modes.py --depths 24 --repeats 0 --memtracker --targets --modes "${MODES[@]}" \
        --idle "$IDLE" --out benchmarks/results/memory_modes_k24
    .venv/bin/python benchmarks/long_context.py --repeats 0 --idle "$IDLE" --out benchmarks/results/long_context
fi
OMP_NUM_THREADS=2 .venv/bin/python benchmarks/memory_modes.py --depths 24 --repeats 3 --time-only --modes "${MODES[@]}" \
    --idle "$IDLE" --out benchmarks/results/memory_modes_k24_time
echo "load between: $(cat /proc/loadavg)"
OMP_NUM_THREADS=2 .venv/bin/python benchmarks/long_context.py --time-only --repeats 3 --idle "$IDLE" \
    --out benchmarks/results/long_context_time
echo "load after: $(cat /proc/loadavg)"
.venv/bin/python benchmarks/floor.py
