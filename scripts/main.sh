#!/usr/bin/env bash
# Set up .venv (scripts/setup.sh), then run the main job: measure one training step of GPT-style
# block stacks under standard, checkpoint and BDIA memory modes and print the table.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/revbits bench "$@"
