"""Failures of a 2-host run (simulated hosts, tests/netns_hosts.py), TP=2 inside a host, DP=2 across:

- elastic: under `torchrun --max-restarts 2` with c10d rendezvous, kill -9 of one worker, and kill -9 of
  every process of one host (its launcher started again, as a node supervisor or a Slurm requeue would),
  restart the job by itself; it resumes from the last complete checkpoint and ends with every checkpoint
  tensor bitwise equal to the uninterrupted run. The invocation is the one docs/training.md gives
  (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: see megaphi/training/multinode.py).
- a link cut for longer than --distributed-timeout-minutes (static rendezvous, no restarts) ends every rank
  with one line naming the timeout, never a hang, and `latest` still names a complete checkpoint; a degraded
  link (netem delay + loss, or a narrow tbf where netem is missing) only slows the run down: it ends equal to the uninterrupted run.

Each test prints what happened (time to recover, iterations lost) for the record."""

import glob
import json
import os
import re
import signal
import subprocess
import time

import pytest

from dist_utils import free_port
from multihost_utils import ROOT, TINY, assert_same_weights, env, latest, logs, static_flags, tail, torchrun, wait_all
from netns_hosts import IFNAME, SimulatedHosts, unavailable
from test_rank_death import _rank_pids

pytestmark = pytest.mark.skipif(unavailable() is not None, reason=f"simulated hosts: {unavailable()}")

ITERS, EVERY = 12, 3
RUN = ["--tensor-model-parallel-size", "2", "--train-iters", str(ITERS), "--save-interval", str(EVERY)]


SCRIPT = os.path.join(ROOT, "examples", "multinode", "torchrun.sh")


def elastic_launch(hosts, i, train, log_dir, **kwargs):
    """examples/multinode/torchrun.sh on host i, as docs/training.md gives it; LOCAL_ADDR and RDZV_IS_HOST are
    needed only because simulated hosts share one host name (on real hosts the name resolves to the right
    address and torchrun finds the store host by itself)."""
    launch_env = env(
        MASTER_ADDR=hosts.addr(0),
        MASTER_PORT="29400",
        NNODES="2",
        NPROC_PER_NODE="2",
        MAX_RESTARTS="2",
        RUN_ID="megaphi-test",
        IFNAME=IFNAME,
        LOCAL_ADDR=hosts.addr(i),
        RDZV_IS_HOST="true" if i == 0 else "false",
        TORCHRUN_ARGS=f"--monitor-interval 1 --log-dir {log_dir} --redirects 3",
    )
    return hosts.popen(i, ["bash", SCRIPT, *TINY, *train], env=launch_env, **kwargs)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The same run, 4 ranks on one host, never interrupted (equal to the 2-host run: test_multihost.py)."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    save = tmp / "save"
    p = subprocess.Popen(
        torchrun(4, ["--master-port", str(free_port())], [*RUN, "--save", str(save)], tmp / "logs"),
        env=env(),
        cwd=str(tmp),
    )
    assert wait_all([p]) == [0], tail(tmp / "logs")
    return save


def records(save):
    path = os.path.join(str(save), "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [r for r in (json.loads(line) for line in f if line.strip()) if "loss" in r]


def restarted_rank0(tmp):
    """Global rank 0's stdout in the launcher's second attempt on host 0 (the host that stays)."""
    paths = glob.glob(str(tmp / "logs0-0" / "*" / "attempt_1" / "0" / "stdout.log"))
    return open(paths[0]).read() if paths else ""


def wait_for_iterations(save, n, procs, timeout=300):
    deadline = time.monotonic() + timeout  # hang guard
    while len(records(save)) < n:
        assert all(p.poll() is None for p in procs), [p.poll() for p in procs]
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.1)


