"""--mock-data: synthetic samples (deterministic from the seed), a short CPU run whose loss falls, the
clear error beside --data-path; and the start-up 'backends:' line the run prints."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from megaphi.data.mock_dataset import MockGPTDataset, mock_tokens
from megaphi.training.arguments import ArgumentError, parse_args


def test_samples_are_deterministic_from_seed_split_and_index():
    a = MockGPTDataset(16, 64, 512, seed=7)
    assert len(a) == 16
    sample = a[3]
    assert sample["tokens"].shape == sample["labels"].shape == (64,)
    full = mock_tokens(7, "train", 3, 65, 512)
    np.testing.assert_array_equal(sample["tokens"], full[:-1])
    np.testing.assert_array_equal(sample["labels"], full[1:])  # labels are the next tokens
    np.testing.assert_array_equal(MockGPTDataset(16, 64, 512, seed=7)[3]["tokens"], sample["tokens"])
    np.testing.assert_array_equal(a[-1]["tokens"], a[15]["tokens"])
    assert not np.array_equal(MockGPTDataset(16, 64, 512, seed=8)[3]["tokens"], sample["tokens"])
    assert not np.array_equal(MockGPTDataset(16, 64, 512, seed=7, split="valid")[3]["tokens"], sample["tokens"])
    with pytest.raises(IndexError):
        a[16]


@pytest.mark.parametrize("length", [1, 7, 8, 9, 64, 2049])
def test_samples_stay_in_the_vocabulary_and_repeat_phrases(length):
    for index in range(20):
        t = mock_tokens(1, "train", index, length, 100)
        assert t.shape == (length,) and t.dtype == np.int64 and t.min() >= 0 and t.max() < 100
    # the first phrase (4-32 tokens) is written twice in a row
    t = mock_tokens(1, "train", 0, 2049, 51200)
    assert any(np.array_equal(t[:n], t[n : 2 * n]) for n in range(4, 33))


def _argv(*extra):
    return ["--model", "tiny", "--micro-batch-size", "2", "--train-iters", "4", "--lr", "1e-3", *extra]


def test_flags():
    args = parse_args(_argv("--mock-data"), world_size=1)
    assert args.mock_data and args.data_prefixes == [] and args.data_weights is None
    with pytest.raises(ArgumentError, match="--mock-data and --data-path"):
        parse_args(_argv("--mock-data", "--data-path", "some/prefix"), world_size=1)
    with pytest.raises(ArgumentError, match="--data-path is required .*--mock-data"):
        parse_args(_argv(), world_size=1)


def _pretrain(*args, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("RANK", None)
    return subprocess.run(
        [sys.executable, "-m", "megaphi.pretrain", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def test_cli_refuses_mock_data_with_data_path(tmp_path):
    proc = _pretrain(*_argv("--mock-data", "--data-path", str(tmp_path / "toy")), timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "megaphi.pretrain: error: --mock-data and --data-path exclude each other: synthetic tokens or token files"
    )


def test_short_cpu_run_trains_without_a_dataset(tmp_path):
    log_dir = tmp_path / "run"
    proc = _pretrain(
        "--model",
        "tiny",
        "--mock-data",
        "--seq-length",
        "64",
        "--micro-batch-size",
        "4",
        "--train-iters",
        "12",
        "--lr",
        "3e-3",
        "--lr-warmup-iters",
        "2",
        "--lr-decay-style",
        "constant",
        "--log-interval",
        "1",
        "--eval-interval",
        "6",
        "--eval-iters",
        "1",
        "--log-dir",
        str(log_dir),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "--mock-data: synthetic tokens (vocabulary 512, seed 1234)" in proc.stdout
    # the start-up line names what the run uses (CPU: torch everywhere)
    backends = [line for line in proc.stdout.splitlines() if line.startswith("backends: ")]
    assert backends == [
        "backends: attention torch SDPA (cpu) | layernorm torch (auto) | rotary torch (auto) | optimizer "
        "torch.optim.AdamW | blocks eager | device cpu | precision fp32 | MFU n/a on cpu (--peak-tflops sets a peak)"
    ]
    records = [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 12 and all(np.isfinite(losses))
    assert abs(losses[0] - np.log(512)) < 0.3  # starts near ln V
    assert np.mean(losses[-3:]) < losses[0] - 0.5  # and falls
    val = [r["val_loss"] for r in records if "val_loss" in r]
    assert len(val) == 2 and val[1] < val[0]  # validation works on its own samples


def test_auto_fallback_on_cuda_is_a_warning(monkeypatch):
    import megaphi.ops as ops
    from megaphi.ops import backend
    from megaphi.training.run_info import ops_backend

    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    monkeypatch.setattr(backend, "cuda_unavailable_reason", lambda device=None: "no kernel image for sm_90")
    ops.set_impl(layernorm="auto", rotary="auto")
    impl, warning = ops_backend("layernorm", gpu)
    assert impl == "torch (auto)"
    assert warning == (
        "--layernorm-impl auto falls back to the torch reference on NVIDIA H200: no kernel image for sm_90"
    )
    monkeypatch.setattr(backend, "cuda_unavailable_reason", lambda device=None: None)
    assert ops_backend("rotary", gpu) == ("cuda (auto: megaphi._cuda)", None)
    ops.set_impl(rotary="torch")
    try:
        assert ops_backend("rotary", gpu) == ("torch", None)  # chosen by hand: no warning
    finally:
        ops.set_impl(rotary="auto")
    assert ops_backend("layernorm", torch.device("cpu")) == ("torch (auto)", None)
