#!/usr/bin/env bash
# Makes the folder of wheels that tools/gpu_check.sh installs from on a GPU machine without network.
# Run it on a machine with registry access and torch installed (deepspeed's build imports torch):
#
#   bash tools/prepare_gpu_wheels.sh [DIR]          # default DIR: .whl (git-ignored)
#
# It holds only what the GPU machine's image lacks: deepspeed as a pure-Python wheel with no ops
# prebuilt (DS_BUILD_OPS=0; megaphi needs none of its JIT ops), and those of deepspeed's requirements
# that the image does not have (hjson, pydantic and pydantic's own: pydantic-core, annotated-types,
# typing-inspection, and typing-extensions, 45 kB, installed only if the image's is older than pydantic
# needs), as binary wheels for the image's Python (CPython 3.12, manylinux x86-64). The image brings
# torch, triton, numpy, tokenizers, safetensors, tqdm, einops, msgpack, ninja, packaging, psutil,
# py-cpuinfo, pytest, pybind11 and setuptools. 7 wheels, about 5 MB.
#
# Environment: PYTHON (python3; builds the deepspeed wheel), GPU_PYTHON_VERSION (3.12: the GPU machine's
# Python), DEEPSPEED_VERSION (0.19.8: inside the range pyproject.toml pins), GPU_WHEELS (the requirements to
# download, "hjson pydantic>=2,<3"), GPU_IMAGE_HAS (distributions not to carry although a requirement
# pulls them in, e.g. "typing_extensions"; none by default).
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-.whl}
PY=${PYTHON:-python3}
PYVER=${GPU_PYTHON_VERSION:-3.12}
DS_VERSION=${DEEPSPEED_VERSION:-0.19.8}
REQS=${GPU_WHEELS:-hjson pydantic>=2,<3}
IMAGE_HAS=${GPU_IMAGE_HAS:-}
mkdir -p "$DIR"
rm -f "$DIR"/*.whl  # exactly one version of each: two would stop the install

echo "deepspeed $DS_VERSION (pure Python, no prebuilt ops) -> $DIR"
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --disable-pip-version-check --no-deps --no-build-isolation -w "$DIR" \
  "deepspeed==$DS_VERSION"

echo "$REQS and what they need, for CPython $PYVER, manylinux x86-64 -> $DIR"
# shellcheck disable=SC2086
"$PY" -m pip download -q --disable-pip-version-check --only-binary=:all: --python-version "$PYVER" \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d "$DIR" $REQS
for name in $IMAGE_HAS; do rm -f "$DIR/$name"-*.whl; done

if ls "$DIR" | grep -Eiq '^(torch|nvidia|triton)[-_]'; then
  echo "prepare_gpu_wheels.sh: $DIR holds torch/nvidia/triton wheels; remove them: the GPU machine has its own" >&2
  exit 1
fi
echo "$(ls "$DIR"/*.whl | wc -l) wheels, $(du -sh "$DIR" | cut -f1) in $DIR: $(cd "$DIR" && ls *.whl | tr '\n' ' ')"
echo "on the GPU machine: bash tools/gpu_check.sh OUT_DIR --wheels $DIR"
