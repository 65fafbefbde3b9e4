#!/usr/bin/env bash
# phi-1-base pretraining with the paper's recipe ("Textbooks Are All You Need", Sec. 2.3):
# 1.3B parameters, sequence 2048, effective batch 1024, AdamW, lr 1e-3 with 750 warmup steps and linear
# decay, weight decay 0.1, 36,000 steps (the paper keeps the 24,000-step checkpoint), fp16, dropout 0.1.
# Paper hardware: 8 A100s, DeepSpeed, < 4 days.
#
#   DATA_PATH=data/codetextbook_text_document bash examples/pretrain_phi1.sh
#   HOSTFILE=hostfile NNODES=2 GPUS_PER_NODE=8 bash examples/pretrain_phi1.sh      # multi-node
#   GPUS_PER_NODE=1 MODEL=phi-1-small SEQ_LENGTH=512 GLOBAL_BATCH=32 TRAIN_ITERS=200 bash examples/pretrain_phi1.sh
# Extra arguments are passed to megaphi.pretrain (e.g. --bf16 is not allowed with the paper's --fp16;
# set PRECISION=bf16 instead); @FILE reads more flags from FILE.
#
# Environment overrides (paths relative to the directory you run the script in; defaults relative to the
# repository):
#   DATA_PATH       data/codetextbook_text_document   PREFIX, or "W1 PREFIX1 W2 PREFIX2 ..."
#   TOKENIZER       ../shared/tokenizers/codegen-350M-mono beside the checkout, else Salesforce/codegen-350M-mono
#                                                     (folder, tokenizer.json or Hub name)
#   MODEL           phi-1                             or phi-1-small
#   CHECKPOINT_DIR  checkpoints/$MODEL-base
#   SEQ_LENGTH 2048   GLOBAL_BATCH 1024   MICRO_BATCH 8 (per GPU)   TRAIN_ITERS 36000   LR 1e-3
#   WARMUP_ITERS    750 x TRAIN_ITERS / 36000 (the paper's 750 steps, scaled with the run)
#   GPUS_PER_NODE 8  NNODES 1  HOSTFILE  ZERO_STAGE 1  TP 1  SEQUENCE_PARALLEL 0  PRECISION fp16|bf16|fp32
#   (PRECISION unset on a machine without a GPU: fp32, with a note)
set -euo pipefail
source "$(dirname "$0")/common.sh"
resolve_env CHECKPOINT_DIR HOSTFILE
[[ -n "${DATA_PATH:-}" ]] && DATA_PATH=$(abs_data_path "$DATA_PATH")
TOKENIZER=$(abs_if_exists "${TOKENIZER:-}")
PRECISION_SET=$([[ -n "${PRECISION:-}" ]] && echo 1 || echo 0)
cd "$(dirname "$0")/.."

GPUS_PER_NODE=${GPUS_PER_NODE:-8}
NNODES=${NNODES:-1}
HOSTFILE=${HOSTFILE:-}
DATA_PATH=${DATA_PATH:-data/codetextbook_text_document}    # PREFIX, or "W1 PREFIX1 W2 PREFIX2"
[[ -z "${TOKENIZER:-}" ]] && TOKENIZER=$(default_tokenizer)
MODEL=${MODEL:-phi-1}                                         # or phi-1-small (pretrain_phi1_small.sh)
CHECKPOINT_DIR=${CHECKPOINT_DIR:-checkpoints/${MODEL}-base}
SEQ_LENGTH=${SEQ_LENGTH:-2048}
GLOBAL_BATCH=${GLOBAL_BATCH:-1024}
MICRO_BATCH=${MICRO_BATCH:-8}                                 # per GPU; accumulation fills GLOBAL_BATCH
TRAIN_ITERS=${TRAIN_ITERS:-36000}
LR=${LR:-1e-3}
WARMUP_ITERS=${WARMUP_ITERS:-$(( 750 * TRAIN_ITERS / 36000 ))}
ZERO_STAGE=${ZERO_STAGE:-1}
TP=${TP:-1}
SEQUENCE_PARALLEL=${SEQUENCE_PARALLEL:-0}                      # 1: --sequence-parallel (TP > 1)
PRECISION=${PRECISION:-fp16}                                  # paper: fp16; bf16, or fp32 (no flag)

require_data "$DATA_PATH" "$TOKENIZER"
PRECISION=$(precision_for_this_machine "$PRECISION" "$PRECISION_SET")
use_one_cuda_queue_if_tensor_parallel "$TP"

LAUNCHER=(deepspeed --num_nodes "$NNODES" --num_gpus "$GPUS_PER_NODE")
[[ -n "$HOSTFILE" ]] && LAUNCHER+=(--hostfile "$HOSTFILE")

# shellcheck disable=SC2206
ARGS=(
    # model: phi-1 (24 layers, hidden 2048, MLP 8192, 32 heads x 64, rotary dim 32)
    #     or phi-1-small (20 layers, hidden 1024, MLP 4096, 16 heads x 64, rotary dim 32)
    --model "$MODEL"
    --seq-length "$SEQ_LENGTH"
    --attention-dropout 0.1
    --hidden-dropout 0.1
    --tokenizer "$TOKENIZER"

    # data: one array of files separated by <|endoftext|>, 2048-token slices
    --data-path $DATA_PATH
    --split 969,30,1
    --seed 1234

    # batch: effective batch 1024 = micro batch x data parallel x accumulation
    --micro-batch-size "$MICRO_BATCH"
    --global-batch-size "$GLOBAL_BATCH"
    --train-iters "$TRAIN_ITERS"

    # optimizer: AdamW, weight decay 0.1 (betas/eps are not stated in the paper)
    --weight-decay 0.1
    --adam-beta1 0.9
    --adam-beta2 0.98
    --adam-eps 1e-7
    --clip-grad 1.0

    # schedule: linear warmup over 750 steps to 1e-3, then linear decay
    --lr "$LR"
    --min-lr 0
    --lr-warmup-iters "$WARMUP_ITERS"
    --lr-decay-iters "$TRAIN_ITERS"
    --lr-decay-style linear

    # precision and parallelism
    --zero-stage "$ZERO_STAGE"
    --tensor-model-parallel-size "$TP"

    # checkpoints (iter_0024000 is the paper's phi-1-base), evaluation, logging
    --save "$CHECKPOINT_DIR"
    --load "$CHECKPOINT_DIR"
    --save-interval 1000
    --eval-interval 1000
    --eval-iters 50
    --log-interval 10
)

[[ "$PRECISION" != fp32 ]] && ARGS+=(--"$PRECISION")
[[ "$SEQUENCE_PARALLEL" == 1 ]] && ARGS+=(--sequence-parallel)

exec "${LAUNCHER[@]}" --module megaphi.pretrain "${ARGS[@]}" "$@"
