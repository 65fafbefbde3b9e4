"""Ranks stop (and save) when their launcher goes away.

`torchrun` killed with SIGKILL leaves its ranks running, and SIGTERM to the `deepspeed` runner kills
the runner only: its child (deepspeed.launcher.launch) and the ranks train on, writing checkpoints
nobody waits for. A rank started by a launcher (RANK in the environment) therefore

* asks the kernel for SIGTERM when its parent dies (Linux prctl(PR_SET_PDEATHSIG)); the SIGTERM is
  handled like an operator's (training.signals.GracefulExit: finish the step, save, exit 0);
* watches its parent and the launcher processes above it (by pid and start time, so a recycled pid
  is not mistaken for the launcher): GracefulExit.should_stop() polls `gone()` after every step, so
  the death of the `deepspeed` runner above deepspeed.launcher.launch also stops the run, and the
  ranks agree on it like on a signal.

A plain `python -m megaphi.pretrain` (no RANK) is not tied to its parent, so `nohup`/`setsid` runs
outlive their shell as before.
"""

import ctypes
import os
import signal
from typing import List, Optional, Tuple

PR_SET_PDEATHSIG = 1
PR_GET_PDEATHSIG = 2
LAUNCHER_SCRIPTS = ("deepspeed", "ds", "torchrun")
LAUNCHER_MODULES = (
    "deepspeed.launcher.launch",
    "deepspeed.launcher.runner",
    "torch.distributed.run",
    "torch.distributed.launch",
)

_ARMED = None


def _proc_stat(pid: int) -> Optional[Tuple[str, int, int]]:
    """(state, ppid, start time in clock ticks) from /proc/PID/stat, or None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # the command name may hold spaces and ')'
    return fields[0], int(fields[1]), int(fields[19])


def _cmdline(pid: int) -> List[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode("utf-8", "replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def looks_like_launcher(argv: List[str]) -> bool:
    """`deepspeed ...`, `torchrun ...`, `python [-u] /path/deepspeed ...` or `python -m <launcher module>`."""
    words = [a for a in argv[:4] if not (a.startswith("-") and a != "-m")]
    if any(os.path.basename(a) in LAUNCHER_SCRIPTS for a in words[:2]):
        return True
    return any(a == "-m" and i + 1 < len(argv) and argv[i + 1] in LAUNCHER_MODULES for i, a in enumerate(argv[:4]))


def set_parent_death_signal(sig=signal.SIGTERM) -> bool:
    """prctl(PR_SET_PDEATHSIG, sig) on Linux; False where it is not available."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def parent_death_signal() -> int:
    """The current PR_GET_PDEATHSIG (0: none)."""
    libc = ctypes.CDLL(None, use_errno=True)
    value = ctypes.c_int(0)
    libc.prctl(PR_GET_PDEATHSIG, ctypes.byref(value), 0, 0, 0)
    return value.value


class LauncherWatch:
    """The parent and the launcher processes above it, as (pid, start time, command)."""

    def __init__(self, parent_pid: int, max_depth: int = 4):
        self.parent_pid = parent_pid
        self.watched = []
        pid = parent_pid
        for depth in range(max_depth):
            stat = _proc_stat(pid)
            if stat is None or pid <= 1:
                break
            argv = _cmdline(pid)
            if depth > 0 and not looks_like_launcher(argv):
                break
            self.watched.append((pid, stat[2], " ".join(" ".join(argv).split())[:120] or f"pid {pid}"))
            pid = stat[1]

    def gone(self) -> Optional[str]:
        """Why the run should stop ('launcher ... exited'), or None while every watched process lives."""
        if os.getppid() != self.parent_pid:
            return f"launcher exit (parent process {self.parent_pid} exited)"
        for pid, started, command in self.watched:
            stat = _proc_stat(pid)
            if stat is None or stat[0] in ("Z", "X") or stat[2] != started:
                return f"launcher exit (process {pid} `{command}` exited)"
        return None


def arm() -> Optional[LauncherWatch]:
    """Called once at rank start, before anything slow. Returns the watch (also `current()`), or
    None for a run that no launcher started."""
    global _ARMED
    if "RANK" not in os.environ:
        return None
    parent = os.getppid()
    set_parent_death_signal(signal.SIGTERM)
    # a parent that died before the prctl took effect sends no signal: gone() sees the new ppid
    _ARMED = LauncherWatch(parent)
    return _ARMED


def current() -> Optional[LauncherWatch]:
    return _ARMED
