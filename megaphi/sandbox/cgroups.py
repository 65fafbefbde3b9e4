"""The worker's cgroup v2 leaf: memory.max bounds a program's whole process tree. Standard library
only."""

import dataclasses
import os
import re

from .linux import read_file, write_file
from .namespaces import cgroup2_mount


@dataclasses.dataclass
class MemoryCgroup:
    """A leaf cgroup and descriptors opened in the host's mount namespace, so it stays writable for
    the worker after its own mounts are made read-only."""

    path: str
    name: str  # the leaf's name inside its parent
    procs_fd: int  # cgroup.procs, to move a program's init in
    events_fd: int  # memory.events, to see the OOM killer at work
    dir_fd: int  # the parent folder, to remove the leaf

    def events(self):
        return memory_events(self.events_fd)

    def close(self):
        """Close the descriptors and remove the leaf (it is empty once no program runs)."""
        os.close(self.procs_fd)
        os.close(self.events_fd)
        try:
            os.rmdir(self.name, dir_fd=self.dir_fd)
        except OSError:
            pass
        os.close(self.dir_fd)


def open_cgroup(memory_bytes, parent=None, mount=None, own=None):
    """A leaf cgroup (cgroup v2) for this worker's program trees, with memory.max = memory_bytes,
    no swap and the OOM killer taking the whole group. Tried in `parent` (explicit), the worker's
    own cgroup and its parent; the first that offers the memory controller and lets us create a
    child is used. Returns (MemoryCgroup, None) or (None, why not)."""
    mount = mount or cgroup2_mount()
    if mount is None:
        return None, "no cgroup v2 file system is mounted"
    if own is None:
        try:
            own = next(
                (
                    line.split(":", 2)[2].strip()
                    for line in read_file("/proc/self/cgroup").splitlines()
                    if line.startswith("0::")
                ),
                None,
            )
        except OSError:
            own = None
    candidates = [parent] if parent else []
    if own is not None:
        own_dir = os.path.join(mount, own.lstrip("/")).rstrip("/") or "/"
        candidates += [own_dir] + ([os.path.dirname(own_dir)] if own.strip("/") else [])
    refusals = []
    for base in candidates:
        if not base.startswith(mount.rstrip("/") + "/") and base.rstrip("/") != mount.rstrip("/"):
            continue  # the parent of the hierarchy's root lies outside the cgroup file system
        name = f"megaphi-sandbox-{os.getpid()}"
        leaf = os.path.join(base, name)
        try:
            if "memory" not in read_file(os.path.join(base, "cgroup.controllers")).split():
                refusals.append(f"{base}: no memory controller")
                continue
            _remove_stale_leaves(base)
            if "memory" not in read_file(os.path.join(base, "cgroup.subtree_control")).split():
                write_file(os.path.join(base, "cgroup.subtree_control"), "+memory")
            os.mkdir(leaf, 0o755)
        except OSError as e:
            refusals.append(f"{base}: {e.strerror or e}")
            continue
        try:
            write_file(os.path.join(leaf, "memory.max"), str(int(memory_bytes)))
            for optional, value in (("memory.swap.max", "0"), ("memory.oom.group", "1")):
                if os.path.exists(os.path.join(leaf, optional)):
                    write_file(os.path.join(leaf, optional), value)
            cgroup = MemoryCgroup(
                path=leaf,
                name=name,
                procs_fd=os.open(os.path.join(leaf, "cgroup.procs"), os.O_WRONLY),
                events_fd=os.open(os.path.join(leaf, "memory.events"), os.O_RDONLY),
                dir_fd=os.open(base, os.O_RDONLY | os.O_DIRECTORY),
            )
            return cgroup, None
        except OSError as e:
            refusals.append(f"{leaf}: {e.strerror or e}")
            try:
                os.rmdir(leaf)
            except OSError:
                pass
    return None, "no usable cgroup v2 memory controller: " + ("; ".join(refusals) or "no candidate cgroup")


def _remove_stale_leaves(base):
    """Leaves of workers that died without cleaning up (empty once their programs are gone)."""
    for entry in os.listdir(base):
        match = re.fullmatch(r"megaphi-sandbox-(\d+)", entry)
        if match and not os.path.exists(f"/proc/{match.group(1)}"):
            try:
                os.rmdir(os.path.join(base, entry))
            except OSError:
                pass


def memory_events(fd):
    """{"oom_kill": n, ...} from a memory.events descriptor."""
    try:
        text = os.pread(fd, 4096, 0).decode()
    except OSError:
        return {}
    return {k: int(v) for k, v in (line.split() for line in text.splitlines() if len(line.split()) == 2)}
