"""Run untrusted Python programs (model completions + tests) in isolated processes.

Each program gets its own supervisor process (megaphi/evaluation/_supervisor.py), which sets up the
isolation and is the program's parent; see that file for the layers. This module owns the host side:
the minimal environment, a temporary directory per run (removed afterwards), the outer wall-clock
guard, output capture with a size cap, the success marker, and a thread pool to run many programs.

Success means: exit status 0, not timed out, AND the marker line (a random per-run token that the
supervisor's runner prints after the program's code returned; it is not in the program's source)
present in stdout, so a program that exits 0 before its tests ran still fails.
"""
import concurrent.futures
import dataclasses
import fcntl
import json
import logging
import os
import pwd
import secrets
import shutil
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
_SYSTEM_PYTHONS = ("/usr/bin/python3", "/usr/local/bin/python3", "/bin/python3")
# Where the supervisor mounts private tmpfs (same list as _supervisor._PRIVATE_DIRS).
_PRIVATE_DIRS = ("/tmp", "/var/tmp", "/dev/shm")
_log = logging.getLogger(__name__)


@dataclasses.dataclass
class SandboxLimits:
    timeout_seconds: float = 10.0       # wall clock
    cpu_seconds: Optional[int] = None   # default: ceil(timeout) + 1
    memory_bytes: int = 2 << 30         # RLIMIT_AS
    file_bytes: int = 16 << 20          # RLIMIT_FSIZE: any file the program writes, stdout/stderr too
    # RLIMIT_NPROC. Root evaluator: per program (each running program has its own uid). Non-root:
    # all concurrent programs share one uid, so the limit is max_processes x workers for them all.
    max_processes: int = 64
    output_bytes: int = 64 << 10        # how much of stdout/stderr is kept in the result
    tmpfs_bytes: int = 64 << 20         # size of the private /tmp where namespaces are available


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


def _read_capped(path, limit):
    try:
        with open(path, "rb") as f:
            head = f.read(limit)
            f.seek(0, os.SEEK_END)
            size = f.tell()
            tail = b""
            if size > limit:
                f.seek(max(size - 4096, 0))
                tail = f.read()
    except OSError:
        return "", b""
    text = head.decode("utf-8", "replace")
    if size > limit:
        text += f"\n... [{size - limit} more bytes not shown]"
    return text, (tail if size > limit else head)[-4096:]


def _describe_exit(returncode):
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


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

    def release(self, uid):
        """Never raises: the caller is in a `finally` that must not lose the program's result."""
        clean = _kill_processes_of(uid)
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

    def release(self, uid):
        pass

    def close(self):
        pass


def _same_or_nested(a, b):
    """True if folder `a` equals `b`, lies inside it, or holds it."""
    a, b = a.rstrip("/") or "/", b.rstrip("/") or "/"
    return a == b or a.startswith(b.rstrip("/") + "/") or b.startswith(a.rstrip("/") + "/")


