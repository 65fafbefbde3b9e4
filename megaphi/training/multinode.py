"""What a run across several hosts needs beyond one host.

- check_save_folder: every rank writes a probe file naming the run into --save and reads rank 0's, so a
  folder that one host cannot write, or that is not the same (shared) folder on every host, is one error
  line on every rank at start, before any training, instead of a hang or a half-written checkpoint at the
  first save.
- warn_elastic_store: torchrun's elastic agent (c10d rendezvous, --max-restarts N > 0) by default hands its
  workers the agent's own TCP store, which outlives a restart: the restarted workers can read the dead
  round's addresses from it and fail with gloo/NCCL "failed to connect" (then RendezvousClosedError once
  the restarts are spent). TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in the launcher's environment makes every
  round use a fresh store; without it rank 0 prints one warning line.
- SaveTimer: --save-interval-minutes, decided on rank 0 and broadcast so every rank saves at the same
  iteration.
"""

import os
import socket
import time
import uuid

import torch
import torch.distributed as dist

from .arguments import ArgumentError

PROBE_PREFIX = ".megaphi-probe-"


class SaveFolderError(ArgumentError):
    """A --save folder that some rank cannot write or that is not shared by every host (one line)."""


def _world():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather(obj, world):
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _ranks(ranks):
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(str(r) for r in ranks)


def check_save_folder(folder: str) -> None:
    """Collective: raise SaveFolderError on every rank unless every rank can write `folder` and sees the
    same folder as rank 0 (a probe file written by each rank, read back by all, then removed)."""
    rank, world = _world()
    folder = os.path.abspath(folder)
    run = [uuid.uuid4().hex if rank == 0 else None]
    if world > 1:
        dist.broadcast_object_list(run, src=0)
    host = socket.gethostname()
    mine = os.path.join(folder, f"{PROBE_PREFIX}{run[0]}-rank{rank}")
    write_error = None
    try:
        os.makedirs(folder, exist_ok=True)
        with open(mine, "w") as f:
            f.write(f"megaphi run probe {run[0]}: rank {rank} of {world} on host {host} (pid {os.getpid()})\n")
    except OSError as e:
        write_error = e.strerror or str(e)
    _gather(None, world)  # every probe is written before anyone looks
    seen = False
    try:
        with open(os.path.join(folder, f"{PROBE_PREFIX}{run[0]}-rank0")) as f:
            seen = run[0] in f.read()
    except OSError:
        pass
    report = _gather((host, write_error, seen), world)
    if write_error is None:
        try:
            os.remove(mine)
        except OSError:
            pass
    unwritable = [(r, h, e) for r, (h, e, _) in enumerate(report) if e is not None]
    if unwritable:
        r, h, e = unwritable[0]
        raise SaveFolderError(
            f"--save {folder}: {_ranks([x[0] for x in unwritable])} (host "
            f"{', '.join(sorted({x[1] for x in unwritable}))}) cannot write it: {e}; every rank "
            f"saves its own shards there, so it must be writable from every host"
        )
    blind = [r for r, (_, _, s) in enumerate(report) if not s]
    if blind:
        hosts = ", ".join(sorted({report[r][0] for r in blind}))
        raise SaveFolderError(
            f"--save {folder} is not the same folder on every host: {_ranks(blind)} (host "
            f"{hosts}) {'does' if len(blind) == 1 else 'do'} not see the probe file rank 0 (host {report[0][0]}) wrote there; give "
            f"a folder on a filesystem that every host mounts at the same path"
        )


def warn_elastic_store(say) -> None:
    """One warning line (through `say`, rank 0's printer) when torchrun's elastic agent would restart this
    job with its shared store: see the module docstring."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return
    try:
        restarts = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0"))
    except ValueError:
        restarts = 0
    if restarts > 0:
        say(
            f"warning: torchrun --max-restarts {restarts} with the launcher's shared TCP store: a restart can "
            f"read the previous round's addresses and fail to connect; set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 "
            f"in the launcher's environment (docs/training.md, Multi-node)"
        )


class SaveTimer:
    """--save-interval-minutes M: True on every rank at the first iteration end at which rank 0 has gone M
    minutes without such a save (the clock starts when training starts). Collective when M is set."""

    def __init__(self, minutes):
        self.seconds = None if minutes is None else 60.0 * minutes
        self.last = time.monotonic()

    def due(self, group=None) -> bool:
        if self.seconds is None:
            return False
        flag = torch.tensor([1 if time.monotonic() - self.last >= self.seconds else 0], dtype=torch.int32)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
            src = 0 if group is None else dist.get_global_rank(group, 0)
            dist.broadcast(flag, src=src, group=group)
        if flag.item():
            self.last = time.monotonic()
            return True
        return False
