"""The parsed flags checked and resolved (Megatron's flags mapped, model preset filled in, batch
geometry, run length, lr schedule lengths, data sources): `resolve_flags` returns a new namespace and
leaves the parsed one as it was.

Everything that can be checked before touching a GPU or the data is checked here, so a bad run
fails in the first second with a message that names the flag.
"""

import argparse
import copy
import json
import math
import os
import re

from megaphi.training import megatron_compat, megatron_flags
from megaphi.training.argument_error import ArgumentError
from megaphi.training.model_flags import resolve_model


def resolve_flags(args, world_size=None):
    """A checked, completed copy of the parsed flags; world_size defaults to $WORLD_SIZE (1 without a
    launcher). ArgumentError (one line naming the flag) for a bad value or combination."""
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    resolved = argparse.Namespace(**copy.deepcopy(vars(args)))
    validate_args(resolved, world_size)
    return resolved


def _positive(args, *names):
    for name in names:
        value = getattr(args, name.lstrip("-").replace("-", "_"))
        if value is not None and value <= 0:
            raise ArgumentError(f"{name} must be > 0, got {value}")


def parse_data_path(data_path):
    """Megatron's list: [prefix, ...] or [w1, p1, w2, p2, ...] -> (weights or None, prefixes)."""
    from megaphi.data import parse_data_path as parse

    try:
        prefixes, weights = parse(data_path)
    except ValueError as e:
        raise ArgumentError(str(e) if str(e).startswith("--data-path") else f"--data-path: {e}") from None
    if weights is not None:
        for w, prefix in zip(weights, prefixes):
            if not math.isfinite(w) or w < 0:
                raise ArgumentError(f"--data-path: weight {w} of {prefix} must be a non-negative number")
        if sum(weights) <= 0:
            raise ArgumentError("--data-path: the weights sum to 0")
    return weights, prefixes


