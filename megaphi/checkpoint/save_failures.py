"""A save that fails: one line naming the folder and the cause, the partial folder removed.

Whatever stops a save (disk full, EIO, EACCES, a read-only remount, a file where the tag folder
should be) ends the run with one line: which folder, why, whether the partial checkpoint was removed,
and what `latest` still names (it is written last, so a failed save never moves it). The folder of
the failed save is removed unless `latest` or `best` names it or it is not a folder at all.
"""

import errno
import gc
import os
import shutil
import traceback

from megaphi.training.dist_timeout import is_timeout
from megaphi.training.peer_loss import is_peer_lost

from . import integrity


class InTheWay(OSError):
    """Something that is not a folder occupies the tag folder's path: never removed by the save."""

    def __init__(self, path):
        super().__init__(errno.ENOTDIR, f"{path} is a file, not a folder: move it away and resume", path)

    def __str__(self):
        return self.strerror


def is_save_failure(error):
    """I/O as the writers report it: OSError, torch.save's RuntimeError (errno lost), safetensors'
    error. A collective timeout or a lost rank is reported by the trainer as such (naming the rank),
    not as a failed save: the partial folder it leaves is set aside by the next run."""
    if is_timeout(error) or is_peer_lost(error):
        return False
    return isinstance(error, (OSError, RuntimeError)) or type(error).__name__ == "SafetensorError"


def describe(error):
    """The cause in a few words: "EIO, Input/output error: PATH", or the writer's first line."""
    if isinstance(error, InTheWay):
        return str(error)
    for e in (error, error.__cause__, error.__context__):
        if isinstance(e, OSError) and e.errno in errno.errorcode:
            where = f": {e.filename}" if e.filename else ""
            return f"{errno.errorcode[e.errno]}, {e.strerror or os.strerror(e.errno)}{where}"
    first = (str(error).strip().splitlines() or [""])[0][:200]
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


def readable_size(n):
    if n < 1024:
        return f"{n} bytes"
    if n < 1 << 20:
        return f"{n / 1024:.0f} KiB"
    if n < 1 << 30:
        return f"{n / 2**20:.1f} MiB"
    return f"{n / 2**30:.1f} GiB"


def _release_writers(error):
    """The failed writer's frames (in the tracebacks of the error and of those it was raised while
    handling) still hold its open file, and a deleted file keeps its blocks until it is closed: drop
    them, so the free space measured afterwards is what the user will find."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if error.__traceback__ is not None:
            traceback.clear_frames(error.__traceback__)
        error = error.__cause__ or error.__context__
    gc.collect()


def discard(save_dir, tag, error, protected, previous, latest_exists):
    """Remove the failed save's folder (unless `protected` names it or it is not a folder) and return
    the one-line message. `previous`: the tag `latest` names (None: none readable)."""
    tag_dir = os.path.join(save_dir, tag)
    if tag in protected or not os.path.isdir(tag_dir) or os.path.islink(tag_dir):
        removal = "nothing was removed"
    else:
        shutil.rmtree(tag_dir, ignore_errors=True)
        removal = (
            "the partial checkpoint was removed"
            if not os.path.lexists(tag_dir)
            else f"the partial checkpoint {tag_dir} could not be removed (remove it by hand)"
        )
    if previous:
        latest = f"'latest' still names {previous}"
    elif latest_exists:
        latest = "'latest' is unchanged"
    else:
        latest = "no checkpoint is complete yet ('latest' was never written)"
    if integrity.is_disk_full(error, save_dir) and not isinstance(error, InTheWay):
        _release_writers(error)
        free = shutil.disk_usage(save_dir).free if os.path.isdir(save_dir) else 0
        return (
            f"disk full (ENOSPC, No space left on device) while saving {tag_dir}; {removal}, "
            f"{readable_size(free)} free now; {latest}; free space (or --keep-last N) and resume"
        )
    return f"saving {tag_dir} failed ({describe(error)}); {removal}; {latest}"
