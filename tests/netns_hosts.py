"""Simulated hosts for multi-host tests: Linux network namespaces joined by a bridge.

    with SimulatedHosts(2) as hosts:          # hosts.addr(0) == "10.R.0.1", hosts.addr(1) == "10.R.0.2"
        p = hosts.popen(1, ["python3", ...])  # a process whose only network is host 1's veth (and its loopback)
        hosts.link_down(1)                    # cut host 1 off; hosts.link_up(1) to restore
        hosts.degrade(1)                      # delay and loss (netem, or a narrow tbf where netem is missing)

Each host is a namespace with one veth (`eth0` inside) whose other end is enslaved to a bridge living in
its own namespace, so nothing is added to the machine's own network. Addresses are 10.R.0.N/24, R random
per instance so that concurrent test runs do not share names or addresses. Everything is removed on exit,
also when the test fails. `unavailable()` says why namespaces cannot be made (not root, no `ip`), for
pytest.skip.
"""

import os
import random
import shutil
import subprocess

IFNAME = "eth0"  # the interface name inside every simulated host (GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME)


def _ip(*args, check=True):
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def unavailable():
    """None when namespaces can be made here, else the reason (for pytest.skip)."""
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2) to make network namespaces"
    if os.geteuid() != 0:
        return "network namespaces need root"
    name = f"mpprobe{os.getpid()}"
    probe = _ip("netns", "add", name, check=False)
    if probe.returncode != 0:
        return f"cannot make a network namespace: {probe.stderr.strip()}"
    _ip("netns", "del", name, check=False)
    return None


class SimulatedHosts:
    def __init__(self, n):
        self.n = n
        self.tag = f"{os.getpid() % 10000}{random.randint(0, 99):02d}"
        self.subnet = random.randint(16, 250)
        self.bridge_ns = f"mpbr{self.tag}"
        self.names = [f"mph{self.tag}n{i}" for i in range(n)]
        self.made = []
        self.procs = []

    def addr(self, i):
        return f"10.{self.subnet}.0.{i + 1}"

    def __enter__(self):
        try:
            self._make()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc):
        self.close()

    def _make(self):
        _ip("netns", "add", self.bridge_ns)
        self.made.append(self.bridge_ns)
        self.exec_bridge("ip", "link", "add", "br0", "type", "bridge")
        self.exec_bridge("ip", "link", "set", "br0", "up")
        self.exec_bridge("ip", "link", "set", "lo", "up")
        for i, name in enumerate(self.names):
            _ip("netns", "add", name)
            self.made.append(name)
            outside = f"v{i}"
            # the pair is born in the bridge namespace: nothing ever appears in the machine's own namespace
            self.exec_bridge("ip", "link", "add", outside, "type", "veth", "peer", "name", IFNAME, "netns", name)
            self.exec_bridge("ip", "link", "set", outside, "master", "br0")
            self.exec_bridge("ip", "link", "set", outside, "up")
            self.exec(i, "ip", "addr", "add", f"{self.addr(i)}/24", "dev", IFNAME)
            self.exec(i, "ip", "link", "set", IFNAME, "up")
            self.exec(i, "ip", "link", "set", "lo", "up")

    def exec_bridge(self, *cmd):
        return subprocess.run(["ip", "netns", "exec", self.bridge_ns, *cmd], capture_output=True, text=True, check=True)

    def exec(self, i, *cmd, check=True):
        return subprocess.run(["ip", "netns", "exec", self.names[i], *cmd], capture_output=True, text=True, check=check)

    def popen(self, i, cmd, binds=(), **kwargs):
        """Start cmd inside host i (same filesystem and pid space as the test, host i's network only).
        binds: (source, target, read_only) bind mounts made in a private mount namespace for this host's
        command only (a folder that this host does not share, or cannot write)."""
        if binds:
            script = " && ".join(
                f"mount --bind {s!r} {t!r}" + (f" && mount -o remount,bind,ro {t!r}" if ro else "")
                for s, t, ro in binds
            )
            cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script + ' && exec "$@"', "sh", *cmd]
        p = subprocess.Popen(["ip", "netns", "exec", self.names[i], *cmd], start_new_session=True, **kwargs)
        self.procs.append(p)
        return p

    def pids(self, i):
        """Pids of every process whose network namespace is host i's."""
        out = _ip("netns", "pids", self.names[i], check=False).stdout
        return [int(p) for p in out.split()]

    def link_down(self, i):
        self.exec_bridge("ip", "link", "set", f"v{i}", "down")

    def link_up(self, i):
        self.exec_bridge("ip", "link", "set", f"v{i}", "up")

    def qdisc(self, i, *spec):
        """Shape host i's link in both directions with a tc qdisc, e.g. ("netem", "delay", "20ms", "loss", "5%")."""
        for run, dev in ((self.exec_bridge, f"v{i}"), (lambda *c: self.exec(i, *c), IFNAME)):
            run("tc", "qdisc", "replace", "dev", dev, "root", *spec)

    def degrade(self, i):
        """A slow, lossy link for host i: netem delay + loss where the kernel has sch_netem, else a token
        bucket (tbf) so narrow that packets queue (delay) and overflow (loss). Returns what was applied."""
        for spec in (
            ("netem", "delay", "20ms", "10ms", "loss", "5%"),
            ("tbf", "rate", "4mbit", "burst", "16kb", "latency", "20ms"),
        ):
            try:
                self.qdisc(i, *spec)
                return " ".join(spec)
            except subprocess.CalledProcessError:
                continue
        raise RuntimeError("neither netem nor tbf qdiscs are available")

    def close(self):
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, 9)
                except OSError:
                    pass
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    pass
        for name in self.names:
            if name in self.made:
                for pid in self.pids(self.names.index(name)):  # stray processes left in the namespace
                    try:
                        os.kill(pid, 9)
                    except OSError:
                        pass
        for name in reversed(self.made):
            _ip("netns", "del", name, check=False)
        self.made = []
