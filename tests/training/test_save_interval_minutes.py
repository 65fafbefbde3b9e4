"""--save-interval-minutes (time-based saves, decided on rank 0 and broadcast), and the elastic-store warning."""

import os

import pytest

from megaphi.training import multinode
from megaphi.training.arguments import ArgumentError, parse_args
from multihost_utils import TINY
from test_resume import run_pretrain


def test_needs_save_and_a_positive_number():
    base = [*TINY, "--train-iters", "2"]
    with pytest.raises(ArgumentError, match="--save-interval-minutes must be > 0 and needs --save DIR"):
        parse_args([*base, "--save-interval-minutes", "5"], world_size=1)
    with pytest.raises(ArgumentError, match="--save-interval-minutes must be > 0"):
        parse_args([*base, "--save-interval-minutes", "0", "--save", "x"], world_size=1)
    assert (
        parse_args([*base, "--save-interval-minutes", "0.5", "--save", "x"], world_size=1).save_interval_minutes == 0.5
    )


def test_timer_fires_after_the_interval_and_restarts(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(multinode.time, "monotonic", lambda: now[0])
    timer = multinode.SaveTimer(2)
    assert not timer.due()
    now[0] += 119
    assert not timer.due()
    now[0] += 1
    assert timer.due() and not timer.due()
    now[0] += 120
    assert timer.due()
    assert not multinode.SaveTimer(None).due()


def test_a_run_saves_by_time(tmp_path):
    save = tmp_path / "save"
    # 0.0001 minutes: due after every iteration; no --save-interval
    run_pretrain(
        [
            *TINY,
            "--global-batch-size",
            "1",
            "--train-iters",
            "3",
            "--save",
            str(save),
            "--save-interval-minutes",
            "0.0001",
        ]
    )
    assert sorted(p for p in os.listdir(save) if p.startswith("iter_")) == [f"iter_000000{i}" for i in (1, 2, 3)]


def test_elastic_store_warning(monkeypatch):
    said = []
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "3")
    multinode.warn_elastic_store(said.append)
    assert len(said) == 1 and "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in said[0]
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")  # what the variable makes torchrun set
    multinode.warn_elastic_store(said.append)
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "0")
    multinode.warn_elastic_store(said.append)
    assert len(said) == 1
