#!/usr/bin/env bash
# The reversible RNNs' step time against nn.GRU / nn.LSTM, in three processes with glibc malloc's defaults
# and three with freed memory kept in the heap, 1 and 2 threads, plus the whole word LM and translator once with each.
# Run it on an otherwise idle machine.
#
#   bash benchmarks/run_revrnn_speed.sh     # log: benchmarks/results/revrnn_speed_<commit>.log (REVRNN_LOG overrides)
#
# Why two malloc settings: by default glibc serves a large block from freshly mmap-ed pages and unmaps it when
# freed, so a step that allocates and frees tens of MB (nn.LSTM's oneDNN workspace) maps and zeroes its pages
# anew, as minor page faults, in some steps and not in others; its step time then depends on that. With
# MALLOC_MMAP_THRESHOLD_ and MALLOC_TRIM_THRESHOLD_ raised, freed blocks stay in the heap and are reused, and
# every arm runs without page faults. revrnn_speed.py counts each arm's faults per step in its table.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
export PYTHONPATH=$PWD/src
log=${REVRNN_LOG:-benchmarks/results/revrnn_speed_$(git rev-parse --short HEAD).log}
stamp() { echo "# $1 $(date -u +%H:%M:%S) load $(cut -d' ' -f1-3 /proc/loadavg)"; }
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
speed() {  # speed LABEL MALLOC_SETTINGS ARGS...: one process of revrnn_speed.py, its table in the log
    local label=$1 settings=$2
    shift 2
    stamp "start $label"
    # shellcheck disable=SC2086  # settings: zero or more NAME=VALUE words
    env $settings "$python" benchmarks/revrnn_speed.py "$@" --out "$scratch/revrnn_speed" 2>&1 \
        | grep -e '^|' -e '^Machine idle' -e '^Reversible step'
    stamp "done $label"
}
keep_freed="MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296"
{
    echo "# benchmarks/run_revrnn_speed.sh at commit $(git rev-parse --short HEAD), $(nproc) CPUs, $(date -u '+%Y-%m-%d')"
    for process in 1 2 3; do
        speed "glibc defaults, process $process" "" --threads 1 2
    done
    for process in 1 2 3; do
        speed "freed memory kept in the heap, process $process" "$keep_freed" --threads 1 2
    done
    speed "whole models, glibc defaults" "" --threads 1 --models rnnlm rnn-translator
    speed "whole models, freed memory kept in the heap" "$keep_freed" --threads 1 --models rnnlm rnn-translator
} | tee "$log"
