"""A real Slurm cluster for the tests in this folder: 2 compute nodes as network namespaces.

The session fixture ``slurm`` installs slurm-wlm + munge when missing
(``scripts/install_slurm.sh``), starts munged, slurmctld and one slurmd per node
(``testbed.sh up``: every node has its own netns with address 198.18.0.1N, hostname, /tmp,
/dev/shm and PID namespace) and stops all of it by PID afterwards (``testbed.sh down``),
also when a test fails or the session is interrupted. Needs root; skipped (with the reason)
where namespaces cannot be created. One test bed per machine at a time: a lock file
serialises concurrent sessions.
"""
from __future__ import annotations

import fcntl
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
TESTBED = Path(__file__).with_name("testbed.sh")
BASE = Path("/var/tmp/rpp_slurm_testbed")  # the shared file system of the nodes: NOT under /tmp
LOCK = Path("/var/tmp/rpp_slurm_testbed.lock")
NODES = 2
FINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL",
         "DEADLINE")
SLURM_DAEMONS = ("slurmd", "slurmstepd")
# what the nodes' jobs must not inherit from the test process: loopback rendezvous settings
DROPPED_ENV = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "MASTER_ADDR", "MASTER_PORT", "RAY_ADDRESS")


def _why_no_testbed() -> str | None:
    """Why this machine cannot host the test bed (a reason outside the project), or None."""
    if os.geteuid() != 0:
        return "the Slurm test bed needs root (network namespaces, bridges, mounts)"
    for tool in ("unshare", "nsenter", "setsid", "ip"):
        if not shutil.which(tool):
            return f"the Slurm test bed needs {tool} (util-linux / iproute2)"
    # what `testbed.sh up` does, inside a throw-away network namespace (nothing of the host changes)
    probe = subprocess.run(["unshare", "--net", "--uts", "--mount", "--pid", "--fork", "sh", "-c",
                            "ip link add rppprobe0 type bridge && ip link add rppprobe1 type veth peer name rppprobe2"
                            " && mount -t tmpfs rppprobe /mnt"], capture_output=True, text=True, timeout=60)
    if probe.returncode:
        return ("cannot create network namespaces, bridges, veths or mounts here (a container without "
                f"CAP_SYS_ADMIN/CAP_NET_ADMIN, or a kernel without bridge/veth): {probe.stderr.strip()[-500:]}")
    return None


def _install_slurm() -> str | None:
    """``scripts/install_slurm.sh`` (apt-get slurm-wlm, munge, iproute2 when missing); the
    reason it could not install them, or None."""
    try:
        inst = subprocess.run(["bash", str(ROOT / "scripts" / "install_slurm.sh")], capture_output=True, text=True,
                              timeout=900)
    except subprocess.TimeoutExpired:
        return "scripts/install_slurm.sh (apt-get install slurm-wlm munge) did not finish within 900 s"
    if inst.returncode:
        return (f"scripts/install_slurm.sh could not install slurm-wlm/munge (rc {inst.returncode}; no apt-get, "
                f"or no package mirror reachable?):\n{inst.stdout[-1500:]}{inst.stderr[-1500:]}")
    return None


def _cannot_run(reason: str) -> None:
    """Skip with the reason; ``RPP_REQUIRE_CLUSTER=1`` (a machine that must run them) fails instead."""
    if os.environ.get("RPP_REQUIRE_CLUSTER", "").strip().lower() in ("1", "true", "yes"):
        pytest.fail(f"RPP_REQUIRE_CLUSTER is set but {reason}")
    pytest.skip(reason)