@pytest.mark.parametrize("failure", ["worker", pytest.param("host", marks=pytest.mark.slow)])
def test_elastic_restart_resumes_exactly(tmp_path, uninterrupted, failure):
    save = tmp_path / "save"
    train = [*RUN, "--save", str(save), "--load", str(save), "--distributed-timeout-minutes", "1"]
    with SimulatedHosts(2) as hosts:

        def launch(i, attempt=0):
            return elastic_launch(
                hosts,
                i,
                train,
                tmp_path / f"logs{i}-{attempt}",
                cwd=str(tmp_path),
                stdout=subprocess.DEVNULL,
                stderr=open(tmp_path / f"launcher{i}-{attempt}.txt", "w"),
            )

        procs = [launch(0), launch(1)]
        wait_for_iterations(save, 5, procs)
        checkpoint = latest(save)
        logged = max(r["iteration"] for r in records(save))  # logged before the kill
        killed_at = time.monotonic()
        if failure == "worker":
            pids = {}
            for p in procs:
                pids.update(_rank_pids(p.pid))
            os.kill(pids[2], signal.SIGKILL)  # one worker of host 1
        else:
            for pid in hosts.pids(1):  # the launcher and both workers of host 1
                os.kill(pid, signal.SIGKILL)
            procs[1].wait(timeout=60)
            procs[1] = launch(1, attempt=1)  # the host's supervisor starts its launcher again
        deadline = time.monotonic() + 300
        while not re.search(r"resumed from .* at iteration \d+[\s\S]*\n *iteration +\d+/", restarted_rank0(tmp_path)):
            assert time.monotonic() < deadline and all(p.poll() in (None, 0) for p in procs), open(
                tmp_path / "launcher0-0.txt"
            ).read()[-3000:]
            time.sleep(0.1)
        recovered = time.monotonic() - killed_at  # to the first step after resuming
        resumed_at = int(re.search(r"resumed from .* at iteration (\d+)", restarted_rank0(tmp_path)).group(1))
        codes = wait_all(procs)
    out = "".join(text for i in range(2) for text in logs(tmp_path / f"logs{i}-0", "stdout.log").values())
    assert codes == [0, 0], out[-3000:]
    assert f"resumed from {save}/iter_{resumed_at:07d} at iteration {resumed_at}" in out
    assert resumed_at >= int(checkpoint[len("iter_") :])  # the last complete checkpoint (one may complete after)
    assert latest(save) == f"iter_{ITERS:07d}"
    n = assert_same_weights(uninterrupted, save, f"iter_{ITERS:07d}")
    print(
        f"\n[{failure} killed] restarted and resumed from iteration {resumed_at}: first step after the kill "
        f"{recovered:.1f} s later, {logged - resumed_at} logged iterations redone, {n} tensors bitwise equal"
    )


@pytest.mark.slow
def test_link_cut_longer_than_the_timeout_is_one_line_and_keeps_the_checkpoint(tmp_path):
    save = tmp_path / "save"
    train = [*RUN, "--train-iters", "100000", "--save", str(save), "--distributed-timeout-minutes", "0.25"]
    with SimulatedHosts(2) as hosts:
        log_dirs = [tmp_path / f"logs{i}" for i in range(2)]
        procs = [
            hosts.popen(
                i,
                torchrun(
                    2, static_flags(2, i, hosts.addr(0), 29500) + ["--monitor-interval", "60"], train, log_dirs[i]
                ),
                env=env(GLOO_SOCKET_IFNAME=IFNAME),
                cwd=str(tmp_path),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for i in range(2)
        ]
        wait_for_iterations(save, 4, procs)
        cut_at = time.monotonic()
        hosts.link_down(1)  # and never up again while the job lives
        codes = wait_all(procs, timeout=400)
        ended = time.monotonic() - cut_at
    assert codes[0] != 0 and codes[1] != 0
    checkpoint = latest(save)
    assert os.path.exists(save / checkpoint / "megaphi_meta.json")
    for log_dir in log_dirs:
        for path, err in logs(log_dir).items():
            lines = [line for line in err.splitlines() if line.startswith("megaphi.pretrain: error:")]
            assert len(lines) == 1, (path, err[-3000:])
            assert "--distributed-timeout-minutes 0.25" in lines[0] or "lost rank" in lines[0], lines[0]
    print(f"\n[link cut] every rank ended {ended:.1f} s after the cut with one line; latest = {checkpoint}")


@pytest.mark.slow
def test_degraded_link_slows_down_and_ends_equal(tmp_path, uninterrupted):
    save = tmp_path / "save"
    with SimulatedHosts(2) as hosts:
        applied = hosts.degrade(1)
        log_dirs = [tmp_path / f"logs{i}" for i in range(2)]
        procs = [
            hosts.popen(
                i,
                torchrun(
                    2,
                    static_flags(2, i, hosts.addr(0), 29500),
                    [*RUN, "--save", str(save), "--distributed-timeout-minutes", "2"],
                    log_dirs[i],
                ),
                env=env(GLOO_SOCKET_IFNAME=IFNAME),
                cwd=str(tmp_path),
            )
            for i in range(2)
        ]
        codes = wait_all(procs)
    assert codes == [0, 0], tail(log_dirs[0]) + tail(log_dirs[1])
    n = assert_same_weights(uninterrupted, save, f"iter_{ITERS:07d}")
    print(f"\n[degraded link: {applied}] finished, {n} tensors bitwise equal")
