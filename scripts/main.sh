#!/usr/bin/env bash
# The main job, from a fresh clone: set up .venv, fetch the Shakespeare data set, train a small
# BDIA-GPT on it (a few minutes on 2 CPU cores), print its validation loss and a sample, then
# measure one training step of the same model under standard, checkpoint and BDIA memory.
# Extra arguments go to `revbits train` (for example --steps 2000 or --device cuda).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
revbits=.venv/bin/revbits
$revbits data fetch shakespeare
run="runs/main-$(date +%Y%m%d-%H%M%S)"
model=(--model gpt --n-layer 6 --d-model 128 --n-head 4 --block-size 256 --batch-size 16)
$revbits train "${model[@]}" --memory bdia --steps 400 --warmup 50 --eval-interval 100 --out "$run" "$@"
echo
echo "== a sample from $run =="
$revbits sample "$run" --prompt "ROMEO:" --tokens 400
echo
$revbits memory "${model[@]}"
