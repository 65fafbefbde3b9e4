"""Noisy deaths made one line: a rank killed mid-run (the survivors name it and say how to resume) and a
second Ctrl-C (no KeyboardInterrupt traceback)."""

import glob
import os
import signal
import subprocess
import sys
import time

import pytest
from dist_utils import free_port

from megaphi.training import launcher_watch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = [
    "--model",
    "tiny",
    "--num-layers",
    "2",
    "--hidden-size",
    "64",
    "--ffn-hidden-size",
    "128",
    "--num-attention-heads",
    "4",
    "--rotary-dim",
    "8",
    "--seq-length",
    "32",
    "--vocab-size",
    "256",
    "--micro-batch-size",
    "2",
    "--lr",
    "1e-3",
    "--mock-data",
    "--eval-iters",
    "0",
    "--log-interval",
    "1",
]


def _rank_pids(launcher_pid):
    """{RANK: pid} of the launcher's children (read from their environment)."""
    ranks = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        if (launcher_watch._proc_stat(int(entry)) or ("", None))[1] != launcher_pid:
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
        except (OSError, ValueError):
            continue
        if b"RANK" in env:
            ranks[int(env[b"RANK"])] = int(entry)
    return ranks


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.distributed
def test_survivor_names_the_lost_rank_and_how_to_resume(tmp_path):
    save, logs = tmp_path / "ckpt", tmp_path / "logs"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    launcher = subprocess.Popen(
        # a slow monitor: the launcher would otherwise SIGTERM the survivor as soon as it sees rank 1 gone,
        # racing the survivor's own discovery; the message under test is the survivor's
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(free_port()),
            "--monitor-interval",
            "60",
            "--log-dir",
            str(logs),
            "--redirects",
            "3",
            "-m",
            "megaphi.pretrain",
            *TINY,
            "--global-batch-size",
            "4",
            "--train-iters",
            "100000",
            "--save",
            str(save),
            "--save-interval",
            "100000",
        ],
        cwd=str(tmp_path),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 300  # hang guard, not a timing assertion

        def rank0_log(name):
            paths = glob.glob(str(logs / "**" / "0" / name), recursive=True)
            return open(paths[0]).read() if paths else ""

        while "iteration        2/" not in rank0_log("stdout.log"):
            assert launcher.poll() is None and time.monotonic() < deadline, rank0_log("stderr.log")
            time.sleep(0.1)
        pids = _rank_pids(launcher.pid)
        os.kill(pids[1], signal.SIGKILL)
        launcher.wait(timeout=300)
        err = rank0_log("stderr.log")
    finally:
        if launcher.poll() is None:
            launcher.kill()
    lines = [line for line in err.splitlines() if line.startswith("megaphi.pretrain: error:")]
    assert len(lines) == 1, err[-3000:]
    assert (
        f"rank 0: lost rank 1 (pid {pids[1]}, no longer running); rerun the same command to resume from the "
        f"last checkpoint in {save}" in lines[0]
    )
    assert "Traceback" not in err, err[-3000:]


def test_second_ctrl_c_is_one_line(monkeypatch, capsys):
    import megaphi.pretrain as pretrain

    def interrupted(args):
        raise KeyboardInterrupt  # what GracefulExit raises on a second SIGINT

    monkeypatch.setattr(pretrain, "init_distributed", lambda *args: None)  # no process group in the test process
    monkeypatch.setattr(pretrain, "run", interrupted)
    rc = pretrain.main([*TINY, "--global-batch-size", "2", "--train-iters", "1"])
    err = capsys.readouterr().err
    assert rc == 130 and err.count("\n") == 1 and "interrupted by a second Ctrl-C" in err and "'latest'" in err
