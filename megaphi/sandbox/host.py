"""The host side of the sandbox: the Sandbox class an evaluator talks to.

A Sandbox keeps `workers` long-lived worker processes (megaphi.sandbox.worker), each set up once
(namespaces, read-only host, hidden folders, memory cgroup) and forking every program into a fresh
process tree of its own; see that module for the layers. This module owns the host side: choosing
the interpreter and the uids programs run as (uid_pool.py), what programs see (folders.py), the
outer wall-clock guard, judging (results.py), and a thread pool that feeds the workers.

Success means: exit status 0, not timed out, AND the marker line (a random per-run token that the
program's runner prints after the program's code returned; it is not in the program's source)
present in stdout, so a program that exits 0 before its tests ran still fails.
"""

import concurrent.futures
import os
import pwd
import sys
import tempfile
import threading
import weakref
from typing import NamedTuple, Optional, Sequence

from . import folders
from .protocol import Hello, Job, Report, WorkerSettings
from .results import ExecutionResult, SandboxLimits, judge
from .uid_pool import FALLBACK_ACCOUNT, SharedAccount, UidPool
from .worker_process import PACKAGE_ROOT, WorkerDied, WorkerProcess, close_workers, minimal_env

# A worker that has not answered this long after a program's timeout is killed (and replaced).
_WORKER_GRACE_SECONDS = 30.0
# The probe imports modules the worker does not load itself and lists every folder of the
# interpreter's installation and packages, so a uid that cannot read them fails here (with the
# folder named) rather than in the first program.
_PROBE_PROGRAM = (
    "import fractions, statistics, unicodedata, zlib, os, sys\n"
    "assert os.listdir(os.path.dirname(os.__file__))\n"
    "for folder in {folders!r}:\n"
    "    try:\n"
    "        os.listdir(folder)\n"
    "    except OSError as e:\n"
    "        sys.exit(f'sandbox-probe: cannot read {{folder}}: {{e.strerror}}')\n"
    "print('sandbox-probe-ok')\n"
)


class ProbeOutcome(NamedTuple):
    """How the probe program went on one interpreter and uid choice."""

    passed: bool
    hello: Optional[Hello] = None
    report: Optional[Report] = None
    failure: str = ""


