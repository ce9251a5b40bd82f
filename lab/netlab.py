"""Network labs for the virtual network: sites as network namespaces, VMs moving between them.

:class:`NetLab` builds, as root, a WAN of sites on one host: a hub namespace with a bridge
(the "WAN"), and per site a namespace joined to the hub by a veth pair with an address
``10.99.0.<n>/24`` (site ``a`` is 1, ``b`` 2, ``c`` 3). On top of it, one of two data planes
for the guests' network ``10.77.0.0/24``:

- ``vnet``: a tmdht vnet agent per site (``tmdht vnet run`` in the site's namespace), a store
  node in each of the first two sites for the MAC directory; VMs attach to their site's agent
  through ``-netdev stream`` and a QMP socket, a host "peer" through a tap device. The WAN
  links get a 9000-byte MTU, as overlay underlays do (the tunnel adds ~110 bytes to a frame).
- ``bridge``: a plain Linux bridge per site, the sites' WAN links enslaved to them (one L2
  segment across sites); VMs attach through a tap device on their site's bridge, the peer is
  the bridge's own address. Nothing but QEMU's own announce (RARP) follows a migrated VM.

Every name it creates starts with ``vnet-``; :meth:`NetLab.close` kills the processes it started
(by PID), then deletes the namespaces (their links and bridges go with them), also after errors.
QEMU runs in a namespace through a wrapper script (``ip netns exec`` execs it: same PID).
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any, Final

from tmdht.errors import TmdhtError
from tmdht.lab.errors import LabError, LabSetupError
from tmdht.lab.host import HostTools

__all__ = [
    "GUEST_NET",
    "PEER_ADDRESS",
    "NetLab",
    "Services",
    "Site",
    "netns_tools",
    "run",
]

GUEST_NET: Final = "10.77.0.0/24"
PEER_ADDRESS: Final = "10.77.0.100"
WAN_NET: Final = "10.99.0.0/24"
_PREFIX: Final = "vnet-"


def run(*args: str, check: bool = True, timeout: float = 60.0) -> str:
    """Run a command, return its stdout; raise LabError with its stderr if it fails."""
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        raise LabError(f"{shlex.join(args)}: {exc}") from exc
    if check and done.returncode != 0:
        raise LabError(f"{shlex.join(args)} failed: {done.stderr.strip()}")
    return done.stdout


@dataclasses.dataclass(frozen=True)
class Services:
    """How the lab talks to the tmdht services it starts as processes. The caller hands them in
    (the lab layer imports only the core; e.g. ``Services(tmdht.node.local.read_ready_line,
    tmdht.vnet.control.control_request)``)."""

    read_ready_line: Callable[[subprocess.Popen[bytes], float, str], dict[str, Any]]
    """Block until a service process printed ``READY {json}`` (bounded); its status."""
    agent_request: Callable[[Path, dict[str, Any]], dict[str, Any]]
    """One request to a vnet agent's control socket; its answer."""


def netns_tools(tools: HostTools, namespace: str, directory: Path) -> HostTools:
    """``tools`` whose QEMU runs inside ``namespace`` (a wrapper script in ``directory``)."""
    wrapper = directory / f"qemu-{namespace}"
    wrapper.write_text(f"#!/bin/sh\nexec ip netns exec {namespace} "
                       f"{shlex.quote(str(tools.qemu))} \"$@\"\n")
    wrapper.chmod(0o755)
    return dataclasses.replace(tools, qemu=wrapper)


@dataclasses.dataclass
class Site:
    """One site: its namespace and WAN address (and, in vnet mode, its agent)."""

    name: str
    namespace: str
    address: str
    agent: dict[str, Any] | None = None
    """The agent's READY status (vnet mode)."""

    @property
    def control(self) -> Path:
        """The agent's control socket."""
        if self.agent is None:
            raise LabError(f"site {self.name} has no agent")
        return Path(self.agent["control"])


