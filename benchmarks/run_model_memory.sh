#!/usr/bin/env bash
# Measured memory of one training step of the training command's models under every memory mode
# (docs/benchmarks.md, Mesa section). Needs the data sets: revbits data fetch fashion-mnist shakespeare.
# Memory does not depend on machine load; about 2 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
out=benchmarks/results/model_memory
mkdir -p "$out"
for model in vit gpt; do  # the options: benchmarks/configs/model-memory-<model>.toml
    .venv/bin/revbits memory --config "benchmarks/configs/model-memory-$model.toml" \
        --json "$out/$model.json" | tee "$out/$model.txt"
done
