"""A Slurm cluster on one machine for tests: slurmctld and one slurmd per simulated host
(tests/netns_hosts.py), nodes n0, n1, ... at the hosts' addresses, munge for authentication.

    with SimulatedHosts(2) as hosts, SlurmCluster(hosts, tmp_path / "slurm") as slurm:
        job = slurm.sbatch(["examples/slurm/pretrain_phi1.sbatch", ...], env=..., cwd=...)
        slurm.wait(job)

Needs Debian's slurm-wlm daemons (packages slurmctld, slurmd, slurm-client, munge); `missing()` names what
is absent, for pytest.skip. The daemons run as root with proctrack/linuxproc and no accounting; every
file lives under the given folder, the ports inside the hosts' namespaces. munged is started only when
none runs, and then stopped again.
"""

import os
import re
import shutil
import subprocess
import time

PROGRAMS = ("slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "srun", "munged")


def missing():
    absent = [p for p in PROGRAMS if shutil.which(p) is None]
    if absent:
        return (
            f"Slurm is not installed ({', '.join(absent)} missing: apt-get install slurmctld slurmd slurm-client munge)"
        )
    return None


class SlurmCluster:
    def __init__(self, hosts, folder, cpus=2):
        self.hosts, self.folder, self.cpus = hosts, str(folder), cpus
        self.conf = os.path.join(self.folder, "slurm.conf")
        self.daemons, self.munged = [], None

    def _write_conf(self):
        f = self.folder
        nodes = "\n".join(
            f"NodeName=n{i} NodeAddr={self.hosts.addr(i)} CPUs={self.cpus} Sockets=1 "
            f"CoresPerSocket={self.cpus} State=UNKNOWN"
            for i in range(self.hosts.n)
        )
        with open(self.conf, "w") as out:
            out.write(f"""ClusterName=megaphitest
SlurmctldHost={os.uname().nodename}({self.hosts.addr(0)})
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation={f}/state
SlurmdSpoolDir={f}/spool-%n
SlurmctldPidFile={f}/slurmctld.pid
SlurmdPidFile={f}/slurmd-%n.pid
SlurmctldLogFile={f}/slurmctld.log
SlurmdLogFile={f}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/linear
SchedulerType=sched/builtin
ReturnToService=2
MpiDefault=none
MailProg=/bin/true
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
{nodes}
PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")

    def env(self, **extra):
        return dict(os.environ, SLURM_CONF=self.conf, **extra)

    def __enter__(self):
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc):
        self.close()

    def _start(self):
        os.makedirs(os.path.join(self.folder, "state"), exist_ok=True)
        for i in range(self.hosts.n):
            os.makedirs(os.path.join(self.folder, f"spool-n{i}"), exist_ok=True)
        self._write_conf()
        if not os.path.exists("/run/munge/munge.socket.2"):
            os.makedirs("/run/munge", exist_ok=True)
            shutil.chown("/run/munge", "munge", "munge")
            self.munged = subprocess.Popen(
                ["runuser", "-u", "munge", "--", "munged", "--foreground"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            deadline = time.monotonic() + 30
            while not os.path.exists("/run/munge/munge.socket.2"):
                assert time.monotonic() < deadline and self.munged.poll() is None, "munged did not start"
                time.sleep(0.1)
        log = open(os.path.join(self.folder, "daemons.txt"), "a")
        self.daemons.append(
            self.hosts.popen(
                0, ["slurmctld", "-D", "-f", self.conf], env=self.env(), stdout=log, stderr=subprocess.STDOUT
            )
        )
        for i in range(self.hosts.n):
            # nsenter (network only), not `ip netns exec`: slurmd needs the machine's /sys/fs/cgroup
            self.daemons.append(
                subprocess.Popen(
                    [
                        "nsenter",
                        f"--net=/run/netns/{self.hosts.names[i]}",
                        "slurmd",
                        "-D",
                        "-f",
                        self.conf,
                        "-N",
                        f"n{i}",
                    ],
                    env=self.env(),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        deadline = time.monotonic() + 60
        while True:
            states = self.run("sinfo", "-h", "-N", "-o", "%T", check=False).stdout.split()
            if len(states) == self.hosts.n and all(s == "idle" for s in states):
                return
            assert time.monotonic() < deadline, f"Slurm nodes not idle: {states}\n{self.logs()}"
            assert all(d.poll() is None for d in self.daemons), self.logs()
            time.sleep(0.5)

    def run(self, *cmd, check=True):
        """A Slurm client command, run on host 0."""
        return subprocess.run(
            ["ip", "netns", "exec", self.hosts.names[0], *cmd],
            env=self.env(),
            capture_output=True,
            text=True,
            check=check,
            timeout=60,
        )

    def sbatch(self, args, env, cwd):
        out = subprocess.run(
            ["ip", "netns", "exec", self.hosts.names[0], "sbatch", "--parsable", *args],
            env=dict(env, SLURM_CONF=self.conf),
            cwd=str(cwd),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        return out.stdout.strip().split(";")[0]

    def job(self, job_id):
        """{field: value} of `scontrol show job`."""
        text = self.run("scontrol", "show", "job", "-o", job_id, check=False).stdout
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def wait(self, job_id, states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"), timeout=600):
        deadline = time.monotonic() + timeout  # hang guard
        while True:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            assert time.monotonic() < deadline, f"job {job_id} still {info.get('JobState')}\n{self.logs()}"
            time.sleep(0.5)

    def logs(self):
        out = []
        for name in ("daemons.txt", "slurmctld.log") + tuple(f"slurmd-n{i}.log" for i in range(self.hosts.n)):
            path = os.path.join(self.folder, name)
            if os.path.exists(path):
                with open(path, errors="replace") as f:
                    out.append(f"== {name}\n{f.read()[-2000:]}")
        return "\n".join(out)

    def close(self):
        for d in reversed(self.daemons):
            if d.poll() is None:
                d.terminate()
                try:
                    d.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    d.kill()
                    d.wait()
        self.daemons = []
        if self.munged is not None and self.munged.poll() is None:
            self.munged.terminate()
            self.munged.wait(timeout=30)
