"""A seccomp filter for sandboxed programs: a few system calls that no HumanEval-style program needs
and that would reach past the sandbox's other layers are refused. Standard library only (the
sandbox worker imports it before any job); a classic BPF program built here, installed with prctl.

Refused (errno EPERM unless noted):
    memfd_create, memfd_secret       memory files hold memory no process maps, which the memory
                                     watchdog cannot see (the private tmpfs folders are size-capped)
    shmget, msgget                   System V shared memory and message queues: the same, in the
                                     program's IPC namespace
    add_key, request_key, keyctl     kernel keyrings: a uid's user keyring outlives its processes
                                     and namespaces, so a later program of the same uid would read it
    unshare / clone with CLONE_NEWUSER   user namespaces (a larger kernel surface, no use here)
    clone3                           ENOSYS: its flags sit in memory a filter cannot read; the C
                                     library then falls back to clone, whose flags are checked
    any call of another ABI          ENOSYS (i386 calls on x86-64, x32 numbers), which would
                                     otherwise go round the numbers above
Everything else is allowed.
"""

import ctypes
import os
import platform

# struct seccomp_data: int nr; u32 arch; u64 instruction_pointer; u64 args[6]
_NR, _ARCH, _ARG0_LOW = 0, 4, 16
_LD_W_ABS, _JEQ, _JGE, _JSET, _RET = 0x20, 0x15, 0x35, 0x45, 0x06
_RET_ALLOW, _RET_ERRNO = 0x7FFF0000, 0x00050000
_EPERM, _ENOSYS = 1, 38
_CLONE_NEWUSER = 0x10000000
_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER = 22, 2
_X32_BIT = 0x40000000

# machine -> (AUDIT_ARCH value, {name: number}); numbers from the kernel's syscall tables.
_TABLES = {
    "x86_64": (
        0xC000003E,
        {
            "memfd_create": 319,
            "memfd_secret": 447,
            "shmget": 29,
            "msgget": 68,
            "add_key": 248,
            "request_key": 249,
            "keyctl": 250,
            "unshare": 272,
            "clone": 56,
            "clone3": 435,
        },
    ),
    "aarch64": (
        0xC00000B7,
        {
            "memfd_create": 279,
            "memfd_secret": 447,
            "shmget": 194,
            "msgget": 186,
            "add_key": 217,
            "request_key": 218,
            "keyctl": 219,
            "unshare": 97,
            "clone": 220,
            "clone3": 435,
        },
    ),
}
REFUSED = ("memfd_create", "memfd_secret", "shmget", "msgget", "add_key", "request_key", "keyctl")
DESCRIPTION = (
    "seccomp: memfd_create, memfd_secret, shmget, msgget, add_key, request_key, keyctl and "
    "CLONE_NEWUSER (unshare, clone) refused, clone3 and other ABIs ENOSYS"
)


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(_SockFilter))]


def _assemble(program):
    """[(code, k, jump-if-true label or None, jump-if-false label or None) or a label str] ->
    [(code, jt, jf, k)] with relative jumps resolved."""
    labels, index = {}, 0
    for item in program:
        if isinstance(item, str):
            labels[item] = index
        else:
            index += 1
    out = []
    for item in program:
        if isinstance(item, str):
            continue
        code, k, jt, jf = item
        here = len(out) + 1  # jumps count from the next instruction
        out.append((code, labels[jt] - here if jt else 0, labels[jf] - here if jf else 0, k))
    return out


def build(machine=None):
    """The filter for `machine` (default: this one) as [(code, jt, jf, k)], or None when there is
    no syscall table for it."""
    machine = machine or platform.machine()
    if machine not in _TABLES:
        return None
    arch, numbers = _TABLES[machine]
    program = [(_LD_W_ABS, _ARCH, None, None), (_JEQ, arch, "native", "enosys"), "native", (_LD_W_ABS, _NR, None, None)]
    if machine == "x86_64":
        program.append((_JGE, _X32_BIT, "enosys", "checks"))
    program.append("checks")
    for name in REFUSED:
        program.append((_JEQ, numbers[name], "eperm", f"after_{name}"))
        program.append(f"after_{name}")
    program += [
        (_JEQ, numbers["clone3"], "enosys", "not_clone3"),
        "not_clone3",
        (_JEQ, numbers["clone"], "flags", "not_clone"),
        "not_clone",
        (_JEQ, numbers["unshare"], "flags", "allow"),
        "flags",
        (_LD_W_ABS, _ARG0_LOW, None, None),
        (_JSET, _CLONE_NEWUSER, "eperm", "allow"),
        "allow",
        (_RET, _RET_ALLOW, None, None),
        "eperm",
        (_RET, _RET_ERRNO | _EPERM, None, None),
        "enosys",
        (_RET, _RET_ERRNO | _ENOSYS, None, None),
    ]
    return _assemble(program)


def install(libc, instructions):
    """Install `instructions` on the calling thread (no_new_privs must be set, or the caller hold
    CAP_SYS_ADMIN); OSError if the kernel refuses."""
    array = (_SockFilter * len(instructions))(*[_SockFilter(c, jt, jf, k) for c, jt, jf, k in instructions])
    prog = _SockFprog(len(instructions), array)
    if (
        libc.prctl(
            _PR_SET_SECCOMP,
            ctypes.c_ulong(_SECCOMP_MODE_FILTER),
            ctypes.byref(prog),
            ctypes.c_ulong(0),
            ctypes.c_ulong(0),
        )
        != 0
    ):
        err = ctypes.get_errno()
        raise OSError(err, f"seccomp filter: {os.strerror(err)}")


def probe(libc):
    """(instructions, description) where a forked child could install the filter and then saw
    memfd_create refused; (None, "unavailable: why") otherwise. Programs get the filter only when
    this says so, and a program whose filter then fails to install is not run."""
    instructions = build()
    if instructions is None:
        return None, f"unavailable: no system-call table for {platform.machine()}"
    pid = os.fork()
    if pid == 0:
        code = 3
        try:
            if libc.prctl(38, ctypes.c_ulong(1), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0)) != 0:
                os._exit(2)  # PR_SET_NO_NEW_PRIVS refused
            install(libc, instructions)
            try:
                os.close(os.memfd_create("probe"))
                code = 4
            except OSError as e:
                code = 0 if e.errno == _EPERM else 4
        except BaseException:  # noqa: BLE001 - the kernel refused the filter
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code == 0:
        return instructions, DESCRIPTION
    why = {
        1: "the kernel refused the filter (no seccomp?)",
        2: "prctl(PR_SET_NO_NEW_PRIVS) refused",
        4: "the filter did not take effect",
    }.get(code, f"probe ended with status {code}")
    return None, f"unavailable: {why}"
