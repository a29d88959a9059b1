#!/usr/bin/env bash
# Time the main job as a new user meets it: clone this repository's HEAD into a temporary folder and
# run `time bash scripts/main.sh` there, setup and the data fetch included (the data set goes to a
# fresh cache folder in the clone). The raw log, with the load average before and after, is written
# to benchmarks/results/main_job_time.log. Run it on an idle machine, once as it is (pip's cache as
# it is) and once with PIP_NO_CACHE_DIR=1 (every package downloaded). Extra arguments go to main.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
log=${REVBITS_TIME_LOG:-$repo/benchmarks/results/main_job_time.log}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$(dirname "$log")"
loadavg() { cut -d' ' -f1-3 /proc/loadavg; }
{
    echo "# bash scripts/main.sh $* from a fresh clone of $(git rev-parse --short HEAD), setup and data fetch included"
    echo "# $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) CPUs, $(python3 --version 2>&1)," \
        "pip cache: $([ -n "${PIP_NO_CACHE_DIR:-}" ] && echo "off (PIP_NO_CACHE_DIR)" || echo "as it is")"
    echo "# load average before (1, 5, 15 min): $(loadavg)"
} | tee "$log"
git clone -q "$repo" "$tmp/revbits"
# a new user's empty data cache and native-kernel cache (the kernels compile in the run); a progress line every 10 s
export REVBITS_DATA="$tmp/data" REVBITS_NATIVE_CACHE="$tmp/native" TQDM_MININTERVAL=10
TIMEFORMAT='main.sh took: real %1Rs, user %1Us, sys %1Ss'
# the log names no path of this machine: the clone's folder and a local package index are replaced
hide_paths() { sed -u -e "s|$tmp|<temporary folder>|g" -e "s|file:///[^ ']*|<local package index>|g"; }
{ time bash "$tmp/revbits/scripts/main.sh" "$@"; } 2>&1 | hide_paths | tee -a "$log"
echo "# load average after (1, 5, 15 min): $(loadavg)" | tee -a "$log"
