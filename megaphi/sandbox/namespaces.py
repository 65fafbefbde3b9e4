"""The worker's namespaces: a network namespace (+ a user namespace when not root) and a mount
namespace in which every host mount is read-only and the evaluator's folders are covered by empty
tmpfs; PID and IPC namespaces of its own that it returns to after each program (setns).
Standard library only."""

import dataclasses
import os
import re
import signal
from typing import Dict, List, Optional, Set

from . import linux
from .linux import MS_BIND, MS_NODEV, MS_NOEXEC, MS_NOSUID, MS_RDONLY, MS_REC, MS_REMOUNT

# Where each program gets a fresh size-capped tmpfs (the host needs the same list).
PRIVATE_DIRS = ("/tmp", "/var/tmp", "/dev/shm")
# Per-mount flags a read-only remount must repeat: inside a user namespace the kernel refuses to
# clear flags that the outer namespace set (they are locked).
_LOCKED_FLAGS = {
    "nosuid": MS_NOSUID,
    "nodev": MS_NODEV,
    "noexec": MS_NOEXEC,
    "noatime": linux.MS_NOATIME,
    "nodiratime": linux.MS_NODIRATIME,
    "relatime": linux.MS_RELATIME,
}
_PSEUDO_FS = (
    "proc",
    "sysfs",
    "cgroup",
    "cgroup2",
    "devpts",
    "mqueue",
    "bpf",
    "tracefs",
    "debugfs",
    "securityfs",
    "pstore",
    "configfs",
    "fusectl",
    "binfmt_misc",
    "hugetlbfs",
    "autofs",
)
READ_ONLY_TMPFS = MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC


@dataclasses.dataclass
class WorkerNamespaces:
    """What entering the worker's namespaces achieved (reported to the host in Hello)."""

    entered: Set[str] = dataclasses.field(default_factory=set)  # of "net", "user", "mount"
    read_only_fs: bool = False
    writable_mounts: List[str] = dataclasses.field(default_factory=list)
    hidden: List[str] = dataclasses.field(default_factory=list)
    exposed: List[str] = dataclasses.field(default_factory=list)
    namespace_error: Optional[str] = None
    mount_error: Optional[str] = None
    expose_error: Optional[str] = None


def mounts():
    """(mount point, per-mount options, filesystem type) for every mount, parents first."""
    unescape = lambda text: re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)  # noqa: E731
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            yield unescape(fields[4]), fields[5].split(","), fields[fields.index("-") + 1]


def cgroup2_mount():
    for point, _, fstype in mounts():
        if fstype == "cgroup2":
            return point
    return None


def remount_read_only():
    """Bind-remount every mount read-only; returns the mount points that refused and are not kernel
    pseudo filesystems (those stay: proc is replaced per program, sysfs/cgroup writes need
    privileges the program does not have, and the cgroup mount is covered when one is in use)."""
    refused = []
    for point, options, fstype in mounts():
        if "ro" in options:
            continue
        flags = MS_BIND | MS_REMOUNT | MS_RDONLY
        for option in options:
            flags |= _LOCKED_FLAGS.get(option, 0)
        try:
            linux.mount(None, point, None, flags)
        except OSError:
            if fstype not in _PSEUDO_FS and point not in refused:
                refused.append(point)
    return refused


def open_folders(folders):
    """{folder: O_PATH descriptor} taken before something is mounted over them."""
    return {folder: os.open(folder, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC) for folder in folders}


def bind_back(kept):
    """Bind each folder of open_folders (recursively: what is hidden inside stays hidden, and the
    bind keeps the read-only flag of the mount it comes from) back at its own path, creating the
    folders above it (mode 755). Returns the folders bound."""
    done = []
    try:
        for folder, fd in kept.items():
            path = "/"
            for part in folder.strip("/").split("/"):
                path = os.path.join(path, part)
                if not os.path.isdir(path):
                    os.mkdir(path)
                    os.chmod(path, 0o755)
            linux.mount(f"/proc/self/fd/{fd}", folder, None, MS_BIND | MS_REC)
            done.append(folder)
    finally:
        for fd in kept.values():
            os.close(fd)
    return done


def enter(hide: List[str], uncover: Dict[str, List[str]]) -> WorkerNamespaces:
    """Unshare the worker's namespaces, make the host read-only, cover `hide`, and cover each
    closed folder of `uncover` while binding its folders back. Returns what held; "mount" in
    `entered` means the mount namespace is ready (the caller then covers the cgroup file system and
    calls become_pid_1)."""
    result = WorkerNamespaces()
    uid, gid = os.getuid(), os.getgid()
    # PID and IPC namespaces of our own too (the worker proper runs as PID 1 of its own, see
    # become_pid_1), so that after each program it may return to them with setns: in a user
    # namespace, the host's belong to a user namespace where we hold no capability.
    flags = (
        linux.CLONE_NEWNET
        | linux.CLONE_NEWNS
        | linux.CLONE_NEWPID
        | linux.CLONE_NEWIPC
        | (0 if uid == 0 else linux.CLONE_NEWUSER)
    )
    try:
        linux.unshare(flags)
    except OSError as e:
        result.namespace_error = str(e)
        return result
    result.entered = {"net"} | ({"user"} if uid != 0 else set())
    if uid != 0:  # map our own uid/gid only: nobody is root inside
        linux.write_file("/proc/self/setgroups", "deny")
        linux.write_file("/proc/self/uid_map", f"{uid} {uid} 1")
        linux.write_file("/proc/self/gid_map", f"{gid} {gid} 1")
    try:
        linux.mount(None, "/", None, MS_REC | linux.MS_PRIVATE)
    except OSError as e:
        result.mount_error = str(e)
        return result
    result.entered.add("mount")
    result.writable_mounts = remount_read_only()
    result.read_only_fs = not result.writable_mounts
    for path in hide:
        try:
            linux.mount("tmpfs", path, "tmpfs", READ_ONLY_TMPFS, "size=4k,mode=755")
            result.hidden.append(path)
        except OSError:
            pass
    for closed, folders in uncover.items():
        # A folder above the interpreter that other uids may not enter (a 0700 home): an empty
        # read-only tmpfs (mode 755) over it, with the interpreter's folders bound back inside.
        try:
            kept = open_folders(folders)
            linux.mount("tmpfs", closed, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=64k,mode=755")
            result.exposed.extend(bind_back(kept))
            linux.mount(None, closed, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
        except OSError as e:
            result.expose_error = f"cannot expose {folders} under {closed}: {e}"
    return result


def become_pid_1():
    """Fork into our new PID namespace; the process left outside only waits for the worker
    proper and exits with its status (killing it, e.g. the host killing our session, kills the
    worker through its parent-death signal, and with it every program)."""
    pid = os.fork()
    if pid:
        _, status = os.waitpid(pid, 0)
        os._exit(max(linux.exit_code(status), 0))
    linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL, "prctl(pdeathsig)")


def open_home():
    """{clone flag: descriptor} of our mount, IPC and PID namespaces, to come back to after each
    program's were made."""
    home = {}
    for name, flag in (("mnt", linux.CLONE_NEWNS), ("ipc", linux.CLONE_NEWIPC), ("pid", linux.CLONE_NEWPID)):
        home[flag] = os.open(f"/proc/self/ns/{name}", os.O_RDONLY | os.O_CLOEXEC)
    return home
