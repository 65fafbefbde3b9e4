"""Command-line flags of `python -m megaphi.pretrain` (Megatron-LM names) and their validation.

Everything that can be checked before touching a GPU or the data is checked here, so a bad run
fails in the first second with a message that names the flag.
"""
import argparse
import json
import math
import os
import re
import shlex
import sys

from megaphi.training import megatron_compat, megatron_flags
from megaphi.training.argument_error import ERROR_PREFIX, ArgumentError  # noqa: F401 (imported from here)
from megaphi.training.model_flags import resolve_model


MODEL_PRESETS = ("phi-1", "phi-1-small", "tiny")
LAYERNORM_IMPL_CHOICES = ("auto", "cuda", "torch", "apex")
ROTARY_IMPL_CHOICES = ("auto", "cuda", "torch")  # apex has no rotary kernel


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each flag's default, except where there is none to show (None, False)."""

    def _get_help_string(self, action):  # the hook ArgumentDefaultsHelpFormatter itself overrides
        if action.default in (None, False):
            return action.help
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """`@args.txt` reads flags from a file: shell-like words, several per line, `#` comments. A parse
    error is one line with the command's error prefix (not the whole usage); an unknown flag comes
    with the closest known one."""

    def convert_arg_line_to_args(self, arg_line):
        return shlex.split(arg_line, comments=True)

    def error(self, message):  # argparse's documented override point for parse errors
        unknown = message.split("unrecognized arguments: ", 1)
        if len(unknown) == 2:
            flag = next((w for w in unknown[1].split() if w.startswith("-")), unknown[1].split()[0])
            near = megatron_compat.closest_flag(self, flag)
            message = (f"unrecognized argument {flag}" + (f" (did you mean {near}?)" if near else "") +
                       "; --help lists the flags")
        self.exit(2, f"{ERROR_PREFIX} {message}\n")


