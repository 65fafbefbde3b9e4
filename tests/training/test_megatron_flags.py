"""Megatron-LM flags beyond the core ones: run length in samples/tokens, warmup fraction, aliases,
per-split data paths, @file arguments, --help with defaults, W&B and run-control checks."""

import subprocess
import sys

import numpy as np
import pytest

from megaphi.training.arguments import ArgumentError, build_parser, parse_args


@pytest.fixture(scope="module")
def prefix(tmp_path_factory):
    from megaphi.data import IndexedDatasetBuilder

    p = str(tmp_path_factory.mktemp("data") / "toy")
    builder = IndexedDatasetBuilder(p + ".bin", np.uint16)
    builder.add_document(np.arange(100, dtype=np.uint16))
    builder.finalize(p + ".idx")
    return p


def _base(*extra):
    return ["--model", "tiny", "--micro-batch-size", "2", "--lr", "1e-3", *extra]


def test_train_samples_and_tokens_become_iterations(prefix):
    args = parse_args(_base("--data-path", prefix, "--global-batch-size", "4", "--train-samples", "41"), world_size=1)
    assert (args.train_iters, args.lr_decay_iters, args.lr_warmup_iters) == (10, 10, 0)
    args = parse_args(
        _base(
            "--data-path",
            prefix,
            "--global-batch-size",
            "4",
            "--train-tokens",
            str(256 * 40),
            "--lr-warmup-samples",
            "8",
            "--lr-decay-samples",
            "20",
        ),
        world_size=1,
    )
    assert (args.train_samples, args.train_iters, args.lr_warmup_iters, args.lr_decay_iters) == (40, 10, 2, 5)


def test_warmup_fraction(prefix):
    args = parse_args(
        _base("--data-path", prefix, "--train-iters", "20", "--lr-warmup-fraction", "0.075"), world_size=1
    )
    assert args.lr_warmup_iters == 1  # int(0.075 * 20), as Megatron
    args = parse_args(
        _base("--data-path", prefix, "--train-iters", "400", "--lr-decay-iters", "200", "--lr-warmup-fraction", "0.1"),
        world_size=1,
    )
    assert args.lr_warmup_iters == 20


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--train-iters", "10", "--train-samples", "4"], "--train-samples and --train-iters exclude each other"),
        (
            ["--train-samples", "1", "--global-batch-size", "4"],
            "--train-samples 1 is less than one --global-batch-size",
        ),
        (["--train-tokens", "100"], "--train-tokens 100 is less than one sample"),
        (["--train-samples", "-3"], "--train-samples must be > 0"),
        (["--train-iters", "10", "--lr-warmup-samples", "4"], "--lr-warmup-samples goes with --train-samples"),
        (["--train-iters", "10", "--lr-warmup-fraction", "1.5"], "--lr-warmup-fraction must be in [0, 1]"),
        (
            ["--train-iters", "10", "--lr-warmup-fraction", "0.1", "--lr-warmup-iters", "1"],
            "--lr-warmup-fraction and --lr-warmup-iters",
        ),
        (["--train-iters", "10", "--exit-duration-in-mins", "5"], "--exit-duration-in-mins needs --save"),
        (["--train-iters", "10", "--exit-duration-in-mins", "0", "--save", "x"], "--exit-duration-in-mins must be > 0"),
        (["--train-iters", "10", "--skip-train"], "--skip-train needs --load"),
        (["--train-iters", "10", "--eval-only", "--load", "x", "--eval-iters", "0"], "--eval-iters must be > 0"),
        (
            ["--train-iters", "10", "--wandb-save-dir", "x"],
            "--wandb-exp-name and --wandb-save-dir need --wandb-project",
        ),
        (["--train-iters", "10", "--train-data-path", "PREFIX"], "--data-path and --train-data-path"),
    ],
)
def test_bad_megatron_flags_name_the_flag(prefix, extra, message):
    with pytest.raises(ArgumentError) as info:
        parse_args(_base("--data-path", prefix, *[prefix if x == "PREFIX" else x for x in extra]), world_size=1)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_per_split_data_paths(prefix, tmp_path):
    args = parse_args(
        _base("--train-iters", "3", "--train-data-path", prefix, "--valid-data-path", "1", prefix), world_size=1
    )
    assert args.train_data_path == [prefix] and args.valid_data_path == ["1", prefix] and not args.data_path
    with pytest.raises(ArgumentError, match="--valid-data-path: .*missing.bin does not exist"):
        parse_args(
            _base("--train-iters", "3", "--train-data-path", prefix, "--valid-data-path", str(tmp_path / "missing")),
            world_size=1,
        )
    with pytest.raises(ArgumentError, match="need --train-data-path"):
        parse_args(_base("--train-iters", "3", "--valid-data-path", prefix), world_size=1)


def test_aliases(prefix, tmp_path):
    args = parse_args(
        _base(
            "--data-path", prefix, "--train-iters", "3", "--tokenizer-model", str(tmp_path), "--recompute-activations"
        ),
        world_size=1,
    )
    # Megatron's --recompute-activations is selective recompute (core attention), not whole layers
    assert args.tokenizer == str(tmp_path) and args.recompute_granularity == "selective" and not args.recompute
    args = parse_args(
        _base("--data-path", prefix, "--train-iters", "3", "--eval-only", "--load", str(tmp_path)), world_size=1
    )
    assert args.skip_train is True


def test_flags_from_a_file(prefix, tmp_path):
    (tmp_path / "args.txt").write_text(
        f"# the tiny recipe\n--model tiny --micro-batch-size 2\n--lr 1e-3  # peak\n"
        f"--data-path '{prefix}'\n--train-iters 4\n"
    )
    args = parse_args([f"@{tmp_path / 'args.txt'}", "--train-iters", "5"], world_size=1)
    assert (args.model, args.lr, args.data_path, args.train_iters) == ("tiny", 1e-3, [prefix], 5)  # later wins


def test_help_shows_defaults():
    text = " ".join(build_parser().format_help().split())  # undo line wrapping
    assert "(default: 1234)" in text and "(default: 969,30,1)" in text and "(default: 100)" in text
    assert "(default: None)" not in text and "(default: False)" not in text
    for flag in (
        "--train-samples",
        "--lr-warmup-fraction",
        "--exit-duration-in-mins",
        "--tokenizer-model",
        "--recompute-activations",
        "--train-data-path",
        "--skip-train",
        "--eval-only",
        "--wandb-project",
    ):
        assert flag in text


def test_wandb_missing_is_a_one_line_error(prefix, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ArgumentError, match="--wandb-project needs the wandb package: pip install wandb"):
        parse_args(_base("--data-path", prefix, "--train-iters", "3", "--wandb-project", "p"), world_size=1)


def test_cli_help_exits_zero():
    out = subprocess.run(
        [sys.executable, "-m", "megaphi.pretrain", "--help"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and "--train-samples" in out.stdout
