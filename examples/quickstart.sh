#!/usr/bin/env bash
# Quickstart: train a small phi (the phi-1 architecture, scaled down) on the Python standard library's
# own sources, then complete `def fibonacci(n):` with it. CPU or GPU; about 3-4 minutes on 2 idle CPU cores.
#
#   bash examples/quickstart.sh
#   WORK_DIR=/tmp/qs TRAIN_ITERS=600 bash examples/quickstart.sh
#   TRAIN_ITERS=20 bash examples/quickstart.sh                         # a one-minute smoke run
#   TOKENIZER=path/to/codegen-350M-mono bash examples/quickstart.sh    # skip training a tokenizer
#
# Environment overrides (relative paths are taken from the directory you run the script in):
#   WORK_DIR      runs/quickstart (in the repository)  corpus, tokenizer, token files, checkpoints
#   TOKENIZER     (trained here)   a tokenizer folder / tokenizer.json to use instead
#   MODEL         tiny             tiny = the phi-1 block scaled down (4 layers, hidden 256, 4 heads);
#                                  phi-1-small or phi-1 train that preset as is
#   SEQ_LENGTH    256              MICRO_BATCH  8         GLOBAL_BATCH  MICRO_BATCH (no accumulation)
#   TRAIN_ITERS   400              LR           2e-3      (min lr LR/10, warmup 7.5% of TRAIN_ITERS)
#   VOCAB_SIZE    4096 (trained tokenizer)               PYTHON  python3
#   MAX_FILES     (all)            take only the first N stdlib files for the corpus (a faster smoke run)
#
# Steps: install if needed -> stdlib corpus (tools/make_stdlib_corpus.py) -> byte-level BPE tokenizer
# (tools/train_tokenizer.py, 4096 tokens) -> token files (tools/preprocess_data.py) -> train
# (python -m megaphi.pretrain) -> curves (tools/plot_metrics.py) -> completions (tools/generate.py).
# Finished steps are skipped when the script is run again; training resumes from its checkpoint.
set -euo pipefail
source "$(dirname "$0")/common.sh"
resolve_env WORK_DIR
TOKENIZER=$(abs_if_exists "${TOKENIZER:-}")
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
WORK_DIR=${WORK_DIR:-runs/quickstart}
MODEL=${MODEL:-tiny}
TRAIN_ITERS=${TRAIN_ITERS:-400}
MICRO_BATCH=${MICRO_BATCH:-8}
GLOBAL_BATCH=${GLOBAL_BATCH:-$MICRO_BATCH}
SEQ_LENGTH=${SEQ_LENGTH:-256}
LR=${LR:-2e-3}
MIN_LR=$(awk -v lr="$LR" 'BEGIN { printf "%g", lr / 10 }')
VOCAB_SIZE=${VOCAB_SIZE:-4096}
CORPUS_LIMIT=()
[[ -n "${MAX_FILES:-}" ]] && CORPUS_LIMIT=(--max-files "$MAX_FILES")
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)}

step() { printf '\n== %s\n' "$*"; }

if ! $PY -c "import megaphi._C, deepspeed" 2>/dev/null; then
    step "installing megaphi (tools/install.sh)"
    bash tools/install.sh
fi
mkdir -p "$WORK_DIR/data"

CORPUS="$WORK_DIR/corpus.jsonl"
if [[ ! -f "$CORPUS" ]]; then
    step "corpus: the Python standard library's sources -> $CORPUS"
    $PY tools/make_stdlib_corpus.py --output "$CORPUS" --exclude-tests "${CORPUS_LIMIT[@]}"
fi

if [[ -z "${TOKENIZER:-}" ]]; then
    TOKENIZER="$WORK_DIR/tokenizer"
    if [[ ! -f "$TOKENIZER/tokenizer.json" ]]; then
        step "tokenizer: byte-level BPE, $VOCAB_SIZE tokens -> $TOKENIZER"
        $PY tools/train_tokenizer.py --input "$CORPUS" --output-dir "$TOKENIZER" --vocab-size "$VOCAB_SIZE"
    fi
fi

DATA_PREFIX="$WORK_DIR/data/stdlib"
if [[ ! -f "${DATA_PREFIX}_text_document.idx" ]]; then
    step "token files -> ${DATA_PREFIX}_text_document.{bin,idx}"
    $PY tools/preprocess_data.py --input "$CORPUS" --tokenizer "$TOKENIZER" --output-prefix "$DATA_PREFIX" \
        --workers 2
fi

PRECISION=()
if $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    PRECISION=(--bf16)
fi

# The phi-1 block (parallel attention + MLP, one shared LayerNorm, rotary on 32 of 64 head dims),
# scaled down: 4 layers, hidden 256, 4 heads. Other MODELs train their preset as is.
ARCH=()
if [[ "$MODEL" == tiny ]]; then
    ARCH=(--num-layers 4 --hidden-size 256 --ffn-hidden-size 1024 --num-attention-heads 4 --rotary-dim 32
          --max-position-embeddings "$SEQ_LENGTH")
fi

CKPT="$WORK_DIR/checkpoints"
step "training a small phi ($MODEL) for $TRAIN_ITERS steps -> $CKPT"
# Dropout is off for such a short run.
$PY -m megaphi.pretrain \
    --model "$MODEL" \
    "${ARCH[@]}" \
    --seq-length "$SEQ_LENGTH" \
    --attention-dropout 0.0 \
    --hidden-dropout 0.0 \
    --tokenizer "$TOKENIZER" \
    --data-path "${DATA_PREFIX}_text_document" \
    --split 98,2,0 \
    --micro-batch-size "$MICRO_BATCH" \
    --global-batch-size "$GLOBAL_BATCH" \
    --train-iters "$TRAIN_ITERS" \
    --lr "$LR" \
    --min-lr "$MIN_LR" \
    --lr-warmup-fraction 0.075 \
    --lr-decay-style linear \
    --weight-decay 0.1 \
    --clip-grad 1.0 \
    --zero-stage 0 \
    "${PRECISION[@]}" \
    --save "$CKPT" \
    --load "$CKPT" \
    --save-interval 100 \
    --eval-interval 100 \
    --eval-iters 4 \
    --log-interval 10

step "loss and learning-rate curves"
$PY tools/plot_metrics.py "$CKPT" --output "$WORK_DIR/curves.png" --title "quickstart ($MODEL, $TRAIN_ITERS steps)"

MODEL_DIR="$CKPT/$(cat "$CKPT/latest")/model"
step "greedy completion of 'def fibonacci(n):' ($MODEL_DIR)"
$PY tools/generate.py --checkpoint "$MODEL_DIR" --prompt "def fibonacci(n):" --greedy --max-new-tokens 64
step "sampled completion (temperature 0.8, top-p 0.95)"
$PY tools/generate.py --checkpoint "$MODEL_DIR" --prompt "def fibonacci(n):" --temperature 0.8 --top-p 0.95 \
    --seed 1 --max-new-tokens 64

printf '\nDone. Checkpoints: %s  metrics: %s/metrics.jsonl  curves: %s/curves.png\n' "$CKPT" "$CKPT" "$WORK_DIR"
