"""Flags of Megatron-LM and Megatron-DeepSpeed (declared in arguments.py) that megaphi takes with their
meaning, notes about, or refuses in one line, and the closest known flag for an unknown one.

- accepted, doing what they say: `--vocab-file/--merge-file` (`--tokenizer-type GPT2BPETokenizer`: a
  byte-level BPE from the pair), `--use-flash-attn`, `--attention-backend flash|fused|unfused|local|auto`,
  `--position-embedding-type rope`, `--rotary-percent`, `--use-distributed-optimizer` (ZeRO 1),
  `--overlap-grad-reduce` (ZeRO's overlap_comm), `--deepspeed_config`, `--log-params-norm`,
  `--log-num-zeros-in-grad` (num zeros in the log line), `--tensorboard-log-interval N`, `--no-save-optim`
  (weights-only checkpoints, resumed with --no-load-optim);
- a one-line note where megaphi already works that way (or cannot do more): `--deepspeed`,
  `--untie-embeddings-and-output-weights`, `--log-throughput`, `--log-memory-to-tensorboard`, ...;
- refused where they contradict phi's architecture: `--swiglu`, `--group-query-attention`,
  `--num-query-groups`, `--normalization RMSNorm`, `--disable-bias-linear`.
"""

import argparse
import difflib
import os

from .argument_error import ArgumentError

# Megatron's --attention-backend values -> megaphi's (fused: TE's cuDNN attention; unfused/local: plain math)
MEGATRON_ATTENTION_BACKENDS = {"flash": "flash-attn", "fused": "sdpa-cudnn", "unfused": "math", "local": "math"}

# flag -> the note printed when it is given (what megaphi does anyway)
NOTES = {
    "deepspeed": "--deepspeed: megaphi always trains on DeepSpeed (ZeRO stage from --zero-stage or the JSON)",
    "untie_embeddings_and_output_weights": "--untie-embeddings-and-output-weights: phi-1's lm_head is already "
    "untied from the embedding (and has a bias)",
    "log_throughput": "--log-throughput: megaphi always logs tokens/s, TFLOP/s per device and MFU",
    "log_memory_to_tensorboard": "--log-memory-to-tensorboard: peak memory is always logged (mem-max-allocated-bytes)",
    "log_validation_ppl_to_tensorboard": "--log-validation-ppl-to-tensorboard: always logged (lm loss validation ppl)",
    "timing_log_level": "--timing-log-level: megaphi times whole iterations only (iteration-time)",
    "log_params_norm": "--log-params-norm: the parameters' L2 norm is logged as params-norm",
}
NO_SAVE_OPTIM_ZERO3 = (
    "--no-save-optim: ZeRO 3 keeps the weights partitioned with the optimizer state; use --zero-stage 0-2"
)
REFUSED = {  # flag -> why it cannot apply to phi
    "swiglu": "--swiglu: phi's MLP is fc1 -> gelu_tanh -> fc2 (no gated unit); a SwiGLU model is another architecture",
    "group_query_attention": "--group-query-attention: phi uses multi-head attention (one key/value head per "
    "query head)",
    "num_query_groups": "--num-query-groups: phi uses multi-head attention (one key/value head per query head)",
    "disable_bias_linear": "--disable-bias-linear: every phi Linear has a bias (the released checkpoints' shape)",
}


def resolve_compat(args):
    """Apply the Megatron flags to megaphi's (before the model fields are resolved); returns the notes."""
    notes = []
    for name, why in REFUSED.items():
        if getattr(args, name) not in (None, False):
            raise ArgumentError(why)
    if args.normalization != "LayerNorm":
        raise ArgumentError(
            f"--normalization {args.normalization}: phi uses LayerNorm (one shared LayerNorm per block, with a bias)"
        )
    if args.position_embedding_type != "rope":
        raise ArgumentError(
            f"--position-embedding-type {args.position_embedding_type}: phi uses rotary "
            f"embeddings (rope) on part of each head (--rotary-dim / --rotary-percent)"
        )
    for name, note in NOTES.items():
        if getattr(args, name) not in (None, False):
            notes.append(note)
    args.attention_backend = MEGATRON_ATTENTION_BACKENDS.get(args.attention_backend, args.attention_backend)
    if args.use_flash_attn:
        if args.attention_backend not in ("auto", "flash-attn"):
            raise ArgumentError(f"--use-flash-attn and --attention-backend {args.attention_backend} exclude each other")
        args.attention_backend = "flash-attn"
    if args.deepspeed_config_alias is not None:
        if args.deepspeed_config not in (None, args.deepspeed_config_alias):
            raise ArgumentError("--deepspeed_config and --deepspeed-config name different files")
        args.deepspeed_config = args.deepspeed_config_alias
    if args.use_distributed_optimizer:
        if args.zero_stage == 0:
            raise ArgumentError(
                "--use-distributed-optimizer shards the optimizer state (ZeRO 1) but --zero-stage 0 asks for none"
            )
        if args.zero_stage is None:
            args.zero_stage, args.zero_stage_source = 1, "--use-distributed-optimizer"
    check_zero3_flags(args)
    if args.tensorboard_log_interval is not None and args.tensorboard_log_interval < 1:
        raise ArgumentError(f"--tensorboard-log-interval must be >= 1, got {args.tensorboard_log_interval}")
    _resolve_tokenizer_files(args)
    return notes


