#!/usr/bin/env bash
# Verifies megaphi on a GPU machine in one command, inside a time budget, and leaves two files:
#
#   bash tools/gpu_check.sh OUT_DIR [--wheels DIR] [--smoke] [--plan]
#
#   OUT_DIR/report.md            the report (tables; also refreshed after every step, so a check killed
#                                from outside still leaves the steps done so far)
#   OUT_DIR/gpu_check.tar.gz     everything: gpu_check/report.md, report.json, logs/ (one log per step)
#
# Steps run most valuable first; each runs under `timeout` with a cap, cut to what is left of
# GPU_CHECK_BUDGET (450 s). A step that no longer fits, or that the budget stops, is "not run: budget"
# (not a failure; env always runs); a failing step never stops the next one. --plan prints the GPU plan.
#   core (their caps fit the budget together):
#     env          Python, torch, GPU (nvidia-smi and torch), nvcc, deepspeed   (tools/gpu_report.py env)
#     install      what the machine lacks (deepspeed, hjson, pydantic), from a folder of wheels, no network,
#                  into a scratch prefix (tools/prepare_gpu_wheels.sh makes the folder)
#     build        megaphi._C and the CUDA kernels for this GPU's arch
#     bench_phi-1  benchmarks/train.py, phi-1 bf16: eager at micro batch 8, 16 until one runs out of
#                  memory, then compiled at the fastest that fit (eager vs compiled step)
#     train_phi-1_bf16, train_phi-1_fp16   python -m megaphi.pretrain --mock-data at that micro batch:
#                  tokens/s, TFLOP/s, MFU, peak memory, loss falling, backends
#     kernels      benchmarks/kernels.py: LayerNorm/rotary GB/s against the device copy bandwidth
#   long tails (with what is left): tests_cuda (the kernel tests), bench_phi-1-small, train_phi-1-small_bf16,
#     train_phi-1-small_fp16, tests_compile_cuda (compiled == eager on the GPU)
#   without a GPU, or with --smoke: train_cpu_tiny, bench_cpu_tiny (the tiny preset on CPU)
# Without torch the check says "torch missing: this check uses the image's CUDA torch" (it never brings
# its own torch). A torch other than the one CI tests is flagged in the report and the version-sensitive
# results (compiled rows, compile tests) are marked provisional.
# Exit status: 0 when no step failed (and at least one ran).
#
# Environment: PYTHON (python3), GPU_CHECK_WHEELS (wheels folder; default .whl/ or wheels/ in the repo),
# GPU_CHECK_BUDGET (450), GPU_CHECK_SKIP (comma-separated steps), GPU_CHECK_MICRO_BATCH (8: the training
# runs' micro batch when the benchmark found none), GPU_CHECK_TRAIN_ITERS (10), GPU_CHECK_CPU_THREADS (1:
# OMP_NUM_THREADS of the CPU steps), GPU_CHECK_WORK (scratch folder; default a temporary one, removed at
# exit). JIT-built extensions go to a private TORCH_EXTENSIONS_DIR inside the scratch folder.
set -uo pipefail  # no -e: a failed step is recorded and the check goes on

usage() { echo "usage: bash tools/gpu_check.sh OUT_DIR [--wheels DIR] [--smoke] [--plan]" >&2; exit 2; }
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT="" WHEELS=${GPU_CHECK_WHEELS:-} SMOKE=0 PLAN=0
while (($#)); do
  case "$1" in
    --wheels) (($# >= 2)) || usage; WHEELS=$2; shift 2 ;;
    --wheels=*) WHEELS=${1#--wheels=}; shift ;;
    --smoke) SMOKE=1; shift ;;
    --plan) PLAN=1; shift ;;
    -h|--help) sed -n '2,37p' "${BASH_SOURCE[0]}"; exit 0 ;;
    -*) echo "gpu_check.sh: unknown option $1" >&2; usage ;;
    *) [ -z "$OUT" ] || usage; OUT=$1; shift ;;
  esac
done

