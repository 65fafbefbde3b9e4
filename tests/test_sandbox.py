"""The sandbox is the security boundary: hostile programs are scored as failures and the evaluator
(this pytest process) and the machine survive all of them."""
import glob
import os
import tempfile

import pytest

from megaphi.evaluation.problems import Problem
from megaphi.evaluation.sandbox import Sandbox, SandboxLimits

PROMPT = 'def add(a, b):\n    """Return a + b."""\n'
TEST = "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"
ADD = Problem(task_id="t/add", prompt=PROMPT, test=TEST, entry_point="add")

# (name, completion, expected status); each completion continues PROMPT.
CASES = [
    ("correct", "    return a + b\n", "passed"),
    ("wrong", "    return a - b\n", "failed"),
    ("syntax_error", "    return a +* b\n", "failed"),
    ("timeout", "    while True:\n        pass\n", "timed out"),
    ("sleep_timeout", "    import time\n    time.sleep(60)\n", "timed out"),
    ("infinite_output", "    while True:\n        print('x' * 4096)\n", "failed"),
    ("fork_bomb", "    import os\n    while True:\n        os.fork()\n", "failed"),
    # Steps of 1 GiB hit the 1 GiB address-space limit at once (small steps would spend the time
    # limit zero-filling pages on a loaded machine and time out instead).
    ("memory_hog", "    blocks = []\n    while True:\n        blocks.append(bytearray(1 << 30))\n", "failed"),
    ("memory_one_shot", "    return len([0] * (1 << 32))\n", "failed"),
    ("exit_0_at_import", "    return a + b\nimport sys\nsys.exit(0)\n", "failed"),
    ("os_exit_0_in_call", "    import os\n    os._exit(0)\n", "failed"),
    ("kill_parent", "    import os, signal\n    os.kill(os.getppid(), signal.SIGKILL)\n    return a - b\n", "failed"),
    ("kill_own_group", "    import os, signal\n    os.killpg(0, signal.SIGKILL)\n    return a - b\n", "failed"),
    ("reads_stdin", "    import sys\n    assert sys.stdin.read() == ''\n    return a + b\n", "passed"),
    ("no_secrets", "    import os\n    assert 'MEGAPHI_TEST_SECRET' not in os.environ\n    return a + b\n", "passed"),
    ("cwd_is_writable", "    open('scratch.txt', 'w').write('ok')\n    return a + b\n", "passed"),
]


@pytest.fixture(scope="module")
def sandbox():
    return Sandbox(SandboxLimits(timeout_seconds=3.0, memory_bytes=1 << 30, file_bytes=1 << 20,
                                 output_bytes=8 << 10), workers=4)


def _our_run_dirs():
    return set(glob.glob(os.path.join(tempfile.gettempdir(), "megaphi-sandbox-*")))


def test_hostile_and_ordinary_programs_are_scored_exactly(sandbox, monkeypatch):
    monkeypatch.setenv("MEGAPHI_TEST_SECRET", "do-not-leak")
    before = _our_run_dirs()
    results = sandbox.run_many([ADD.program(completion) for _, completion, _ in CASES])
    got = {name: (r.status, r.detail) for (name, _, _), r in zip(CASES, results)}
    want = {name: expected for name, _, expected in CASES}
    assert {name: status for name, (status, _) in got.items()} == want, got
    assert "before the tests completed" in got["exit_0_at_import"][1]
    assert "before the tests completed" in got["os_exit_0_in_call"][1]
    # Infinite output is capped in memory too.
    infinite = results[[c[0] for c in CASES].index("infinite_output")]
    assert len(infinite.stdout) < 9 << 10
    # Every per-run temporary directory is gone.
    assert _our_run_dirs() - before == set()
    # The evaluator is alive (we are running) and the sandbox still works afterwards.
    assert sandbox.run_with_marker(ADD.program("    return a + b\n")).passed


def test_success_marker_is_required(sandbox):
    assert not sandbox.run("print('hello')\n", success_marker="never-printed").passed
    assert sandbox.run("print('token-123')\n", success_marker="token-123").passed
    assert sandbox.run("import sys; sys.exit(0)\n").passed  # no marker asked for: exit 0 is enough


def test_kill_every_visible_process(sandbox):
    caps = sandbox.capabilities
    if not (caps["dropped_privileges"] or caps["pid_namespace"]):
        pytest.skip("neither a PID namespace nor a privilege drop is available: kill(-1) would hit the tests")
    result = sandbox.run_with_marker("import os, signal\nos.kill(-1, signal.SIGKILL)\nraise SystemExit(1)\n")
    assert result.status == "failed"
    assert sandbox.run_with_marker("print('still here')\n").passed


def test_writes_outside_the_working_directory_do_not_land(sandbox, tmp_path):
    caps = sandbox.capabilities
    target = tmp_path / "victim.txt"
    target.write_text("original")
    tmp_target = os.path.join(tempfile.gettempdir(), f"megaphi-sandbox-escape-{os.getpid()}")
    if not (caps["dropped_privileges"] or (caps["private_tmp"] and str(tmp_path).startswith("/tmp/"))):
        pytest.skip("no privilege drop and no private /tmp here: the program could write as this user")
    program = (f"import os\n"
               f"for path in ({str(target)!r}, {tmp_target!r}):\n"
               f"    try:\n"
               f"        with open(path, 'w') as f:\n"
               f"            f.write('overwritten')\n"
               f"    except OSError:\n"
               f"        pass\n")
    try:
        assert sandbox.run_with_marker(program).passed
        assert target.read_text() == "original"
        if caps["private_tmp"]:
            assert not os.path.exists(tmp_target)
    finally:
        if os.path.exists(tmp_target):  # the shared /tmp is writable for everyone without namespaces
            os.remove(tmp_target)


def test_network_is_unreachable_where_namespaces_allow(sandbox):
    if not sandbox.capabilities["network_isolated"]:
        pytest.skip("no network namespace on this platform: " + "; ".join(sandbox.capabilities["notes"]))
    program = ("import socket\n"
               "for host in ('1.1.1.1', '127.0.0.1'):\n"
               "    try:\n"
               "        socket.create_connection((host, 80), timeout=1).close()\n"
               "        raise SystemExit('connected to ' + host)\n"
               "    except OSError:\n"
               "        pass\n")
    assert sandbox.run_with_marker(program).passed
