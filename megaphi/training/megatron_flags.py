"""Resolution of the flags a Megatron-LM user types beyond the core ones (declared in arguments.py):

- run length in samples or tokens (`--train-samples`, `--train-tokens`, `--lr-warmup-samples`,
  `--lr-decay-samples`), turned into iterations of --global-batch-size, as Megatron does without
  batch-size ramp-up;
- `--lr-warmup-fraction` of the decay iterations;
- `--exit-duration-in-mins`: save and exit once the run has lasted that long (all ranks agree);
- `--train-data-path` / `--valid-data-path` / `--test-data-path`: one dataset per split;
- `--skip-train` (alias `--eval-only`): validation (and test) loss and perplexity of a checkpoint;
- Weights & Biases: `--wandb-project`, `--wandb-exp-name`, `--wandb-save-dir`.

Each check raises ArgumentError with a one-line message naming the flag.
"""

import importlib.util
import math

from .argument_error import ArgumentError


def resolve_run_length(args):
    """Turn sample/token counts into iterations; needs args.global_batch_size and args.seq_length."""
    gbs = args.global_batch_size
    for name in ("train_samples", "train_tokens", "lr_warmup_samples", "lr_decay_samples"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise ArgumentError(f"--{name.replace('_', '-')} must be > 0, got {value}")
    if args.train_tokens is not None:
        if args.train_samples is not None:
            raise ArgumentError("--train-tokens and --train-samples exclude each other")
        args.train_samples = args.train_tokens // args.seq_length
        if args.train_samples == 0:
            raise ArgumentError(
                f"--train-tokens {args.train_tokens} is less than one sample of --seq-length {args.seq_length}"
            )
    if args.train_samples is not None:
        if args.train_iters is not None:
            raise ArgumentError("--train-samples and --train-iters exclude each other: give one run length")
        args.train_iters = args.train_samples // gbs
        if args.train_iters == 0:
            raise ArgumentError(f"--train-samples {args.train_samples} is less than one --global-batch-size {gbs}")
    if args.skip_train:  # no training: the lr schedule and its length are never read
        args.train_iters = 1 if args.train_iters is None else args.train_iters
        args.lr = 0.0 if args.lr is None else args.lr
    for name, iters_name in (("lr_warmup_samples", "lr_warmup_iters"), ("lr_decay_samples", "lr_decay_iters")):
        samples = getattr(args, name)
        if samples is None:
            continue
        flag = "--" + name.replace("_", "-")
        if args.train_samples is None:
            raise ArgumentError(
                f"{flag} goes with --train-samples (or --train-tokens); use "
                f"--{iters_name.replace('_', '-')} with --train-iters"
            )
        if getattr(args, iters_name) is not None:
            raise ArgumentError(f"{flag} and --{iters_name.replace('_', '-')} exclude each other")
        setattr(args, iters_name, samples // gbs)


def resolve_warmup(args):
    """--lr-warmup-fraction -> --lr-warmup-iters (after --lr-decay-iters is known)."""
    if args.lr_warmup_fraction is None:
        if args.lr_warmup_iters is None:
            args.lr_warmup_iters = 0
        return
    fraction = args.lr_warmup_fraction
    if args.lr_warmup_iters is not None:
        raise ArgumentError("--lr-warmup-fraction and --lr-warmup-iters (or --lr-warmup-samples) exclude each other")
    if not (math.isfinite(fraction) and 0.0 <= fraction <= 1.0):
        raise ArgumentError(f"--lr-warmup-fraction must be in [0, 1], got {fraction}")
    args.lr_warmup_iters = int(fraction * args.lr_decay_iters)


def validate_run_control(args):
    if args.exit_duration_in_mins is not None:
        if not (math.isfinite(args.exit_duration_in_mins) and args.exit_duration_in_mins > 0):
            raise ArgumentError(f"--exit-duration-in-mins must be > 0, got {args.exit_duration_in_mins}")
        if args.save is None:
            raise ArgumentError("--exit-duration-in-mins needs --save DIR (the run saves before exiting)")
    if args.skip_train:
        if args.load is None:
            raise ArgumentError("--skip-train needs --load (a training checkpoint or a model folder to evaluate)")
        if args.eval_iters <= 0:
            raise ArgumentError("--skip-train evaluates --eval-iters batches; --eval-iters must be > 0")


def per_split_data_paths(args):
    """{split: data path list} for the --{split}-data-path flags given, or {} (then --data-path)."""
    return {
        split: getattr(args, f"{split}_data_path")
        for split in ("train", "valid", "test")
        if getattr(args, f"{split}_data_path")
    }


def validate_data_sources(args):
    """--data-path, --mock-data and the per-split paths: exactly one source of training data."""
    per_split = per_split_data_paths(args)
    if per_split:
        if args.data_path:
            raise ArgumentError(
                "--data-path and --train-data-path/--valid-data-path/--test-data-path exclude each "
                "other: one blend split by --split, or one path per split"
            )
        if args.mock_data:
            raise ArgumentError("--mock-data and --train-data-path exclude each other: synthetic tokens or token files")
        if "train" not in per_split and not args.skip_train:
            raise ArgumentError("--valid-data-path/--test-data-path need --train-data-path (or --skip-train)")


def validate_wandb(args):
    if args.wandb_project is None:
        if args.wandb_exp_name is not None or args.wandb_save_dir is not None:
            raise ArgumentError("--wandb-exp-name and --wandb-save-dir need --wandb-project")
        return
    if importlib.util.find_spec("wandb") is None:
        raise ArgumentError(
            "--wandb-project needs the wandb package: pip install wandb (or pip install megaphi[wandb])"
        )


def add_run_length_args(group):
    group.add_argument(
        "--train-samples",
        type=int,
        default=None,
        help="train for this many samples: --train-iters = samples // --global-batch-size",
    )
    group.add_argument(
        "--train-tokens",
        type=int,
        default=None,
        help="train for this many tokens: --train-samples = tokens // --seq-length",
    )
    group.add_argument(
        "--exit-duration-in-mins",
        type=float,
        default=None,
        help="save and exit once the run has lasted this many minutes (all ranks agree)",
    )
    group.add_argument(
        "--skip-train",
        "--eval-only",
        dest="skip_train",
        action="store_true",
        help="no training: report the validation (and test) loss and perplexity of --load",
    )


def add_lr_units_args(group):
    group.add_argument(
        "--lr-warmup-fraction",
        type=float,
        default=None,
        help="warmup as a fraction of --lr-decay-iters (instead of --lr-warmup-iters)",
    )
    group.add_argument(
        "--lr-warmup-samples",
        type=int,
        default=None,
        help="warmup in samples (with --train-samples): iterations = samples // global batch",
    )
    group.add_argument(
        "--lr-decay-samples",
        type=int,
        default=None,
        help="decay in samples (with --train-samples): iterations = samples // global batch",
    )


def add_split_data_args(group):
    for split in ("train", "valid", "test"):
        group.add_argument(
            f"--{split}-data-path",
            nargs="+",
            default=None,
            help=f"the {split} split's own PREFIX or W1 PREFIX1 W2 PREFIX2 ... (used whole, "
            f"instead of --data-path with --split)",
        )


def add_wandb_args(group):
    group.add_argument(
        "--wandb-project",
        default=None,
        help="log metrics to this Weights & Biases project (needs `pip install wandb`; "
        "WANDB_MODE=offline works without a network)",
    )
    group.add_argument("--wandb-exp-name", default=None, help="W&B run name (default: W&B's own)")
    group.add_argument(
        "--wandb-save-dir", default=None, help="folder for W&B's local files (default: --log-dir, else W&B's ./wandb)"
    )
