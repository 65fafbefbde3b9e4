"""Command-line flags of `python -m megaphi.pretrain`: Megatron-LM's names, `@FILE`, `--help` with
defaults. Every flag is declared here, one `_add_*_args` group per concern; parsing only.

The parsed flags are checked and resolved into a frozen `RunConfig` by megaphi.training.config
(`resolve_config`); `parse_args` gives the same resolved values as a namespace, for tools and tests.
"""

import argparse
import os
import shlex
import sys

from megaphi.training import megatron_compat, megatron_flags
from megaphi.training.argument_error import ERROR_PREFIX, ArgumentError  # noqa: F401 (imported from here)
from megaphi.training.megatron_compat import MEGATRON_ATTENTION_BACKENDS

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
            message = (
                f"unrecognized argument {flag}"
                + (f" (did you mean {near}?)" if near else "")
                + "; --help lists the flags"
            )
        self.exit(2, f"{ERROR_PREFIX} {message}\n")


def build_parser():
    p = ArgumentParser(
        prog="python -m megaphi.pretrain",
        description="Pretrain or finetune a phi-1-class model (Megatron-style flags, DeepSpeed ZeRO). "
        "@FILE reads more flags from FILE.",
        allow_abbrev=False,
        fromfile_prefix_chars="@",
        formatter_class=HelpFormatter,
    )
    from megaphi import __version__

    p.add_argument("--version", action="version", version=f"megaphi.pretrain {__version__}")
    for add_group in (
        _add_model_args,
        _add_batch_args,
        _add_learning_rate_args,
        _add_optimizer_args,
        _add_precision_args,
        _add_distributed_args,
        _add_data_args,
        _add_checkpoint_args,
        _add_logging_args,
        megatron_compat.add_megatron_args,
    ):
        add_group(p)
    return p


def parse_flags(argv=None):
    """The command line as argparse reads it, nothing checked beyond argparse's types and choices."""
    return build_parser().parse_args(argv)


def parse_args(argv=None, world_size=None):
    """Parse and resolve (megaphi.training.flag_checks.resolve_flags): the run's flag values as a new
    namespace. world_size defaults to $WORLD_SIZE (1 without a launcher)."""
    from megaphi.training.flag_checks import resolve_flags

    args = resolve_flags(parse_flags(argv), world_size)
    if int(os.environ.get("RANK", "0")) == 0:
        for note in args.flag_notes:
            print(f"note: {note}", file=sys.stderr, flush=True)
    return args