def validate_args(args, world_size):
    args.flag_notes = megatron_compat.resolve_compat(args)  # Megatron's flags -> megaphi's, or a one-line refusal
    resolve_model(args)
    _positive(
        args,
        "--num-layers",
        "--hidden-size",
        "--ffn-hidden-size",
        "--num-attention-heads",
        "--rotary-dim",
        "--seq-length",
        "--max-position-embeddings",
        "--micro-batch-size",
        "--global-batch-size",
        "--train-iters",
        "--exit-interval",
        "--lr-decay-iters",
        "--save-interval",
        "--eval-interval",
        "--log-interval",
        "--tensor-model-parallel-size",
        "--eval-humaneval-interval",
        "--vocab-size",
        "--make-vocab-size-divisible-by",
    )
    for name in ("attention_dropout", "hidden_dropout", "embedding_dropout"):
        if not 0.0 <= getattr(args, name) < 1.0:
            raise ArgumentError(f"--{name.replace('_', '-')} must be in [0, 1), got {getattr(args, name)}")

    heads, hidden, tp = args.num_attention_heads, args.hidden_size, args.tensor_model_parallel_size
    if hidden % heads:
        raise ArgumentError(f"--hidden-size {hidden} is not divisible by --num-attention-heads {heads}")
    head_dim = hidden // heads
    if args.rotary_dim > head_dim or args.rotary_dim % 2:
        raise ArgumentError(f"--rotary-dim {args.rotary_dim} must be even and <= head dim {head_dim}")
    if args.seq_length > args.max_position_embeddings:
        raise ArgumentError(
            f"--seq-length {args.seq_length} exceeds the model's max position embeddings "
            f"{args.max_position_embeddings} (--max-position-embeddings)"
        )
    if world_size % tp:
        raise ArgumentError(f"--tensor-model-parallel-size {tp} does not divide the world size {world_size}")
    if heads % tp or args.ffn_hidden_size % tp:
        raise ArgumentError(
            f"--tensor-model-parallel-size {tp} must divide --num-attention-heads {heads} "
            f"and --ffn-hidden-size {args.ffn_hidden_size}"
        )
    check_pipeline_layout(args, world_size)
    args.world_size = world_size
    args.data_parallel_size = world_size // (tp * args.pipeline_model_parallel_size)

    if args.recompute_activations and args.recompute_granularity is None:
        args.recompute_granularity = "selective"  # as in Megatron-LM
    if args.recompute_num_layers < 0 or args.loss_chunk_tokens < 0:
        raise ArgumentError("--recompute-num-layers and --loss-chunk-tokens must be >= 0")
    if args.micro_batch_size is None:
        raise ArgumentError("--micro-batch-size is required")
    per_step = args.micro_batch_size * args.data_parallel_size
    if args.global_batch_size is None:
        args.global_batch_size = per_step
    if args.global_batch_size % per_step:
        raise ArgumentError(
            f"--global-batch-size {args.global_batch_size} is not divisible by --micro-batch-size "
            f"{args.micro_batch_size} x data-parallel size {args.data_parallel_size} = {per_step}"
        )
    args.gradient_accumulation_steps = args.global_batch_size // per_step
    pp = args.pipeline_model_parallel_size
    if args.virtual_pipeline_stages > 1 and args.gradient_accumulation_steps % pp:
        raise ArgumentError(
            f"--num-layers-per-virtual-pipeline-stage: the interleaved schedule needs the micro-batches per "
            f"step (--global-batch-size / (--micro-batch-size x data-parallel size) = "
            f"{args.gradient_accumulation_steps}) to be a multiple of --pipeline-model-parallel-size {pp}"
        )
    megatron_flags.resolve_run_length(args)  # --train-samples / --train-tokens -> --train-iters
    if args.train_iters is None:
        raise ArgumentError("--train-iters is required (or --train-samples / --train-tokens)")

    if args.fp16 and args.bf16:
        raise ArgumentError("--fp16 and --bf16 are mutually exclusive")
    if args.zero_stage is None:
        # one data-parallel rank has nothing to partition; ZeRO would only add buffer copies
        args.zero_stage = 1 if args.data_parallel_size > 1 else 0
        args.zero_stage_source = f"default with {args.data_parallel_size} data-parallel rank(s)"
    elif not hasattr(args, "zero_stage_source"):
        args.zero_stage_source = "--zero-stage"
    if args.zero_stage not in (0, 1, 2, 3):
        raise ArgumentError(f"--zero-stage must be 0, 1, 2 or 3, got {args.zero_stage}")
    check_pipeline_composition(args)
    if not (args.distributed_timeout_minutes > 0 and math.isfinite(args.distributed_timeout_minutes)):
        raise ArgumentError(f"--distributed-timeout-minutes must be > 0, got {args.distributed_timeout_minutes}")

    if args.lr is None:
        raise ArgumentError("--lr is required")
    if args.lr < 0 or args.min_lr < 0:
        raise ArgumentError("--lr and --min-lr must be >= 0")
    if args.min_lr > args.lr:
        raise ArgumentError(f"--min-lr {args.min_lr} is larger than --lr {args.lr}")
    if args.lr_decay_iters is None:
        args.lr_decay_iters = args.train_iters
    if args.lr_decay_iters <= 0:
        raise ArgumentError(f"--lr-decay-iters must be > 0, got {args.lr_decay_iters}")
    megatron_flags.resolve_warmup(args)  # --lr-warmup-fraction -> --lr-warmup-iters
    if args.lr_warmup_iters < 0:
        raise ArgumentError("--lr-warmup-iters must be >= 0")
    if args.lr_warmup_iters > args.lr_decay_iters:
        raise ArgumentError(f"--lr-warmup-iters {args.lr_warmup_iters} exceeds --lr-decay-iters {args.lr_decay_iters}")
    args.clip_grad_given = args.clip_grad is not None  # else 1.0, unless the DeepSpeed JSON sets gradient_clipping
    if args.clip_grad is None:
        args.clip_grad = 1.0
    if args.weight_decay < 0 or args.clip_grad < 0:
        raise ArgumentError("--weight-decay and --clip-grad must be >= 0")
    scale = args.initial_loss_scale
    if not (math.isfinite(scale) and scale > 0 and math.log2(scale) == int(math.log2(scale))):
        raise ArgumentError(f"--initial-loss-scale must be a power of 2 > 0 (e.g. 65536), got {scale}")
    if not (0 <= args.adam_beta1 < 1 and 0 <= args.adam_beta2 < 1):
        raise ArgumentError("--adam-beta1 and --adam-beta2 must be in [0, 1)")

    if args.mock_data and args.data_path:
        raise ArgumentError("--mock-data and --data-path exclude each other: synthetic tokens or token files")
    megatron_flags.validate_data_sources(args)
    per_split = megatron_flags.per_split_data_paths(args)
    if not args.data_path and not args.mock_data and not per_split:
        raise ArgumentError(
            "--data-path is required (PREFIX or W1 PREFIX1 W2 PREFIX2 ...), or --mock-data for synthetic tokens"
        )
    args.data_weights, args.data_prefixes = parse_data_path(args.data_path) if args.data_path else (None, [])
    sources = [("--data-path", args.data_prefixes)]
    for split, path in per_split.items():
        flag = f"--{split}-data-path"
        try:
            sources.append((flag, parse_data_path(path)[1]))
        except ArgumentError as e:
            raise ArgumentError(str(e).replace("--data-path", flag)) from None
    for flag, prefixes in sources:
        for prefix in prefixes:
            for ext in (".bin", ".idx"):
                if not os.path.exists(prefix + ext):
                    raise ArgumentError(f"{flag}: {prefix + ext} does not exist")
    parts = args.split.replace("/", ",").split(",")
    try:
        split = [float(x) for x in parts]
    except ValueError:
        raise ArgumentError(f"--split {args.split!r}: expected numbers like 969,30,1") from None
    if not split or len(split) > 3 or any(x < 0 for x in split) or sum(split) <= 0:
        raise ArgumentError(f"--split {args.split!r}: expected up to three non-negative numbers like 969,30,1")
    if (
        args.tokenizer is not None
        and not os.path.exists(args.tokenizer)
        and not re.fullmatch(r"[\w.-]+/[\w.-]+", args.tokenizer)
    ):  # else a Hugging Face Hub name
        raise ArgumentError(f"--tokenizer: {args.tokenizer} does not exist")

    if args.save_interval is not None and args.save is None:
        raise ArgumentError("--save-interval needs --save DIR")
    if args.save_interval_minutes is not None and (args.save is None or not args.save_interval_minutes > 0):
        raise ArgumentError(
            f"--save-interval-minutes must be > 0 and needs --save DIR, got {args.save_interval_minutes}"
        )
    if args.exit_interval is not None and args.save is None:
        raise ArgumentError("--exit-interval needs --save DIR (the run saves before exiting)")
    if args.keep_last is not None and (args.keep_last < 1 or args.save is None):
        raise ArgumentError(f"--keep-last must be >= 1 and needs --save DIR, got {args.keep_last}")
    if args.override_opt_param_scheduler and args.use_checkpoint_opt_param_scheduler:
        raise ArgumentError(
            "--override-opt_param-scheduler and --use-checkpoint-opt_param-scheduler exclude each other"
        )
    if args.finetune and args.load is None:
        raise ArgumentError(
            "--finetune needs --load (a training checkpoint, or a model folder: megaphi or Hugging Face phi)"
        )
    megatron_flags.validate_run_control(args)
    megatron_flags.validate_wandb(args)
    if (args.finetune or args.skip_train) and not os.path.exists(args.load):
        raise ArgumentError(f"--load: {args.load} does not exist")
    if args.log_dir is None:
        args.log_dir = args.save
    if args.eval_iters < 0:
        raise ArgumentError("--eval-iters must be >= 0")
    if (args.eval_humaneval is None) != (args.eval_humaneval_interval is None):
        raise ArgumentError("--eval-humaneval PATH and --eval-humaneval-interval N go together")
    if args.eval_humaneval is not None and args.tokenizer is None:
        raise ArgumentError("--eval-humaneval needs --tokenizer (to encode prompts and decode completions)")
    if args.eval_humaneval is not None:
        from megaphi.evaluation.problems import ProblemFileError, resolve_problem_set

        try:
            problems_file, _ = resolve_problem_set(args.eval_humaneval)
        except ProblemFileError as e:
            raise ArgumentError(f"--eval-humaneval: {e}") from None
        if not os.path.exists(problems_file):
            raise ArgumentError(f"--eval-humaneval: {problems_file} does not exist")
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        raise ArgumentError("--peak-tflops must be > 0")

    if args.deepspeed_config is not None:
        args.deepspeed_config_dict = load_json_config(args.deepspeed_config)
    else:
        args.deepspeed_config_dict = {}
    return args


