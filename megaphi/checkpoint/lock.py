"""One job per --save folder: an flock held for the whole run.

Two jobs writing one folder (a job restarted while the old one still runs, orphaned ranks of a
killed launcher, a copy-pasted script) interleave checkpoints and `latest`. Global rank 0 takes an
exclusive, non-blocking fcntl.flock on `DIR/.megaphi.lock` and keeps the file open until the
process ends (the kernel drops the lock then, even after kill -9, so a stale file never blocks a
restart); it writes its pid, host and start time into it. A second job's rank 0 fails to take it,
reads the holder from the file, and every rank of that job stops with one error line naming it.
The file stays in the folder (removing it would race with a job about to take it).
"""

import datetime
import errno
import fcntl
import json
import os
import socket
from typing import IO

from .collective import broadcast_from_rank0, global_rank
from .layout import LOCK_NAME, CheckpointError

_HELD: dict[str, IO] = {}  # folder -> open file (the lock lives as long as it stays open)


class SaveFolderError(CheckpointError):
    """--save names no usable folder (a file, or not creatable or lockable): one line naming --save;
    the trainer prints it and exits 1."""


class SaveFolderInUse(SaveFolderError):
    """Another run holds the folder's lock."""


def _holder(path):
    try:
        with open(path) as f:
            info = json.loads(f.read() or "{}")
        return f"pid {info['pid']} on host {info['host']} (started {info['started']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "an unknown process"


def acquire(folder: str) -> None:
    """Take the folder's lock for the rest of this process, or raise SaveFolderInUse (not collective)."""
    folder = os.path.abspath(folder)
    if folder in _HELD:
        return
    path = os.path.join(folder, LOCK_NAME)
    if os.path.lexists(folder) and not os.path.isdir(folder):
        raise SaveFolderError(f"--save {folder} is a file, not a folder: give a folder (created if absent)")
    try:
        os.makedirs(folder, exist_ok=True)
        f = open(path, "a+")
    except OSError as e:
        raise SaveFolderError(f"--save {folder}: cannot create {path}: {e.strerror or e}") from None
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        f.close()
        if e.errno not in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN):
            raise SaveFolderError(
                f"--save {folder}: cannot lock {path}: {e.strerror or e} (the filesystem may not support flock)"
            ) from None
        raise SaveFolderInUse(
            f"--save {folder} is in use by another run: {_holder(path)} holds {path}; stop that run or save elsewhere"
        ) from None
    f.seek(0)
    f.truncate()
    f.write(
        json.dumps(
            {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            }
        )
    )
    f.flush()
    _HELD[folder] = f


def acquire_for_job(folder: str) -> None:
    """Collective: rank 0 takes the lock; every rank raises SaveFolderInUse when it could not."""
    error = None
    if global_rank() == 0:
        try:
            acquire(folder)
        except SaveFolderError as e:  # in use, or not creatable/lockable
            error = str(e)
    error = broadcast_from_rank0(error)
    if error is not None:
        raise SaveFolderInUse(error)


def release(folder: str) -> None:
    f = _HELD.pop(os.path.abspath(folder), None)
    if f is not None:
        f.close()  # closing drops the flock


def release_all() -> None:
    """At the end of a run called in-process (process exit releases the locks anyway)."""
    for folder in list(_HELD):
        release(folder)
