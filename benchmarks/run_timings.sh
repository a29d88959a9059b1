#!/usr/bin/env bash
# Every step-time ratio that README and docs/ quote, one script after another, with the load average
# before and after each: run it on an otherwise idle machine (no tests, builds or benchmarks beside it).
#
#   bash benchmarks/run_timings.sh                      # BDIA at the main job's size and at K = 24, the
#                                                       # reversible RNNs, layer slices at Qwen3-0.6B's width
#   REAL_SHAPES=1 bash benchmarks/run_timings.sh        # and the 28-layer Qwen3-0.6B LoRA step at T = 2048
#                                                       # (minutes per step on a CPU)
#
# The log goes to benchmarks/results/timings_<commit>.log (TIMINGS_LOG overrides); each script also
# writes its own results file, as its docstring says.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
export PYTHONPATH=$PWD/src
log=${TIMINGS_LOG:-benchmarks/results/timings_$(git rev-parse --short HEAD).log}
stamp() { echo "# $1 $(date -u +%H:%M:%S) load $(cut -d' ' -f1-3 /proc/loadavg)"; }
run() {  # run NAME ARGS...: one benchmark, its output and the load around it in the log
    local name=$1
    shift
    stamp "start $name: $*"
    "$python" "$@" 2>&1 | grep -v -e FutureWarning -e "warnings.warn" | sed -e "s|$PWD/||g"
    stamp "done $name"
}
{
    echo "# benchmarks/run_timings.sh at commit $(git rev-parse --short HEAD), $(nproc) CPUs, $(date -u '+%Y-%m-%d')"
    run bdia_overhead benchmarks/bdia_overhead.py --rounds 15 --threads 2 \
        --modes standard checkpoint bdia "bdia (recompute top)" --out benchmarks/results/bdia_overhead_main
    run revrnn_speed benchmarks/revrnn_speed.py --threads 1 2 --out benchmarks/results/revrnn_speed_quiet
    run layer_floor benchmarks/layer_floor.py --lengths 1024 2048 --breakdown 0 --time-repeats 3 --time-length 2048 \
        --modes gc+fused gc+offload+fused bdia+fused "bdia, mlp slices only" --out benchmarks/results/layer_floor_time
    run memory_modes_k24 benchmarks/memory_modes.py --depths 24 --repeats 5 --time-only --modes checkpoint bdia \
        --idle yes --out benchmarks/results/memory_modes_k24_time
    if [ -n "${REAL_SHAPES:-}" ]; then
        run real_shapes benchmarks/real_shapes.py --runs qwen3-0.6b:lora --batches 1 --lengths 2048 --repeats 2 \
            --modes gc+fused gc+offload+fused bdia+fused --idle yes
    fi
} | tee "$log"
