"""Hostile programs against the sandbox's second line: memory no process maps, kernel keyrings that
outlive a program, an earlier program's source in inherited memory, user namespaces, tmpfs inodes.
Each program here got through before the matching protection existed."""

import hashlib
import platform
import secrets

import pytest

from megaphi.sandbox import Sandbox, SandboxLimits

# Syscall numbers the hostile programs call through ctypes (no Python wrapper exists for them).
SYSCALLS = {
    "x86_64": {"add_key": 248, "keyctl": 250, "clone": 56, "clone3": 435},
    "aarch64": {"add_key": 217, "keyctl": 219, "clone": 220, "clone3": 435},
}.get(platform.machine())


# 24 memory files of 15 MiB each (under RLIMIT_FSIZE each), written but never mapped: no process's
# mapped memory shows them, and RLIMIT_AS does not count them.
MEMFD_HOG = """
import os
files = []
try:
    for i in range(24):
        fd = os.memfd_create(f"m{i}")
        for _ in range(15):
            os.write(fd, b"x" * (1 << 20))
        files.append(fd)
except OSError as e:
    raise SystemExit(f"refused after {len(files)} files: {e}")
print("held", len(files) * 15, "MiB")
"""


def test_memory_files_do_not_bypass_the_tree_memory_bound():
    with Sandbox(SandboxLimits(timeout_seconds=30.0, memory_bytes=256 << 20), workers=1) as box:
        result = box.run_with_marker(MEMFD_HOG)
        caps = box.capabilities
    assert not result.passed and "held" not in result.stdout, (result, caps["tree_memory"])
    if caps.get("syscall_filter", "").startswith("seccomp"):
        assert "refused after 0 files" in result.stderr, result


ADD_KEY = """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
KEY_SPEC_USER_KEYRING = -4
key = libc.syscall({add_key}, b"user", b"megaphi-test-{token}", b"secret-{token}", 6 + {n},
                   ctypes.c_int(KEY_SPEC_USER_KEYRING))
print("add_key", key, os.strerror(ctypes.get_errno()) if key < 0 else "ok")
"""

FIND_KEY = """
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
KEYCTL_SEARCH, KEY_SPEC_USER_KEYRING = 10, -4
found = libc.syscall({keyctl}, KEYCTL_SEARCH, ctypes.c_int(KEY_SPEC_USER_KEYRING), b"user",
                     b"megaphi-test-{token}", 0)
if found >= 0:
    raise SystemExit(f"read an earlier program's key {{found}}")
"""


def test_a_key_added_by_one_program_is_not_seen_by_the_next():
    if SYSCALLS is None:
        pytest.skip(f"no syscall numbers for {platform.machine()} in this test")
    token = secrets.token_hex(8)
    fill = {"token": token, "n": len(token), **SYSCALLS}
    with Sandbox(SandboxLimits(timeout_seconds=10.0), workers=1) as box:  # one worker: the same uid
        added = box.run_with_marker(ADD_KEY.format(**fill))
        assert added.passed, added
        found = box.run_with_marker(FIND_KEY.format(**fill))
        filtered = box.capabilities.get("syscall_filter", "").startswith("seccomp")
    assert found.passed, found
    if filtered:
        assert "add_key -1 Operation not permitted" in added.stdout, added.stdout


# The second program looks for the first one's secret in its own memory (what it inherited from
# the process it was forked from), knowing only a prefix and the secret's digest.
SCAN_OWN_MEMORY = """
import hashlib, re
prefix, digest = {prefix!r}, {digest!r}
pattern = re.compile(re.escape(prefix.encode()) + rb"[0-9a-f]{{32}}")
hits = 0
with open("/proc/self/maps") as maps, open("/proc/self/mem", "rb", buffering=0) as mem:
    for line in maps:
        fields = line.split()
        if "r" not in fields[1] or (len(fields) > 5 and fields[5].startswith("[v")):
            continue
        start, end = (int(x, 16) for x in fields[0].split("-"))
        try:
            mem.seek(start)
            chunk = mem.read(end - start)
        except (OSError, OverflowError, ValueError):
            continue
        for m in pattern.finditer(chunk):
            if hashlib.sha256(m.group()).hexdigest() == digest:
                hits += 1
print("hits", hits)
if hits:
    raise SystemExit("found an earlier program's source in memory")
"""


