#!/usr/bin/env bash
# Verifies megaphi on a GPU machine in one command and writes a report:
#
#   bash tools/gpu_check.sh OUT_DIR [--wheels DIR] [--smoke]
#
# Steps, each under its own `timeout`, each recorded (passed / failed / skipped and why); a failing
# step never stops the next one:
#   env         Python, torch, CUDA, GPU, nvcc, driver                  (tools/gpu_report.py env)
#   install     deepspeed and whatever else is missing, from a folder of wheels, no network
#               (pip --no-index --find-links DIR --prefix WORK/prefix; nothing is written into the
#               machine's Python; tools/prepare_gpu_wheels.sh makes the folder)
#   build       megaphi._C and the CUDA kernels for this GPU's arch (setup.py build_ext --inplace)
#   tests_cuda  pytest -m cuda
#   kernels     benchmarks/kernels.py: LayerNorm/rotary GB/s against the device copy bandwidth
#   train_*     phi-1-small and phi-1 in bf16, a few steps of python -m megaphi.pretrain --mock-data:
#               tokens/s, TFLOP/s, MFU, peak memory, loss falling, backends chosen (fp16 runs come last)
#   bench_*     benchmarks/train.py, phi-1-small and phi-1, bf16, chunked loss: eager at each micro batch
#               of a short list until one runs out of memory, then compiled at the fastest that fit
#               (ms/step, tokens/s, TFLOP/s, MFU, peak memory, host syncs per step; logs/NAME.json)
#   train_cpu_tiny, bench_cpu_tiny (no GPU or --smoke only) the tiny preset on CPU
# Report: OUT_DIR/report.md (tables) and OUT_DIR/report.json; per-step logs in OUT_DIR/logs/.
# Without a GPU (or with --smoke) the GPU steps are skipped with the reason and the CPU steps run.
# Exit status: 0 when no step failed (and at least one ran).
#
# Environment: PYTHON (python3), GPU_CHECK_WHEELS (the wheels folder; default: .whl/ or wheels/ in the
# repo when present), GPU_CHECK_BUDGET (seconds for everything, default 570: each step's timeout is
# cut to what is left), GPU_CHECK_SKIP (comma-separated steps to skip), GPU_CHECK_MICRO_BATCH (8),
# GPU_CHECK_TRAIN_ITERS (10), GPU_CHECK_WORK (scratch folder; default a temporary one, removed at exit).
# Steps run in the order above (fp16 training last); GPU_CHECK_SKIP makes room in a short budget.
set -uo pipefail  # no -e: a failed step is recorded and the check goes on

usage() { echo "usage: bash tools/gpu_check.sh OUT_DIR [--wheels DIR] [--smoke]" >&2; exit 2; }
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT="" WHEELS=${GPU_CHECK_WHEELS:-} SMOKE=0
while (($#)); do
  case "$1" in
    --wheels) (($# >= 2)) || usage; WHEELS=$2; shift 2 ;;
    --wheels=*) WHEELS=${1#--wheels=}; shift ;;
    --smoke) SMOKE=1; shift ;;
    -h|--help) sed -n '2,29p' "${BASH_SOURCE[0]}"; exit 0 ;;
    -*) echo "gpu_check.sh: unknown option $1" >&2; usage ;;
    *) [ -z "$OUT" ] || usage; OUT=$1; shift ;;
  esac
done
[ -n "$OUT" ] || usage
if [ -z "$WHEELS" ]; then
  for d in "$REPO/.whl" "$REPO/wheels"; do [ -d "$d" ] && { WHEELS=$d; break; }; done
fi
if [ -n "$WHEELS" ]; then
  [ -d "$WHEELS" ] || { echo "gpu_check.sh: --wheels $WHEELS is not a folder" >&2; exit 2; }
  WHEELS=$(cd "$WHEELS" && pwd)
fi

