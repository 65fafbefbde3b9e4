"""Ranks save and stop when their launcher goes away; one job per --save folder (issue 12)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from megaphi.checkpoint import lock as save_lock
from megaphi.training import launcher_watch
from megaphi.training.signals import GracefulExit
from test_resume import TINY_MODEL

TRAIN_FLAGS = [
    "--model",
    "tiny",
    "--mock-data",
    *TINY_MODEL,
    "--micro-batch-size",
    "2",
    "--global-batch-size",
    "4",
    "--train-iters",
    "100000",
    "--lr",
    "1e-3",
    "--lr-warmup-iters",
    "1",
    "--log-interval",
    "1",
    "--eval-iters",
    "0",
    "--no-export-model",
]

# A minimal launcher: starts one rank (RANK=0 of 1, as torchrun/deepspeed would) and waits forever.
LAUNCHER = r"""
import os, subprocess, sys, time
out, env = sys.argv[1], dict(os.environ, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                                 MASTER_PORT=sys.argv[2], OMP_NUM_THREADS="1")
with open(os.path.join(out, "rank.out"), "w") as o, open(os.path.join(out, "rank.err"), "w") as e:
    child = subprocess.Popen([sys.executable, "-m", "megaphi.pretrain", *sys.argv[3:]], stdout=o, stderr=e, env=env)
with open(os.path.join(out, "rank.pid"), "w") as f:
    f.write(str(child.pid))
while True:
    time.sleep(60)
"""


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _alive(pid):
    stat = launcher_watch._proc_stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")


def _wait(condition, timeout, what):
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _read(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def test_killed_launcher_rank_saves_and_exits_and_the_save_folder_is_locked(tmp_path):
    save, logs = str(tmp_path / "ck"), tmp_path / "logs"
    logs.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("RANK", None)
    launcher = subprocess.Popen(
        [sys.executable, "-c", LAUNCHER, str(logs), _free_port(), *TRAIN_FLAGS, "--save", save], env=env
    )
    rank_pid = None
    try:
        lock = os.path.join(save, ".megaphi.lock")
        _wait(
            lambda: _read(lock).endswith("}") or launcher.poll() is not None or "error" in _read(logs / "rank.err"),
            240,
            "the rank to lock its --save folder",
        )
        rank_pid = int(_read(logs / "rank.pid"))
        holder = json.loads(_read(lock))
        assert holder["pid"] == rank_pid and holder["host"] == socket.gethostname()
        # a second job on the same --save folder refuses, naming the holder (started while the first trains)
        second = subprocess.Popen(
            [sys.executable, "-m", "megaphi.pretrain", *TRAIN_FLAGS, "--save", save],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        metrics = os.path.join(save, "metrics.jsonl")
        _wait(lambda: len(_read(metrics).splitlines()) >= 2 or not _alive(rank_pid), 240, "the rank to train")
        assert _alive(rank_pid), _read(logs / "rank.err")[-3000:]
        _, second_err = second.communicate(timeout=240)
        assert second.returncode == 1, second_err[-3000:]
        errors = [line for line in second_err.splitlines() if line.startswith("megaphi.pretrain: error:")]
        assert errors == [
            f"megaphi.pretrain: error: --save {save} is in use by another run: pid {rank_pid} on host "
            f"{holder['host']} (started {holder['started']}) holds {lock}; stop that run or save "
            f"elsewhere"
        ], second_err[-3000:]

        launcher.kill()  # kill -9: no chance to pass anything on
        launcher.wait(timeout=60)
        _wait(lambda: not _alive(rank_pid), 240, "the orphaned rank to exit")
    finally:
        if launcher.poll() is None:
            launcher.kill()
        if rank_pid is not None and _alive(rank_pid):
            os.kill(rank_pid, signal.SIGKILL)
    out = _read(logs / "rank.out")
    assert "received SIGTERM: saved at iteration" in out, out[-2000:] + _read(logs / "rank.err")[-2000:]
    tag = _read(os.path.join(save, "latest")).strip()
    meta = json.loads(_read(os.path.join(save, tag, "megaphi_meta.json")))
    logged = [json.loads(x)["iteration"] for x in _read(metrics).splitlines()]
    assert meta["iteration"] == logged[-1] >= 2
    assert f"saved at iteration {meta['iteration']}, exiting" in out


# runner (a script named `deepspeed`) -> an intermediate launcher -> a rank that polls its watch
RUNNER = r"""
import subprocess, sys, time
subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2], sys.argv[3]])
while True:
    time.sleep(60)