def _resolve_tokenizer_files(args):
    pair = (args.vocab_file, args.merge_file)
    if args.tokenizer_type == "GPT2BPETokenizer" and None in pair:
        raise ArgumentError("--tokenizer-type GPT2BPETokenizer needs --vocab-file and --merge-file")
    if args.tokenizer_type == "HuggingFaceTokenizer" and args.tokenizer is None:
        raise ArgumentError(
            "--tokenizer-type HuggingFaceTokenizer needs --tokenizer-model (a tokenizer.json, folder or Hub name)"
        )
    if pair == (None, None):
        return
    if None in pair:
        raise ArgumentError("--vocab-file and --merge-file go together (a GPT-2-style byte-level BPE)")
    if args.tokenizer is not None:
        raise ArgumentError("--vocab-file/--merge-file and --tokenizer exclude each other: one tokenizer")
    for flag, path in (("--vocab-file", args.vocab_file), ("--merge-file", args.merge_file)):
        if not os.path.isfile(path):
            raise ArgumentError(f"{flag}: {path} does not exist")


def closest_flag(parser, flag):
    """The known flag nearest to an unknown one (difflib), or None."""
    known = [
        s
        for action in parser._actions
        for s in action.option_strings  # argparse's public-by-use list
        if s.startswith("--") and action.help != argparse.SUPPRESS
    ]
    name = flag.split("=", 1)[0]
    matches = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    return matches[0] if matches else None


def add_megatron_args(parser):
    g = parser.add_argument_group("Megatron-LM / Megatron-DeepSpeed flags (see docs/training.md)")
    g.add_argument("--vocab-file", default=None, help="GPT-2-style vocab.json (with --merge-file): a byte-level BPE")
    g.add_argument("--merge-file", default=None, help="GPT-2-style merges.txt (with --vocab-file)")
    g.add_argument(
        "--tokenizer-type",
        default=None,
        choices=("GPT2BPETokenizer", "HuggingFaceTokenizer"),
        help="GPT2BPETokenizer: --vocab-file + --merge-file; HuggingFaceTokenizer: --tokenizer-model",
    )
    g.add_argument("--use-flash-attn", action="store_true", help="= --attention-backend flash-attn")
    g.add_argument(
        "--position-embedding-type",
        default="rope",
        help="rope only (phi's rotary embeddings); accepted for Megatron scripts",
    )
    g.add_argument(
        "--rotary-percent",
        type=float,
        default=None,
        help="rotary dim = this x head dim (Megatron's way to give --rotary-dim)",
    )
    g.add_argument("--normalization", default="LayerNorm", help="LayerNorm only (phi's)")
    g.add_argument(
        "--use-distributed-optimizer",
        action="store_true",
        help="shard the optimizer state over data-parallel ranks: ZeRO stage 1 (unless --zero-stage >= 1)",
    )
    g.add_argument(
        "--overlap-grad-reduce",
        action="store_true",
        help="overlap the gradient reduction with the backward pass (ZeRO's overlap_comm)",
    )
    g.add_argument("--deepspeed", action="store_true", help="accepted (megaphi always runs DeepSpeed)")
    g.add_argument("--deepspeed_config", dest="deepspeed_config_alias", default=None, help=argparse.SUPPRESS)
    for flag in (
        "--untie-embeddings-and-output-weights",
        "--log-throughput",
        "--log-memory-to-tensorboard",
        "--log-validation-ppl-to-tensorboard",
        "--log-params-norm",
        "--swiglu",
        "--group-query-attention",
        "--disable-bias-linear",
    ):
        g.add_argument(flag, action="store_true", help=argparse.SUPPRESS)
    g.add_argument(
        "--log-num-zeros-in-grad",
        action="store_true",
        help="count the zero entries of each step's gradient: 'num zeros' in the log line, num-zeros in "
        "TensorBoard (a pass over the gradients and a scalar all-reduce per step; ZeRO 0-2)",
    )
    g.add_argument(
        "--tensorboard-log-interval",
        type=int,
        default=None,
        metavar="N",
        help="TensorBoard / W&B scalars every N iterations, that iteration's loss (default: at every log "
        "line, the interval's mean loss); metrics.jsonl and stdout keep --log-interval",
    )
    g.add_argument(
        "--no-save-optim",
        action="store_true",
        help="checkpoints without optimizer state (weights, lr schedule, data position, RNG); resume them "
        "with --no-load-optim (ZeRO 0-2)",
    )
    g.add_argument("--timing-log-level", type=int, default=None, choices=(0, 1, 2), help=argparse.SUPPRESS)
    g.add_argument("--num-query-groups", type=int, default=None, help=argparse.SUPPRESS)


def check_zero3_flags(args):
    """The flags that need whole parameters or gradients: refused at ZeRO 3 (one line)."""
    if args.zero_stage != 3:
        return
    if args.log_params_norm:
        raise ArgumentError("--log-params-norm: ZeRO 3 partitions the parameters; use --zero-stage 0-2")
    if args.log_num_zeros_in_grad:  # a ZeRO 3 DeepSpeed JSON: refused at the engine
        raise ArgumentError(
            "--log-num-zeros-in-grad: ZeRO 3 partitions the gradients per parameter; use --zero-stage 0-2"
        )
    if args.no_save_optim:  # a ZeRO 3 DeepSpeed JSON: refused at the engine
        raise ArgumentError(NO_SAVE_OPTIM_ZERO3)