BUDGET=${GPU_CHECK_BUDGET:-450}
RESERVE=15   # seconds kept for the report and the archive
MIN_STEP=20  # a step is not started with less than this left
# NAME:CAP, in the order they run on a GPU; the core steps' caps add up to at most BUDGET - RESERVE
CORE_STEPS="env:30 install:45 build:110 bench_phi-1:120 train_phi-1_bf16:45 train_phi-1_fp16:45 kernels:40"
TAIL_STEPS="tests_cuda:120 bench_phi-1-small:90 train_phi-1-small_bf16:40 train_phi-1-small_fp16:40
            tests_compile_cuda:150"
CPU_STEPS="train_cpu_tiny:300 bench_cpu_tiny:120"  # the first builds DeepSpeed's CPU comm op (minutes under load)
cap_of() { local s; for s in $CORE_STEPS $TAIL_STEPS $CPU_STEPS; do [ "${s%%:*}" = "$1" ] && echo "${s#*:}"; done; }
if ((PLAN)); then
  echo "budget ${BUDGET}s (reserve ${RESERVE}s); core steps, then the tails with what is left:"
  for s in $CORE_STEPS; do echo "core ${s%%:*} ${s#*:}"; done
  for s in $TAIL_STEPS; do echo "tail ${s%%:*} ${s#*:}"; done
  exit 0
fi
[ -n "$OUT" ] || usage
if [ -z "$WHEELS" ]; then
  for d in "$REPO/.whl" "$REPO/wheels"; do [ -d "$d" ] && { WHEELS=$d; break; }; done
fi
if [ -n "$WHEELS" ]; then
  [ -d "$WHEELS" ] || { echo "gpu_check.sh: --wheels $WHEELS is not a folder" >&2; exit 2; }
  WHEELS=$(cd "$WHEELS" && pwd)
fi
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
rm -f "$OUT/report.md" "$OUT/gpu_check.tar.gz"
WORK=${GPU_CHECK_WORK:-}
if [ -z "$WORK" ]; then
  WORK=$(mktemp -d "${TMPDIR:-/tmp}/megaphi-gpu-check.XXXXXX") || exit 2
  trap 'rm -rf "$WORK"' EXIT
fi
mkdir -p "$WORK" && WORK=$(cd "$WORK" && pwd)
CHECK=$WORK/gpu_check  # what the archive holds
LOGS=$CHECK/logs
rm -rf "$CHECK" && mkdir -p "$LOGS" || exit 2
cd "$REPO"
export PY=${PYTHON:-python3} LOGS REPO
export PYTHONUNBUFFERED=1 PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
# JIT builds (DeepSpeed's CPU shm comm op) never touch the shared ~/.cache/torch_extensions: a step
# killed mid-build there leaves a lock that hangs every later DeepSpeed run on the machine.
export TORCH_EXTENSIONS_DIR=$WORK/torch_extensions
CPU_THREADS=${GPU_CHECK_CPU_THREADS:-1}

