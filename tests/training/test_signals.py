"""Clean exits: SIGTERM finishes the step, saves and exits 0; a NaN loss stops naming the iteration."""

import json
import os
import signal
import subprocess
import sys
import time

from test_resume import make_token_file, run_pretrain, sigterm_after_metrics, tiny_flags


def test_sigterm_saves_and_exits_zero(tmp_path):
    prefix = make_token_file(str(tmp_path / "toy"))
    out = str(tmp_path / "ck")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("RANK", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "megaphi.pretrain", *tiny_flags(prefix, 100000), "--save", out, "--eval-iters", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    metrics = os.path.join(out, "metrics.jsonl")
    stdout, stderr = sigterm_after_metrics(proc, metrics, lines=2)
    assert proc.returncode == 0, stderr[-3000:]
    assert "received SIGTERM" in stdout
    tag = open(os.path.join(out, "latest")).read().strip()
    meta = json.load(open(os.path.join(out, tag, "megaphi_meta.json")))
    logged = [json.loads(x)["iteration"] for x in open(metrics).read().splitlines()]
    assert meta["iteration"] == logged[-1] >= 2  # the step in flight finished and was saved
    assert meta["iteration"] < 100000
    assert os.path.exists(os.path.join(out, tag, "model", "model.safetensors"))


def test_nan_loss_stops_with_iteration(tmp_path):
    prefix = make_token_file(str(tmp_path / "toy"))
    proc = run_pretrain(
        tiny_flags(prefix, 50) + ["--lr", "1e6", "--clip-grad", "0", "--eval-iters", "0", "--lr-warmup-iters", "0"],
        check=False,
    )
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "loss is nan at iteration" in proc.stderr or "loss is inf at iteration" in proc.stderr, proc.stderr[-2000:]


def test_graceful_exit_records_signal_and_restores_handlers():
    from megaphi.training.signals import GracefulExit

    before = signal.getsignal(signal.SIGTERM)
    with GracefulExit() as stop:
        assert not stop.should_stop()
        os.kill(os.getpid(), signal.SIGTERM)  # handled: recorded, the process keeps running
        time.sleep(0.05)
        assert stop.should_stop() and stop.signal_name == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is before
