"""Flag parsing and validation: each bad flag fails up front with a message naming it."""

import json
import subprocess
import sys

import numpy as np
import pytest

from megaphi.training.arguments import ArgumentError, parse_args
from megaphi.training.deepspeed_config import build_deepspeed_config, resolve_deepspeed


@pytest.fixture(scope="module")
def data_prefix(tmp_path_factory):
    from megaphi.data import IndexedDatasetBuilder

    prefix = str(tmp_path_factory.mktemp("data") / "toy")
    builder = IndexedDatasetBuilder(prefix + ".bin", np.uint16)
    builder.add_document(np.arange(100, dtype=np.uint16))
    builder.finalize(prefix + ".idx")
    return prefix


def _argv(prefix, *extra):
    return [
        "--model",
        "tiny",
        "--micro-batch-size",
        "2",
        "--train-iters",
        "10",
        "--lr",
        "1e-3",
        "--data-path",
        prefix,
        *extra,
    ]


def test_defaults_and_accumulation(data_prefix, tmp_path):
    args = parse_args(_argv(data_prefix, "--global-batch-size", "16", "--save", str(tmp_path)), world_size=2)
    assert args.data_parallel_size == 2 and args.gradient_accumulation_steps == 4
    assert args.log_dir == str(tmp_path)  # --log-dir defaults to --save
    assert args.lr_decay_iters == 10  # defaults to --train-iters
    assert args.seq_length == 256 and args.num_layers == 2  # from the tiny preset
    config = build_deepspeed_config(args)
    assert (
        config["train_batch_size"],
        config["train_micro_batch_size_per_gpu"],
        config["gradient_accumulation_steps"],
    ) == (16, 2, 4)
    assert config["zero_optimization"]["stage"] == 1 and "fp16" not in config
    assert parse_args(_argv(data_prefix), world_size=1).zero_stage == 0  # nothing to partition on 1 rank


def test_presets_and_overrides(data_prefix):
    args = parse_args(
        _argv(
            data_prefix, "--model", "phi-1-small", "--num-layers", "3", "--seq-length", "128", "--hidden-dropout", "0.1"
        ),
        world_size=1,
    )
    assert (args.num_layers, args.hidden_size, args.ffn_hidden_size, args.num_attention_heads) == (3, 1024, 4096, 16)
    assert args.seq_length == 128 and args.hidden_dropout == 0.1
    two = parse_args(_argv(data_prefix, "--data-path", "0.3", data_prefix, "0.7", data_prefix), world_size=1)
    assert two.data_weights == [0.3, 0.7] and two.data_prefixes == [data_prefix, data_prefix]


@pytest.mark.parametrize(
    "extra, world, flag",
    [
        (["--global-batch-size", "6"], 2, "--global-batch-size 6 is not divisible"),
        (["--fp16", "--bf16"], 1, "--fp16 and --bf16"),
        (["--zero-stage", "4"], 1, "--zero-stage"),
        (["--seq-length", "512"], 1, "--seq-length 512 exceeds"),
        (["--tensor-model-parallel-size", "3"], 4, "--tensor-model-parallel-size 3"),
        (["--lr-warmup-iters", "20"], 1, "--lr-warmup-iters 20 exceeds --lr-decay-iters"),
        (["--min-lr", "1.0"], 1, "--min-lr"),
        (["--save-interval", "5"], 1, "--save-interval needs --save"),
        (["--finetune"], 1, "--finetune needs --load"),
        (["--split", "a,b"], 1, "--split"),
        (["--hidden-dropout", "1.5"], 1, "--hidden-dropout"),
        (["--micro-batch-size", "0"], 1, "--micro-batch-size must be > 0"),
        (["--eval-humaneval-interval", "5"], 1, "--eval-humaneval"),
        (["--num-attention-heads", "3"], 1, "--hidden-size 128 is not divisible by --num-attention-heads 3"),
        (["--tokenizer", "/nonexistent/tok"], 1, "--tokenizer"),
        (["--fp16", "--initial-loss-scale", "0"], 1, "--initial-loss-scale must be a power of 2 > 0"),
        (["--fp16", "--initial-loss-scale", "-4"], 1, "--initial-loss-scale must be a power of 2 > 0"),
        (["--fp16", "--initial-loss-scale", "1000"], 1, "--initial-loss-scale must be a power of 2 > 0"),
    ],
)
def test_bad_flags(data_prefix, extra, world, flag):
    with pytest.raises(ArgumentError) as e:
        parse_args(_argv(data_prefix, *extra), world_size=world)
    assert flag in str(e.value)


def test_missing_required(data_prefix, tmp_path):
    with pytest.raises(ArgumentError, match="--data-path is required"):
        parse_args(["--model", "tiny", "--micro-batch-size", "2", "--train-iters", "1", "--lr", "1"], world_size=1)
    with pytest.raises(ArgumentError, match=r"--data-path: .*missing\.bin does not exist"):
        parse_args(_argv(str(tmp_path / "missing")), world_size=1)
    with pytest.raises(ArgumentError, match="--train-iters is required"):
        parse_args(
            ["--model", "tiny", "--micro-batch-size", "2", "--lr", "1", "--data-path", data_prefix], world_size=1
        )
    with pytest.raises(ArgumentError, match="--lr is required"):
        parse_args(
            ["--model", "tiny", "--micro-batch-size", "2", "--train-iters", "1", "--data-path", data_prefix],
            world_size=1,
        )