class Cluster:
    """Client side of the test bed: submit jobs, poll them, look into the nodes."""

    def __init__(self, base: Path):
        self.base, self.jobs, self.shared = base, base / "jobs", base / "shared"
        env = {k: v for k, v in os.environ.items() if k not in DROPPED_ENV}
        env.update(SLURM_CONF=str(base / "slurm.conf"), PYTHONPATH=os.pathsep.join(
            p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p),
            PATH=f"{ROOT / '.venv' / 'bin'}{os.pathsep}{env.get('PATH', '')}", RAY_USAGE_STATS_ENABLED="0",
            # Ray's OOM killer reads the memory of the whole machine, which the test bed's nodes share
            # with every other process on it: it must not kill a tiny job for what others use.
            RAY_memory_monitor_refresh_ms="0",
            # a small object store (the tiny jobs pass little through it) in the node's /dev/shm, not
            # 30 % of the shared machine's memory as a file under /tmp
            RPP_RAY_NODE_ARGS="--object-store-memory=300000000")
        self.env = env
        self.submitted: list[str] = []

    def run(self, *cmd: str, check: bool = True, timeout: float = 60, retries: int = 0) -> str:
        """Run a Slurm client command; ``retries``: again after a failure (a loaded slurmctld
        can time out a request)."""
        for attempt in range(retries + 1):
            try:
                p = subprocess.run(list(cmd), env=self.env, cwd=self.jobs, capture_output=True, text=True,
                                   timeout=timeout)
            except subprocess.TimeoutExpired as e:
                p = subprocess.CompletedProcess(cmd, -1, "", f"timed out after {e.timeout} s")
            if p.returncode == 0 or not check:
                return p.stdout
            if attempt < retries:
                time.sleep(2)
        raise RuntimeError(f"{' '.join(cmd)} -> {p.returncode}: {p.stdout}{p.stderr}")

    def sbatch(self, name: str, *args: str, env: dict | None = None) -> str:
        """Submit; ``args`` are sbatch options then the script and its arguments."""
        saved = self.env
        self.env = {**saved, **(env or {})}
        try:
            jid = self.run("sbatch", "--parsable", f"--job-name={name}", "-o", f"{name}-%j.out", *args).strip()
        finally:
            self.env = saved
        self.submitted.append(jid)
        return jid

    def job(self, jid: str) -> dict[str, str]:
        out = self.run("scontrol", "show", "job", "-o", jid, retries=10)
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def cancel_active(self) -> list[str]:
        """scancel every submitted job that is still pending or running (after a failed test)."""
        active = []
        for j in self.submitted:
            state = dict(re.findall(r"(\w+)=(\S*)", self.run("scontrol", "show", "job", "-o", j, check=False)))
            if state.get("JobState", "COMPLETED") not in FINAL:  # a purged job is long finished
                active.append(j)
        if active:
            self.run("scancel", *active, check=False)
            for j in active:
                self.wait(j, timeout=120)
        return active

    def wait(self, jid: str, *, timeout: float, until=FINAL) -> dict[str, str]:
        """Poll ``scontrol show job`` until the state is one of ``until``; the job's fields."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(jid)
            if info.get("JobState") in until:
                return info
            if time.monotonic() > deadline:
                self.run("scancel", jid, check=False)
                raise AssertionError(f"job {jid} still {info.get('JobState')} after {timeout:.0f} s\n"
                                     + self.output(jid)[-6000:])
            time.sleep(0.5)

    def output(self, jid: str) -> str:
        files = sorted(self.jobs.glob(f"*-{jid}.out"))
        return files[0].read_text(errors="replace") if files else f"(no output file for job {jid})"

    def requeue(self, jid: str) -> None:
        """Requeue a finished or running job (as Slurm does on preemption/node failure with
        --requeue) and let it start at once (Slurm delays a requeued job's start otherwise)."""
        self.run("scontrol", "requeue", jid)
        self.release(jid)

    def release(self, jid: str, timeout: float = 120) -> None:
        """A requeued job waits ~2 min before Slurm starts it again: start it as soon as its
        previous run has ended on every node and its revoked credential is older than a second
        (a start within the same second fails: "Job credential revoked")."""
        self.wait(jid, timeout=timeout, until=("PENDING",))
        self.wait_nodes_clean()
        time.sleep(2)
        self.run("scontrol", "update", f"jobid={jid}", "StartTime=now")

    # ------------------------------------------------------------------ inside the nodes
    def node_init_pid(self, i: int) -> int:
        out = subprocess.run(["bash", str(TESTBED), "node-init-pid", str(i)], env={**os.environ, "B": str(self.base)},
                             capture_output=True, text=True, check=True).stdout
        return int(out.split()[0])

    def node_processes(self, i: int) -> list[tuple[int, str]]:
        """Every process of node ``i`` (its PID namespace) but its init and Slurm's daemons."""
        init = self.node_init_pid(i)
        ns = os.readlink(f"/proc/{init}/ns/pid")
        out = []
        for p in Path("/proc").iterdir():
            if not p.name.isdigit() or int(p.name) == init:
                continue
            try:
                if os.readlink(p / "ns" / "pid") != ns:
                    continue
                cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
                comm = (p / "comm").read_text().strip()
            except OSError:  # exited meanwhile
                continue
            if comm not in SLURM_DAEMONS:
                out.append((int(p.name), cmd or f"[{comm}]"))
        return out

    def wait_nodes_clean(self, timeout: float = 60) -> None:
        """Every node back to its init and slurmd only (no Ray, worker or job process)."""
        deadline = time.monotonic() + timeout
        while True:
            left = {i: self.node_processes(i) for i in range(1, NODES + 1)}
            if not any(left.values()):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"processes left on the nodes: {left}")
            time.sleep(0.5)

    def kill_node_processes(self, i: int) -> list[tuple[int, str]]:
        """SIGKILL every process on node ``i`` except Slurm's daemons: its Ray (raylet, GCS
        clients, workers, `ray start`) dies as in a crash; slurmd stays up."""
        victims = self.node_processes(i)
        for pid, _ in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return victims

    def link(self, i: int, up: bool) -> None:
        """Bring node ``i``'s only link up or down (down: the node vanishes from the network
        without a TCP reset, as on a dead switch port or a powered-off node)."""
        subprocess.run(["ip", "link", "set", f"rpp_h{i}", "up" if up else "down"], check=True)

    def dump(self) -> str:
        """The daemons' logs, the jobs' per-node Ray logs and each node's newest raylet logs."""
        files = sorted((self.base / "log").glob("*.log")) + sorted(self.jobs.glob("**/*.log"))[-8:]
        for node in sorted((self.base / "nodes").glob("n*")):
            logs = node / "tmp" / "ray" / "session_latest" / "logs"
            files += [f for f in (logs / "raylet.out", logs / "raylet.err", logs / "gcs_server.out") if f.is_file()]
        return "\n".join(f"==== {f}\n{f.read_text(errors='replace')[-3000:]}" for f in files)


