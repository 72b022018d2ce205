"""A real Slurm cluster emulated on one Linux machine: a controller and N nodes, each node a network namespace with
its own address, hostname and /etc/hosts, running its own `slurmd` (Slurm 22.05+ and munge, as root).

    python tests/scripts/slurm_cluster.py up DIR --nodes 3     # prints `export SLURM_CONF=DIR/slurm.conf`
    SLURM_CONF=DIR/slurm.conf sbatch --nodes=3 ...               # submit as on any cluster
    python tests/scripts/slurm_cluster.py down DIR               # daemons, jobs, namespaces and bridge gone

What runs where: `munged` and `slurmctld` (hostname `ctl`, its own UTS namespace) in this machine's network
namespace, on a bridge of their own; `slurmd -N nodeI` in namespace I, whose veth is on that bridge, so every job
step's processes see only their node's address and resolve the node names through the cluster's hosts file, as on
a cluster with its own DNS. Nothing is routed off the bridge: a job reaches its nodes and the controller only.
Plugins that need no cgroups (proctrack/linuxproc, task/none), a private munge key and socket, and a slurm.conf in
DIR (commands find it through SLURM_CONF): the machine's own Slurm or munge set-up, if any, is left alone.

tests/test_slurm_real.py uses `Cluster` as a fixture; docs/scaling.md ("an emulated cluster on a laptop") runs it
by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

PACKAGES = ("slurm-wlm", "munge")  # Debian/Ubuntu: Slurm 22.05 on bookworm
DAEMONS = ("slurmctld", "slurmd", "munged", "sbatch", "srun", "scontrol")
STATE_FILE = "cluster.json"  # what `down` needs: namespaces, bridge, daemon pids

APT_TIMEOUT = 300  # s, each apt-get call


class ClusterUnavailable(RuntimeError):
    """This machine cannot host the emulated cluster (not root, no network namespaces, Slurm not installable)."""


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def ensure_installed() -> None:
    """Install Slurm and munge with apt where absent (as `make java` installs Java); raise ClusterUnavailable with
    the reason when that cannot happen here."""
    if os.geteuid() != 0:
        raise ClusterUnavailable("needs root (network namespaces, slurmd)")
    if all(shutil.which(d) or os.path.exists(f"/usr/sbin/{d}") for d in DAEMONS):
        return
    if shutil.which("apt-get") is None:
        raise ClusterUnavailable(f"Slurm is not installed and there is no apt-get to install {' '.join(PACKAGES)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", *PACKAGES]):
        try:  # bounded: a package mirror that does not answer must skip the test, not hold the suite
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=APT_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise ClusterUnavailable(f"`{' '.join(cmd)}` did not finish in {APT_TIMEOUT} s") from None
        if proc.returncode != 0:
            tail = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-1:]
            raise ClusterUnavailable(f"`{' '.join(cmd)}` failed: {' '.join(tail)}")


def _free_subnet() -> str:
    """A 10.x.y.0/24 prefix ('10.x.y') no route of this machine uses."""
    routes = _run("ip", "-4", "-o", "route", "show", "table", "all").stdout
    while True:
        prefix = f"10.{random.randrange(100, 250)}.{random.randrange(1, 250)}"
        if f"{prefix}." not in routes:
            return prefix


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def slurm_conf(folder: Path, controller: str, nodes: dict[str, str], port: int, cpus: int) -> str:
    """slurm.conf for a controller at `controller` and `nodes` (name -> address), every file under `folder`."""
    lines = [
        "ClusterName=epotrl",
        f"SlurmctldHost=ctl({controller})",
        f"SlurmctldPort={port}",
        "SlurmdPort=6818",  # one slurmd per namespace: the same port on each node's own address
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={folder / 'munge' / 'munge.socket'}",
        "SlurmUser=root",
        "SlurmdUser=root",
        f"StateSaveLocation={folder / 'state'}",
        f"SlurmdSpoolDir={folder / 'spool'}/%n",
        f"SlurmctldPidFile={folder / 'slurmctld.pid'}",
        f"SlurmdPidFile={folder / 'slurmd'}-%n.pid",
        f"SlurmctldLogFile={folder / 'slurmctld.log'}",
        f"SlurmdLogFile={folder / 'slurmd'}-%n.log",
        # no cgroups: namespaces share this machine's cgroup tree, which a container may not let us write
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none",
        "SwitchType=switch/none",
        "MpiDefault=none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",
        "SchedulerType=sched/builtin",
        "ReturnToService=2",
        # every node reports this machine's cores; take the configured ones instead
        "SlurmdParameters=config_overrides",
        "KillWait=5",
        # a node whose slurmd stops answering is set DOWN, and its jobs end (NODE_FAIL), after 30 s, not 5 min
        "SlurmdTimeout=30",
        "InactiveLimit=0",
        "MinJobAge=600",  # `scontrol show job` still knows a finished job for the test to read
        *(f"NodeName={name} NodeAddr={addr} CPUs={cpus} State=UNKNOWN" for name, addr in nodes.items()),
        "PartitionName=emulated Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO",
    ]
    return "\n".join(lines) + "\n"


class Cluster:
    """The emulated cluster in `folder`: `up()` starts it, `down()` removes every trace (safe after a partial up)."""

    def __init__(self, folder: str | os.PathLike, nodes: int = 3, cpus: int = 2):
        self.folder = Path(folder).resolve()
        self.num_nodes, self.cpus = nodes, cpus
        self.conf = self.folder / "slurm.conf"
        self.tag = f"{random.randrange(16**4):04x}"
        self.bridge = f"epob{self.tag}"
        self.names = [f"node{i + 1}" for i in range(nodes)]
        self.namespaces = [f"epo{self.tag}{name}" for name in self.names]
        self.addresses: dict[str, str] = {}
        self.controller = ""
        self.pids: dict[str, int] = {}
        self._procs: list[subprocess.Popen] = []  # reaped by `down` (daemons started by this process)

    @property
    def env(self) -> dict[str, str]:
        """os.environ for Slurm commands that talk to this cluster."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def _save(self) -> None:
        state = {"bridge": self.bridge, "namespaces": self.namespaces, "pids": self.pids}
        (self.folder / STATE_FILE).write_text(json.dumps(state))

    def _spawn(self, key: str, cmd: list[str]) -> None:
        log = open(self.folder / f"{key}.out", "ab")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        log.close()
        self._procs.append(proc)
        self.pids[key] = proc.pid
        self._save()

    def up(self, timeout: float = 60.0) -> Cluster:
        ensure_installed()
        for sub in ("munge", "state", "spool"):
            (self.folder / sub).mkdir(parents=True, exist_ok=True)
        self._save()  # before the first namespace exists: `down` after a failed `up` finds what to remove
        self._network()
        self._munge()
        port = _free_port()
        self.conf.write_text(slurm_conf(self.folder, self.controller, self.addresses, port, self.cpus))
        # slurmctld checks that its host's name is the SlurmctldHost: give it a UTS namespace named `ctl`
        self._spawn("slurmctld", ["unshare", "--uts", "sh", "-c", "hostname ctl && exec slurmctld -D -c"])
        hosts = self.folder / "hosts"
        for name, ns in zip(self.names, self.namespaces):
            # the node's network, hostname and hosts file (mount and UTS namespaces private to its processes);
            # nsenter, not `ip netns exec`, which mounts a fresh /sys without the cgroup tree slurmd reads
            script = 'mount --bind "$0" /etc/hosts && hostname "$1" && exec slurmd -D -N "$1"'
            self._spawn(name, ["nsenter", f"--net=/run/netns/{ns}", "unshare", "--uts", "--mount", "--propagation",
                               "private", "sh", "-c", script, str(hosts), name])  # fmt: skip
        self._wait_idle(timeout)
        return self

    def _network(self) -> None:
        prefix = _free_subnet()
        self.controller = f"{prefix}.1"
        _run("ip", "link", "add", self.bridge, "type", "bridge")
        _run("ip", "addr", "add", f"{self.controller}/24", "dev", self.bridge)
        _run("ip", "link", "set", self.bridge, "up")
        for i, (name, ns) in enumerate(zip(self.names, self.namespaces)):
            address = f"{prefix}.{11 + i}"
            outside, inside = f"epo{self.tag}v{i}", f"epo{self.tag}e{i}"
            _run("ip", "netns", "add", ns)
            _run("ip", "link", "add", outside, "type", "veth", "peer", "name", inside)
            _run("ip", "link", "set", inside, "netns", ns)
            _run("ip", "link", "set", outside, "master", self.bridge, "up")
            _run("ip", "-n", ns, "addr", "add", f"{address}/24", "dev", inside)
            _run("ip", "-n", ns, "link", "set", inside, "up")
            _run("ip", "-n", ns, "link", "set", "lo", "up")
            self.addresses[name] = address
        hosts = ["127.0.0.1 localhost", f"{self.controller} ctl", *(f"{a} {n}" for n, a in self.addresses.items())]
        (self.folder / "hosts").write_text("\n".join(hosts) + "\n")

    def _munge(self) -> None:
        munge = self.folder / "munge"
        key = munge / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        munge.chmod(0o700)
        # --force: munged refuses root-owned paths outside its own /etc and /var layout otherwise
        self._spawn("munged", ["munged", "--foreground", "--force", f"--key-file={key}",
                               f"--socket={munge / 'munge.socket'}", f"--pid-file={munge / 'munged.pid'}",
                               f"--log-file={munge / 'munged.log'}", f"--seed-file={munge / 'munged.seed'}"])  # fmt: skip
        deadline = time.time() + 10
        while not (munge / "munge.socket").exists():
            if time.time() > deadline:
                raise RuntimeError(f"munged did not start: {self._tail('munged.out')}")
            time.sleep(0.1)

    def _tail(self, name: str, lines: int = 5) -> str:
        path = self.folder / name
        return " | ".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else "(no log)"

    def _wait_idle(self, timeout: float) -> None:
        deadline, states = time.time() + timeout, ""
        while time.time() < deadline:
            proc = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True, env=self.env)
            states = proc.stdout.strip() or proc.stderr.strip()
            if (
                proc.returncode == 0
                and all(line.split()[1] == "idle" for line in states.splitlines())
                and len(states.splitlines()) == self.num_nodes
            ):
                return
            for key, pid in self.pids.items():
                if not _alive(pid):
                    raise RuntimeError(f"{key} exited: {self._tail(f'{key}.out')} {self._tail(f'slurmd-{key}.log')}")
            time.sleep(0.5)
        raise RuntimeError(
            f"nodes not idle after {timeout:.0f} s: {states!r}; slurmctld: {self._tail('slurmctld.log')}"
        )

    def crash(self, name: str) -> None:
        """Node `name` fails as a machine does: every process in its namespace (its slurmd, the job's tasks) is
        killed at once; its address then refuses connections."""
        ns = self.namespaces[self.names.index(name)]
        for pid in _run("ip", "netns", "pids", ns).stdout.split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass

    def down(self) -> list[str]:
        """Kill every process of the cluster (jobs included), then remove its namespaces and bridge. Returns what
        could not be removed (empty: all gone)."""
        problems = teardown(self.folder)
        for proc in self._procs:
            proc.wait()
        return problems

    def __enter__(self) -> Cluster:
        try:
            return self.up()
        except BaseException:
            self.down()
            raise

    def __exit__(self, *exc) -> None:
        self.down()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def teardown(folder: str | os.PathLike) -> list[str]:
    """`down` from the state file in FOLDER: namespaces' processes (slurmd, job steps), then the daemons, the
    namespaces and the bridge."""
    path = Path(folder) / STATE_FILE
    if not path.exists():
        return []
    state = json.loads(path.read_text())
    problems = []
    for ns in state["namespaces"]:  # every process in a node's namespace is the cluster's: its slurmd or a job's
        pids = _run("ip", "netns", "pids", ns, check=False).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
    for pid in state["pids"].values():  # the daemons' own process groups (start_new_session)
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for ns in state["namespaces"]:
        if ns in _run("ip", "netns", "list", check=False).stdout.split():
            proc = _run("ip", "netns", "delete", ns, check=False)
            if proc.returncode:
                problems.append(f"netns {ns}: {proc.stderr.strip()}")
    if _run("ip", "link", "show", state["bridge"], check=False).returncode == 0:
        proc = _run("ip", "link", "delete", state["bridge"], check=False)
        if proc.returncode:
            problems.append(f"bridge {state['bridge']}: {proc.stderr.strip()}")
    path.unlink()
    return problems


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="slurm_cluster.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["up", "down"])
    parser.add_argument("folder", help="where the cluster's config, logs and state live (created)")
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 1, help="CPUs each node offers Slurm")
    args = parser.parse_args(argv)
    if args.action == "down":
        problems = teardown(args.folder)
        print("\n".join(problems) or f"cluster in {args.folder} is down")
        return 1 if problems else 0
    cluster = Cluster(args.folder, nodes=args.nodes, cpus=args.cpus)
    try:
        cluster.up()
    except (ClusterUnavailable, RuntimeError) as e:
        cluster.down()
        print(f"slurm_cluster.py: {e}", file=sys.stderr)
        return 2
    print(f"export SLURM_CONF={cluster.conf}  # nodes: {', '.join(f'{n}={a}' for n, a in cluster.addresses.items())}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
