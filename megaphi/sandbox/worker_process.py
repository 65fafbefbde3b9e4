"""The host's handle on one worker process (megaphi.sandbox.worker): starts it as a module, sends
it protocol messages, and reads its answers with a deadline."""

import os
import select
import signal
import subprocess
import tempfile
import time

from . import protocol
from .protocol import Hello, Job, Report, WorkerSettings

WORKER_MODULE = "megaphi.sandbox.worker"
# The folder that holds the megaphi package: the worker imports this very copy of it.
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def minimal_env(home):
    # Nothing from the evaluator's environment is inherited: no tokens, keys or proxies.
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "HOME": home,
        "TMPDIR": "/tmp",
        "PYTHONHASHSEED": "0",
        "PYTHONDONTWRITEBYTECODE": "1",
    }


def worker_command(python):
    # -s, not -I: the worker's environment is ours alone (PYTHONHASHSEED=0 takes effect), and the
    # worker drops the import paths only it needs from sys.path itself.
    return [python, "-s", "-B", "-m", WORKER_MODULE]


def worker_env(python_path):
    """The worker's environment; `python_path` (the interpreter's own sys.path) decides whether
    PYTHONPATH must name PACKAGE_ROOT for `-m` to find the package (None: unknown, it does)."""
    env = minimal_env("/")
    if python_path is None or PACKAGE_ROOT not in python_path:
        env["PYTHONPATH"] = PACKAGE_ROOT
    return env


class WorkerDied(RuntimeError):
    """The worker ended, did not answer in time, or sent something that is not a message."""


class WorkerProcess:
    """One long-lived worker process and its line protocol."""

    def __init__(self, python, settings: WorkerSettings, python_path=None):
        self._stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            worker_command(python),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=worker_env(python_path),
            cwd="/",
            start_new_session=True,
            close_fds=True,
        )
        self._buf = b""
        self.hello = None
        try:
            self._send(settings)
            self.hello = self._receive(Hello, 60.0)
        except WorkerDied:
            self.close()
            raise

    def _send(self, message):
        try:
            self.proc.stdin.write(protocol.encode(message))
            self.proc.stdin.flush()
        except OSError as e:
            raise WorkerDied(f"sandbox worker is gone ({e}){self._stderr_tail()}") from None

    def _receive(self, expected, timeout):
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise WorkerDied("sandbox worker did not answer in time")
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                raise WorkerDied(f"sandbox worker ended{self._stderr_tail()}")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        try:
            return protocol.decode(line, expected)
        except protocol.ProtocolError as e:
            raise WorkerDied(f"sandbox worker sent a garbled report ({e})") from None

    def _stderr_tail(self):
        try:
            self._stderr.seek(0)
            text = self._stderr.read()[-2000:].decode("utf-8", "replace").strip()
        except (OSError, ValueError):
            return ""
        return f": {text}" if text else ""

    def run(self, job: Job, timeout) -> Report:
        self._send(job)
        return self._receive(Report, timeout)

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
        if self.hello is not None and self.hello.cgroup:
            try:
                os.rmdir(self.hello.cgroup)
            except OSError:
                pass


def close_workers(workers):
    for worker in list(workers):
        if isinstance(worker, WorkerProcess):  # (not a slot held by a worker still starting)
            worker.close(patience=1.0)
    workers.clear()