def build_parser():
    p = ArgumentParser(
        prog="python -m megaphi.pretrain",
        description="Pretrain or finetune a phi-1-class model (Megatron-style flags, DeepSpeed ZeRO). "
                    "@FILE reads more flags from FILE.",
        allow_abbrev=False, fromfile_prefix_chars="@", formatter_class=HelpFormatter)
    from megaphi import __version__
    p.add_argument("--version", action="version", version=f"megaphi.pretrain {__version__}")

    g = p.add_argument_group("model")
    g.add_argument("--model", default="phi-1", choices=MODEL_PRESETS,
                   help="architecture preset; the flags below override single fields")
    g.add_argument("--num-layers", type=int)
    g.add_argument("--hidden-size", type=int)
    g.add_argument("--ffn-hidden-size", type=int)
    g.add_argument("--num-attention-heads", type=int)
    g.add_argument("--rotary-dim", type=int)
    g.add_argument("--seq-length", type=int, help="training sequence length (default: max positions)")
    g.add_argument("--max-position-embeddings", type=int)
    g.add_argument("--vocab-size", type=int, help="only when no --tokenizer is given")
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                   help="pad the vocabulary to a multiple of this x TP size")
    g.add_argument("--attention-dropout", type=float)
    g.add_argument("--hidden-dropout", type=float, help="residual dropout (attention and MLP outputs)")
    g.add_argument("--embedding-dropout", type=float)
    g.add_argument("--init-method-std", type=float)
    g.add_argument("--recompute", action="store_true", help="activation recomputation per layer (full granularity)")
    g.add_argument("--recompute-activations", action="store_true",
                   help="Megatron's shorthand for --recompute-granularity selective")
    g.add_argument("--attention-backend", default="auto",
                   choices=("auto", "flash-attn", "sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "math",
                            *megatron_compat.MEGATRON_ATTENTION_BACKENDS),
                   help="auto: flash-attn when installed (CUDA fp16/bf16), else torch SDPA's own choice; the others "
                        "force one kernel and fail at start when it cannot run (Megatron's values: flash = "
                        "flash-attn, fused = sdpa-cudnn, unfused/local = math)")
    g.add_argument("--recompute-granularity", choices=("full", "selective"), default=None,
                   help="full: recompute whole layers (implies --recompute); selective: recompute only the "
                        "core attention (Megatron's names)")
    g.add_argument("--recompute-num-layers", type=int, default=0,
                   help="full granularity: recompute the first N layers only (0 = all)")
    g.add_argument("--torch-compile", default="auto", choices=("auto", "on", "off"),
                   help="torch.compile each decoder block (Inductor fuses the elementwise work around the "
                        "matmuls and attention); auto: off until verified on a GPU, see docs/training.md")
    g.add_argument("--loss-chunk-tokens", type=int, default=0,
                   help="compute lm_head + cross entropy this many tokens at a time, never materializing the "
                        "full logits (0 = off)")
    g.add_argument("--layernorm-impl", default="auto", choices=LAYERNORM_IMPL_CHOICES,
                   help="LayerNorm kernel (auto: CUDA kernel on a GPU, torch otherwise)")
    g.add_argument("--rotary-impl", default="auto", choices=ROTARY_IMPL_CHOICES,
                   help="rotary embedding kernel (auto: CUDA kernel on a GPU, torch otherwise)")

    g = p.add_argument_group("batch and iterations")
    g.add_argument("--micro-batch-size", type=int, default=None, help="samples per device per forward pass")
    g.add_argument("--global-batch-size", type=int, default=None,
                   help="default: micro batch x data-parallel size (no accumulation)")
    g.add_argument("--train-iters", type=int, default=None, help="optimizer steps to train for")
    g.add_argument("--exit-interval", type=int, default=None,
                   help="save and exit when the iteration is a multiple of this")
    g.add_argument("--seed", type=int, default=1234, help="seeds data order, initialization and dropout")
    megatron_flags.add_run_length_flags(g)

    g = p.add_argument_group("learning rate")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate")
    g.add_argument("--min-lr", type=float, default=0.0, help="learning rate at the end of the decay")
    g.add_argument("--lr-warmup-iters", type=int, default=None, help="linear warmup steps (default: 0)")
    g.add_argument("--lr-decay-iters", type=int, default=None, help="default: --train-iters")
    g.add_argument("--lr-decay-style", default="linear", choices=("linear", "cosine", "constant"),
                   help="decay from --lr to --min-lr after the warmup")
    megatron_flags.add_lr_flags(g)

    g = p.add_argument_group("optimizer")
    g.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (not on biases, LayerNorm)")
    g.add_argument("--adam-beta1", type=float, default=0.9, help="AdamW beta1")
    g.add_argument("--adam-beta2", type=float, default=0.999, help="AdamW beta2")
    g.add_argument("--adam-eps", type=float, default=1e-8, help="AdamW epsilon")
    g.add_argument("--optimizer-impl", choices=("auto", "torch", "torch-fused", "deepspeed-fused"), default="auto",
                   help="AdamW implementation: auto = torch's fused AdamW on CUDA (no JIT compile), torch's "
                        "default on CPU; deepspeed-fused = DeepSpeed's FusedAdam (compiles on first use)")
    g.add_argument("--clip-grad", type=float, default=None,
                   help="global gradient norm clip, 0 disables it (default: 1.0, or the --deepspeed-config JSON's "
                        "gradient_clipping)")

    g = p.add_argument_group("precision")
    g.add_argument("--fp16", action="store_true", help="fp16 with dynamic loss scaling (default: fp32)")
    g.add_argument("--bf16", action="store_true", help="bf16 (default: fp32)")
    g.add_argument("--initial-loss-scale", type=float, default=2.0 ** 16, help="fp16: starting loss scale")
    g.add_argument("--min-loss-scale", type=float, default=1.0, help="fp16: the loss scale never goes below")
    g.add_argument("--loss-scale-window", type=int, default=1000,
                   help="fp16: steps without overflow before the loss scale doubles")
    g.add_argument("--hysteresis", type=int, default=2, help="fp16: overflows tolerated before the scale halves")

    g = p.add_argument_group("distributed")
    g.add_argument("--zero-stage", type=int, default=None,
                   help="DeepSpeed ZeRO stage 0-3 (default: 1 with several data-parallel ranks, else 0)")
    g.add_argument("--deepspeed-config", default=None, help="JSON merged over the generated config")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1, help="tensor-parallel ranks per model")
    g.add_argument("--sequence-parallel", action="store_true",
                   help="shard LayerNorm/dropout activations over the sequence (TP > 1 only)")
    g.add_argument("--check-replicated-params", type=int, nargs="?", const=1, default=None, metavar="N",
                   help="TP > 1: check that parameters every TP rank holds whole are bitwise equal across the TP "
                        "group at start and every N iterations (default 1); always checked before each save")
    g.add_argument("--no-async-tensor-model-parallel-allreduce", dest="async_tensor_model_parallel_allreduce",
                   action="store_false",
                   help="TP > 1: communicate the column layers' input gradient after their weight gradients "
                        "instead of overlapping the two (Megatron's name; for comparison)")
    g.add_argument("--distributed-backend", default=None, choices=("nccl", "gloo"),
                   help="default: nccl with CUDA, else gloo")
    g.add_argument("--distributed-timeout-minutes", type=float, default=10.0,
                   help="a collective (or the start-up rendezvous) waiting longer than this for the other ranks "
                        "stops the run with an error (a stopped, hung or dead rank)")
    # Launchers pass one of these; LOCAL_RANK in the environment is used otherwise.
    g.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=None,
                   help=argparse.SUPPRESS)

    g = p.add_argument_group("data")
    g.add_argument("--data-path", nargs="+", default=None,
                   help="PREFIX or W1 PREFIX1 W2 PREFIX2 ... (prefix of .bin/.idx)")
    g.add_argument("--mock-data", action="store_true",
                   help="train on synthetic tokens (no --data-path, no tokenizer needed): benchmarks, checks")
    g.add_argument("--split", default="969,30,1", help="train,valid,test weights of --data-path's documents")
    megatron_flags.add_data_flags(g)
    g.add_argument("--tokenizer", "--tokenizer-model", dest="tokenizer", default=None,
                   help="tokenizer folder, tokenizer.json or Hugging Face Hub name")
    g.add_argument("--data-cache-path", "--data-cache-dir", dest="data_cache_path", default=None,
                   help="folder for the dataset index cache (default: <data dir>/cache/GPTDataset_indices)")
    g.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes")

    g = p.add_argument_group("checkpoints")
    g.add_argument("--save", default=None, help="checkpoint folder to write")
    g.add_argument("--load", default=None, help="checkpoint folder to resume from (or, with --finetune / "
                                                  "--skip-train, a model folder: megaphi or Hugging Face phi)")
    g.add_argument("--save-interval", type=int, default=None, help="save every N iterations (and at the end)")
    g.add_argument("--save-interval-minutes", type=float, default=None, metavar="M",
                   help="also save when M minutes have passed since the start or the last such save (decided "
                        "on rank 0, all ranks save at the same iteration)")
    g.add_argument("--finetune", action="store_true",
                   help="with --load: load weights only; fresh optimizer, schedule and iteration")
    g.add_argument("--no-export-model", action="store_true",
                   help="do not write DIR/<tag>/model/ (config.json + model.safetensors) at each save")
    g.add_argument("--keep-last", type=int, default=None, metavar="N",
                   help="after each save, delete iter_* checkpoints older than the newest N (never the one "
                        "`latest` or `best` names)")
    g.add_argument("--start-over", action="store_true",
                   help="train from iteration 0 although --save/--load holds iter_* checkpoints without a "
                        "`latest` file (they are overwritten); without it such a run is refused")
    g.add_argument("--no-load-optim", action="store_true",
                   help="resume weights, lr schedule position, data position and RNG, but not the optimizer "
                        "state (e.g. across ZeRO stages or data-parallel sizes)")
    g.add_argument("--no-load-rng", action="store_true", help="do not restore the checkpoint's RNG states")
    g.add_argument("--use-checkpoint-args", action="store_true",
                   help="take the architecture (and vocabulary rows) from the --load checkpoint's metadata")
    g.add_argument("--override-opt_param-scheduler", "--override-opt-param-scheduler",
                   dest="override_opt_param_scheduler", action="store_true",
                   help="resume with this run's lr schedule flags although they differ from the checkpoint's")
    g.add_argument("--use-checkpoint-opt_param-scheduler", "--use-checkpoint-opt-param-scheduler",
                   dest="use_checkpoint_opt_param_scheduler", action="store_true",
                   help="resume with the checkpoint's lr schedule flags (--lr, --min-lr, warmup, decay)")
    g.add_argument("--override-data-order", action="store_true",
                   help="resume although --seed, --seq-length or --global-batch-size differ from the checkpoint's "
                        "(the samples read from the resumed position on are then not those of an uninterrupted run)")

    g = p.add_argument_group("evaluation and logging")
    g.add_argument("--eval-interval", type=int, default=1000, help="validate every N iterations (and at the end)")
    g.add_argument("--eval-iters", type=int, default=100, help="0 disables validation")
    g.add_argument("--log-interval", type=int, default=100,
                   help="log every N iterations (the first iteration is always logged)")
    g.add_argument("--log-dir", default=None, help="metrics.jsonl goes here (default: --save)")
    g.add_argument("--tensorboard-dir", default=None, help="TensorBoard event files (Megatron's tag names)")
    megatron_flags.add_wandb_flags(g)
    g.add_argument("--peak-tflops", type=float, default=None,
                   help="peak TFLOP/s per device for MFU (default: looked up by device name)")
    g.add_argument("--eval-humaneval", default=None, metavar="PROBLEMS",
                   help="humaneval (the 164 real problems), humaneval:N (the first N) or a problems file; "
                        "the best checkpoint is then chosen by pass@1")
    g.add_argument("--eval-humaneval-interval", type=int, default=None)
    g.add_argument("--humaneval-max-new-tokens", type=int, default=256, help="completion length cap")
    megatron_compat.add_compat_flags(p)
    return p