def test_deepspeed_config_merge(data_prefix, tmp_path):
    user = tmp_path / "ds.json"
    user.write_text(
        json.dumps(
            {
                "zero_optimization": {"stage": 3, "overlap_comm": False},
                "train_micro_batch_size_per_gpu": 2,
                "fp16": {"loss_scale_window": 100},
            }
        )
    )
    args = parse_args(_argv(data_prefix, "--fp16", "--deepspeed-config", str(user)), world_size=1)
    settings = resolve_deepspeed(args)
    config = settings.config
    assert config["zero_optimization"]["stage"] == 3 and config["zero_optimization"]["overlap_comm"] is False
    assert settings.zero_stage == 3
    assert config["fp16"] == {
        "enabled": True,
        "loss_scale": 0,
        "initial_scale_power": 16,
        "loss_scale_window": 100,
        "hysteresis": 2,
        "min_loss_scale": 1.0,
    }

    user.write_text(json.dumps({"train_batch_size": 64}))
    args = parse_args(_argv(data_prefix, "--deepspeed-config", str(user)), world_size=1)
    with pytest.raises(ArgumentError, match="train_batch_size=64 contradicts --global-batch-size"):
        build_deepspeed_config(args)

    user.write_text('{\n  "zero_optimization": {"stage": 2,}\n}')
    with pytest.raises(ArgumentError, match=r"ds\.json:2:"):
        parse_args(_argv(data_prefix, "--deepspeed-config", str(user)), world_size=1)


def test_deepspeed_config_non_numeric_batch_key_names_file_and_key(data_prefix, tmp_path):
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"train_micro_batch_size_per_gpu": "two"}))
    args = parse_args(_argv(data_prefix, "--deepspeed-config", str(user)), world_size=1)
    with pytest.raises(ArgumentError, match=r"--deepspeed-config: .*ds\.json: train_micro_batch_size_per_gpu must be"):
        build_deepspeed_config(args)


def test_example_zero2_config_merges(data_prefix):
    args = parse_args(
        _argv(data_prefix, "--global-batch-size", "8", "--deepspeed-config", "examples/ds_config_zero2.json"),
        world_size=2,
    )
    settings = resolve_deepspeed(args)
    config = settings.config
    zero = config["zero_optimization"]
    assert zero["stage"] == 2 and settings.zero_stage == 2
    assert zero["overlap_comm"] is True and zero["contiguous_gradients"] is True
    assert zero["reduce_bucket_size"] == zero["allgather_bucket_size"] == 2e8
    # "auto" batch keys take the flags' values
    assert (
        config["train_batch_size"],
        config["train_micro_batch_size_per_gpu"],
        config["gradient_accumulation_steps"],
    ) == (8, 2, 2)


def test_small_flag_fixes(data_prefix):
    assert (
        parse_args(_argv(data_prefix, "--fp16", "--initial-loss-scale", "4096"), world_size=1).initial_loss_scale
        == 4096
    )
    # Megatron's spelling is the main one; the older one stays as an alias
    assert parse_args(_argv(data_prefix, "--data-cache-path", "/tmp/c"), world_size=1).data_cache_path == "/tmp/c"
    assert parse_args(_argv(data_prefix, "--data-cache-dir", "/tmp/d"), world_size=1).data_cache_path == "/tmp/d"
    # apex has LayerNorm kernels but no rotary one
    assert parse_args(_argv(data_prefix, "--layernorm-impl", "apex"), world_size=1).layernorm_impl == "apex"
    with pytest.raises(SystemExit):
        parse_args(_argv(data_prefix, "--rotary-impl", "apex"), world_size=1)


def test_cli_reports_bad_flag_and_exits_2(data_prefix):
    proc = subprocess.run(
        [sys.executable, "-m", "megaphi.pretrain", *_argv(data_prefix, "--fp16", "--bf16")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "--fp16 and --bf16 are mutually exclusive" in proc.stderr


def test_optimizer_impls():
    """CUDA runs default to torch's fused AdamW (no JIT compile); DeepSpeed's FusedAdam is opt-in."""
    import torch
    from megaphi.training.optimizer import build_optimizer

    model = torch.nn.Linear(4, 4)
    cuda = build_optimizer(model, 1e-3, 0.1, device_type="cuda")
    assert isinstance(cuda, torch.optim.AdamW) and cuda.defaults["fused"] is True
    cpu = build_optimizer(model, 1e-3, 0.1, device_type="cpu")
    assert isinstance(cpu, torch.optim.AdamW) and not cpu.defaults["fused"]
    assert build_optimizer(model, 1e-3, 0.1, device_type="cpu", impl="torch-fused").defaults["fused"] is True
    with pytest.raises(ValueError, match="deepspeed-fused needs CUDA"):
        build_optimizer(model, 1e-3, 0.1, device_type="cpu", impl="deepspeed-fused")
    with pytest.raises(ValueError, match="optimizer impl must be one of"):
        build_optimizer(model, 1e-3, 0.1, impl="apex")
    # the weight-decay groups are kept: the bias is not decayed
    assert [g["weight_decay"] for g in cuda.param_groups] == [0.1, 0.0]


def test_bf16_accumulates_in_fp32_and_leaves_zero_stage_0(data_prefix):
    args = parse_args(_argv(data_prefix, "--bf16"), world_size=1)
    assert args.zero_stage == 0
    settings = resolve_deepspeed(args)
    config = settings.config
    assert config["data_types"] == {"grad_accum_dtype": "fp32"} and config["communication_data_type"] == "fp32"
    assert config["zero_optimization"]["stage"] == 1 and settings.zero_stage == 1 and args.zero_stage == 0
    fp32 = parse_args(_argv(data_prefix), world_size=1)
    assert "data_types" not in build_deepspeed_config(fp32) and fp32.zero_stage == 0
