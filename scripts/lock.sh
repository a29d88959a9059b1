#!/usr/bin/env bash
# Rewrite constraints.txt from a fresh environment with the newest releases that install here.
# Review the diff, run the tests, and commit it as a deliberate upgrade.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .venv-lock
REVBITS_VENV=.venv-lock REVBITS_UNPINNED=1 bash scripts/setup.sh
{
    echo "# Every version CI installs (scripts/setup.sh passes this file to pip with -c)."
    echo "# Regenerate after a deliberate upgrade: bash scripts/lock.sh. Test against the newest releases: bash scripts/test-latest.sh"
    .venv-lock/bin/python -m pip freeze --exclude-editable | grep -v '^-e ' | sed -E 's/^(torch==[0-9.]+)\+.*/\1/'
} > constraints.txt
rm -rf .venv-lock