def _add_model_args(p):
    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        default="phi-1",
        choices=MODEL_PRESETS,
        help="architecture preset; the flags below override single fields",
    )
    g.add_argument("--num-layers", type=int)
    g.add_argument("--hidden-size", type=int)
    g.add_argument("--ffn-hidden-size", type=int)
    g.add_argument("--num-attention-heads", type=int)
    g.add_argument("--rotary-dim", type=int)
    g.add_argument("--seq-length", type=int, help="training sequence length (default: max positions)")
    g.add_argument("--max-position-embeddings", type=int)
    g.add_argument("--vocab-size", type=int, help="only when no --tokenizer is given")
    g.add_argument(
        "--make-vocab-size-divisible-by",
        type=int,
        default=128,
        help="pad the vocabulary to a multiple of this x TP size",
    )
    g.add_argument("--attention-dropout", type=float)
    g.add_argument("--hidden-dropout", type=float, help="residual dropout (attention and MLP outputs)")
    g.add_argument("--embedding-dropout", type=float)
    g.add_argument("--init-method-std", type=float)
    g.add_argument("--recompute", action="store_true", help="activation recomputation per layer (full granularity)")
    g.add_argument(
        "--recompute-activations",
        action="store_true",
        help="Megatron's shorthand for --recompute-granularity selective",
    )
    g.add_argument(
        "--attention-backend",
        default="auto",
        choices=(
            "auto",
            "flash-attn",
            "sdpa-flash",
            "sdpa-cudnn",
            "sdpa-efficient",
            "math",
            *MEGATRON_ATTENTION_BACKENDS,
        ),
        help="auto: flash-attn when installed (CUDA fp16/bf16), else torch SDPA's own choice; the others "
        "force one kernel and fail at start when it cannot run (Megatron's values: flash = "
        "flash-attn, fused = sdpa-cudnn, unfused/local = math)",
    )
    g.add_argument(
        "--recompute-granularity",
        choices=("full", "selective"),
        default=None,
        help="full: recompute whole layers (implies --recompute); selective: recompute only the "
        "core attention (Megatron's names)",
    )
    g.add_argument(
        "--recompute-num-layers",
        type=int,
        default=0,
        help="full granularity: recompute the first N layers only (0 = all)",
    )
    g.add_argument(
        "--torch-compile",
        default="auto",
        choices=("auto", "on", "off"),
        help="torch.compile each decoder block (Inductor fuses the elementwise work around the "
        "matmuls and attention); auto: off until verified on a GPU, see docs/training.md",
    )
    g.add_argument(
        "--loss-chunk-tokens",
        type=int,
        default=0,
        help="compute lm_head + cross entropy this many tokens at a time, never materializing the "
        "full logits (0 = off)",
    )
    g.add_argument(
        "--layernorm-impl",
        default="auto",
        choices=LAYERNORM_IMPL_CHOICES,
        help="LayerNorm kernel (auto: CUDA kernel on a GPU, torch otherwise)",
    )
    g.add_argument(
        "--rotary-impl",
        default="auto",
        choices=ROTARY_IMPL_CHOICES,
        help="rotary embedding kernel (auto: CUDA kernel on a GPU, torch otherwise)",
    )


def _add_batch_args(p):
    g = p.add_argument_group("batch and iterations")
    g.add_argument("--micro-batch-size", type=int, default=None, help="samples per device per forward pass")
    g.add_argument(
        "--global-batch-size",
        type=int,
        default=None,
        help="default: micro batch x data-parallel size (no accumulation)",
    )
    g.add_argument("--train-iters", type=int, default=None, help="optimizer steps to train for")
    g.add_argument(
        "--exit-interval", type=int, default=None, help="save and exit when the iteration is a multiple of this"
    )
    g.add_argument("--seed", type=int, default=1234, help="seeds data order, initialization and dropout")
    megatron_flags.add_run_length_args(g)


def _add_learning_rate_args(p):
    g = p.add_argument_group("learning rate")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate")
    g.add_argument("--min-lr", type=float, default=0.0, help="learning rate at the end of the decay")
    g.add_argument("--lr-warmup-iters", type=int, default=None, help="linear warmup steps (default: 0)")
    g.add_argument("--lr-decay-iters", type=int, default=None, help="default: --train-iters")
    g.add_argument(
        "--lr-decay-style",
        default="linear",
        choices=("linear", "cosine", "constant"),
        help="decay from --lr to --min-lr after the warmup",
    )
    megatron_flags.add_lr_units_args(g)


def _add_optimizer_args(p):
    g = p.add_argument_group("optimizer")
    g.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (not on biases, LayerNorm)")
    g.add_argument("--adam-beta1", type=float, default=0.9, help="AdamW beta1")
    g.add_argument("--adam-beta2", type=float, default=0.999, help="AdamW beta2")
    g.add_argument("--adam-eps", type=float, default=1e-8, help="AdamW epsilon")
    g.add_argument(
        "--optimizer-impl",
        choices=("auto", "torch", "torch-fused", "deepspeed-fused"),
        default="auto",
        help="AdamW implementation: auto = torch's fused AdamW on CUDA (no JIT compile), torch's "
        "default on CPU; deepspeed-fused = DeepSpeed's FusedAdam (compiles on first use)",
    )
    g.add_argument(
        "--clip-grad",
        type=float,
        default=None,
        help="global gradient norm clip, 0 disables it (default: 1.0, or the --deepspeed-config JSON's "
        "gradient_clipping)",
    )


