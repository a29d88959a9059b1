#!/usr/bin/env bash
# The real-shape memory grid (benchmarks/real_shapes.py), most important points first, one process at a
# time. Bytes only (LiveBytes counts do not depend on the machine's load). Resumable: a rerun skips the
# points benchmarks/results/real_shapes.json already holds, so it can be stopped and started again.
#   OMP_NUM_THREADS=1 bash benchmarks/run_real_shapes.sh [--idle no] 2>&1 | tee -a benchmarks/results/real_shapes.log
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src"
PY=${PYTHON:-.venv/bin/python}
FUSED=(gc gc+fused gc+offload+fused checkpoint+fused bdia+fused)
# 1. The headline: Qwen3-0.6B LoRA, batch 1, up to T = 4096.
$PY benchmarks/real_shapes.py --runs qwen3-0.6b:lora --batches 1 --lengths 256 1024 2048 4096 --modes "${FUSED[@]}" "$@"
# 2. Llama-3.2-1B LoRA, batch 1.
$PY benchmarks/real_shapes.py --runs llama-3.2-1b:lora --batches 1 --lengths 256 1024 2048 --modes "${FUSED[@]}" "$@"
# 3. Full fine-tuning of the 0.6B with AdamW, batch 1.
$PY benchmarks/real_shapes.py --runs qwen3-0.6b:full --batches 1 --lengths 256 512 1024 --modes "${FUSED[@]}" "$@"
# 4. Batch 4, Qwen3-0.6B LoRA.
$PY benchmarks/real_shapes.py --runs qwen3-0.6b:lora --batches 4 --lengths 256 512 1024 --modes "${FUSED[@]}" "$@"
# 5. The other modes where they fit, and the longer lengths of the runs above.
$PY benchmarks/real_shapes.py --runs qwen3-0.6b:lora --batches 1 --lengths 256 1024 2048 4096 \
    --modes transformers gc+offload bdia+mesa+fused bdia mesa+fused "$@"
$PY benchmarks/real_shapes.py --runs llama-3.2-1b:lora --batches 1 --lengths 4096 --modes "${FUSED[@]}" "$@"
$PY benchmarks/real_shapes.py --runs qwen3-0.6b:full --batches 1 --lengths 2048 4096 --modes "${FUSED[@]}" "$@"
$PY benchmarks/real_shapes.py --runs qwen3-0.6b:lora llama-3.2-1b:lora --batches 4 --lengths 256 512 1024 2048 4096 \
    --modes "${FUSED[@]}" "$@"
