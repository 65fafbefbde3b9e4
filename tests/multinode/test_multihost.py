"""Multi-host training on simulated hosts (network namespaces joined by a bridge, tests/netns_hosts.py):
torchrun with --nnodes 2 --node-rank 0|1, 2 ranks per host, gloo over the hosts' veth only, TP=2 inside a
host and DP=2 across hosts, ZeRO 1, dropout 0.1. Every tensor of the checkpoints (weights, optimizer
shards, RNG states) is bitwise equal to the same run as 4 ranks on one host, and checkpoints move between
host counts: a 2-host checkpoint resumes on one host and a 1-host checkpoint on two, both ending equal
to the uninterrupted run."""

import os
import shutil
import subprocess

import pytest

from dist_utils import free_port
from multihost_utils import ROOT, TINY, assert_same_weights, env, latest, logs, static_flags, tail, torchrun, wait_all
from netns_hosts import IFNAME, SimulatedHosts, unavailable

pytestmark = pytest.mark.skipif(unavailable() is not None, reason=f"simulated hosts: {unavailable()}")

TP2 = ["--tensor-model-parallel-size", "2", "--train-iters", "4", "--save-interval", "2"]


def run_one_host(tmp, save, extra=()):
    log_dir = tmp / f"logs-{os.path.basename(save)}"
    p = subprocess.Popen(
        torchrun(4, ["--master-port", str(free_port())], [*TP2, "--save", str(save), *extra], log_dir),
        env=env(),
        cwd=str(tmp),
    )
    assert wait_all([p]) == [0], tail(log_dir)
    return "".join(logs(log_dir, "stdout.log").values())


def run_two_hosts(tmp, save, extra=()):
    with SimulatedHosts(2) as hosts:
        log_dirs = [tmp / f"logs-{os.path.basename(save)}-host{i}" for i in range(2)]
        procs = [
            hosts.popen(
                i,
                torchrun(2, static_flags(2, i, hosts.addr(0), 29500), [*TP2, "--save", str(save), *extra], log_dirs[i]),
                env=env(GLOO_SOCKET_IFNAME=IFNAME),
                cwd=str(tmp),
            )
            for i in range(2)
        ]
        assert wait_all(procs) == [0, 0], tail(log_dirs[0]) + tail(log_dirs[1])
    return "".join(logs(log_dirs[0], "stdout.log").values())


def copy_checkpoint(src, tag, dst):
    """A save folder holding only src's checkpoint `tag` (as if the run had stopped there)."""
    os.makedirs(dst)
    shutil.copytree(os.path.join(src, tag), os.path.join(dst, tag))
    with open(os.path.join(dst, "latest"), "w") as f:
        f.write(tag)


@pytest.fixture(scope="module")
def one_host(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("one-host")
    run_one_host(tmp, tmp / "save")
    return tmp / "save"


@pytest.fixture(scope="module")
def two_hosts(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("two-hosts")
    run_two_hosts(tmp, tmp / "save")
    return tmp / "save"


def test_two_hosts_equal_one_host(one_host, two_hosts):
    assert latest(two_hosts) == "iter_0000004"
    for tag in ("iter_0000002", "iter_0000004"):
        assert assert_same_weights(one_host, two_hosts, tag) > 50


@pytest.mark.slow
def test_checkpoints_move_between_host_counts(tmp_path, one_host, two_hosts):
    # the 2-host checkpoint of iteration 2 resumes on one host; the 1-host one on two hosts
    two_to_one, one_to_two = tmp_path / "two-to-one", tmp_path / "one-to-two"
    copy_checkpoint(two_hosts, "iter_0000002", two_to_one)
    copy_checkpoint(one_host, "iter_0000002", one_to_two)
    out = {
        two_to_one: run_one_host(tmp_path, two_to_one, ["--load", str(two_to_one)]),
        one_to_two: run_two_hosts(tmp_path, one_to_two, ["--load", str(one_to_two)]),
    }
    for resumed in (two_to_one, one_to_two):
        assert f"resumed from {resumed}/iter_0000002 at iteration 2" in out[resumed], out[resumed][-2000:]
        assert latest(resumed) == "iter_0000004"
        assert assert_same_weights(one_host, resumed, "iter_0000004") > 50


@pytest.mark.slow
def test_deepspeed_launcher_without_ssh_on_two_hosts(tmp_path, one_host):
    """examples/multinode/deepspeed_hostfile.sh, route 2 (deepspeed --no_ssh --node_rank) on each host."""
    save, hostfile = tmp_path / "save", tmp_path / "hostfile"
    hostfile.write_text("node-a slots=2\nnode-b slots=2\n")
    with SimulatedHosts(2) as hosts:
        procs = [
            hosts.popen(
                i,
                [
                    "bash",
                    os.path.join(ROOT, "examples", "multinode", "deepspeed_hostfile.sh"),
                    *TINY,
                    *TP2,
                    "--save",
                    str(save),
                ],
                env=env(
                    HOSTFILE=str(hostfile),
                    NODE_RANK=str(i),
                    MASTER_ADDR=hosts.addr(0),
                    MASTER_PORT="29500",
                    IFNAME=IFNAME,
                ),
                cwd=str(tmp_path),
                stdout=open(tmp_path / f"host{i}.txt", "w"),
                stderr=subprocess.STDOUT,
            )
            for i in range(2)
        ]
        codes = wait_all(procs)
    assert codes == [0, 0], (tmp_path / "host0.txt").read_text()[-3000:] + (tmp_path / "host1.txt").read_text()[-3000:]
    assert latest(save) == "iter_0000004"
    assert assert_same_weights(one_host, save, "iter_0000004") > 50


@pytest.mark.parametrize("kind", ["read-only", pytest.param("not shared", marks=pytest.mark.slow)])
def test_save_folder_one_host_cannot_use_is_one_line_at_start(tmp_path, kind):
    save, elsewhere = tmp_path / "shared-save", tmp_path / "host1-private"
    save.mkdir()
    elsewhere.mkdir()
    binds = [(str(save), str(save), True)] if kind == "read-only" else [(str(elsewhere), str(save), False)]
    with SimulatedHosts(2) as hosts:
        log_dirs = [tmp_path / f"logs-host{i}" for i in range(2)]
        procs = [
            hosts.popen(
                i,
                torchrun(
                    1,
                    static_flags(2, i, hosts.addr(0), 29500),
                    ["--train-iters", "2", "--save", str(save)],
                    log_dirs[i],
                ),
                binds=binds if i == 1 else (),
                env=env(GLOO_SOCKET_IFNAME=IFNAME),
                cwd=str(tmp_path),
            )
            for i in range(2)
        ]
        codes = wait_all(procs)
    assert codes == [1, 1], tail(log_dirs[0]) + tail(log_dirs[1])
    expected = (
        "cannot write it: Read-only file system"
        if kind == "read-only"
        else "is not the same folder on every host: rank 1 (host"
    )
    for log_dir in log_dirs:
        (err,) = logs(log_dir).values()
        lines = [line for line in err.splitlines() if line.startswith("megaphi.pretrain: error:")]
        assert len(lines) == 1 and f"--save {save}" in lines[0] and expected in lines[0], err[-2000:]
        assert "Traceback" not in err
        (out,) = logs(log_dir, "stdout.log").values()
        assert "iteration" not in out  # nothing trained
    assert not os.path.exists(save / "latest") and not list(save.glob(".megaphi-probe-*"))
