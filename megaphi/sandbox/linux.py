"""Linux system calls the worker needs and Python does not offer (prctl, mount, unshare, setns,
capset), called through the C library, and small descriptor helpers. Standard library only."""

import ctypes
import os
import select
import tempfile
import time

CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWUSER = 0x00020000, 0x08000000, 0x10000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC, MS_PRIVATE, MS_RELATIME = 1024, 2048, 4096, 0x4000, 1 << 18, 1 << 21
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_CAPBSET_DROP = 1, 4, 24
PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 36, 38, 47, 4

libc = ctypes.CDLL(None, use_errno=True)


def check(ret, what):
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def prctl(option, value, what):
    check(libc.prctl(option, ctypes.c_ulong(value), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0)), what)


def mount(source, target, fstype, flags, data=None):
    check(
        libc.mount(
            source and source.encode(),
            target.encode(),
            fstype and fstype.encode(),
            ctypes.c_ulong(flags),
            data and data.encode(),
        ),
        f"mount {target}",
    )


def unshare(flags):
    check(libc.unshare(flags), "unshare")


def setns(fd, flag):
    """None on success, else the error in words."""
    if libc.setns(fd, flag) != 0:
        return os.strerror(ctypes.get_errno())
    return None


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def drop_capabilities(keep_effective=False):
    """Empty the bounding and ambient sets, then (unless `keep_effective`, for a setuid that
    follows and clears them itself) the permitted, effective and inheritable sets."""
    for cap in range(64):
        if libc.prctl(PR_CAPBSET_DROP, ctypes.c_ulong(cap), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0)):
            if ctypes.get_errno() == 22:  # EINVAL: past the last capability
                break
    libc.prctl(
        PR_CAP_AMBIENT,
        ctypes.c_ulong(PR_CAP_AMBIENT_CLEAR_ALL),
        ctypes.c_ulong(0),
        ctypes.c_ulong(0),
        ctypes.c_ulong(0),
    )
    if not keep_effective:
        header, data = _CapHeader(0x20080522, 0), (_CapData * 2)()
        check(libc.capset(ctypes.byref(header), data), "capset")


def write_file(path, text):
    with open(path, "w") as f:
        f.write(text)


def read_file(path):
    with open(path) as f:
        return f.read()


def write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def read_available(fd):
    """Everything a non-blocking descriptor holds now."""
    data = b""
    while True:
        try:
            chunk = os.read(fd, 1 << 20)
        except BlockingIOError:
            return data
        if not chunk:
            return data
        data += chunk


def read_line(fd, buf):
    """(line, rest) from `buf` and what `fd` brings; (None, buf) at end of file."""
    while b"\n" not in buf:
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return None, buf
        buf += chunk
    line, _, rest = buf.partition(b"\n")
    return line, rest


def exit_code(status):
    return (
        os.waitstatus_to_exitcode(status)
        if hasattr(os, "waitstatus_to_exitcode")
        else (-os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status))
    )


def memfile(name):
    """A file that lives in memory only (for a program's stdout/stderr)."""
    try:
        return os.memfd_create(name, 0)
    except (AttributeError, OSError):  # old Python or kernel: an unlinked file in /tmp
        fd, path = tempfile.mkstemp(prefix=f"megaphi-{name}-")
        os.unlink(path)
        return fd


def wait_for_exit(pid, timeout):
    """True if `pid` exited within `timeout` seconds (it stays unreaped)."""
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):  # old kernels / seccomp profiles without pidfd_open: poll
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return True
            time.sleep(0.002)
        return False
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    ready = bool(poller.poll(timeout * 1000.0))
    os.close(pidfd)
    return ready
