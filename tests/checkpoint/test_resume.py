"""Exact resume: 2N steps in one run == N steps, save, resume, N steps (bit-for-bit, dropout on)."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np

N = 3


def make_token_file(prefix, docs=120, vocab=250, seed=0):
    from megaphi.data import IndexedDatasetBuilder

    rng = np.random.RandomState(seed)
    builder = IndexedDatasetBuilder(prefix + ".bin", np.uint16)
    for _ in range(docs):
        n = rng.randint(10, 120)
        builder.add_document(((rng.randint(vocab) + rng.randint(1, 4) * np.arange(n)) % vocab).astype(np.uint16))
    builder.finalize(prefix + ".idx")
    return prefix


# the 2-layer, 64-wide model the CPU training tests run (with "--model tiny")
TINY_MODEL = [
    "--num-layers",
    "2",
    "--hidden-size",
    "64",
    "--ffn-hidden-size",
    "128",
    "--num-attention-heads",
    "2",
    "--seq-length",
    "32",
    "--vocab-size",
    "256",
]


def tiny_flags(prefix, train_iters):
    return [
        "--model",
        "tiny",
        *TINY_MODEL,
        "--micro-batch-size",
        "2",
        "--global-batch-size",
        "4",
        "--train-iters",
        str(train_iters),
        "--lr",
        "1e-3",
        "--lr-warmup-iters",
        "1",
        "--data-path",
        prefix,
        "--split",
        "90,10,0",
        "--log-interval",
        "1",
        "--eval-interval",
        "2",
        "--eval-iters",
        "1",
        "--attention-dropout",
        "0.1",
        "--hidden-dropout",
        "0.1",
    ]


def run_pretrain(args, timeout=300, check=True):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("RANK", None)
    proc = subprocess.run(
        [sys.executable, "-m", "megaphi.pretrain", *args], capture_output=True, text=True, timeout=timeout, env=env
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"pretrain failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def sigterm_after_metrics(proc, metrics_path, lines, timeout=240):
    """Wait until a running trainer has logged `lines` complete metrics lines, send it SIGTERM and
    return its (stdout, stderr); the process is killed if anything goes wrong."""
    try:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if os.path.exists(metrics_path) and open(metrics_path).read().count("\n") >= lines:
                break
            if proc.poll() is not None:
                raise AssertionError(f"trainer exited early:\n{proc.stderr.read()[-3000:]}")
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        return proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()


def read_metrics(log_dir):
    with open(os.path.join(log_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_resume_is_bit_exact(tmp_path):
    prefix = make_token_file(str(tmp_path / "toy"))
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    run_pretrain(tiny_flags(prefix, 2 * N) + ["--save", straight, "--zero-stage", "1"])
    # the first half loads from the (still empty) folder it saves to, like a restartable job script
    first = run_pretrain(
        tiny_flags(prefix, 2 * N) + ["--save", split, "--load", split, "--zero-stage", "1", "--exit-interval", str(N)]
    )
    assert "starting from scratch" in first.stdout
    with open(os.path.join(split, "latest")) as f:
        assert f.read().strip() == f"iter_{N:07d}"
    resumed = run_pretrain(tiny_flags(prefix, 2 * N) + ["--save", split, "--load", split, "--zero-stage", "1"])
    assert f"resumed from {split}/iter_{N:07d} at iteration {N}" in resumed.stdout

    a = [r for r in read_metrics(straight) if "loss" in r]
    b = [r for r in read_metrics(split) if "loss" in r]
    assert [r["iteration"] for r in b] == list(range(1, 2 * N + 1))
    for ra, rb in zip(a, b):
        for key in ("loss", "lr", "grad_norm", "consumed_samples"):
            assert ra[key] == rb[key], (ra["iteration"], key, ra[key], rb[key])
    assert [r["val_loss"] for r in read_metrics(straight) if "val_loss" in r] == [
        r["val_loss"] for r in read_metrics(split) if "val_loss" in r
    ]

    # final weights identical, byte for byte
    tag = f"iter_{2 * N:07d}"
    with (
        open(os.path.join(straight, tag, "model", "model.safetensors"), "rb") as fa,
        open(os.path.join(split, tag, "model", "model.safetensors"), "rb") as fb,
    ):
        assert fa.read() == fb.read()
    meta = json.load(open(os.path.join(split, tag, "megaphi_meta.json")))
    assert meta["iteration"] == 2 * N and meta["consumed_samples"] == 2 * N * 4
    assert meta["consumed_tokens"] == 2 * N * 4 * 32 and meta["model_config"]["hidden_size"] == 64
