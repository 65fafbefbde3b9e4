#!/usr/bin/env bash
# Makes the folder of wheels that tools/gpu_check.sh installs from on a GPU machine without network.
# Run it on a machine with registry access and torch installed (deepspeed's build imports torch):
#
#   bash tools/prepare_gpu_wheels.sh [DIR]          # default DIR: .whl (git-ignored)
#
# It holds: deepspeed as a pure-Python wheel with no ops prebuilt (DS_BUILD_OPS=0; megaphi needs none
# of its JIT ops), deepspeed's needs except torch (the GPU machine has its own CUDA build of torch), and
# what megaphi needs to build, train and test, as binary wheels for the GPU machine's Python
# (manylinux x86-64). gpu_check.sh installs from it only what that machine lacks. About 35 MB.
#
# Environment: PYTHON (python3; builds the deepspeed wheel), GPU_PYTHON_VERSION (3.12: the GPU machine's
# Python), DEEPSPEED_VERSION (0.19.8), GPU_WHEELS_EXTRA (more requirement specs, space-separated).
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-.whl}
PY=${PYTHON:-python3}
PYVER=${GPU_PYTHON_VERSION:-3.12}
DS_VERSION=${DEEPSPEED_VERSION:-0.19.8}
mkdir -p "$DIR"
rm -f "$DIR"/deepspeed-*.whl  # one deepspeed only: gpu_check.sh pins the version it finds here

echo "deepspeed $DS_VERSION (pure Python, no prebuilt ops) -> $DIR"
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --disable-pip-version-check --no-deps --no-build-isolation -w "$DIR" \
  "deepspeed==$DS_VERSION"

# deepspeed's requirements without torch; megaphi's (numpy tokenizers safetensors tqdm); building the
# extensions (setuptools pybind11); the tests (pytest). Their own dependencies come along.
REQS="einops hjson msgpack ninja numpy packaging psutil py-cpuinfo pydantic>=2 tqdm
      tokenizers safetensors setuptools wheel pybind11 pytest ${GPU_WHEELS_EXTRA:-}"
echo "dependencies for CPython $PYVER, manylinux x86-64 -> $DIR"
# shellcheck disable=SC2086
"$PY" -m pip download -q --disable-pip-version-check --only-binary=:all: --python-version "$PYVER" \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d "$DIR" $REQS

if ls "$DIR" | grep -Eiq '^(torch|nvidia|triton)[-_]'; then
  echo "prepare_gpu_wheels.sh: $DIR holds torch/nvidia/triton wheels; remove them: the GPU machine has its own" >&2
  exit 1
fi
echo "$(ls "$DIR"/*.whl | wc -l) wheels, $(du -sh "$DIR" | cut -f1) in $DIR"
echo "on the GPU machine: bash tools/gpu_check.sh OUT_DIR --wheels $DIR"
