"""Run control and logging end to end: per-split data paths, --lr-warmup-fraction, the first iteration
logged whatever --log-interval is (with an ETA), --exit-duration-in-mins (saves, then exits),
TensorBoard and W&B under Megatron's tag names; then --eval-only on the saved checkpoint gives the
validation loss the training run logged."""

import importlib.util
import json
import os

import pytest

from test_resume import TINY_MODEL, make_token_file, run_pretrain

MODEL = ["--model", "tiny", *TINY_MODEL, "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "1e-3"]


def _scalars(tb_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(tb_dir)
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_exit_duration_first_log_line_tags_and_eval_only(tmp_path, monkeypatch):
    train = make_token_file(str(tmp_path / "train"))
    valid = make_token_file(str(tmp_path / "valid"), docs=40, seed=1)
    ck, tb = str(tmp_path / "ck"), str(tmp_path / "tb")
    use_wandb = importlib.util.find_spec("wandb") is not None
    extra = ["--wandb-project", "megaphi-test", "--wandb-exp-name", "run-control"] if use_wandb else []
    monkeypatch.setenv("WANDB_MODE", "offline")  # no network: W&B keeps the run under --save/wandb
    proc = run_pretrain(
        MODEL
        + [
            "--train-iters",
            "1000",
            "--lr-warmup-fraction",
            "0.01",
            "--train-data-path",
            train,
            "--valid-data-path",
            valid,
            "--log-interval",
            "500",
            "--eval-interval",
            "1",
            "--eval-iters",
            "1",
            "--save",
            ck,
            "--tensorboard-dir",
            tb,
            "--exit-duration-in-mins",
            "1e-6",
        ]
        + extra
    )
    # a tiny time limit: the run stops after its first iteration, saved, whatever the machine's speed
    assert "--exit-duration-in-mins 1e-06: saved at iteration 1, exiting" in proc.stdout
    assert "finished (exit-duration) at iteration 1" in proc.stdout
    assert open(os.path.join(ck, "latest")).read().strip() == "iter_0000001"
    first = [line for line in proc.stdout.splitlines() if line.startswith("iteration")]
    assert len(first) == 1 and "/1000" in first[0] and "| ETA " in first[0]  # iteration 1 of --log-interval 500
    records = [json.loads(x) for x in open(os.path.join(ck, "metrics.jsonl"))]
    assert records[0]["iteration"] == 1 and records[0]["lr"] == pytest.approx(1e-3 / 10)  # warmup 10 = 1% of 1000
    val_loss = records[1]["val_loss"]

    tags = _scalars(tb)
    for tag in (
        "lm loss",
        "learning-rate",
        "grad-norm",
        "loss-scale",
        "iteration-time",
        "batch-size",
        "lm loss validation",
        "lm loss validation ppl",
        "lm loss vs samples",
        "lm loss validation vs samples",
    ):
        assert tag in tags, sorted(tags)
    assert tags["lm loss"] == [(1, pytest.approx(records[0]["loss"]))]
    assert tags["lm loss vs samples"][0][0] == 4  # step = consumed samples
    assert tags["iteration-time"][0][1] == pytest.approx(records[0]["ms_per_iter"] / 1000, rel=1e-5)
    if use_wandb:
        runs = [d for d in os.listdir(os.path.join(ck, "wandb")) if d.startswith("offline-run-")]
        assert len(runs) == 1 and any(f.endswith(".wandb") for f in os.listdir(os.path.join(ck, "wandb", runs[0])))

    ev = str(tmp_path / "eval")
    proc = run_pretrain(
        MODEL + ["--eval-only", "--load", ck, "--valid-data-path", valid, "--eval-iters", "1", "--log-dir", ev]
    )
    assert f"valid of {ck} | lm loss" in proc.stdout
    assert [json.loads(x) for x in open(os.path.join(ev, "metrics.jsonl"))][0]["val_loss"] == val_loss


def test_wandb_is_imported_only_when_asked():
    import subprocess
    import sys

    code = (
        "import sys, megaphi.pretrain, megaphi.training.metrics as m; m.open_metrics_writer("
        "type('A', (), {'log_dir': None, 'tensorboard_dir': None, 'wandb_project': None})()).close(); "
        "print('wandb' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr[-2000:]


def _agree_on_duration(rank, world_size):
    import time

    from megaphi.training.train_loop import duration_exceeded

    now = time.time()
    # only rank 0 has run past the limit (it started 10 minutes "earlier"): every rank must stop
    assert duration_exceeded(1.0, now - 600 if rank == 0 else now) is True
    assert duration_exceeded(1.0, now) is False
    assert duration_exceeded(None, now - 600) is False  # no limit: no collective either


@pytest.mark.distributed
def test_exit_duration_ranks_agree():
    from dist_utils import run_distributed

    run_distributed(_agree_on_duration, 2)