class Sandbox:
    """Executes programs in isolation; `capabilities` says which layers hold on this machine.
    Holds `workers` worker processes until close() (or garbage collection / interpreter exit)."""

    def __init__(
        self,
        limits: Optional[SandboxLimits] = None,
        workers: Optional[int] = None,
        python: Optional[str] = None,
        isolate: bool = True,
        hide_paths: Sequence[str] = (),
        allow_root: bool = False,
        cgroup_parent: Optional[str] = None,
    ):
        self.limits = limits or SandboxLimits()
        # A root evaluator never runs programs as root unless this is set (see docs/evaluation.md).
        self.allow_root = allow_root
        self.workers = workers or max(1, min(8, os.cpu_count() or 1))
        self.isolate = isolate
        # A cgroup v2 folder whose children may get the memory controller (tried before our own
        # cgroup and its parent); see megaphi.sandbox.cgroups.open_cgroup.
        self.cgroup_parent = cgroup_parent
        self._requested_python = python
        self._setup_lock = threading.Lock()
        self._capabilities = None
        self._python = None
        self._uid_pool = None  # when root: the uids the programs run as (UidPool or SharedAccount)
        self._nproc = None
        self._all_workers = []  # every live worker process
        self._idle = []  # those not running a program now
        self._pool_cond = threading.Condition()
        self._finalizer = weakref.finalize(self, close_workers, self._all_workers)
        # Folders the program should not read (covered by an empty tmpfs where mount namespaces
        # work): the evaluator's working directory and home, this checkout, and `hide_paths`
        # (e.g. the problems file's folder). Folders holding the interpreter stay visible.
        self._hide_candidates = [os.getcwd(), os.path.expanduser("~"), PACKAGE_ROOT]
        self._hide_requested = list(hide_paths)
        self._hidden = None

    def close(self):
        """Stop the worker processes (a later run starts new ones)."""
        with self._pool_cond:
            workers = list(self._all_workers)
            self._all_workers.clear()
            self._idle.clear()
        close_workers(workers)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _hidden_paths(self):
        if self._hidden is None:
            self._hidden = folders.hidden_paths(self._python, self._hide_candidates, self._hide_requested)
        return self._hidden

    def _exposed_folders(self):
        return folders.exposed_folders(self._python, self._hidden_paths())

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
        return WorkerSettings(
            isolate=bool(self.isolate),
            hide=self._hidden_paths(),
            memory_bytes=int(self.limits.memory_bytes),
            cgroup=bool(self.isolate),
            cgroup_parent=self.cgroup_parent,
            expose=exposed,
            uncover=folders.closed_ancestors(exposed) if other_uid else {},
        )

    def _start_worker(self):
        layout = folders.interpreter_layout(self._python)
        return WorkerProcess(self._python, self._worker_settings(), layout["path"] if layout else None)

    def _probe(self, python, uid_pool):
        """Start a worker with `python` and run a probe program as `uid_pool`'s uid; the worker is
        kept on success."""
        self._python, self._uid_pool, self._hidden = python, uid_pool, None
        self._nproc = self._nproc_limit()
        try:
            worker = self._start_worker()
        except (OSError, WorkerDied) as e:
            return ProbeOutcome(False, failure=str(e))
        with self._pool_cond:
            self._all_workers.append(worker)
        probe = _PROBE_PROGRAM.format(folders=self._exposed_folders())
        result, report = self._execute_on(worker, probe, "sandbox-probe-ok")
        if not result.passed:
            self._retire(worker)
        else:
            self._checkin(worker)
        why = [line for line in (result.stderr or "").splitlines() if line.startswith("sandbox-probe:")]
        failure = why[-1][len("sandbox-probe: ") :] if why else result.detail
        return ProbeOutcome(result.passed, worker.hello, report, failure)

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
                    pools.append(UidPool(self.workers))
                except (OSError, RuntimeError) as e:
                    notes.append(f"no private uids for programs: {e}")
                try:
                    pools.append(SharedAccount(FALLBACK_ACCOUNT))
                except (KeyError, RuntimeError) as e:
                    notes.append(f"no fallback account {FALLBACK_ACCOUNT!r}: {e}")
                if self.allow_root:
                    pools.append(None)
            failures = []
            for pool in pools:
                for python in [python] if python and os.path.exists(python) else []:
                    probe = self._probe(python, pool)
                    if probe.passed:
                        for unused in pools:
                            if unused is not None and unused is not pool:
                                unused.close()
                        self._capabilities = self._describe(python, pool, probe, notes)
                        return
                    who = (
                        "current user"
                        if pool is None
                        else FALLBACK_ACCOUNT
                        if isinstance(pool, SharedAccount)
                        else "a private uid"
                    )
                    notes.append(f"{python} as {who} failed the probe")
                    failures.append(f"as {who}: {probe.failure}")
            for pool in pools:
                if pool is not None:
                    pool.close()
            if os.geteuid() == 0 and not self.allow_root:
                notes.append("programs are never run as root unless Sandbox(allow_root=True)")
            if not python or not os.path.exists(python):
                raise RuntimeError(f"sandbox: interpreter {python!r} does not exist")
            raise RuntimeError(
                f"sandbox: programs cannot run on {python} ({'; '.join(failures) or 'no probe ran'}): "
                "make its installation readable by other users, or choose another interpreter "
                "(--sandbox-python / Sandbox(python=...))"
                + "".join(f"; {n}" for n in notes if not n.endswith("failed the probe"))
            )

    def _describe(self, python, pool, probe, notes):
        """The capabilities dict: which layers hold, from the probe's Hello and Report."""
        hello = probe.hello or Hello(
            pid=0,
            namespaces=[],
            read_only_fs=False,
            hidden=[],
            tree_memory="per process only",
            syscall_filter="unavailable: the worker did not say",
        )
        report = probe.report or Report(namespaces=hello.namespaces)
        runs_as = pwd.getpwuid(os.geteuid()).pw_name
        if isinstance(pool, SharedAccount):
            runs_as = pool.name
        elif pool is not None:
            runs_as = f"a private uid per running program (one of {pool.uids})"
        namespaces = report.namespaces
        # A namespace error of the run (unshare per program) says more than the worker's own.
        namespace_error = report.namespace_error or hello.namespace_error
        return {
            "python": python,
            "python_version": (folders.interpreter_layout(python) or {}).get("version"),
            "exposed_paths": hello.exposed
            + (folders.under_private_dirs(self._exposed_folders()) if report.private_tmp else []),
            "runs_as": runs_as,
            "dropped_privileges": pool is not None,
            "program_uids": list(pool.uids) if pool else [],
            "network_isolated": "net" in namespaces,
            "pid_namespace": "pid" in namespaces,
            "private_tmp": report.private_tmp,
            "read_only_fs": hello.read_only_fs,
            "hidden_paths": hello.hidden,
            "process_limit": self._nproc,
            "syscall_filter": hello.syscall_filter,
            "tree_memory": hello.tree_memory if "pid" in namespaces else "per process only",
            "notes": notes
            + [n for n in (namespace_error, hello.mount_error, hello.cgroup_note) if n is not None]
            + ([f"still writable: {hello.writable_mounts}"] if hello.writable_mounts else []),
        }

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
            worker = self._start_worker()
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
        return Job(
            source=source,
            runner_marker=runner_prints_marker,
            uid=uid,
            gid=gid,
            timeout_seconds=limits.timeout_seconds,
            cpu_seconds=int(limits.cpu_seconds or int(limits.timeout_seconds) + 2),
            memory_bytes=limits.memory_bytes,
            file_bytes=limits.file_bytes,
            tmpfs_bytes=limits.tmpfs_bytes,
            tmpfs_inodes=limits.tmpfs_inodes,
            nproc=self._nproc,
            output_bytes=limits.output_bytes,
            env=minimal_env("/tmp/sandbox"),
            host_tmpdir=tempfile.gettempdir(),
        )

    def _execute_on(self, worker, source, marker, runner_prints_marker=False):
        """Run one program on `worker` as the next free uid; (ExecutionResult, Report)."""
        pool = self._uid_pool
        uid = pool.acquire() if pool is not None else None
        report = Report()
        try:
            try:
                report = worker.run(
                    self._job(source, runner_prints_marker, uid, pool.gid_for(uid) if pool is not None else None),
                    self.limits.timeout_seconds + _WORKER_GRACE_SECONDS,
                )
            except WorkerDied as e:
                report = Report(error=str(e))
                self._retire(worker)  # its run, if any, dies with it
        finally:
            if pool is not None:
                # With a PID namespace every process of the run is gone once the worker reported
                # (the namespace ended with its init); otherwise look for stragglers of the uid.
                pool.release(uid, known_clean="pid" in report.namespaces)
        if runner_prints_marker:
            marker = report.marker
        return judge(report, marker, self.limits.memory_bytes), report

    def _execute(self, source, marker, runner_prints_marker=False):
        try:
            worker = self._checkout()
        except WorkerDied as e:
            return ExecutionResult(
                False, "failed", f"sandbox worker could not start: {e}", None, False, "", "", 0.0
            ), Report()
        try:
            return self._execute_on(worker, source, marker, runner_prints_marker)
        finally:
            if worker.alive():
                self._checkin(worker)
            else:
                self._retire(worker)

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
