"""Sandbox supervisor: runs ONE untrusted Python program and reports how it ended.

Started by megaphi.evaluation.sandbox as `python -I -S _supervisor.py CONFIG_JSON` with the program's
source on stdin. Standard library only, because it runs in an isolated interpreter.

Why a separate process: the program's parent is this supervisor, never the evaluator, so a program
that kills its parent only ends its own run; and namespaces/fork/rlimits are set up here, away from
the evaluator's threads. Layers (each best-effort, reported back):
  * new network, PID and mount namespaces (a user namespace too when not root): no network, the
    program is PID 1 of its own namespace so everything it forks dies with it, /tmp, /var/tmp,
    /dev/shm are fresh size-capped tmpfs mounts that vanish afterwards, every other mount is
    remounted read-only (so nothing the program writes outside those lands on the host, whatever
    its uid), and the evaluator's own folders (`hide`) are covered by empty read-only tmpfs;
  * when root: the program runs as the private uid/gid the evaluator gave this run (no account has
    it, no other running program shares it): it cannot write root's files or signal the evaluator
    or other programs, and RLIMIT_NPROC applies to it alone (root would ignore it); or, where no
    private uid works, as the evaluator's fallback account (nobody), never as root unless asked;
  * rlimits (CPU, address space, file size, processes, open files, no core dumps), no_new_privs,
    a parent-death signal, stdin /dev/null, stdout/stderr to files capped by RLIMIT_FSIZE;
  * a wall-clock timeout, after which the program (and with it its namespace) is SIGKILLed.
"""
import ctypes
import json
import os
import re
import resource
import select
import signal
import sys
import time

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC, MS_PRIVATE, MS_RELATIME = 1024, 2048, 4096, 0x4000, 1 << 18, 1 << 21
# Per-mount flags a read-only remount must repeat: inside a user namespace the kernel refuses to
# clear flags that the outer namespace set (they are locked).
_LOCKED_FLAGS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": MS_NOATIME,
                 "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME}
_PRIVATE_DIRS = ("/tmp", "/var/tmp", "/dev/shm")
_PSEUDO_FS = ("proc", "sysfs", "cgroup", "cgroup2", "devpts", "mqueue", "bpf", "tracefs", "debugfs",
              "securityfs", "pstore", "configfs", "fusectl", "binfmt_misc", "hugetlbfs", "autofs")
PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 36, 38

_libc = ctypes.CDLL(None, use_errno=True)

# Runs program.py as __main__; only if its code returns (no exception, no exit) does it print the
# success marker, which it reads from fd 3 and which appears nowhere in the program's files, argv or
# environment. Code that introspects this interpreter (gc, frames, memory) can still find it: see
# docs/evaluation.md for what the marker does and does not guarantee.
RUNNER = """
import os, sys, types
def run(marker=os.read(3, 256)):
    os.close(3)
    with open("program.py", "rb") as f:
        code = compile(f.read(), "program.py", "exec")
    module = types.ModuleType("__main__")
    module.__file__ = "program.py"
    sys.modules["__main__"] = module
    sys.argv = ["program.py"]
    exec(code, module.__dict__)
    if marker:
        sys.stdout.flush()
        os.write(1, marker + b"\\n")
run()
"""


def _check(ret, what):
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(source, target, fstype, flags, data=None):
    _check(_libc.mount(source and source.encode(), target.encode(), fstype and fstype.encode(),
                       ctypes.c_ulong(flags), data and data.encode()), f"mount {target}")


def _write_file(path, text):
    with open(path, "w") as f:
        f.write(text)