# --- recording -------------------------------------------------------------------------------------
publish() {  # report.md and the archive in OUT_DIR, each replaced whole
  timeout 60 "$PY" tools/gpu_report.py report "$CHECK" >/dev/null 2>&1 ||
    printf '# megaphi GPU check\n\nThe report helper failed; the step logs are in the archive.\n' >"$CHECK/report.md"
  cp "$CHECK/report.md" "$OUT/.report.md.tmp" && mv "$OUT/.report.md.tmp" "$OUT/report.md"
  tar czf "$OUT/.gpu_check.tar.gz.tmp" -C "$WORK" gpu_check && mv "$OUT/.gpu_check.tar.gz.tmp" "$OUT/gpu_check.tar.gz"
}
record() {  # NAME STATUS RC SECONDS TIMEOUT REASON
  printf 'status=%s\nrc=%s\nseconds=%s\ntimeout=%s\n' "$2" "$3" "$4" "$5" >"$LOGS/$1.status"
  printf '%s\n' "$6" >"$LOGS/$1.reason"
  printf '[gpu_check] %-22s %-7s %4ss  %s\n' "$1" "$2" "$4" "$6"
}
skip() { echo "$1" >>"$LOGS/steps.order"; record "$1" skipped "" 0 "" "$2"; }
last_line() { grep -v '^[[:space:]]*$' "$1" 2>/dev/null | tail -n 1 | cut -c1-400; }
run_step() {  # NAME COMMAND...: run under timeout (the step's cap, cut to the budget left), log to logs/NAME.log
  local name=$1 cap; shift
  cap=$(cap_of "$name")
  if [[ ",${GPU_CHECK_SKIP:-}," == *",$name,"* ]]; then skip "$name" "GPU_CHECK_SKIP names it"; return 1; fi
  echo "$name" >>"$LOGS/steps.order"
  local left=$((BUDGET - SECONDS - RESERVE))
  [ "$name" = env ] && left=$((left > cap ? left : cap))  # always run: it decides what else can run
  if ((left < MIN_STEP)); then
    record "$name" "not run" "" 0 "" "budget: ${left}s of GPU_CHECK_BUDGET=${BUDGET}s left, the step needs ${MIN_STEP}s"
    return 1
  fi
  local limit=$((cap < left ? cap : left)) start=$SECONDS rc
  timeout --kill-after=5 "$limit" "$@" >"$LOGS/$name.log" 2>&1 </dev/null
  rc=$?
  # a JIT build killed half-way leaves its lock, on which the next step would wait forever
  ((rc == 124 || rc == 137)) && find "$TORCH_EXTENSIONS_DIR" -name lock -type f -delete 2>/dev/null
  if ((rc == 0)); then
    record "$name" passed 0 $((SECONDS - start)) "$limit" ""
  elif ((rc == 124 || rc == 137)) && ((limit < cap)); then
    record "$name" "not run" "$rc" $((SECONDS - start)) "$limit" \
      "budget: stopped after ${limit}s when GPU_CHECK_BUDGET=${BUDGET}s ran out (cap ${cap}s); partial log kept"
  elif ((rc == 124 || rc == 137)); then
    record "$name" failed "$rc" $((SECONDS - start)) "$limit" \
      "timed out after ${limit}s; last output: $(last_line "$LOGS/$name.log")"
  else
    record "$name" failed "$rc" $((SECONDS - start)) "$limit" "exit code $rc: $(last_line "$LOGS/$name.log")"
  fi
  publish  # after every step that ran: a check stopped from outside still leaves its report
  return "$rc"
}