mkdir -p "$OUT/logs" || exit 2
OUT=$(cd "$OUT" && pwd)
LOGS=$OUT/logs
rm -rf "$LOGS"/* "$OUT/report.md" "$OUT/report.json"  # a rerun into the same folder starts clean
cd "$REPO"
export PY=${PYTHON:-python3} LOGS REPO
export PYTHONUNBUFFERED=1 PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
BUDGET=${GPU_CHECK_BUDGET:-570}
RESERVE=20   # seconds kept for the report
MIN_STEP=20  # a step is not started with less than this left
WORK=${GPU_CHECK_WORK:-}
if [ -z "$WORK" ]; then
  WORK=$(mktemp -d "${TMPDIR:-/tmp}/megaphi-gpu-check.XXXXXX") || exit 2
  trap 'rm -rf "$WORK"' EXIT
fi
mkdir -p "$WORK"

# --- recording -------------------------------------------------------------------------------------
record() {  # NAME STATUS RC SECONDS TIMEOUT REASON
  printf 'status=%s\nrc=%s\nseconds=%s\ntimeout=%s\n' "$2" "$3" "$4" "$5" >"$LOGS/$1.status"
  printf '%s\n' "$6" >"$LOGS/$1.reason"
  printf '[gpu_check] %-22s %-7s %4ss  %s\n' "$1" "$2" "$4" "$6"
}
skipped_by_env() { [[ ",${GPU_CHECK_SKIP:-}," == *",$1,"* ]]; }
skip() { echo "$1" >>"$LOGS/steps.order"; record "$1" skipped "" 0 "" "$2"; }
last_line() { grep -v '^[[:space:]]*$' "$1" 2>/dev/null | tail -n 1 | cut -c1-400; }
run_step() {  # NAME CAP_SECONDS COMMAND...: run under timeout, log to logs/NAME.log, record the outcome
  local name=$1 cap=$2; shift 2
  if skipped_by_env "$name"; then skip "$name" "GPU_CHECK_SKIP names it"; return 1; fi
  echo "$name" >>"$LOGS/steps.order"
  local left=$((BUDGET - SECONDS - RESERVE))
  if ((left < MIN_STEP)); then
    record "$name" skipped "" 0 "" "the time budget is spent (GPU_CHECK_BUDGET=${BUDGET}s)"; return 1
  fi
  local limit=$((cap < left ? cap : left)) start=$SECONDS rc
  timeout --kill-after=10 "$limit" "$@" >"$LOGS/$name.log" 2>&1 </dev/null
  rc=$?
  if ((rc == 0)); then
    record "$name" passed 0 $((SECONDS - start)) "$limit" ""
  elif ((rc == 124 || rc == 137)); then
    record "$name" failed "$rc" $((SECONDS - start)) "$limit" \
      "timed out after ${limit}s; last output: $(last_line "$LOGS/$name.log")"
  else
    record "$name" failed "$rc" $((SECONDS - start)) "$limit" "exit code $rc: $(last_line "$LOGS/$name.log")"
  fi
  return "$rc"
}

# --- steps -------------------------------------------------------------------------------------------
install_from_wheels() {  # WHEELS PREFIX
  local pin ds
  ds=$(ls "$1"/deepspeed-*.whl 2>/dev/null | head -n 1)
  pin=deepspeed; [ -n "$ds" ] && pin="deepspeed==$(basename "$ds" | cut -d- -f2)"
  echo "installing missing packages from $1 into $2 (pip --no-index; what is installed already is kept)"
  "$PY" -m pip install --no-index --find-links "$1" --prefix "$2" --no-warn-script-location \
    --disable-pip-version-check "$pin" numpy tokenizers safetensors tqdm pytest setuptools pybind11 || return 1
  add_to_path "$2"
  "$PY" -c "import deepspeed, hjson, pydantic, numpy, tokenizers, safetensors, pytest
print('deepspeed', deepspeed.__version__, 'importable')"
}
add_to_path() {  # PREFIX: its site-packages folders go first on PYTHONPATH
  local site
  for site in $(find "$1" -type d -name site-packages 2>/dev/null); do export PYTHONPATH="$site:$PYTHONPATH"; done
}
missing_packages() {
  "$PY" - <<'EOF' 2>/dev/null || echo "python"
import importlib.util
names = ["torch", "deepspeed", "hjson", "pydantic", "numpy", "tokenizers", "safetensors", "tqdm", "pytest"]
print(" ".join(n for n in names if importlib.util.find_spec(n) is None))
EOF
}
build_kernels() {  # ARCH
  echo "MEGAPHI_CUDA_ARCHS=$1"
  MEGAPHI_CUDA_ARCHS=$1 MEGAPHI_NVCC_THREADS=${MEGAPHI_NVCC_THREADS:-4} "$PY" setup.py build_ext --inplace || return 1
  "$PY" -m megaphi.ops
  "$PY" - <<'EOF'
import sys, torch
from megaphi.ops import _backend
reason = _backend.cuda_unavailable_reason()
if reason is None:
    print(f"megaphi kernels: usable on {torch.cuda.get_device_name()}")
else:
    print(f"megaphi kernels: NOT usable: {reason}")
    sys.exit(1)
EOF
}
train() {  # LOG_DIR PRETRAIN_FLAGS...: a short --mock-data run, then its loss must have fallen
  local dir=$1; shift
  "$PY" -m megaphi.pretrain --mock-data --log-interval 1 --eval-iters 1 --log-dir "$dir" "$@" || return 1
  "$PY" tools/gpu_report.py check-train "$dir"
}
export -f install_from_wheels add_to_path build_kernels train

run_step env 90 "$PY" tools/gpu_report.py env "$LOGS/env.json"
fact() {  # KEY: a value from logs/env.json
  "$PY" -c "import json,sys; print(json.load(open(sys.argv[1])).get(sys.argv[2]) or '')" "$LOGS/env.json" "$1" 2>/dev/null
}
HAS_GPU=$(fact cuda_available)
ARCH=$(fact arch)
if ((SMOKE)); then
  MODE=smoke; NO_GPU="--smoke: the GPU steps are not run"
elif [ ! -s "$LOGS/env.json" ]; then
  MODE=unknown; NO_GPU="the env step did not say whether there is a GPU (logs/env.log)"
elif [ "$HAS_GPU" = "True" ]; then
  MODE=gpu; NO_GPU=""
else
  CUDA_BUILD=$(fact torch_cuda)
  MODE=cpu; NO_GPU="no CUDA GPU: torch $(fact torch) (CUDA build: ${CUDA_BUILD:-none}) sees none"
fi
echo "$MODE" >"$LOGS/mode"
echo "[gpu_check] mode $MODE; report in $OUT; wheels: ${WHEELS:-none}; budget ${BUDGET}s"

# install
MISSING=$(missing_packages)
if [ -n "$WHEELS" ]; then
  run_step install 180 bash -c 'install_from_wheels "$1" "$2"' _ "$WHEELS" "$WORK/prefix"
  add_to_path "$WORK/prefix"
elif [ -z "$MISSING" ]; then
  skip install "everything needed is importable already (deepspeed $(fact deepspeed)); no wheels folder used"
else
  echo install >>"$LOGS/steps.order"
  record install failed "" 0 "" \
    "missing: $MISSING; give the wheels folder (--wheels DIR, made by tools/prepare_gpu_wheels.sh)"
fi

# build, tests, kernel benchmark
if [ -n "$NO_GPU" ]; then
  skip build "$NO_GPU (the CUDA kernels are built for the GPU's arch only)"
  skip tests_cuda "$NO_GPU"
  skip kernels "$NO_GPU"
else
  run_step build 300 bash -c 'build_kernels "$1"' _ "$ARCH"
  CUDA_TESTS=$(grep -l 'mark\.cuda' tests/test_*.py 2>/dev/null | tr '\n' ' ')
  if [ -z "$CUDA_TESTS" ]; then
    skip tests_cuda "no test file has a cuda mark"
  else
    # shellcheck disable=SC2086
    run_step tests_cuda 240 "$PY" -m pytest -m cuda -q -p no:cacheprovider --junitxml="$LOGS/pytest_cuda.xml" \
      $CUDA_TESTS
  fi
  run_step kernels 150 "$PY" benchmarks/kernels.py --no-compile --iters 20 --warmup 5 --json "$LOGS/kernels.json"
fi

# training, then the step benchmark, then the fp16 training runs
MB=${GPU_CHECK_MICRO_BATCH:-8}
ITERS=${GPU_CHECK_TRAIN_ITERS:-10}
WARMUP=$((ITERS >= 6 ? 3 : 0))
train_runs() {  # MODEL:PRECISION:CAP...
  local run model precision cap name
  for run in "$@"; do
    IFS=: read -r model precision cap <<<"$run"
    name=train_${model}_${precision}
    if [ -n "$NO_GPU" ]; then skip "$name" "$NO_GPU"; continue; fi
    run_step "$name" "$cap" bash -c 'train "$@"' _ "$LOGS/$name" --model "$model" "--$precision" --seq-length 2048 \
      --micro-batch-size "$MB" --train-iters "$ITERS" --eval-interval "$ITERS" --lr 1e-3 --lr-warmup-iters "$WARMUP" \
      --lr-decay-style constant
  done
}
train_runs phi-1-small:bf16:150 phi-1:bf16:240
for run in phi-1-small:16,32:200 phi-1:8,16:240; do
  IFS=: read -r model micro_batches cap <<<"$run"
  name=bench_$model
  if [ -n "$NO_GPU" ]; then skip "$name" "$NO_GPU"; continue; fi
  run_step "$name" "$cap" "$PY" benchmarks/train.py --model "$model" --bf16 --seq-length 2048 \
    --grid "compile=off,on recompute=none loss_chunk=4096 micro_batch=$micro_batches" --find-max-micro-batch \
    --warmup 3 --steps 5 --json "$LOGS/$name.json" --logs "$LOGS/$name"
done
train_runs phi-1-small:fp16:150 phi-1:fp16:240
if [ -n "$NO_GPU" ]; then
  run_step train_cpu_tiny 180 env CUDA_VISIBLE_DEVICES= bash -c 'train "$@"' _ "$LOGS/train_cpu_tiny" --model tiny \
    --seq-length 64 --micro-batch-size 4 --train-iters 8 --eval-interval 8 --lr 3e-3 --lr-warmup-iters 2 \
    --lr-decay-style constant
  run_step bench_cpu_tiny 150 env CUDA_VISIBLE_DEVICES= "$PY" benchmarks/train.py --model tiny --seq-length 64 \
    --threads 1 --grid "loss_chunk=0,64" --warmup 1 --steps 2 --json "$LOGS/bench_cpu_tiny.json"
fi

# report (the environment read again: the install step may have added deepspeed)
timeout 60 "$PY" tools/gpu_report.py env "$LOGS/env.json.new" >/dev/null 2>&1 &&
  mv "$LOGS/env.json.new" "$LOGS/env.json"
if ! timeout 60 "$PY" tools/gpu_report.py report "$OUT"; then
  printf '# megaphi GPU check\n\nThe report helper failed; the step logs are in logs/.\n' >"$OUT/report.md"
  exit 1
fi
if grep -qx 'status=failed' "$LOGS"/*.status 2>/dev/null; then exit 1; fi
if ! grep -qx 'status=passed' "$LOGS"/*.status 2>/dev/null; then echo "[gpu_check] no step ran" >&2; exit 1; fi
exit 0
