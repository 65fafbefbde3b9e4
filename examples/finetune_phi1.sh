#!/usr/bin/env bash
# phi-1 finetuning (paper Sec. 2.3): phi-1-base finetuned on CodeExercises with the pretraining setup
# but effective batch 256, lr 1e-4 with 50 warmup steps (linear decay), weight decay 0.01, 6,000 steps,
# a checkpoint every 1000 steps and the best one kept (validation at every save; DIR/best names it).
#
#   PRETRAINED=checkpoints/phi-1-base/iter_0024000/model DATA_PATH=data/codeexercises_text_document \
#       bash examples/finetune_phi1.sh
# PRETRAINED is a megaphi model folder (a training checkpoint's <tag>/model, or a Hugging Face phi-1
# converted by tools/convert_checkpoint.py) or a training checkpoint folder (its `latest` tag is used).
# Re-running resumes the finetuning from CHECKPOINT_DIR once it holds a checkpoint.
# Extra arguments are passed to megaphi.pretrain; @FILE reads more flags from FILE.
#
# Environment overrides (paths relative to the directory you run the script in; defaults relative to the
# repository):
#   PRETRAINED      checkpoints/phi-1-base/iter_0024000/model
#   DATA_PATH       data/codeexercises_text_document  PREFIX, or "W1 PREFIX1 W2 PREFIX2 ..."
#   TOKENIZER       ../shared/tokenizers/codegen-350M-mono beside the checkout, else Salesforce/codegen-350M-mono
#                                                     (folder, tokenizer.json or Hub name)
#   MODEL           phi-1                             the architecture of PRETRAINED (phi-1-small, ...)
#   CHECKPOINT_DIR  checkpoints/$MODEL
#   SEQ_LENGTH 2048   GLOBAL_BATCH 256   MICRO_BATCH 8 (per GPU)   TRAIN_ITERS 6000   LR 1e-4
#   WARMUP_ITERS    50 x TRAIN_ITERS / 6000 (the paper's 50 steps, scaled with the run)
#   GPUS_PER_NODE 8  NNODES 1  HOSTFILE  ZERO_STAGE 1  TP 1  SEQUENCE_PARALLEL 0  PRECISION fp16|bf16|fp32
#   (PRECISION unset on a machine without a GPU: fp32, with a note)
set -euo pipefail
source "$(dirname "$0")/common.sh"
resolve_env PRETRAINED CHECKPOINT_DIR HOSTFILE
[[ -n "${DATA_PATH:-}" ]] && DATA_PATH=$(abs_data_path "$DATA_PATH")
TOKENIZER=$(abs_if_exists "${TOKENIZER:-}")
PRECISION_SET=$([[ -n "${PRECISION:-}" ]] && echo 1 || echo 0)
cd "$(dirname "$0")/.."

GPUS_PER_NODE=${GPUS_PER_NODE:-8}
NNODES=${NNODES:-1}
HOSTFILE=${HOSTFILE:-}
PRETRAINED=${PRETRAINED:-checkpoints/phi-1-base/iter_0024000/model}
DATA_PATH=${DATA_PATH:-data/codeexercises_text_document}
[[ -z "${TOKENIZER:-}" ]] && TOKENIZER=$(default_tokenizer)
MODEL=${MODEL:-phi-1}
CHECKPOINT_DIR=${CHECKPOINT_DIR:-checkpoints/${MODEL}}
SEQ_LENGTH=${SEQ_LENGTH:-2048}
GLOBAL_BATCH=${GLOBAL_BATCH:-256}
MICRO_BATCH=${MICRO_BATCH:-8}                                 # per GPU; accumulation fills GLOBAL_BATCH
TRAIN_ITERS=${TRAIN_ITERS:-6000}
LR=${LR:-1e-4}
WARMUP_ITERS=${WARMUP_ITERS:-$(( 50 * TRAIN_ITERS / 6000 ))}
ZERO_STAGE=${ZERO_STAGE:-1}
TP=${TP:-1}
SEQUENCE_PARALLEL=${SEQUENCE_PARALLEL:-0}                      # 1: --sequence-parallel (TP > 1)
PRECISION=${PRECISION:-fp16}

require_data "$DATA_PATH" "$TOKENIZER"
if [[ ! -e "$PRETRAINED" ]]; then
    echo "finetune_phi1.sh: PRETRAINED: $PRETRAINED does not exist; make it with: bash examples/pretrain_phi1.sh (checkpoints/phi-1-base), or python tools/convert_checkpoint.py hf-to-megaphi HF_PHI_FOLDER $PRETRAINED; or set PRETRAINED" >&2
    exit 2
fi
PRECISION=$(precision_for_this_machine "$PRECISION" "$PRECISION_SET")
use_one_cuda_queue_if_tensor_parallel "$TP"

LAUNCHER=(deepspeed --num_nodes "$NNODES" --num_gpus "$GPUS_PER_NODE")
[[ -n "$HOSTFILE" ]] && LAUNCHER+=(--hostfile "$HOSTFILE")

# shellcheck disable=SC2206
ARGS=(
    # model: phi-1, same setup as pretraining
    --model "$MODEL"
    --seq-length "$SEQ_LENGTH"
    --attention-dropout 0.1
    --hidden-dropout 0.1
    --tokenizer "$TOKENIZER"

    # start from the pretrained weights: fresh optimizer, schedule and iteration
    --finetune
    --load "$PRETRAINED"

    # data
    --data-path $DATA_PATH
    --split 969,30,1
    --seed 1234

    # batch: effective batch 256
    --micro-batch-size "$MICRO_BATCH"
    --global-batch-size "$GLOBAL_BATCH"
    --train-iters "$TRAIN_ITERS"

    # optimizer: AdamW, weight decay 0.01
    --weight-decay 0.01
    --adam-beta1 0.9
    --adam-beta2 0.98
    --adam-eps 1e-7
    --clip-grad 1.0

    # schedule: linear warmup over 50 steps to 1e-4, then linear decay
    --lr "$LR"
    --min-lr 0
    --lr-warmup-iters "$WARMUP_ITERS"
    --lr-decay-iters "$TRAIN_ITERS"
    --lr-decay-style linear

    # precision and parallelism
    --zero-stage "$ZERO_STAGE"
    --tensor-model-parallel-size "$TP"

    # checkpoints every 1000 steps, validated at each, the best recorded in CHECKPOINT_DIR/best
    --save "$CHECKPOINT_DIR"
    --save-interval 1000
    --eval-interval 1000
    --eval-iters 50
    --log-interval 10
)

[[ "$PRECISION" != fp32 ]] && ARGS+=(--"$PRECISION")
[[ "$SEQUENCE_PARALLEL" == 1 ]] && ARGS+=(--sequence-parallel)

exec "${LAUNCHER[@]}" --module megaphi.pretrain "${ARGS[@]}" "$@"