# --- what the steps run ------------------------------------------------------------------------------
install_from_wheels() {  # WHEELS PREFIX: the folder's wheels whose distribution is not installed, no resolver
  local dir=$1 prefix=$2 files
  # --no-deps and explicit files: pip's resolver would also re-check the image's own packages (torch's
  # pins), which a machine without network cannot satisfy; the folder holds exactly the missing ones.
  files=$("$PY" -c "import os, sys
from importlib import metadata
for name in sorted(os.listdir(sys.argv[1])):
    if name.endswith('.whl'):
        try:
            metadata.version(name.split('-')[0])
        except metadata.PackageNotFoundError:
            print(os.path.join(sys.argv[1], name))" "$dir") || return 1
  [ -n "$files" ] || { echo "$dir holds nothing that is missing here"; return 1; }
  echo "installing into $prefix (pip --no-index --no-deps; installed distributions are kept):" $files
  # shellcheck disable=SC2086
  "$PY" -m pip install --no-index --no-deps --prefix "$prefix" --no-warn-script-location \
    --disable-pip-version-check $files || return 1
  add_to_path "$prefix"
  "$PY" -c "import deepspeed, hjson, pydantic; print('deepspeed', deepspeed.__version__, 'importable')"
}
add_to_path() {  # PREFIX: its site-packages folders go first on PYTHONPATH
  local site
  for site in $(find "$1" -type d -name site-packages 2>/dev/null); do export PYTHONPATH="$site:$PYTHONPATH"; done
}
build_kernels() {  # ARCH
  echo "MEGAPHI_CUDA_ARCHS=$1"
  MEGAPHI_CUDA_ARCHS=$1 MEGAPHI_NVCC_THREADS=${MEGAPHI_NVCC_THREADS:-8} "$PY" setup.py build_ext --inplace || return 1
  "$PY" -m megaphi.ops
  "$PY" -c "import sys, torch
from megaphi.ops import _backend
reason = _backend.cuda_unavailable_reason()
print(f'megaphi kernels: usable on {torch.cuda.get_device_name()}' if reason is None else f'megaphi kernels: NOT usable: {reason}')
sys.exit(reason is not None)"
}
train() {  # LOG_DIR PRETRAIN_FLAGS...: a short --mock-data run, then its loss must have fallen
  local dir=$1; shift
  echo "OMP_NUM_THREADS=${OMP_NUM_THREADS:-unset} TORCH_EXTENSIONS_DIR=$TORCH_EXTENSIONS_DIR"
  "$PY" -m megaphi.pretrain --mock-data --log-interval 1 --eval-iters 1 --log-dir "$dir" "$@" || return 1
  "$PY" tools/gpu_report.py check-train "$dir"
}
export -f install_from_wheels add_to_path build_kernels train
fact() {  # KEY [FILE]: a value from logs/env.json (or FILE)
  "$PY" -c "import json,sys; v = json.load(open(sys.argv[1])).get(sys.argv[2]); print('' if v is None else v)" \
    "${2:-$LOGS/env.json}" "$1" 2>/dev/null
}

# --- env and mode ------------------------------------------------------------------------------------
run_step env "$PY" tools/gpu_report.py env "$LOGS/env.json"
SMI_GPU=$(fact nvidia_smi_gpu)
if ((SMOKE)); then
  MODE=smoke; NO_GPU="--smoke: the GPU steps are not run"
elif [ ! -s "$LOGS/env.json" ]; then
  MODE=unknown; NO_GPU="the env step did not say whether there is a GPU (logs/env.log)"
elif [ -n "$(fact torch_missing)" ]; then
  MODE=no-torch; NO_GPU="torch missing: this check uses the image's CUDA torch${SMI_GPU:+ (nvidia-smi sees $SMI_GPU)}"
elif [ "$(fact cuda_available)" = "True" ]; then
  MODE=gpu; NO_GPU=""
elif [ -n "$SMI_GPU" ]; then
  MODE=cpu; NO_GPU="torch $(fact torch) (CUDA build: $(fact torch_cuda)) cannot use the GPU nvidia-smi sees ($SMI_GPU)"
else
  MODE=cpu; NO_GPU="no CUDA GPU: nvidia-smi sees none, torch $(fact torch) (CUDA build: $(fact torch_cuda)) neither"
fi
echo "$MODE" >"$LOGS/mode"
echo "[gpu_check] mode $MODE; report in $OUT; wheels: ${WHEELS:-none}; budget ${BUDGET}s"

# --- install: only what is missing -------------------------------------------------------------------
MISSING=$("$PY" -c "import importlib.util as u
print(' '.join(n for n in ['deepspeed', 'hjson', 'pydantic', 'numpy', 'tokenizers', 'safetensors', 'tqdm',
                           'pytest', 'pybind11'] if u.find_spec(n) is None))" 2>/dev/null)
if [ "$MODE" = no-torch ]; then
  skip install "$NO_GPU"
elif [ -z "$MISSING" ]; then
  skip install "everything needed is importable already (deepspeed $(fact deepspeed))"
elif [ -n "$WHEELS" ]; then
  run_step install bash -c 'install_from_wheels "$@"' _ "$WHEELS" "$WORK/prefix"
  add_to_path "$WORK/prefix"
else
  echo install >>"$LOGS/steps.order"
  record install failed "" 0 "" "missing: $MISSING; give the wheels folder (--wheels DIR, made by tools/prepare_gpu_wheels.sh)"
fi

# --- GPU steps, most valuable first --------------------------------------------------------------------
ITERS=${GPU_CHECK_TRAIN_ITERS:-10}
WARMUP=$((ITERS >= 6 ? 3 : 0))
train_gpu() {  # MODEL PRECISION MICRO_BATCH
  run_step "train_$1_$2" bash -c 'train "$@"' _ "$LOGS/train_$1_$2" --model "$1" "--$2" --seq-length 2048 \
    --micro-batch-size "$3" --train-iters "$ITERS" --eval-interval "$ITERS" --lr 1e-3 --lr-warmup-iters "$WARMUP" \
    --lr-decay-style constant
}
bench_gpu() {  # MODEL MICRO_BATCHES: eager at each until one runs out of memory, then compiled at the fastest
  run_step "bench_$1" "$PY" benchmarks/train.py --model "$1" --bf16 --seq-length 2048 \
    --grid "compile=off,on recompute=none loss_chunk=4096 micro_batch=$2" --find-max-micro-batch \
    --warmup 2 --steps 4 --json "$LOGS/bench_$1.json" --logs "$LOGS/bench_$1"
}
best_micro_batch() {  # MODEL: the fastest micro batch its benchmark found, else GPU_CHECK_MICRO_BATCH
  local mb; mb=$(fact best_micro_batch "$LOGS/bench_$1.json")
  echo "${mb:-${GPU_CHECK_MICRO_BATCH:-8}}"
}
if [ -z "$NO_GPU" ]; then
  run_step build bash -c 'build_kernels "$1"' _ "$(fact arch)"
  bench_gpu phi-1 8,16
  MB=$(best_micro_batch phi-1)
  train_gpu phi-1 bf16 "$MB"
  train_gpu phi-1 fp16 "$MB"
  run_step kernels "$PY" benchmarks/kernels.py --no-compile --iters 20 --warmup 5 --json "$LOGS/kernels.json"
  run_step tests_cuda "$PY" -m pytest -m cuda -q -p no:cacheprovider --junitxml="$LOGS/pytest_cuda.xml" \
    tests/ops/test_kernels_cuda.py
  bench_gpu phi-1-small 16,32
  MB=$(best_micro_batch phi-1-small)
  train_gpu phi-1-small bf16 "$MB"
  train_gpu phi-1-small fp16 "$MB"
  run_step tests_compile_cuda "$PY" -m pytest -m cuda -q -p no:cacheprovider \
    --junitxml="$LOGS/pytest_compile_cuda.xml" tests/model/test_compile_cuda.py
else
  for s in $CORE_STEPS $TAIL_STEPS; do
    case "${s%%:*}" in env|install) ;; *) skip "${s%%:*}" "$NO_GPU" ;; esac
  done