def _enter_namespaces(cfg, report):
    """Unshare net/pid/mount (+user when unprivileged); returns the set of namespaces entered."""
    uid, gid = os.getuid(), os.getgid()
    flags = CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWNS | (0 if uid == 0 else CLONE_NEWUSER)
    try:
        _check(_libc.unshare(flags), "unshare")
    except OSError as e:
        report["namespace_error"] = str(e)
        return set()
    if uid != 0:  # map our own uid/gid only: nobody is root inside
        _write_file("/proc/self/setgroups", "deny")
        _write_file("/proc/self/uid_map", f"{uid} {uid} 1")
        _write_file("/proc/self/gid_map", f"{gid} {gid} 1")
    entered = {"net", "pid", "mount"}
    try:
        _mount(None, "/", None, MS_REC | MS_PRIVATE)
        private = [d for d in _PRIVATE_DIRS if os.path.isdir(d) and not os.path.islink(d)]
        for d in private:
            _mount("tmpfs", d, "tmpfs", MS_NOSUID | MS_NODEV, f"size={cfg['tmpfs_bytes']},mode=1777")
        report["private_tmp"] = True
    except OSError as e:
        report["mount_error"] = str(e)
        return entered  # without a private working directory, a read-only host would be unusable
    writable = _remount_read_only(private)
    report["read_only_fs"] = not writable
    if writable:
        report["writable_mounts"] = writable
    hidden = []
    for path in cfg.get("hide", []):
        try:
            _mount("tmpfs", path, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=4k,mode=755")
            hidden.append(path)
        except OSError:
            pass
    report["hidden"] = hidden
    return entered


def _mounts():
    """(mount point, per-mount options, filesystem type) for every mount, parents first."""
    unescape = lambda text: re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            fstype = fields[fields.index("-") + 1]
            yield unescape(fields[4]), fields[5].split(","), fstype


def _remount_read_only(private):
    """Bind-remount every mount except the private tmpfs folders read-only; returns the mount points
    that refused and are not kernel pseudo filesystems (those stay as they are: proc is replaced,
    sysfs/cgroup writes need privileges the program does not have)."""
    def under(path, root):
        return path == root or path.startswith(root.rstrip("/") + "/")
    refused = []
    for point, options, fstype in _mounts():
        if "ro" in options or any(under(point, d) for d in private):
            continue
        flags = MS_BIND | MS_REMOUNT | MS_RDONLY
        for option in options:
            flags |= _LOCKED_FLAGS.get(option, 0)
        try:
            _mount(None, point, None, flags)
        except OSError:
            if fstype not in _PSEUDO_FS and point not in refused:
                refused.append(point)
    return refused


def _set_limits(cfg):
    cpu = int(cfg["cpu_seconds"])
    limits = [
        (resource.RLIMIT_CPU, (cpu, cpu + 1)),
        (resource.RLIMIT_AS, (cfg["memory_bytes"],) * 2),
        (resource.RLIMIT_FSIZE, (cfg["file_bytes"],) * 2),
        (resource.RLIMIT_NOFILE, (256, 256)),
        (resource.RLIMIT_CORE, (0, 0)),
    ]
    if cfg.get("nproc"):
        limits.append((resource.RLIMIT_NPROC, (cfg["nproc"],) * 2))
    for which, value in limits:
        resource.setrlimit(which, value)


def _child(cfg, workdir, fds, marker_fd, in_pid_ns, in_mount_ns, supervisor_pid):
    try:
        os.setsid()
        if in_pid_ns and in_mount_ns:
            try:  # a /proc that shows only this namespace's processes
                _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
            except OSError:
                pass
        os.chdir(workdir)
        _set_limits(cfg)
        if cfg.get("uid") is not None:
            os.setgroups([])
            os.setgid(cfg["gid"])
            os.setuid(cfg["uid"])
        # After the uid change: credential changes clear the parent-death signal.
        _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(no_new_privs)")
        _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(pdeathsig)")
        if not in_pid_ns and os.getppid() != supervisor_pid:
            os._exit(125)  # the supervisor died before the death signal was armed
        for target, fd in enumerate((*fds, marker_fd)):
            os.dup2(fd, target)
        os.closerange(4, 65536)
        python = cfg["python"]
        os.execve(python, [python, "-I", "-B", "-c", RUNNER], cfg["env"])
    except BaseException as e:  # noqa: BLE001 - report anything, never return into the supervisor
        try:
            os.write(fds[2], f"sandbox setup failed: {e!r}\n".encode())
        finally:
            os._exit(127)


def _reap_descendants(child_pid):
    """Kill whatever the program left behind (it was reparented to us, the subreaper)."""
    for _ in range(1000):
        try:
            os.killpg(child_pid, signal.SIGKILL)
        except OSError:
            pass
        pids = []
        for tid in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{tid}/children") as f:
                    pids += [int(p) for p in f.read().split()]
            except OSError:
                pass
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        try:
            while os.waitpid(-1, os.WNOHANG)[0] > 0:
                pass
        except ChildProcessError:
            return
        time.sleep(0.005)


def _wait_for_exit(pid, timeout):
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


def main():
    cfg = json.loads(sys.argv[1])
    marker, _, source = sys.stdin.buffer.read().partition(b"\n")  # first line: the marker (may be empty)
    report = {"namespaces": [], "private_tmp": False, "dropped_privileges": cfg.get("uid") is not None}
    # Output files are opened before /tmp is replaced by a private tmpfs (they live on the host).
    devnull = os.open(os.devnull, os.O_RDONLY)
    out_fd = os.open(cfg["stdout_path"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    err_fd = os.open(cfg["stderr_path"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    entered = _enter_namespaces(cfg, report) if cfg["isolate"] else set()
    report["namespaces"] = sorted(entered)
    workdir = "/tmp/sandbox" if report["private_tmp"] else cfg["workdir"]
    os.makedirs(workdir, exist_ok=True)
    cfg["env"]["HOME"] = workdir  # the program's uid may have no account, hence no home of its own
    with open(os.path.join(workdir, "program.py"), "wb") as f:
        f.write(source)
    if cfg.get("uid") is not None:
        os.chown(workdir, cfg["uid"], cfg["gid"])
        os.chmod(workdir, 0o700)
    _check(_libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), "prctl(subreaper)")
    supervisor_pid = os.getpid()
    start = time.monotonic()
    marker_read, marker_write = os.pipe()
    os.write(marker_write, marker)
    os.close(marker_write)
    pid = os.fork()
    if pid == 0:
        _child(cfg, workdir, (devnull, out_fd, err_fd), marker_read, "pid" in entered, report["private_tmp"], supervisor_pid)
    for fd in (devnull, out_fd, err_fd, marker_read):
        os.close(fd)
    timed_out = not _wait_for_exit(pid, cfg["timeout_seconds"])
    if timed_out:
        os.kill(pid, signal.SIGKILL)  # as PID 1 of its namespace, this takes every descendant along
    _, status = os.waitpid(pid, 0)
    report["duration_seconds"] = time.monotonic() - start
    if "pid" not in entered:
        _reap_descendants(pid)
    report["timed_out"] = timed_out
    report["returncode"] = os.waitstatus_to_exitcode(status)
    sys.stdout.write(json.dumps(report) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