class NetLab:
    """Sites as namespaces; ``mode`` is ``vnet`` or ``bridge`` (see the module docstring)."""

    def __init__(self, mode: str, services: Services, sites: Sequence[str] = ("a", "b", "c"),
                 *, work: Path | None = None, tag: str = "") -> None:
        if mode not in ("vnet", "bridge"):
            raise LabError(f"unknown lab mode {mode!r}")
        if os.geteuid() != 0:
            raise LabSetupError("network labs need root (network namespaces)")
        self.mode = mode
        self.services = services
        self.tag = tag or f"{os.getpid() % 1000:03d}"
        self.hub = f"{_PREFIX}w{self.tag}"
        self.sites = {name: Site(name, f"{_PREFIX}{name}{self.tag}", f"10.99.0.{i + 1}")
                      for i, name in enumerate(sites)}
        self._own_work = work is None
        self.work = Path(tempfile.mkdtemp(prefix="vnet-lab-")) if work is None else work
        self._procs: list[subprocess.Popen[bytes]] = []
        self._logs: list[IO[bytes]] = []
        self.cluster_key: Path | None = None
        self.seeds: list[tuple[str, int]] = []

    # -- topology ---------------------------------------------------------------------------

    def __enter__(self) -> NetLab:
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _build(self) -> None:
        mtu = "9000" if self.mode == "vnet" else "1500"
        run("ip", "netns", "add", self.hub)
        run("ip", "-n", self.hub, "link", "add", f"{_PREFIX}hub", "type", "bridge")
        run("ip", "-n", self.hub, "link", "set", f"{_PREFIX}hub", "mtu", mtu, "up")
        for site in self.sites.values():
            run("ip", "netns", "add", site.namespace)
            run("ip", "-n", site.namespace, "link", "set", "lo", "up")
            uplink, hub_end = f"{_PREFIX}up", f"{_PREFIX}{site.name}"
            run("ip", "link", "add", uplink, "netns", site.namespace, "mtu", mtu, "type", "veth",
                "peer", "name", hub_end, "netns", self.hub, "mtu", mtu)
            run("ip", "-n", self.hub, "link", "set", hub_end, "master", f"{_PREFIX}hub", "up")
            if self.mode == "bridge":
                bridge = f"{_PREFIX}br"
                run("ip", "-n", site.namespace, "link", "add", bridge, "type", "bridge")
                run("ip", "-n", site.namespace, "link", "set", uplink, "master", bridge, "up")
                run("ip", "-n", site.namespace, "link", "set", bridge, "up")
                run("ip", "-n", site.namespace, "addr", "add", f"{site.address}/24", "dev",
                    bridge)
            else:
                run("ip", "-n", site.namespace, "addr", "add", f"{site.address}/24", "dev",
                    uplink)
                run("ip", "-n", site.namespace, "link", "set", uplink, "up")

    def close(self) -> None:
        """Kill what the lab started (by PID), delete its namespaces (idempotent)."""
        for proc in reversed(self._procs):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)
        for proc in reversed(self._procs):
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
            if proc.stdout is not None:
                proc.stdout.close()
        self._procs.clear()
        for log in self._logs:
            log.close()
        self._logs.clear()
        for namespace in [s.namespace for s in self.sites.values()] + [self.hub]:
            run("ip", "netns", "del", namespace, check=False)

    # -- processes --------------------------------------------------------------------------

    def spawn(self, namespace: str, argv: Sequence[str], *, name: str,
              stdout: bool = False) -> subprocess.Popen[bytes]:
        """Start ``argv`` in ``namespace`` (killed by :meth:`close`); stderr to a log file."""
        log = (self.work / f"{name}.log").open("ab")
        self._logs.append(log)
        proc = subprocess.Popen(["ip", "netns", "exec", namespace, *argv],
                                stdout=subprocess.PIPE if stdout else subprocess.DEVNULL,
                                stderr=log, stdin=subprocess.DEVNULL)
        self._procs.append(proc)
        return proc

    def exec(self, site: str, *argv: str, timeout: float = 60.0) -> str:
        """Run a command in a site's namespace and return its output."""
        return run("ip", "netns", "exec", self.sites[site].namespace, *argv, timeout=timeout)

    def tmdht(self, site: str, args: Sequence[str], *, name: str,
              timeout: float = 60.0) -> dict[str, Any]:
        """Start a tmdht service (``node run`` / ``vnet run`` with ``--ready-line``) in a site;
        returns its READY status."""
        proc = self.spawn(self.sites[site].namespace,
                          [sys.executable, "-m", "tmdht.cli", *args, "--ready-line"], name=name,
                          stdout=True)
        try:
            return self.services.read_ready_line(proc, timeout, name)
        except LabError:
            raise
        except (TmdhtError, OSError, subprocess.SubprocessError) as exc:
            raise LabError(f"{name}: {exc}") from exc

    # -- the data planes --------------------------------------------------------------------

    def start_directory(self, sites: Sequence[str] = ("a", "b")) -> None:
        """A store node per site (the MAC directory); a fresh cluster key."""
        self.cluster_key = self.work / "cluster.key"
        self.cluster_key.write_text(os.urandom(32).hex() + "\n")
        self.cluster_key.chmod(0o600)
        seeds: list[tuple[str, int]] = []
        for site in sites:
            address = self.sites[site].address
            args = ["node", "run", "--data-dir", str(self.work / f"node-{site}"), "--host",
                    address, "--kademlia-port", "0", "--data-port", "0", "--metrics-port", "0",
                    "--cluster-key-file", str(self.cluster_key), "--replicas", str(len(sites)),
                    "--log-format", "text", "--replication-interval", "5"]
            for host, port in seeds:
                args += ["--seed", f"{host}:{port}"]
            status = self.tmdht(site, args, name=f"node-{site}")
            seeds.append((address, int(status["kademlia"][1])))
        self.seeds = seeds

    def start_agent(self, site: str, *, extra: Sequence[str] = ()) -> Site:
        """The site's vnet agent (after :meth:`start_directory`)."""
        if self.cluster_key is None:
            raise LabError("start_directory first")
        entry = self.sites[site]
        args = ["vnet", "run", "--data-dir", str(self.work / f"agent-{site}"), "--host",
                entry.address, "--tunnel-port", "0", "--metrics-port", "0", "--site", site,
                "--cluster-key-file", str(self.cluster_key), "--replicas",
                str(len(self.seeds)), "--log-format", "text", *extra]
        for host, port in self.seeds:
            args += ["--seed", f"{host}:{port}"]
        entry.agent = self.tmdht(site, args, name=f"agent-{site}")
        return entry

    def agent_request(self, site: str, request: dict[str, Any]) -> dict[str, Any]:
        """A control request to a site's agent."""
        return self.services.agent_request(self.sites[site].control, request)

    def agent_metrics(self, site: str) -> dict[str, float]:
        """A site's agent's metrics (``name{label=value}`` -> value)."""

        agent = self.sites[site].agent
        if agent is None:
            raise LabError(f"site {site} has no agent")
        host, port = agent["metrics"]
        text = self.exec(site, sys.executable, "-c",
                         "import urllib.request,sys;sys.stdout.write(urllib.request.urlopen("
                         f"'http://{host}:{port}/metrics',timeout=5).read().decode())")
        return parse_metrics(text)

    def tap(self, site: str, name: str) -> str:
        """A persistent tap device in a site (bridge mode: a port of the site's bridge)."""
        namespace = self.sites[site].namespace
        run("ip", "-n", namespace, "tuntap", "add", "dev", name, "mode", "tap")
        # A long queue: the host's stack must not drop what a busy agent reads a little late.
        run("ip", "-n", namespace, "link", "set", name, "txqueuelen", "10000")
        if self.mode == "bridge":
            run("ip", "-n", namespace, "link", "set", name, "master", f"{_PREFIX}br")
        run("ip", "-n", namespace, "link", "set", name, "up")
        return name

    def peer(self, site: str, vnet: int = 1) -> str:
        """The host peer's interface in ``site``, with address :data:`PEER_ADDRESS` (in vnet
        mode a tap device attached to network ``vnet``)."""
        namespace = self.sites[site].namespace
        prefix = ipaddress.ip_network(GUEST_NET).prefixlen
        if self.mode == "bridge":
            run("ip", "-n", namespace, "addr", "add", f"{PEER_ADDRESS}/{prefix}", "dev",
                f"{_PREFIX}br")
            return f"{_PREFIX}br"
        device = self.tap(site, f"{_PREFIX}peer")
        self.agent_request(site, {"op": "attach", "name": "peer", "vnet": vnet, "kind": "tap",
                                  "tap": device})
        run("ip", "-n", namespace, "addr", "add", f"{PEER_ADDRESS}/{prefix}", "dev", device)
        return device

    def wait_agents_know(self, site: str, mac: str, where: str, timeout: float = 20.0) -> None:
        """Until ``site``'s agent forwards ``mac`` to ``where``'s agent (or hosts it)."""
        agent = self.sites[where].agent
        if agent is None:
            raise LabError(f"site {where} has no agent")
        deadline = time.monotonic() + timeout
        for _ in range(int(timeout / 0.05) + 2):
            status = self.agent_request(site, {"op": "status"})["status"]
            if any(e["mac"] == mac and e["agent"] == agent["agent"] for e in status["fdb"]):
                return
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)  # a poll interval: the state is in another process
        raise LabError(f"agent {site} did not learn {mac} at {where} within {timeout} s")


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text as ``name{label=value,...}`` (labels sorted) -> value."""
    from prometheus_client.parser import text_string_to_metric_families  # noqa: PLC0415

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out


def write_json(path: Path, doc: Any) -> None:
    """Write JSON atomically."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(path)