def check_pipeline_layout(args, world_size):
    """--pipeline-model-parallel-size and its layer split: P x TP divides the world, the layers split
    into P stages (x virtual stages); sets args.pipeline_layers_per_stage to a list of counts or None."""
    from megaphi.parallel.pipeline.split import split_layers, virtual_stages_per_rank

    pp, tp = args.pipeline_model_parallel_size, args.tensor_model_parallel_size
    if pp is None or pp < 1:
        raise ArgumentError(f"--pipeline-model-parallel-size must be >= 1, got {pp}")
    if world_size % (tp * pp):
        raise ArgumentError(
            f"--pipeline-model-parallel-size {pp} x --tensor-model-parallel-size {tp} does not divide "
            f"the world size {world_size}"
        )
    per_virtual = args.num_layers_per_virtual_pipeline_stage
    if per_virtual is not None and per_virtual < 1:
        raise ArgumentError(f"--num-layers-per-virtual-pipeline-stage must be >= 1, got {per_virtual}")
    counts = args.pipeline_layers_per_stage
    if isinstance(counts, str):
        try:
            counts = [int(x) for x in counts.split(",")]
        except ValueError:
            raise ArgumentError(f"--pipeline-layers-per-stage {counts!r}: expected counts like 5,6,6,7") from None
    if counts is not None and pp == 1:
        raise ArgumentError("--pipeline-layers-per-stage needs --pipeline-model-parallel-size > 1")
    try:
        chunks = virtual_stages_per_rank(args.num_layers, pp, per_virtual) if per_virtual else 1
        split_layers(args.num_layers, pp, chunks, counts)
    except ValueError as e:
        raise ArgumentError(str(e)) from None
    args.pipeline_layers_per_stage = counts
    args.virtual_pipeline_stages = chunks


