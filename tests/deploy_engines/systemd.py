"""The systemd half of the deploy test: a debootstrapped bookworm with the project installed as
deploy/README.md says, the shipped unit, sysctl drop-in and a config per instance, booted with
``systemd-nspawn --private-network`` (its network is its own loopback: the nodes can reach
nothing else). There is no systemd on the host to ask (``machinectl``, ``systemctl -M``), so
commands run inside through ``nsenter`` into the container's namespaces, and the host's
``tmdht`` looks at the cluster from inside its network namespace only."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

from support.deploy import SYSTEMD_SAMPLE, fill_sample

from deploy_engines.bases import NSPAWN_ONE_SHOT
from deploy_engines.cluster import cluster_status
from deploy_engines.host import Daemon, run, wait_for
from deploy_engines.report import CheckFailed, Report

__all__ = ["SystemdPhase"]

INSTANCES = {"a": 7400, "b": 7410, "c": 7420}
MAX_EXPOSURE = 2.0
MACHINE = "tmdht-deploy"
CONTAINER_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# What the Dockerfile copies to build the project: the same files make the wheel here (the
# source folders as pyproject.toml maps them to packages).
PROJECT_FILES = (
    "pyproject.toml",
    "README.md",
    *sorted(
        set(
            tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())[
                "tool"
            ]["setuptools"]["package-dir"].values()
        )
    ),
)
READYZ = (
    "import sys, urllib.request\n"
    "try:\n"
    "    print(urllib.request.urlopen(sys.argv[1], timeout=3).read().decode())\n"
    "except OSError as exc:\n"
    "    sys.exit(f'{exc}')\n"
)


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rpartition(")")[2].split()[1]) == pid:
                found.append(int(entry.name))
    return found


class SystemdPhase:
    """Everything the systemd half starts, and its checks."""

    def __init__(self, repo: Path, work: Path, report: Report) -> None:
        self.repo = repo
        self.work = work / "systemd"
        self.logs = work / "logs"
        self.report = report
        self.rootfs = self.work / "rootfs"
        self.key_file = self.work / "cluster.key"
        self.nspawn: Daemon | None = None
        self.leader = 0

    # -- plumbing ------------------------------------------------------------------------------

    def inside(self, *argv: str, check: bool = True, timeout: float = 60) -> str:
        """Run a command in the booted container; its stdout."""
        proc = run(["nsenter", "-t", str(self.leader), "-a", "env", "-i", CONTAINER_PATH, *argv],
                   check=check, timeout=timeout, log=self.logs / "systemd-commands.log")  # fmt: skip
        return proc.stdout

    def show(self, unit: str, *props: str) -> dict[str, str]:
        """``systemctl show`` properties of a unit."""
        out = self.inside("systemctl", "show", unit, *(f"--property={p}" for p in props))
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def readyz(self, port: int) -> dict[str, Any] | None:
        """An instance's /readyz from inside the container's network (None unless 200)."""
        proc = run(["nsenter", "-t", str(self.leader), "-n", sys.executable, "-c", READYZ,
                    f"http://127.0.0.1:{port + 2}/readyz"], check=False, timeout=30)  # fmt: skip
        if proc.returncode != 0:
            return None
        doc: dict[str, Any] = json.loads(proc.stdout)
        return doc

    def journal(self, unit: str) -> str:
        """A unit's journal, messages only."""
        return self.inside("journalctl", "--unit", unit, "--output", "cat", "--no-pager")

    # -- steps ---------------------------------------------------------------------------------

    def prepare(self, base: Path) -> str:
        """Copy the base, install the project's wheel, the unit, the drop-in, configs, the key."""
        self.work.mkdir(parents=True, exist_ok=True)
        if self.rootfs.exists():
            shutil.rmtree(self.rootfs)
        run(["cp", "-a", "--reflink=auto", base, self.rootfs], timeout=300)
        source, wheels = self.work / "src", self.work / "wheels"
        for name in PROJECT_FILES:
            src = self.repo / name
            if src.is_dir():
                shutil.copytree(
                    src, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.so")
                )
            else:
                source.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, source / name)
        run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
             "--wheel-dir", wheels, source], timeout=300, log=self.logs / "systemd-commands.log")  # fmt: skip
        (wheel,) = wheels.glob("tmdht-*.whl")
        run([*NSPAWN_ONE_SHOT, "--private-network", f"--bind-ro={wheels}:/mnt/wheels", "-D",
             self.rootfs, "/opt/tmdht/bin/pip", "install", "--quiet", "--no-deps", "--no-index",
             f"/mnt/wheels/{wheel.name}"], timeout=300, log=self.logs / "systemd-commands.log")  # fmt: skip
        # As deploy/README.md installs them.
        systemd = self.repo / "deploy" / "systemd"
        unit_dir = self.rootfs / "etc" / "systemd" / "system"
        shutil.copyfile(systemd / "tmdht-node@.service", unit_dir / "tmdht-node@.service")
        shutil.copyfile(
            systemd / "90-tmdht.conf", self.rootfs / "etc" / "sysctl.d" / "90-tmdht.conf"
        )
        etc = self.rootfs / "etc" / "tmdht"
        etc.mkdir(mode=0o755, exist_ok=True)
        for name, port in INSTANCES.items():
            (etc / f"{name}.toml").write_text(
                fill_sample(
                    SYSTEMD_SAMPLE.read_text(),
                    host="127.0.0.1",
                    advertise_host="127.0.0.1",
                    seeds=[f"127.0.0.1:{INSTANCES['a']}"],
                    kademlia_port=port,
                    data_port=port + 1,
                    metrics_port=port + 2,
                )
            )
        key = etc / "cluster.key"
        key.write_text(os.urandom(32).hex() + "\n")
        key.chmod(0o600)
        shutil.copyfile(key, self.key_file)
        return f"{wheel.name}, instances {', '.join(INSTANCES)}"

    def boot(self) -> str:
        """systemd-nspawn --boot --private-network; wait until the system is up."""
        self.nspawn = Daemon.start(
            "systemd-nspawn",
            ["systemd-nspawn", "--directory", self.rootfs, "--boot", "--private-network",
             "--register=no", "--keep-unit", "--machine", MACHINE, "--console=passive"],
            self.logs / "nspawn.log",
        )  # fmt: skip

        def leader() -> int | None:
            if self.nspawn is None or not self.nspawn.running():
                raise CheckFailed(
                    f"systemd-nspawn exited:\n{self.nspawn.tail() if self.nspawn else ''}"
                )
            # nspawn forks an outer child that forks the container's init and exits: the leader
            # is the child that is PID 1 in its own PID namespace.
            for child in _children(self.nspawn.pid):
                with contextlib.suppress(OSError):
                    status = Path(f"/proc/{child}/status").read_text()
                    nspid = next((x for x in status.splitlines() if x.startswith("NSpid:")), "")
                    if nspid.split()[-1] == "1" and len(nspid.split()) == 3:
                        return child
            return None

        self.leader = wait_for("the container's init", leader, 30)

        def manager_answers() -> bool:
            proc = run(["nsenter", "-t", str(self.leader), "-a", "env", "-i", CONTAINER_PATH,
                        "systemctl", "is-system-running"], check=False, timeout=30)  # fmt: skip
            # A state, not "Failed to connect to bus", nor "offline" (PID 1 is not systemd yet,
            # or has not created /run/systemd/system).
            return proc.stdout.strip() not in ("", "offline")

        wait_for("systemd in the container answering", manager_answers, 60)
        state = self.inside(
            "systemctl", "is-system-running", "--wait", check=False, timeout=120
        ).strip()
        if state not in ("running", "degraded"):
            raise CheckFailed(f"system is {state}")
        failed = self.inside("systemctl", "--failed", "--no-legend", "--plain").strip()
        return f"init pid {self.leader} on the host, system {state}" + (
            f" (failed: {failed.split()[0]} ...)" if failed else ""
        )

    def start_instances(self) -> str:
        """Start a, then b and c: each ready (/readyz 200) the moment systemctl start returns."""
        waits = []
        for group in (["a"], ["b", "c"]):
            units = [f"tmdht-node@{n}" for n in group]
            self.inside("systemctl", "start", *units, timeout=120)
            for name in group:
                unit = f"tmdht-node@{name}"
                props = self.show(unit, "Type", "ActiveState", "StatusText")
                if props["Type"] != "notify" or props["ActiveState"] != "active":
                    raise CheckFailed(f"{unit}: {props}")
                if self.readyz(INSTANCES[name]) is None:  # no polling: ready when start returned
                    raise CheckFailed(f"{unit} active but /readyz not 200 yet")
                waits.append(props["StatusText"])
        return f"Type=notify, ready on return; status: {waits[0]!r}"

    def main_pids(self) -> dict[str, int]:
        """Each instance's main process id (in the container's PID namespace)."""
        return {n: int(self.show(f"tmdht-node@{n}", "MainPID")["MainPID"]) for n in INSTANCES}

    def check_users(self) -> str:
        """One dynamic user per instance, hardening applied; one cannot signal another."""
        pids = self.main_pids()
        uids = {}
        for name, pid in pids.items():
            status = dict(
                line.split(":", 1)
                for line in self.inside("cat", f"/proc/{pid}/status").splitlines()
            )
            uids[name] = status["Uid"].split()[0]
            if (
                int(status["CapEff"].strip(), 16)
                or status["NoNewPrivs"].strip() != "1"
                or (status["Seccomp"].strip() != "2")
            ):
                raise CheckFailed(f"{name}: CapEff {status['CapEff']}, NoNewPrivs "
                                  f"{status['NoNewPrivs']}, Seccomp {status['Seccomp']}")  # fmt: skip
        if len(set(uids.values())) != len(INSTANCES):
            raise CheckFailed(f"instances share users: {uids}")
        users = {n: self.show(f"tmdht-node@{n}", "User")["User"] for n in INSTANCES}

        # As instance a's user, signal 0 to instance b's process: refused (EPERM); as b's own
        # user it is allowed (so the refusal is about users, not a broken command).
        def signal_b_as(uid: str) -> subprocess.CompletedProcess[str]:
            return run(["nsenter", "-t", str(self.leader), "-a", "setpriv", f"--reuid={uid}",
                        f"--regid={uid}", "--clear-groups", "/bin/sh", "-c", f"kill -0 {pids['b']}"],
                       check=False, timeout=30)  # fmt: skip

        as_a, as_b = signal_b_as(uids["a"]), signal_b_as(uids["b"])
        if as_a.returncode == 0 or "not permitted" not in as_a.stderr or as_b.returncode != 0:
            raise CheckFailed(f"kill -0 b as a: {as_a.returncode} {as_a.stderr.strip()!r}, "
                              f"as b: {as_b.returncode} {as_b.stderr.strip()!r}")  # fmt: skip
        return f"users {users}, uids {sorted(uids.values())}; a cannot signal b"

    def check_ring(self) -> str:
        """cluster status from inside the container's network: 3 ready members."""

        def three() -> list[dict[str, Any]] | None:
            members = cluster_status(f"127.0.0.1:{INSTANCES['a']}", self.key_file, self.leader)
            ready = [m for m in members if m["health"] == "ready"]
            return members if len(ready) == len(INSTANCES) == len(members) else None

        members = wait_for("3 ready members", three, 30, interval=1.0)
        return f"{len(members)} members ready"

    def restart_keeps_id(self) -> str:
        """systemctl restart: the same node id (node.json in the StateDirectory)."""
        before = self.readyz(INSTANCES["a"])
        self.inside("systemctl", "restart", "tmdht-node@a", timeout=120)
        after = self.readyz(INSTANCES["a"])
        if before is None or after is None or before["node_id"] != after["node_id"]:
            raise CheckFailed(f"before {before}, after {after}")
        stored = json.loads(self.inside("cat", "/var/lib/tmdht/a/node.json"))["node_id"]
        if stored != after["node_id"]:
            raise CheckFailed(f"node.json says {stored}, the node {after['node_id']}")
        return f"a keeps {stored[:16]}"

    def kill_restarts(self) -> str:
        """kill -9 of the main process: systemd restarts it (Restart=on-failure), same id."""
        unit = "tmdht-node@b"
        before = self.readyz(INSTANCES["b"])
        pid = self.main_pids()["b"]
        self.inside("/bin/sh", "-c", f"kill -9 {pid}")

        def restarted() -> dict[str, str] | None:
            props = self.show(unit, "MainPID", "ActiveState", "NRestarts")
            fresh = props["ActiveState"] == "active" and props["MainPID"] not in ("0", str(pid))
            return props if fresh and int(props["NRestarts"]) >= 1 else None

        props = wait_for("b restarted", restarted, 30, interval=0.5)
        after = self.readyz(INSTANCES["b"])
        if before is None or after is None or before["node_id"] != after["node_id"]:
            raise CheckFailed(f"before {before}, after {after}")
        return f"pid {pid} -> {props['MainPID']}, NRestarts {props['NRestarts']}, same id"

    def reload_rereads_the_key(self) -> str:
        """`systemctl reload` re-reads /etc/tmdht/cluster.key, not the credential copied at start:
        rotation step 1 (accept a new key, still send with the old one) on every instance, the
        ring stays whole, then the file goes back and a second reload restores the old keys."""
        key = self.rootfs / "etc" / "tmdht" / "cluster.key"
        old = key.read_text().strip()
        units = [f"tmdht-node@{name}" for name in INSTANCES]

        def reload_all(text: str, count: int, keys: str) -> None:
            tmp = key.with_name("cluster.key.tmp")
            tmp.write_text(text)
            tmp.chmod(0o600)
            tmp.replace(key)
            try:
                self.inside("systemctl", "reload", *units, timeout=120)
            except RuntimeError as exc:
                journal = self.journal(units[0]).splitlines()
                raise CheckFailed(f"{exc}; {units[0]}'s journal ends: {journal[-6:]}") from None

            def reloaded() -> bool | None:
                lines = [
                    [
                        x
                        for x in self.journal(unit).splitlines()
                        if "cluster keys reloaded from" in x
                    ]
                    for unit in units
                ]
                done = all(len(x) >= count and keys in x[-1] for x in lines)
                return True if done else None

            try:
                wait_for(f"every instance reloaded ({keys})", reloaded, 30, interval=0.5)
            except TimeoutError as exc:
                journal = self.journal(units[0]).splitlines()
                raise CheckFailed(f"{exc}; {units[0]}'s journal ends: {journal[-5:]}") from None

        new = os.urandom(32).hex()
        try:
            reload_all(f"1:{old}\n2:{new}\n", 1, "key id 1 (accepting 1, 2)")
            members = cluster_status(f"127.0.0.1:{INSTANCES['a']}", self.key_file, self.leader)
            ready = [m for m in members if m["health"] == "ready"]
            if len(ready) != len(INSTANCES):
                raise CheckFailed(f"after the reload: {members}")
        except BaseException:
            key.write_text(f"{old}\n")  # the later steps need the old key file; the error wins
            raise
        reload_all(f"{old}\n", 2, "key id 1 (accepting 1)")
        return f"{len(units)} instances took key 2 on reload and gave it back, ring whole"

    def missing_key_fails(self) -> str:
        """Without /etc/tmdht/cluster.key the unit fails with systemd's credential error."""
        unit = "tmdht-node@c"
        self.inside("mv", "/etc/tmdht/cluster.key", "/etc/tmdht/cluster.key.away")
        try:
            started = run(["nsenter", "-t", str(self.leader), "-a", "env", "-i", CONTAINER_PATH,
                           "systemctl", "restart", unit], check=False, timeout=120)  # fmt: skip
            props = self.show(unit, "ExecMainStatus", "Result")
            journal = self.journal(unit)
        finally:
            self.inside("mv", "/etc/tmdht/cluster.key.away", "/etc/tmdht/cluster.key")
        # systemd sets the credential up for every process of the unit, so the first one fails
        # with 243/CREDENTIALS: ExecStartPre's copy of the key (a control process: the journal
        # says so and ExecMainStatus stays 0), or ExecStart itself in a unit without it.
        if (
            started.returncode == 0
            or props["Result"] != "exit-code"
            or "status=243/CREDENTIALS" not in journal
        ):
            raise CheckFailed(f"restart exit {started.returncode}, {props}")
        self.inside("systemctl", "reset-failed", unit, check=False)
        self.inside("systemctl", "restart", unit, timeout=120)
        if self.readyz(INSTANCES["c"]) is None:
            raise CheckFailed("c not ready again with its key back")
        return "status=243/CREDENTIALS; ready again once the key is back"

    def security(self) -> str:
        """systemd-analyze security of the running unit."""
        out = self.inside("systemd-analyze", "security", "--no-pager", "tmdht-node@a.service")
        match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", out)
        if match is None or float(match.group(1)) > MAX_EXPOSURE:
            raise CheckFailed(out[-400:])
        return f"exposure {match.group(1)} (<= {MAX_EXPOSURE})"

    def check_journal(self) -> str:
        """The limits the node could not get are said; idle sweeps are not."""
        journal = self.journal("tmdht-node@a")
        limits = self.inside("cat", f"/proc/{self.main_pids()['a']}/limits")
        (line,) = [x for x in limits.splitlines() if x.startswith("Max open files")]
        soft, hard = (int(v) for v in line.split()[3:5])
        if hard < 65536 and f"open files limit is {hard}" not in journal:
            raise CheckFailed(f"LimitNOFILE clamped to {hard} without a warning")
        sweeps = journal.count("replication sweep:")
        if sweeps > 6:  # a's journal spans three starts; each logs its first sweep
            raise CheckFailed(f"{sweeps} replication sweep lines at info level")
        return (
            f"open files {soft}/{hard}"
            + (" (clamped: warned)" if hard < 65536 else "")
            + (f"; {sweeps} sweep lines")
        )

    def teardown(self) -> list[str]:
        """Power the container off (SIGTERM to nspawn), remove its tree."""
        leftovers = []
        if self.nspawn is not None:
            code = self.nspawn.stop(90)
            if code not in (0, None):
                leftovers.append(f"systemd-nspawn exited {code}")
        run(["rm", "-rf", "--one-file-system", self.work], check=False, timeout=300)
        if self.work.exists():
            leftovers.append(f"{self.work} not removed")
        return leftovers
