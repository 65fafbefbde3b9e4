"""The run's process group: the launcher's (deepspeed, torchrun, Slurm), or a 1-rank one for a plain
`python -m megaphi.pretrain` or a Trainer built in a Python session."""

import os
import socket

import torch
import torch.distributed as dist

from megaphi.training import dist_timeout


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def init_distributed(backend=None, timeout_minutes=None):
    """Join the launcher's process group, or make a 1-rank one for a plain `python -m` run (nothing
    when a group exists). timeout_minutes (--distributed-timeout-minutes) bounds every collective of
    every group."""
    if dist.is_initialized():
        return
    single_process = "RANK" not in os.environ  # no launcher
    if single_process:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", _free_port())
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    kwargs = {}
    if timeout_minutes is not None:
        kwargs["timeout"] = dist_timeout.set_default_timeout(timeout_minutes)
    if single_process:
        # an in-process store: no TCP port to bind, so concurrent single-process runs never collide
        kwargs.update(store=dist.HashStore(), rank=0, world_size=1)
    dist.init_process_group(backend, **kwargs)
