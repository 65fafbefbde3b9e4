"""--distributed-timeout-minutes: a stopped rank becomes a clear error, not a 30-minute silent wait."""

import os
import subprocess
import sys

import pytest

from dist_utils import free_port

MOCK_FLAGS = [
    "--model",
    "tiny",
    "--mock-data",
    "--micro-batch-size",
    "1",
    "--train-iters",
    "1",
    "--lr",
    "1e-3",
    "--eval-iters",
    "0",
]

# Each rank runs megaphi.pretrain.main with `run` replaced: a group made after init (it must inherit
# the timeout), one barrier, then rank 1 stops itself (SIGSTOP) before an all-reduce that rank 0 enters.
DRIVER = r"""
import os, signal, sys, time
import torch, torch.distributed as dist
import megaphi.pretrain as pretrain
rank, sync = int(os.environ["RANK"]), sys.argv[1]

def run(args):
    group = dist.new_group(backend="gloo")
    dist.barrier(group=group)
    if rank == 1:
        open(os.path.join(sync, "stopping"), "w").close()
        os.kill(os.getpid(), signal.SIGSTOP)
    dist.all_reduce(torch.ones(1), group=group)
    return 0

pretrain.run = run
open(os.path.join(sync, f"ready{rank}"), "w").close()  # start the rendezvous together (its timeout is short)
while not all(os.path.exists(os.path.join(sync, f"ready{r}")) for r in range(2)):
    time.sleep(0.01)
sys.exit(pretrain.main(sys.argv[2:]))
"""


def test_flag_default_and_validation():
    from megaphi.training.arguments import ArgumentError, parse_args

    assert parse_args(MOCK_FLAGS, world_size=1).distributed_timeout_minutes == 10.0
    assert (
        parse_args(MOCK_FLAGS + ["--distributed-timeout-minutes", "0.5"], world_size=1).distributed_timeout_minutes
        == 0.5
    )
    with pytest.raises(ArgumentError, match="--distributed-timeout-minutes must be > 0"):
        parse_args(MOCK_FLAGS + ["--distributed-timeout-minutes", "0"], world_size=1)


@pytest.mark.distributed
def test_stopped_rank_times_out_with_a_clear_error(tmp_path):
    port = str(free_port())
    procs = []
    try:
        for rank in range(2):
            env = dict(
                os.environ,
                RANK=str(rank),
                LOCAL_RANK=str(rank),
                WORLD_SIZE="2",
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=port,
                OMP_NUM_THREADS="1",
            )
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-c", DRIVER, str(tmp_path), *MOCK_FLAGS, "--distributed-timeout-minutes", "0.05"],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                    env=env,
                )
            )
        _, stderr = procs[0].communicate(timeout=240)  # generous: the timeout itself is 3 s
        assert os.path.exists(tmp_path / "stopping")
        assert procs[0].returncode == 1, stderr[-3000:]
        errors = [line for line in stderr.splitlines() if line.startswith("megaphi.pretrain: error:")]
        assert len(errors) == 1, stderr[-3000:]
        assert errors[0].startswith(
            "megaphi.pretrain: error: rank 0: a distributed operation waited longer than "
            "--distributed-timeout-minutes 0.05 (3 s) for the other ranks: a rank is "
            "stopped, hung or dead"
        ), errors[0]
        assert "Traceback" not in stderr, stderr[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate(timeout=60)