def _add_precision_args(p):
    g = p.add_argument_group("precision")
    g.add_argument("--fp16", action="store_true", help="fp16 with dynamic loss scaling (default: fp32)")
    g.add_argument("--bf16", action="store_true", help="bf16 (default: fp32)")
    g.add_argument("--initial-loss-scale", type=float, default=2.0**16, help="fp16: starting loss scale")
    g.add_argument("--min-loss-scale", type=float, default=1.0, help="fp16: the loss scale never goes below")
    g.add_argument(
        "--loss-scale-window", type=int, default=1000, help="fp16: steps without overflow before the loss scale doubles"
    )
    g.add_argument("--hysteresis", type=int, default=2, help="fp16: overflows tolerated before the scale halves")


def _add_distributed_args(p):
    g = p.add_argument_group("distributed")
    g.add_argument(
        "--zero-stage",
        type=int,
        default=None,
        help="DeepSpeed ZeRO stage 0-3 (default: 1 with several data-parallel ranks, else 0; fp16: 1; bf16: 2 with "
        "several data-parallel ranks; docs/training.md, ZeRO stage by precision)",
    )
    g.add_argument("--deepspeed-config", default=None, help="JSON merged over the generated config")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1, help="tensor-parallel ranks per model")
    g.add_argument(
        "--pipeline-model-parallel-size",
        type=int,
        default=1,
        help="pipeline stages: the layers split over this many ranks, run with the 1F1B schedule (docs/pipeline.md)",
    )
    g.add_argument(
        "--num-layers-per-virtual-pipeline-stage",
        type=int,
        default=None,
        help="interleaved 1F1B: layers per model chunk; each rank holds num_layers / P / this chunks",
    )
    g.add_argument(
        "--pipeline-layers-per-stage",
        default=None,
        metavar="N1,N2,...",
        help="uneven split: decoder layers of each stage (P counts, or P x virtual stages), summing to --num-layers",
    )
    g.add_argument(
        "--sequence-parallel",
        action="store_true",
        help="shard LayerNorm/dropout activations over the sequence (TP > 1 only)",
    )
    g.add_argument(
        "--check-replicated-params",
        type=int,
        nargs="?",
        const=1,
        default=None,
        metavar="N",
        help="TP > 1: check that parameters every TP rank holds whole are bitwise equal across the TP "
        "group at start and every N iterations (default 1); always checked before each save",
    )
    g.add_argument(
        "--no-async-tensor-model-parallel-allreduce",
        dest="async_tensor_model_parallel_allreduce",
        action="store_false",
        help="TP > 1: communicate the column layers' input gradient after their weight gradients "
        "instead of overlapping the two (Megatron's name; for comparison)",
    )
    g.add_argument(
        "--distributed-backend", default=None, choices=("nccl", "gloo"), help="default: nccl with CUDA, else gloo"
    )
    g.add_argument(
        "--distributed-timeout-minutes",
        type=float,
        default=10.0,
        help="a collective (or the start-up rendezvous) waiting longer than this for the other ranks "
        "stops the run with an error (a stopped, hung or dead rank)",
    )
    # Launchers pass one of these; LOCAL_RANK in the environment is used otherwise.
    g.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=None, help=argparse.SUPPRESS)


def _add_data_args(p):
    g = p.add_argument_group("data")
    g.add_argument(
        "--data-path", nargs="+", default=None, help="PREFIX or W1 PREFIX1 W2 PREFIX2 ... (prefix of .bin/.idx)"
    )
    g.add_argument(
        "--mock-data",
        action="store_true",
        help="train on synthetic tokens (no --data-path, no tokenizer needed): benchmarks, checks",
    )
    g.add_argument("--split", default="969,30,1", help="train,valid,test weights of --data-path's documents")
    megatron_flags.add_split_data_args(g)
    g.add_argument(
        "--tokenizer",
        "--tokenizer-model",
        dest="tokenizer",
        default=None,
        help="tokenizer folder, tokenizer.json or Hugging Face Hub name",
    )
    g.add_argument(
        "--data-cache-path",
        "--data-cache-dir",
        dest="data_cache_path",
        default=None,
        help="folder for the dataset index cache (default: <data dir>/cache/GPTDataset_indices)",
    )
    g.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes")


