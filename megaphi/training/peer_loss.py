"""When a rank dies (kill -9, OOM killer, a lost host), the others fail inside a collective with the
backend's raw error ("Connection reset by peer" from gloo, a remote-exit error from NCCL). This turns that
into one line: which rank was lost, where known, and that the run resumes from its last checkpoint.

Each rank records every rank's (host, pid) once at start-up (one all-gather), so a survivor can tell
which rank on its own host is gone; a rank on another host is reported by its host."""

import os
import re
import socket
import time

import torch.distributed as dist

from .launcher_watch import _proc_stat

_PEER_LOST_TEXT = re.compile(
    r"connection (reset|closed) by peer|broken pipe|remote process exited|"
    r"peer (closed|disconnected)|ncclRemoteError|NCCL communicator was aborted",
    re.IGNORECASE,
)


def record_peers():
    """[(host, pid)] of every rank, in rank order (a collective: every rank calls it); [] at world size 1."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return []
    peers = [None] * dist.get_world_size()
    dist.all_gather_object(peers, (socket.gethostname(), os.getpid()))
    return peers


def is_peer_lost(exc: BaseException) -> bool:
    return isinstance(exc, RuntimeError) and bool(_PEER_LOST_TEXT.search(str(exc)))


def _running(pid):
    stat = _proc_stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")


def lost_ranks(peers, my_rank, settle_seconds=10.0):
    """(ranks on this host that are no longer running, hosts of the other ranks). A killed process closes
    its sockets before it is gone from /proc, so the survivor may look a moment too early: it looks again
    for up to `settle_seconds`."""
    here = socket.gethostname()
    local = [(rank, pid) for rank, (host, pid) in enumerate(peers) if rank != my_rank and host == here]
    deadline = time.monotonic() + settle_seconds
    while True:
        dead = [rank for rank, pid in local if not _running(pid)]
        if dead or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    elsewhere = sorted({host for rank, (host, _) in enumerate(peers) if host != here})
    return dead, elsewhere


def peer_lost_message(exc, peers, my_rank, save_dir=None):
    dead, elsewhere = lost_ranks(peers, my_rank) if peers else ([], [])
    if dead:
        who = (
            f"lost rank {dead[0]} (pid {peers[dead[0]][1]}, no longer running)"
            if len(dead) == 1
            else f"lost ranks {', '.join(map(str, dead))} (no longer running)"
        )
    elif elsewhere:
        who = f"lost contact with a rank on {', '.join(elsewhere)} (its process or the network went away)"
    else:
        who = "lost contact with another rank"
    resume = (
        f"rerun the same command to resume from the last checkpoint in {save_dir}"
        if save_dir
        else "no --save was given, so there is no checkpoint to resume from"
    )
    detail = " ".join(str(exc).split())[:160]
    return f"rank {my_rank}: {who}; {resume} ({type(exc).__name__}: {detail})"
