#!/usr/bin/env bash
# The real-shape memory grid (benchmarks/real_shapes.py), most important points first, one process at a
# time. Bytes only (LiveBytes counts do not depend on the machine's load). Resumable: every invocation
# skips the points benchmarks/results/real_shapes.json already holds, so the script can be stopped and
# started again, and each line only costs the points it still lacks.
#   OMP_NUM_THREADS=1 bash benchmarks/run_real_shapes.sh --idle no 2>&1 | tee -a benchmarks/results/real_shapes.log
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src"
PY=${PYTHON:-.venv/bin/python}
run() { $PY benchmarks/real_shapes.py "$@" || echo "real_shapes.py failed: $*"; }  # the next one still runs
QWEN=(--runs qwen3-0.6b:lora --batches 1)
# 1. The headline: Qwen3-0.6B LoRA, batch 1, bdia against offloaded checkpointing at 2048 and 4096, then the anchors.
run "${QWEN[@]}" --lengths 256 2048 --modes bdia+fused gc+offload+fused "$@"
run "${QWEN[@]}" --lengths 4096 --modes bdia+fused gc+offload+fused "$@"
run "${QWEN[@]}" --lengths 2048 --modes gc+fused gc "$@"
# 2. Llama-3.2-1B LoRA, batch 1.
run --runs llama-3.2-1b:lora --batches 1 --lengths 256 1024 --modes bdia+fused gc+offload+fused gc+fused gc "$@"
# 3. Full fine-tuning of the 0.6B with AdamW, batch 1.
run --runs qwen3-0.6b:full --batches 1 --lengths 256 512 --modes bdia+fused gc+fused gc gc+offload+fused "$@"
# 4. Batch 4, Qwen3-0.6B LoRA.
run --runs qwen3-0.6b:lora --batches 4 --lengths 256 512 --modes bdia+fused gc+offload+fused gc+fused gc "$@"
# 5. The rest of the grid: longer lengths, the other modes where they fit.
FUSED=(gc gc+fused gc+offload+fused checkpoint+fused bdia+fused)
run "${QWEN[@]}" --lengths 256 1024 2048 4096 --modes "${FUSED[@]}" "$@"
run --runs llama-3.2-1b:lora --batches 1 --lengths 256 1024 2048 4096 --modes "${FUSED[@]}" "$@"
run --runs qwen3-0.6b:full --batches 1 --lengths 256 512 1024 2048 4096 --modes "${FUSED[@]}" "$@"
run --runs qwen3-0.6b:lora llama-3.2-1b:lora --batches 4 --lengths 256 512 1024 2048 4096 --modes "${FUSED[@]}" "$@"
run "${QWEN[@]}" --lengths 256 1024 2048 4096 --modes transformers gc+offload bdia+mesa+fused bdia mesa+fused "$@"