fi

# --- CPU steps (no GPU, or --smoke): private extension folder, bounded threads --------------------------
if [ -n "$NO_GPU" ] && [ "$MODE" != no-torch ]; then
  run_step train_cpu_tiny env CUDA_VISIBLE_DEVICES= OMP_NUM_THREADS="$CPU_THREADS" bash -c 'train "$@"' _ \
    "$LOGS/train_cpu_tiny" --model tiny --seq-length 64 --micro-batch-size 4 --train-iters 8 --eval-interval 8 \
    --lr 3e-3 --lr-warmup-iters 2 --lr-decay-style constant
  run_step bench_cpu_tiny env CUDA_VISIBLE_DEVICES= OMP_NUM_THREADS="$CPU_THREADS" "$PY" benchmarks/train.py \
    --model tiny --seq-length 64 --threads "$CPU_THREADS" --grid "loss_chunk=0,64" --warmup 1 --steps 2 \
    --json "$LOGS/bench_cpu_tiny.json"
fi

# --- the report (the environment read again: the install step may have added deepspeed) ---------------
timeout 30 "$PY" tools/gpu_report.py env "$LOGS/env.json.new" >/dev/null 2>&1 && mv "$LOGS/env.json.new" "$LOGS/env.json"
rm -f "$LOGS/env.json.new"
publish
cat "$OUT/report.md"
if grep -qx 'status=failed' "$LOGS"/*.status 2>/dev/null; then exit 1; fi
if ! grep -qx 'status=passed' "$LOGS"/*.status 2>/dev/null; then echo "[gpu_check] no step ran" >&2; exit 1; fi
exit 0
