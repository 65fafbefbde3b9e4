#!/usr/bin/env bash
# phi-1-small (350M) pretraining with the phi-1 paper's pretraining recipe ("Textbooks Are All You
# Need", Sec. 2.3): sequence 2048, effective batch 1024, AdamW, lr 1e-3 with 750 warmup steps and
# linear decay, weight decay 0.1, 36,000 steps (as for phi-1-base), fp16, dropout 0.1.
# The recipe is examples/pretrain_phi1.sh with the phi-1-small model; the same environment
# overrides apply (DATA_PATH, TOKENIZER, CHECKPOINT_DIR, SEQ_LENGTH, GLOBAL_BATCH, MICRO_BATCH (default 16
# here), TRAIN_ITERS, LR, WARMUP_ITERS, ZERO_STAGE, TP, ...; relative paths from your directory).
#
#   DATA_PATH=data/codetextbook_text_document bash examples/pretrain_phi1_small.sh
set -euo pipefail
export MODEL=phi-1-small
export MICRO_BATCH=${MICRO_BATCH:-16}   # per GPU; accumulation fills the 1024
exec bash "$(dirname "$0")/pretrain_phi1.sh" "$@"