def test_a_program_cannot_read_an_earlier_programs_source_from_memory():
    prefix = "megaphi-secret-"
    secret = prefix + secrets.token_hex(16)
    earlier = f"SECRET = {secret!r}\nassert len(SECRET) == {len(secret)}\n" * 20
    with Sandbox(SandboxLimits(timeout_seconds=30.0), workers=1) as box:
        assert box.run_with_marker(earlier).passed
        assert box.run_with_marker(earlier).passed
        later = box.run_with_marker(
            SCAN_OWN_MEMORY.format(prefix=prefix, digest=hashlib.sha256(secret.encode()).hexdigest())
        )
    assert later.passed, (later.detail, later.stdout, later.stderr[-1000:])
    assert "hits 0" in later.stdout


USER_NAMESPACES = """
import ctypes, os, signal
libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWUSER = 0x10000000
made = []
if libc.unshare(CLONE_NEWUSER) == 0:
    made.append("unshare")
pid = libc.syscall({clone}, CLONE_NEWUSER | signal.SIGCHLD, 0, 0, 0, 0)
if pid == 0:
    os._exit(0)
if pid > 0:
    os.waitpid(pid, 0)
    made.append("clone")
args = (ctypes.c_uint64 * 11)(CLONE_NEWUSER, 0, 0, 0, signal.SIGCHLD, 0, 0, 0, 0, 0, 0)
pid = libc.syscall({clone3}, args, ctypes.c_size_t(88))
if pid == 0:
    os._exit(0)
if pid > 0:
    os.waitpid(pid, 0)
    made.append("clone3")
print("made", made)
if made:
    raise SystemExit(f"made user namespaces with {{made}}")
# Ordinary process creation still works.
import subprocess, sys, threading
assert subprocess.run([sys.executable, "-c", "print(6 * 7)"], capture_output=True, text=True).stdout == "42\\n"
box = []
thread = threading.Thread(target=box.append, args=(1,))
thread.start()
thread.join()
assert box == [1]
if os.fork() == 0:
    os._exit(0)
os.wait()
"""


def test_programs_cannot_make_user_namespaces():
    if SYSCALLS is None:
        pytest.skip(f"no syscall numbers for {platform.machine()} in this test")
    with Sandbox(SandboxLimits(timeout_seconds=20.0), workers=1) as box:
        result = box.run_with_marker(USER_NAMESPACES.format(**SYSCALLS))
    assert result.passed, (result.detail, result.stdout, result.stderr[-1000:])


MANY_FILES = """
import os
made = 0
for directory in ("/tmp", "/dev/shm", "."):
    try:
        for i in range(3000):
            open(os.path.join(directory, f"f{i}"), "w").close()
            made += 1
    except OSError as e:
        print(directory, "stopped:", e.strerror)
print("made", made)
"""


def test_private_tmpfs_folders_have_an_inode_cap():
    limits = SandboxLimits(timeout_seconds=60.0, tmpfs_inodes=500)
    with Sandbox(limits, workers=1) as box:
        if not box.capabilities["private_tmp"]:
            pytest.skip("no private tmpfs here: " + "; ".join(box.capabilities["notes"]))
        result = box.run_with_marker(MANY_FILES)
    assert result.passed, result
    made = int(result.stdout.split("made")[1].split()[0])
    # /tmp (also the working directory) and /dev/shm each stop at the cap.
    assert made <= 2 * 500, result.stdout
    assert "No space left on device" in result.stdout


def test_the_filter_is_claimed_exactly_where_programs_run_under_it():
    with Sandbox(SandboxLimits(timeout_seconds=10.0), workers=1) as box:
        claimed = box.capabilities["syscall_filter"]
        result = box.run_with_marker(
            "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('Seccomp:')])\n"
        )
    assert result.passed, result
    mode = result.stdout.split("['")[1].split("'")[0]
    assert (mode == "2") == claimed.startswith("seccomp"), (claimed, mode)
    assert claimed.startswith(("seccomp", "unavailable: "))


def test_the_filter_is_not_built_for_a_machine_without_a_table():
    from megaphi.sandbox import syscall_filter

    assert syscall_filter.build("riscv64") is None
    x86, arm = syscall_filter.build("x86_64"), syscall_filter.build("aarch64")
    assert x86 and arm and x86 != arm
    # Every jump lands inside the program, and it ends with return instructions.
    for program in (x86, arm):
        for i, (code, jt, jf, k) in enumerate(program):
            assert code == 0x06 or i + 1 + max(jt, jf) < len(program)
        assert program[-1][0] == 0x06 and program[-2][0] == 0x06 and program[-3][0] == 0x06