def _add_checkpoint_args(p):
    g = p.add_argument_group("checkpoints")
    g.add_argument("--save", default=None, help="checkpoint folder to write")
    g.add_argument(
        "--load",
        default=None,
        help="checkpoint folder to resume from (or, with --finetune / "
        "--skip-train, a model folder: megaphi or Hugging Face phi)",
    )
    g.add_argument("--save-interval", type=int, default=None, help="save every N iterations (and at the end)")
    g.add_argument(
        "--save-interval-minutes",
        type=float,
        default=None,
        metavar="M",
        help="also save when M minutes have passed since the start or the last such save (decided "
        "on rank 0, all ranks save at the same iteration)",
    )
    g.add_argument(
        "--finetune",
        action="store_true",
        help="with --load: load weights only; fresh optimizer, schedule and iteration",
    )
    g.add_argument(
        "--no-export-model",
        action="store_true",
        help="do not write DIR/<tag>/model/ (config.json + model.safetensors) at each save",
    )
    g.add_argument(
        "--keep-last",
        type=int,
        default=None,
        metavar="N",
        help="after each save, delete iter_* checkpoints older than the newest N (never the one "
        "`latest` or `best` names)",
    )
    g.add_argument(
        "--start-over",
        action="store_true",
        help="train from iteration 0 although --save/--load holds iter_* checkpoints without a "
        "`latest` file (they are overwritten); without it such a run is refused",
    )
    g.add_argument(
        "--no-load-optim",
        action="store_true",
        help="resume weights, lr schedule position, data position and RNG, but not the optimizer "
        "state (e.g. across ZeRO stages or data-parallel sizes)",
    )
    g.add_argument("--no-load-rng", action="store_true", help="do not restore the checkpoint's RNG states")
    g.add_argument(
        "--use-checkpoint-args",
        action="store_true",
        help="take the architecture (and vocabulary rows) from the --load checkpoint's metadata",
    )
    g.add_argument(
        "--override-opt_param-scheduler",
        "--override-opt-param-scheduler",
        dest="override_opt_param_scheduler",
        action="store_true",
        help="resume with this run's lr schedule flags although they differ from the checkpoint's",
    )
    g.add_argument(
        "--use-checkpoint-opt_param-scheduler",
        "--use-checkpoint-opt-param-scheduler",
        dest="use_checkpoint_opt_param_scheduler",
        action="store_true",
        help="resume with the checkpoint's lr schedule flags (--lr, --min-lr, warmup, decay)",
    )
    g.add_argument(
        "--override-data-order",
        action="store_true",
        help="resume although --seed, --seq-length or --global-batch-size differ from the checkpoint's "
        "(the samples read from the resumed position on are then not those of an uninterrupted run)",
    )


def _add_logging_args(p):
    g = p.add_argument_group("evaluation and logging")
    g.add_argument("--eval-interval", type=int, default=1000, help="validate every N iterations (and at the end)")
    g.add_argument("--eval-iters", type=int, default=100, help="0 disables validation")
    g.add_argument(
        "--log-interval", type=int, default=100, help="log every N iterations (the first iteration is always logged)"
    )
    g.add_argument("--log-dir", default=None, help="metrics.jsonl goes here (default: --save)")
    g.add_argument("--tensorboard-dir", default=None, help="TensorBoard event files (Megatron's tag names)")
    megatron_flags.add_wandb_args(g)
    g.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="peak TFLOP/s per device for MFU (default: looked up by device name)",
    )
    g.add_argument(
        "--eval-humaneval",
        default=None,
        metavar="PROBLEMS",
        help="humaneval (the 164 real problems), humaneval:N (the first N) or a problems file; "
        "the best checkpoint is then chosen by pass@1",
    )
    g.add_argument("--eval-humaneval-interval", type=int, default=None)
    g.add_argument("--humaneval-max-new-tokens", type=int, default=256, help="completion length cap")
