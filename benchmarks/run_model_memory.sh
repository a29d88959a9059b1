#!/usr/bin/env bash
# Measured memory of one training step of the training command's models under every memory mode
# (docs/benchmarks.md, Mesa section). Needs the data sets: revbits data fetch fashion-mnist shakespeare.
# Memory does not depend on machine load; about 2 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
out=benchmarks/results/model_memory
mkdir -p "$out"
.venv/bin/revbits memory --model vit --n-layer 6 --d-model 128 --patch-size 4 --batch-size 128 \
    --json "$out/vit.json" | tee "$out/vit.txt"
.venv/bin/revbits memory --model gpt --n-layer 6 --d-model 128 --block-size 256 --batch-size 32 \
    --json "$out/gpt.json" | tee "$out/gpt.txt"
