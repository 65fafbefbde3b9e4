"""examples/slurm/pretrain_phi1.sbatch.

- On a real Slurm cluster of 2 nodes on this machine (slurmctld + one slurmd per simulated host,
  tests/slurm_cluster.py; skipped where Debian's slurm-wlm packages are not installed): the job trains 2
  hosts x 2 ranks (TP=2 x DP=2), a worker is killed with no torchrun restarts left, the script requeues the
  job, the requeued job resumes from the last checkpoint and ends with every checkpoint tensor bitwise
  equal to the uninterrupted run.
- Everywhere: the commands the script generates (one torchrun per node, rendezvous at the first node's
  NodeAddr, the node's own address, the store host, --save/--load, the requeue after a failure), with
  stand-ins for srun, scontrol and torchrun that record what they are given.
"""

import os
import signal
import stat
import subprocess
import time

import pytest

from dist_utils import free_port
from multihost_utils import ROOT, TINY, assert_same_weights, env, latest, logs, tail, torchrun, wait_all
from netns_hosts import SimulatedHosts, unavailable
from slurm_cluster import SlurmCluster, missing
from test_rank_death import _rank_pids

SBATCH = os.path.join(ROOT, "examples", "slurm", "pretrain_phi1.sbatch")
RUN = ["--tensor-model-parallel-size", "2", "--train-iters", "8", "--save-interval", "2"]


@pytest.mark.slow
@pytest.mark.skipif(
    unavailable() is not None or missing() is not None,
    reason=f"needs simulated hosts and Slurm: {unavailable() or missing()}",
)
def test_sbatch_requeues_after_a_failure_and_resumes_exactly(tmp_path):
    reference = tmp_path / "uninterrupted"
    p = subprocess.Popen(
        torchrun(4, ["--master-port", str(free_port())], [*RUN, "--save", str(reference)], tmp_path / "logs-ref"),
        env=env(),
        cwd=str(tmp_path),
    )
    assert wait_all([p]) == [0], tail(tmp_path / "logs-ref")

    save, log_dir = tmp_path / "ckpt", tmp_path / "logs"
    job_env = env(
        MEGAPHI_REPO=ROOT,
        CHECKPOINT_DIR=str(save),
        GPUS_PER_NODE="2",
        MAX_RESTARTS="0",
        SAVE_MINUTES="600",
        IFNAME="eth0",
        TORCHRUN_ARGS=f"--monitor-interval 1 --log-dir {log_dir} --redirects 3",
    )
    with SimulatedHosts(2) as hosts, SlurmCluster(hosts, tmp_path / "slurm") as slurm:
        job = slurm.sbatch(["--gres=none", "--cpus-per-task=2", SBATCH, *TINY, *RUN], job_env, tmp_path)
        deadline = time.monotonic() + 300
        while not (save / "metrics.jsonl").exists() or open(save / "metrics.jsonl").read().count("\n") < 3:
            assert time.monotonic() < deadline and slurm.job(job).get("JobState") in ("PENDING", "RUNNING"), slurm.job(
                job
            )
            time.sleep(0.2)
        workers = {}
        for pid in hosts.pids(1):
            workers.update(_rank_pids(pid))
        os.kill(workers[2], signal.SIGKILL)  # no torchrun restart is left: the launchers exit, the job requeues
        info = slurm.wait(job, states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"))
        output = (tmp_path / f"megaphi-megaphi-phi1-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED" and info.get("Restarts") == "1", (info, output[-3000:])
    assert "requeueing job" in output and "requeued 1 times" in output, output[-3000:]
    out = "".join(logs(log_dir, "stdout.log").values())
    assert "resumed from" in out, out[-3000:]
    assert latest(save) == "iter_0000008"
    n = assert_same_weights(reference, save, "iter_0000008")
    print(f"\n[Slurm] worker killed, job requeued and resumed: {n} tensors bitwise equal")


FAKE = """#!/usr/bin/env bash
printf '%s %s\\n' "$(basename "$0")" "$(printf '%q ' "$@")" >> "$FAKE_LOG"
case "$(basename "$0") $1 $2" in
    "scontrol show hostnames") printf 'gpu-a\\ngpu-b\\n' ;;
    "scontrol show node") echo "NodeName=$3 Arch=x86_64 NodeAddr=addr-of-$3 NodeHostName=$3 State=ALLOCATED" ;;
esac
if [[ "$(basename "$0")" == srun ]]; then
    while [[ "$1" == --* ]]; do shift; done
    for i in 0 1; do
        node=$( [[ $i == 0 ]] && echo gpu-a || echo gpu-b )
        SLURM_NODEID=$i SLURMD_NODENAME=$node "$@" || exit 3
    done
    exit "${FAKE_SRUN_EXIT:-0}"
fi
if [[ "$(basename "$0")" == torchrun ]]; then
    echo "env MASTER_ADDR=$MASTER_ADDR GLOO_SOCKET_IFNAME=$GLOO_SOCKET_IFNAME NCCL_SOCKET_IFNAME=$NCCL_SOCKET_IFNAME" \
         "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=$TORCH_DISABLE_SHARE_RDZV_TCP_STORE" >> "$FAKE_LOG"
fi
exit 0
"""


@pytest.mark.parametrize("srun_exit", [0, 1])
def test_sbatch_generated_commands(tmp_path, srun_exit):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("srun", "scontrol", "torchrun"):
        (bin_dir / name).write_text(FAKE)
        (bin_dir / name).chmod(0o755 | stat.S_IEXEC)
    log = tmp_path / "calls.txt"
    job_env = env(
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        FAKE_LOG=str(log),
        FAKE_SRUN_EXIT=str(srun_exit),
        SLURM_JOB_ID="77",
        SLURM_JOB_NODELIST="gpu-[a-b]",
        SLURM_JOB_NUM_NODES="2",
        SLURM_SUBMIT_DIR=str(tmp_path),
        SLURM_RESTART_COUNT="0",
        MEGAPHI_REPO=ROOT,
        IFNAME="ib0",
    )
    done = subprocess.run(
        ["bash", SBATCH, "--model", "phi-1"], env=job_env, cwd=str(tmp_path), capture_output=True, text=True, timeout=60
    )
    calls = log.read_text().splitlines()
    assert done.returncode == srun_exit, done.stderr
    runs = [c for c in calls if c.startswith("torchrun ")]
    assert len(runs) == 2, calls
    for node, line in zip(("gpu-a", "gpu-b"), runs):
        expected = (
            f"torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint addr-of-gpu-a:29400 "
            f"--rdzv-id megaphi-77 --max-restarts 3 --local-addr addr-of-{node} --rdzv-conf "
            f"is_host={'true' if node == 'gpu-a' else 'false'} -m megaphi.pretrain --model phi-1 --save "
            f"{tmp_path}/checkpoints/phi-1-base --load {tmp_path}/checkpoints/phi-1-base "
            f"--save-interval-minutes 30"
        )
        assert line.strip() == expected, line
    assert (
        "env MASTER_ADDR=addr-of-gpu-a GLOO_SOCKET_IFNAME=ib0 NCCL_SOCKET_IFNAME=ib0 "
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in calls
    )
    requeues = [c for c in calls if c.startswith("scontrol requeue")]
    assert requeues == (["scontrol requeue 77 "] if srun_exit else []), calls
