"""megaphi.training.trainer.Trainer driven from Python: built from flags, trained, saved, and resumed by
a second Trainer that continues exactly where an uninterrupted run would be."""

import json
import math
import os

import pytest
import torch
import torch.distributed as dist

from megaphi.training.config import RunConfig
from megaphi.training.trainer import StepResult, Trainer

FLAGS = [
    "--model",
    "tiny",
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
    "--mock-data",
    "--micro-batch-size",
    "2",
    "--global-batch-size",
    "4",
    "--train-iters",
    "4",
    "--lr",
    "1e-3",
    "--lr-warmup-iters",
    "1",
    "--eval-iters",
    "1",
    "--eval-interval",
    "2",
    "--log-interval",
    "1",
    "--seed",
    "7",
]


@pytest.fixture
def one_process_group(monkeypatch):
    """The 1-rank group a Trainer makes in a plain process; the variables it sets and the group are
    gone after the test."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def _losses(folder):
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return {r["iteration"]: r["loss"] for r in records if "loss" in r}


def _weights(trainer):
    return {k: v.detach().clone() for k, v in trainer.engine.module.state_dict().items()}


def test_trained_saved_and_resumed_from_python_equals_an_uninterrupted_run(tmp_path, one_process_group):
    whole, parts = str(tmp_path / "whole"), str(tmp_path / "parts")
    with Trainer(RunConfig.from_flags(FLAGS + ["--save", whole], world_size=1)) as trainer:
        assert trainer.train() == "done"
        expected = _weights(trainer)

    with Trainer(RunConfig.from_flags(FLAGS + ["--save", parts, "--exit-interval", "2"], world_size=1)) as first:
        assert first.train() == "exit-interval" and first.state.iteration == 2
    assert open(os.path.join(parts, "latest")).read().strip() == "iter_0000002"

    config = RunConfig.from_flags(FLAGS + ["--save", parts, "--load", parts], world_size=1)
    assert config.checkpoint.resume_tag == "iter_0000002"
    with Trainer(config) as second:
        assert (second.state.iteration, second.state.consumed_samples) == (2, 8)
        assert second.train() == "done" and second.state.iteration == 4
        resumed = _weights(second)

    assert resumed.keys() == expected.keys()
    for name in expected:
        assert torch.equal(resumed[name], expected[name]), name
    assert _losses(parts) == _losses(whole) and sorted(_losses(whole)) == [1, 2, 3, 4]


def test_train_step_evaluate_and_save_one_by_one(tmp_path, one_process_group):
    save = str(tmp_path / "ck")
    with Trainer(RunConfig.from_flags(FLAGS + ["--save", save], world_size=1)) as trainer:
        data = trainer.make_train_iterator(trainer.state.consumed_samples)
        steps = [trainer.train_step(data) for _ in range(2)]
        assert all(isinstance(s, StepResult) for s in steps)
        assert [s.iteration for s in steps] == [1, 2] and trainer.state.consumed_samples == 8
        assert steps[0].lr == pytest.approx(1e-3) and steps[1].lr < steps[0].lr  # warmup 1, then decay
        # fp32, ZeRO 0: DeepSpeed reports no grad norm; the engine module's recorder does
        assert all(s.grad_norm is not None and 0 < float(s.grad_norm) < math.inf for s in steps)
        assert math.isfinite(float(steps[1].loss))
        assert math.isfinite(trainer.evaluate())
        assert trainer.save() == "iter_0000002"
    assert open(os.path.join(save, "latest")).read().strip() == "iter_0000002"
    with open(os.path.join(save, "iter_0000002", "megaphi_meta.json")) as f:
        meta = json.load(f)
    assert meta["iteration"] == 2 and meta["args"]["train_iters"] == 4 and meta["zero_stage"] == 0