# What pipelined runs (P > 1) do not do yet, each refused with one line naming the flag.
_NOT_WIRED_WITH_PIPELINE = (("eval_humaneval", "--eval-humaneval"),)


def check_pipeline_composition(args):
    """ZeRO-2/3 partition gradients (and parameters) on every backward, and a pipeline runs m
    micro-batches' backwards per step into whole accumulated gradients: refused, as DeepSpeed's
    PipelineEngine and Megatron-DeepSpeed refuse them. ZeRO 0 and 1 compose (docs/pipeline.md)."""
    pp = args.pipeline_model_parallel_size
    if pp == 1:
        return
    from megaphi.parallel.pipeline.split import check_pipeline_composition as check_zero_stage

    try:
        check_zero_stage(pp, args.zero_stage)  # the rule and its message live with the pipeline
    except ValueError as e:
        raise ArgumentError(str(e)) from None
    for name, flag in _NOT_WIRED_WITH_PIPELINE:
        if getattr(args, name, None):
            raise ArgumentError(f"{flag} is not supported with --pipeline-model-parallel-size {pp} yet")


def load_json_config(path):
    if not os.path.exists(path):
        raise ArgumentError(f"--deepspeed-config: {path} does not exist")
    with open(path) as f:
        text = f.read()
    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        raise ArgumentError(f"--deepspeed-config: {path}:{e.lineno}:{e.colno}: {e.msg}") from None
    if not isinstance(config, dict):
        raise ArgumentError(f"--deepspeed-config: {path} must hold a JSON object")
    return config