def parse_args(argv=None, world_size=None):
    """Parse and validate; world_size defaults to $WORLD_SIZE (1 without a launcher)."""
    args = build_parser().parse_args(argv)
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    validate_args(args, world_size)
    if int(os.environ.get("RANK", "0")) == 0:
        for note in args.flag_notes:
            print(f"note: {note}", file=sys.stderr, flush=True)
    return args


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
    _positive(args, "--num-layers", "--hidden-size", "--ffn-hidden-size", "--num-attention-heads",
              "--rotary-dim", "--seq-length", "--max-position-embeddings", "--micro-batch-size",
              "--global-batch-size", "--train-iters", "--exit-interval", "--lr-decay-iters",
              "--save-interval", "--eval-interval", "--log-interval", "--tensor-model-parallel-size",
              "--eval-humaneval-interval", "--vocab-size", "--make-vocab-size-divisible-by")
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
        raise ArgumentError(f"--seq-length {args.seq_length} exceeds the model's max position embeddings "
                            f"{args.max_position_embeddings} (--max-position-embeddings)")
    if world_size % tp:
        raise ArgumentError(f"--tensor-model-parallel-size {tp} does not divide the world size {world_size}")
    if heads % tp or args.ffn_hidden_size % tp:
        raise ArgumentError(f"--tensor-model-parallel-size {tp} must divide --num-attention-heads {heads} "
                            f"and --ffn-hidden-size {args.ffn_hidden_size}")
    args.world_size = world_size
    args.data_parallel_size = world_size // tp

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
            f"{args.micro_batch_size} x data-parallel size {args.data_parallel_size} = {per_step}")
    args.gradient_accumulation_steps = args.global_batch_size // per_step
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
        raise ArgumentError(f"--lr-warmup-iters {args.lr_warmup_iters} exceeds --lr-decay-iters "
                            f"{args.lr_decay_iters}")
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
        raise ArgumentError("--data-path is required (PREFIX or W1 PREFIX1 W2 PREFIX2 ...), "
                            "or --mock-data for synthetic tokens")
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
    if args.tokenizer is not None and not os.path.exists(args.tokenizer) \
            and not re.fullmatch(r"[\w.-]+/[\w.-]+", args.tokenizer):  # else a Hugging Face Hub name
        raise ArgumentError(f"--tokenizer: {args.tokenizer} does not exist")

    if args.save_interval is not None and args.save is None:
        raise ArgumentError("--save-interval needs --save DIR")
    if args.save_interval_minutes is not None and (args.save is None or not args.save_interval_minutes > 0):
        raise ArgumentError(f"--save-interval-minutes must be > 0 and needs --save DIR, got {args.save_interval_minutes}")
    if args.exit_interval is not None and args.save is None:
        raise ArgumentError("--exit-interval needs --save DIR (the run saves before exiting)")
    if args.keep_last is not None and (args.keep_last < 1 or args.save is None):
        raise ArgumentError(f"--keep-last must be >= 1 and needs --save DIR, got {args.keep_last}")
    if args.override_opt_param_scheduler and args.use_checkpoint_opt_param_scheduler:
        raise ArgumentError("--override-opt_param-scheduler and --use-checkpoint-opt_param-scheduler exclude each other")
    if args.finetune and args.load is None:
        raise ArgumentError("--finetune needs --load (a training checkpoint, or a model folder: megaphi or Hugging Face phi)")
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