@pytest.fixture(scope="session")
def slurm():
    reason = _install_slurm() if os.geteuid() == 0 else None
    reason = reason or _why_no_testbed()
    if reason:
        _cannot_run(reason)
    lock = open(LOCK, "w")
    deadline = time.monotonic() + 1800
    while True:  # another session on this machine may hold the (machine-global) test bed
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() > deadline:
                pytest.fail(f"{LOCK} held by another test session for 30 min")
            time.sleep(2)
    env = {**os.environ, "B": str(BASE), "N": str(NODES), "CPUS": "2", "GPUS": "0"}
    previous = signal.signal(signal.SIGTERM, _interrupt)  # a terminated session still tears down
    try:
        subprocess.run(["bash", str(TESTBED), "down"], env=env, capture_output=True, timeout=120)  # a crashed run
        for d in ("jobs", "shared"):  # job ids restart at 1: no output or run of an earlier session may remain
            shutil.rmtree(BASE / d, ignore_errors=True)
        up = subprocess.run(["bash", str(TESTBED), "up"], env=env, capture_output=True, text=True, timeout=180)
        if up.returncode:
            logs = "".join(f"==== {f}\n{f.read_text(errors='replace')[-2000:]}\n"
                           for f in sorted((BASE / "log").glob("*")) if f.is_file())
            pytest.fail(f"testbed.sh up failed (rc {up.returncode}):\n{up.stdout}{up.stderr}\n{logs}")
        (BASE / "shared").mkdir()
        yield Cluster(BASE)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the teardown short
        down = subprocess.run(["bash", str(TESTBED), "down"], env=env, capture_output=True, text=True, timeout=180)
        signal.signal(signal.SIGTERM, previous)
        if not os.environ.get("RPP_KEEP_TESTBED"):
            shutil.rmtree(BASE, ignore_errors=True)
        fcntl.flock(lock, fcntl.LOCK_UN)
        lock.close()
        assert down.returncode == 0, down.stdout + down.stderr


@pytest.fixture(autouse=True)
def _no_job_outlives_its_test(request):
    """A test that fails while its job runs must not leave the job holding the nodes."""
    yield
    if "slurm" in request.fixturenames:
        request.getfixturevalue("slurm").cancel_active()


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")
