"""The uids programs run as when the host is root: a pool of private uids (one per running program)
or, where none works, one shared unprivileged account. A root host never runs programs as root
unless the Sandbox was told so."""

import fcntl
import logging
import os
import pwd
import signal
import stat
import threading
import time
import weakref

_log = logging.getLogger(__name__)

# Private uids for programs when the evaluator is root: numbers no account uses (not in /etc/passwd
# or /etc/group) and no process holds. RLIMIT_NPROC counts per uid, so one uid per running program
# gives each program its own process budget: a fork bomb cannot starve a neighbour.
PRIVATE_UIDS = range(60000, 65534)
# flock()ed files, one per uid a pool holds, so two evaluators on one machine never share a uid.
# Only root may write these folders: in a world-writable one (/tmp) another user could create the
# folder first and take the pool away. The first that works is used.
LOCK_DIRS = ("/run/megaphi-uid-locks", "/var/lock/megaphi-uid-locks")
# When no private uid works, a root evaluator runs programs as this account instead (shared
# process budget); never as root unless Sandbox(allow_root=True).
FALLBACK_ACCOUNT = "nobody"


def _ids_in_account_files():
    taken = set()
    for path, columns in (("/etc/passwd", (2, 3)), ("/etc/group", (2,))):
        try:
            with open(path) as f:
                for line in f:
                    fields = line.split(":")
                    taken.update(int(fields[c]) for c in columns if len(fields) > c and fields[c].isdigit())
        except OSError:
            pass
    return taken


def _process_ids():
    """{pid: set of every uid and gid (real, effective, saved, fs) it holds} for all processes."""
    ids = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                held = set()
                for line in f:
                    if line.startswith(("Uid:", "Gid:")):
                        held.update(int(x) for x in line.split()[1:])
                        if line.startswith("Gid:"):
                            break
        except (OSError, ValueError):
            continue
        ids[int(entry)] = held
    return ids


def kill_processes_of(uid, patience_seconds=5.0):
    """SIGKILL every process holding `uid` (as uid or gid) until none is left; False if some stay
    (e.g. a zombie whose parent does not reap it)."""
    deadline = time.monotonic() + patience_seconds
    while True:
        pids = [pid for pid, held in _process_ids().items() if uid in held]
        if not pids:
            return True
        if time.monotonic() > deadline:
            return False
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.01)


def open_uid_lock_dir():
    """The first of LOCK_DIRS that is (or can be made) a real directory owned by root and
    writable by nobody else; RuntimeError naming every refusal otherwise."""
    refusals = []
    for path in LOCK_DIRS:
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        except OSError as e:
            refusals.append(f"{path}: {e.strerror}")
            continue
        info = os.lstat(path)
        if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
            refusals.append(f"{path}: not a directory (symbolic links are refused)")
        elif info.st_uid != 0 or info.st_mode & 0o022:
            refusals.append(
                f"{path}: owned by uid {info.st_uid} with mode {stat.S_IMODE(info.st_mode):o}, "
                "must be owned by root and writable only by it"
            )
        else:
            return path
    raise RuntimeError("sandbox: no usable uid lock directory: " + "; ".join(refusals))


def _close_fds(fds):
    for fd in list(fds.values()):
        try:
            os.close(fd)
        except OSError:
            pass
    fds.clear()


class UidPool:
    """`size` private uids (gid = uid); a run takes one and gives it back once nothing of it lives."""

    shared = False

    def __init__(self, size):
        self._lock_dir = open_uid_lock_dir()
        self._locks = {}  # uid -> fd holding its flock, for the pool's lifetime
        self._retired = set()  # uids whose processes could not be removed: never handed out again
        self._free = []
        self._in_service = size  # uids handed out or free; shrinks when a retired uid has no successor
        self._cond = threading.Condition()
        weakref.finalize(self, _close_fds, self._locks)
        for _ in range(size):
            self._free.append(self._reserve())
        self.uids = sorted(self._free)

    def _reserve(self):
        taken = _ids_in_account_files()
        for held in _process_ids().values():
            taken |= held
        for uid in PRIVATE_UIDS:
            if uid in taken or uid in self._locks:
                continue
            fd = os.open(os.path.join(self._lock_dir, str(uid)), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # another evaluator holds it
                os.close(fd)
                continue
            self._locks[uid] = fd
            return uid
        raise RuntimeError(f"sandbox: no unused uid left in {PRIVATE_UIDS.start}-{PRIVATE_UIDS.stop - 1}")

    @staticmethod
    def gid_for(uid):
        return uid

    def acquire(self):
        with self._cond:
            while not self._free:
                if self._in_service == 0:
                    raise RuntimeError(
                        "sandbox: every private uid was retired (processes holding them "
                        "could not be killed) and no unused uid is left to replace them"
                    )
                self._cond.wait()
            return self._free.pop()

    def release(self, uid, known_clean=False):
        """Never raises: the caller is in a `finally` that must not lose the program's result.
        `known_clean`: the run's PID namespace ended, so no process can hold the uid any more
        (no /proc scan needed)."""
        clean = known_clean or kill_processes_of(uid)
        with self._cond:
            if not clean:
                self._retired.add(uid)  # keep its lock so no one else picks it up either
                try:
                    uid = self._reserve()
                except (OSError, RuntimeError) as e:
                    self._in_service -= 1
                    _log.warning(
                        "sandbox: uid %d retired without a replacement (%s); %d uids left", uid, e, self._in_service
                    )
                    self._cond.notify_all()  # waiters must see an empty pool and fail
                    return
            self._free.append(uid)
            self._cond.notify()

    def close(self):
        _close_fds(self._locks)


class SharedAccount:
    """Every program runs as one existing unprivileged account (e.g. nobody); its RLIMIT_NPROC is
    shared by all concurrent programs. Its processes are not killed on release: other system
    services may run as the same account (the PID namespace, where available, ends the program's)."""

    shared = True

    def __init__(self, name):
        account = pwd.getpwnam(name)
        if account.pw_uid == 0 or account.pw_gid == 0:
            raise RuntimeError(f"sandbox: account {name} is root")
        self.name, self.uid, self.gid = name, account.pw_uid, account.pw_gid
        self.uids = [self.uid]

    def gid_for(self, uid):
        return self.gid

    def acquire(self):
        return self.uid

    def release(self, uid, known_clean=False):
        pass

    def close(self):
        pass
