#!/usr/bin/env bash
# Refreshes constraints.txt: installs the newest releases into a new virtual environment, runs the test
# suite there, and only if it passes writes the installed versions to constraints.txt (review the diff,
# then commit it). Usage: bash tools/refresh_constraints.sh [pytest args, e.g. -x]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=$(mktemp -d)/venv
${PYTHON:-python3} -m venv "$VENV"
PYTHON=$VENV/bin/python MEGAPHI_CONSTRAINTS=none bash tools/install.sh
PYTHON=$VENV/bin/python bash tools/test.sh "$@"
tmp=constraints.txt.tmp
{
  echo "# Versions the test suite passed with on a fresh machine (Python 3.11, CPU). tools/install.sh installs"
  echo "# under these constraints; torch is pinned there separately (MEGAPHI_TORCH_SPEC). Refresh: bash tools/refresh_constraints.sh"
  "$VENV/bin/python" -m pip freeze --all --exclude-editable --disable-pip-version-check |
    grep -vE '^(pip|torch|triton|nvidia-[a-z0-9-]+)==' | grep -v '^megaphi'
} > "$tmp"
mv "$tmp" constraints.txt
echo "constraints.txt refreshed from $VENV (tests passed); review with: git diff constraints.txt"
