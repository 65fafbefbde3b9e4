"""The host <-> worker messages (megaphi.sandbox.protocol) and how the host starts a worker."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from megaphi.sandbox import protocol, worker_process
from megaphi.sandbox.protocol import Hello, InitStatus, Job, ProtocolError, Report, WorkerSettings

EXAMPLES = [
    WorkerSettings(
        isolate=True,
        hide=["/home/me"],
        memory_bytes=2 << 30,
        cgroup=True,
        cgroup_parent=None,
        expose=["/usr/lib/python3.11"],
        uncover={"/home/me": ["/home/me/venv"]},
    ),
    Hello(
        pid=1,
        namespaces=["mount", "net"],
        read_only_fs=True,
        hidden=["/work"],
        tree_memory="per process only",
        syscall_filter="unavailable: no table",
        exposed=["/home/me/venv"],
        cgroup="/sys/fs/cgroup/x",
        cgroup_note=None,
        namespace_error=None,
        mount_error="mount /: EPERM",
        expose_error=None,
        writable_mounts=["/data"],
    ),
    Job(
        source="print('é')\n",
        runner_marker=True,
        uid=60000,
        gid=60000,
        timeout_seconds=3.0,
        cpu_seconds=5,
        memory_bytes=1 << 30,
        file_bytes=1 << 20,
        tmpfs_bytes=1 << 20,
        tmpfs_inodes=64,
        nproc=None,
        output_bytes=4096,
        env={"PATH": "/usr/bin"},
        host_tmpdir="/tmp",
    ),
    Report(
        namespaces=["ipc", "pid"],
        private_tmp=True,
        marker="megaphi-done-x",
        returncode=-14,
        timed_out=True,
        timeout_kind="alarm",
        duration_seconds=3.1,
        stdout="out",
        stdout_tail="out",
        stderr="err",
    ),
    Report(error="sandbox setup failed: OSError()"),
    InitStatus(status=256, memory_exceeded=True),
    InitStatus(error="sandbox init failed: boom"),
]


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda m: type(m).__name__)
def test_every_message_survives_a_round_trip(message):
    line = protocol.encode(message)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert protocol.decode(line, type(message)) == message
    assert protocol.decode(line.decode(), type(message)) == message


def _job_fields():
    return json.loads(protocol.encode(EXAMPLES[2]))


@pytest.mark.parametrize(
    "line, expected, words",
    [
        (b"not json", Job, "not JSON"),
        (None, Job, "not JSON"),
        (b"", Job, "not JSON"),
        (b"[1, 2]", Job, "expected a JSON object"),
        (b'{"type": "launch"}', Job, "unknown message type 'launch'"),
        (b'{"source": "x"}', Job, "unknown message type None"),
        (protocol.encode(Report()), Job, "expected a 'job' message, got 'report'"),
        (json.dumps({**_job_fields(), "shell": True}), Job, "unknown fields ['shell']"),
        (json.dumps({k: v for k, v in _job_fields().items() if k != "source"}), Job, "lacks fields ['source']"),
        (json.dumps({**_job_fields(), "uid": "0"}), Job, "job.uid"),
        (json.dumps({**_job_fields(), "runner_marker": 1}), Job, "job.runner_marker"),
        (json.dumps({**_job_fields(), "cpu_seconds": True}), Job, "job.cpu_seconds"),
        (json.dumps({**_job_fields(), "env": {"PATH": 1}}), Job, "job.env"),
    ],
)
def test_a_malformed_message_is_a_one_line_error(line, expected, words):
    with pytest.raises(ProtocolError) as error:
        protocol.decode(line, expected)
    message = str(error.value)
    assert words in message and "\n" not in message and message.startswith("sandbox protocol: ")


def test_only_messages_can_be_encoded():
    with pytest.raises(ProtocolError, match="not a message"):
        protocol.encode({"type": "job"})


def test_the_worker_is_started_as_a_module():
    command = worker_process.worker_command(sys.executable)
    assert command[0] == sys.executable
    assert command[-2:] == ["-m", "megaphi.sandbox.worker"]
    assert not any(arg.endswith(".py") for arg in command)
    spec = importlib.util.find_spec(worker_process.WORKER_MODULE)
    assert os.path.samefile(spec.origin, os.path.join(worker_process.PACKAGE_ROOT, "megaphi", "sandbox", "worker.py"))
    # The worker imports the very package the host runs from, wherever the interpreter looks.
    assert worker_process.worker_env([])["PYTHONPATH"] == worker_process.PACKAGE_ROOT
    assert "PYTHONPATH" not in worker_process.worker_env([worker_process.PACKAGE_ROOT])


def test_a_started_worker_runs_the_module(monkeypatch):
    started = []

    class Refused(OSError):
        pass

    def fake_popen(args, **kwargs):
        started.append((args, kwargs))
        raise Refused("not started in this test")

    monkeypatch.setattr(worker_process.subprocess, "Popen", fake_popen)
    settings = EXAMPLES[0]
    with pytest.raises(Refused):
        worker_process.WorkerProcess(sys.executable, settings)
    ((args, kwargs),) = started
    assert args[-2:] == ["-m", "megaphi.sandbox.worker"] and kwargs["cwd"] == "/"
    assert kwargs["env"]["PYTHONPATH"] == worker_process.PACKAGE_ROOT


@pytest.mark.parametrize(
    "settings, words",
    [(b"", "no settings on stdin"), (protocol.encode(Report()), "expected a 'settings' message, got 'report'")],
)
def test_the_worker_module_refuses_bad_settings_in_one_line(settings, words):
    proc = subprocess.run(
        worker_process.worker_command(sys.executable),
        input=settings,
        capture_output=True,
        env=worker_process.worker_env(None),
        cwd="/",
        timeout=60,
    )
    stderr = proc.stderr.decode().strip()
    assert proc.returncode == 1 and words in stderr and "\n" not in stderr and not proc.stdout, stderr
