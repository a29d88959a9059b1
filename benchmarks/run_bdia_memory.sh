#!/usr/bin/env bash
# Both runs behind docs/benchmarks.md: glibc's default allocator, and glibc told to keep freed
# memory (as PyTorch's CUDA caching allocator does), which removes page-fault time from CPU timings.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python benchmarks/bdia_memory.py --out benchmarks/results/bdia_memory "$@"
MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736 \
    .venv/bin/python benchmarks/bdia_memory.py --out benchmarks/results/bdia_memory_retain "$@"