"""
MIDDLE = r"""
import os, subprocess, sys, time
subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]], env=dict(os.environ, RANK="0"))
time.sleep(300)
"""
RANK = r"""
import os, sys, time
from megaphi.training import launcher_watch
watch = launcher_watch.arm()
out = sys.argv[1]
with open(out + ".tmp", "w") as f:
    f.write(f"{launcher_watch.parent_death_signal()} {[pid for pid, _, _ in watch.watched]}")
os.replace(out + ".tmp", out)
deadline = time.time() + 240
while time.time() < deadline and watch.gone() is None:
    time.sleep(0.05)
with open(out + ".tmp", "w") as f:
    f.write(str(watch.gone()))
os.replace(out + ".tmp", out + ".gone")
"""


def test_death_of_the_runner_above_the_launcher_is_noticed(tmp_path):
    runner_script = tmp_path / "deepspeed"
    runner_script.write_text(RUNNER)
    report = str(tmp_path / "rank.txt")
    runner = subprocess.Popen([sys.executable, str(runner_script), MIDDLE, RANK, report])
    try:
        _wait(lambda: os.path.exists(report), 120, "the rank to arm its watch")
        sig, watched = _read(report).split(" ", 1)
        assert int(sig) == signal.SIGTERM  # the parent-death signal is set
        assert runner.pid in json.loads(watched) and len(json.loads(watched)) == 2  # its parent and the runner
        runner.kill()  # the middle launcher lives on, as deepspeed.launcher.launch does
        _wait(lambda: os.path.exists(report + ".gone"), 120, "the rank to notice")
        command = " ".join(" ".join([sys.executable, str(runner_script), MIDDLE, RANK, report]).split())[:120]
        assert _read(report + ".gone") == f"launcher exit (process {runner.pid} `{command}` exited)"
    finally:
        runner.kill()
        runner.wait()


def test_graceful_exit_stops_when_the_watch_reports(tmp_path):
    class Watch:
        reason = None

        def gone(self):
            return self.reason

    watch = Watch()
    with GracefulExit(watch=watch) as stop:
        assert not stop.should_stop()
        watch.reason = "launcher exit (parent process 12 exited)"
        assert stop.should_stop() and stop.signal_name == "launcher exit (parent process 12 exited)"


def test_plain_runs_are_not_tied_to_their_parent(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    assert launcher_watch.arm() is None


def test_lock_is_exclusive_and_a_stale_file_does_not_block(tmp_path):
    folder = str(tmp_path / "ck")
    os.makedirs(folder)
    with open(os.path.join(folder, ".megaphi.lock"), "w") as f:
        f.write('{"pid": 1, "host": "gone", "started": "yesterday"}')  # left by a killed run: not held
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from megaphi.checkpoint import lock as save_lock; "
            "save_lock.acquire(sys.argv[1]); print('held', flush=True); time.sleep(300)",
            folder,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(save_lock.SaveFolderInUse, match=f"in use by another run: pid {holder.pid} on host "):
            save_lock.acquire(folder)
    finally:
        holder.kill()
        holder.wait()
    save_lock.acquire(folder)  # the holder's death released it
    (tmp_path / "a_file").write_text("")
    with pytest.raises(save_lock.SaveFolderError, match=f"--save {tmp_path / 'a_file' / 'ck'}: cannot create "):
        save_lock.acquire(str(tmp_path / "a_file" / "ck"))
    try:
        assert json.loads(_read(os.path.join(folder, ".megaphi.lock")))["pid"] == os.getpid()
    finally:
        save_lock.release(folder)