class Sandbox:
    """Executes programs in isolation; `capabilities` says which layers hold on this machine."""

    def __init__(self, limits: Optional[SandboxLimits] = None, workers: Optional[int] = None,
                 python: Optional[str] = None, isolate: bool = True, hide_paths: Sequence[str] = (),
                 allow_root: bool = False):
        self.limits = limits or SandboxLimits()
        # A root evaluator never runs programs as root unless this is set (see docs/evaluation.md).
        self.allow_root = allow_root
        self.workers = workers or max(1, min(8, os.cpu_count() or 1))
        self.isolate = isolate
        self._requested_python = python
        self._setup_lock = threading.Lock()
        self._capabilities = None
        self._python = None
        self._uid_pool = None  # when root: the uids the programs run as (_UidPool or _SharedAccount)
        # Folders the program should not read (covered by an empty tmpfs where mount namespaces
        # work): the evaluator's working directory and home, this checkout, and `hide_paths`
        # (e.g. the problems file's folder). Folders holding the interpreter stay visible.
        package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        self._hide_candidates = [os.getcwd(), os.path.expanduser("~"), package_root, *hide_paths]
        self._hidden = None

    def _hidden_paths(self):
        if self._hidden is None:
            keep = self._interpreter_dirs(self._python)
            # The private tmpfs folders are private already; covering one (or a folder holding one,
            # such as "/") with a read-only tmpfs would leave the program no writable /tmp.
            private = {os.path.realpath(d) for d in _PRIVATE_DIRS} | set(_PRIVATE_DIRS)
            hidden = []
            for path in map(os.path.realpath, self._hide_candidates):
                if (os.path.isdir(path) and path != "/" and path not in hidden
                        and not any(_same_or_nested(path, k) for k in keep | private)):
                    hidden.append(path)
            self._hidden = hidden
        return self._hidden

    @staticmethod
    def _interpreter_dirs(python):
        """Where `python` finds itself and its standard library (these must stay visible)."""
        dirs = {os.path.dirname(os.path.realpath(python)), os.path.dirname(os.path.abspath(python))}
        try:
            out = subprocess.run([python, "-I", "-S", "-c", "import sys; print(sys.prefix); print(sys.base_prefix)"],
                                 capture_output=True, text=True, timeout=30, env=_minimal_env("/")).stdout
            dirs.update(os.path.realpath(line) for line in out.splitlines() if line.startswith("/"))
        except (OSError, subprocess.SubprocessError):
            return {"/"}  # unknown layout: hide nothing
        return dirs

    # -- setup -------------------------------------------------------------------------------------
    def _nproc_limit(self):
        pool = self._uid_pool
        if os.geteuid() == 0 and pool is None:
            return None  # programs run as root (allow_root), which ignores RLIMIT_NPROC
        if pool is not None and not pool.shared:
            return self.limits.max_processes  # a private uid per program: the limit is per program
        # RLIMIT_NPROC counts every process of the user, so leave room for the concurrent runs.
        uid = pool.uid if pool is not None else os.getuid()
        return self.limits.max_processes * self.workers + self._process_count(uid)

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

    def _probe(self, python, uid_pool):
        self._python, self._uid_pool, self._hidden = python, uid_pool, None
        result, report = self._execute("print('sandbox-probe-ok')\n", "sandbox-probe-ok")
        return result.passed, report

    def _setup(self):
        with self._setup_lock:
            if self._capabilities is not None:
                return
            candidates = [self._requested_python] if self._requested_python else [sys.executable, *_SYSTEM_PYTHONS]
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
            for pool in pools:
                for python in candidates:
                    if not python or not os.path.exists(python):
                        continue
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
                        self._capabilities = {
                            "python": python,
                            "runs_as": runs_as,
                            "dropped_privileges": pool is not None,
                            "program_uids": list(pool.uids) if pool else [],
                            "network_isolated": "net" in report.get("namespaces", []),
                            "pid_namespace": "pid" in report.get("namespaces", []),
                            "private_tmp": bool(report.get("private_tmp")),
                            "read_only_fs": bool(report.get("read_only_fs")),
                            "hidden_paths": report.get("hidden", []),
                            "process_limit": self._nproc_limit(),
                            "notes": notes + [report[k] for k in ("namespace_error", "mount_error") if k in report]
                                     + ([f"still writable: {report['writable_mounts']}"] if report.get("writable_mounts") else []),
                        }
                        return
                    who = ("current user" if pool is None else
                           _FALLBACK_ACCOUNT if isinstance(pool, _SharedAccount) else "a private uid")
                    notes.append(f"{python} as {who} failed the probe")
            for pool in pools:
                if pool is not None:
                    pool.close()
            if os.geteuid() == 0 and not self.allow_root:
                notes.append("programs are never run as root unless Sandbox(allow_root=True)")
            raise RuntimeError("sandbox: no Python interpreter could run a probe program: " + "; ".join(notes))

    @property
    def capabilities(self) -> dict:
        self._setup()
        return dict(self._capabilities)

    # -- running -----------------------------------------------------------------------------------
    def _execute(self, source, marker, runner_prints_marker=False):
        pool = self._uid_pool
        if pool is None:
            return self._execute_as(None, None, source, marker, runner_prints_marker)
        uid = pool.acquire()
        try:
            return self._execute_as(uid, pool.gid_for(uid), source, marker, runner_prints_marker)
        finally:
            pool.release(uid)  # only after every process of the run is gone

    def _execute_as(self, uid, gid, source, marker, runner_prints_marker):
        limits = self.limits
        rundir = tempfile.mkdtemp(prefix="megaphi-sandbox-")
        try:
            workdir = os.path.join(rundir, "work")
            os.mkdir(workdir)
            if uid is not None:  # the program must be able to enter its working directory
                os.chmod(rundir, 0o711)
                os.chown(workdir, uid, gid)
            cfg = {
                "python": self._python, "isolate": self.isolate, "workdir": workdir,
                "stdout_path": os.path.join(rundir, "stdout"), "stderr_path": os.path.join(rundir, "stderr"),
                "timeout_seconds": limits.timeout_seconds,
                "cpu_seconds": limits.cpu_seconds or int(limits.timeout_seconds) + 1,
                "memory_bytes": limits.memory_bytes, "file_bytes": limits.file_bytes,
                "tmpfs_bytes": limits.tmpfs_bytes, "nproc": self._nproc_limit(),
                "uid": uid, "gid": gid,
                "env": _minimal_env("/tmp/sandbox" if self.isolate else workdir),
                "hide": self._hidden_paths(),
            }
            stdin = ((marker if runner_prints_marker else "") + "\n" + source).encode("utf-8")
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-B", _SUPERVISOR, json.dumps(cfg)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                env=_minimal_env(rundir), cwd=rundir, start_new_session=True, close_fds=True)
            try:
                out, err = proc.communicate(stdin, timeout=limits.timeout_seconds + 30)
            except subprocess.TimeoutExpired:
                out, err = b"", b"supervisor did not finish"
            finally:
                try:  # the supervisor's session: anything still in it goes too
                    os.killpg(proc.pid, signal.SIGKILL)
                except OSError:
                    pass
                proc.wait()
            try:
                report = json.loads(out.decode().strip().splitlines()[-1])
            except (ValueError, IndexError):
                report = {"supervisor_error": f"supervisor {_describe_exit(proc.returncode)}: "
                                              f"{err.decode('utf-8', 'replace')[-2000:]}"}
            stdout, stdout_tail = _read_capped(cfg["stdout_path"], limits.output_bytes)
            stderr, _ = _read_capped(cfg["stderr_path"], limits.output_bytes)
        finally:
            shutil.rmtree(rundir, ignore_errors=True)
        return self._judge(report, stdout, stdout_tail, stderr, marker), report

    @staticmethod
    def _judge(report, stdout, stdout_tail, stderr, marker):
        duration = float(report.get("duration_seconds", 0.0))
        if "supervisor_error" in report:
            return ExecutionResult(False, "failed", report["supervisor_error"], None, False, stdout, stderr, duration)
        rc, timed_out = report["returncode"], report["timed_out"]
        if timed_out:
            return ExecutionResult(False, "timed out", "wall-clock timeout", rc, True, stdout, stderr, duration)
        if rc != 0:
            return ExecutionResult(False, "failed", _describe_exit(rc), rc, False, stdout, stderr, duration)
        if marker is not None and marker.encode() not in stdout_tail:
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
        marker = "megaphi-done-" + secrets.token_hex(16)
        return self._execute(source, marker, runner_prints_marker=True)[0]

    def run_many(self, sources: Sequence[str], with_marker: bool = True, progress=None):
        """Run programs on `workers` threads (each drives one supervisor process); results in order."""
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
