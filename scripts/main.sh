#!/usr/bin/env bash
# The main job, from a fresh clone: set up .venv, fetch the Shakespeare data set, train a small
# BDIA-GPT on it (a few minutes on 2 CPU cores, setup included: README gives the measured time), print
# its validation loss and a sample, then measure one training step of the same GPT, 12 layers deep,
# under each memory mode. Extra arguments go to `revbits train` (for example --steps 3000 or --device cuda).
# benchmarks/cli_overhead.py reads the model=(...) line; scripts/time_main.sh times this script.
set -euo pipefail
cd "$(dirname "$0")/.."
stage() { echo; echo "== $* ($SECONDS s since the start) =="; }
stage "setup: .venv with revbits and its pinned dependencies"
bash scripts/setup.sh
revbits=.venv/bin/revbits
stage "data"
$revbits data fetch shakespeare
run="runs/main-$(date +%Y%m%d-%H%M%S)"
model=(--model gpt --n-layer 2 --d-model 128 --n-head 4 --block-size 64 --batch-size 32 --dropout 0)
stage "training: the last line holds the validation loss at the end"
$revbits train "${model[@]}" --memory bdia --steps 1000 --warmup 20 --lr 3e-3 --eval-interval 250 --out "$run" "$@"
stage "a sample from $run"
$revbits sample "$run" --prompt "ROMEO:" --tokens 400
stage "memory of one training step of the same GPT, 12 layers deep (BDIA's saving grows with depth)"
$revbits memory "${model[@]}" --n-layer 12
stage "done"
