"""A multi-host ring on one machine: hosts as network namespaces, a whole host killed and restarted.

    sudo build/venv/bin/python bench/multihost.py [--hosts 8] [--nodes-per-host 4]
        [--pages 100000] [--batch 20000] [--grace 30] [--interval 10] [--virtual-ids V] [--check]

Builds (as root) ``--hosts`` network namespaces ("hosts") and a ninth one for the client, each
joined by a veth pair to a bridge in a hub namespace of its own (nothing is added to the
machine's own namespace; addresses in 10.213.0.0/24, which exists only on that bridge). Every
name starts with ``multihost-<pid>`` (namespaces) or ``mh`` (links inside them). On each host it
starts ``--nodes-per-host`` store node processes bound to the host's address, with the host as
their failure domain (``--host-label``), all joined through the first node. Then, from the client
namespace, it measures:

1. time until every node's view is complete (each node's ``tmdht_known_peers`` = nodes - 1),
   counted from the moment every node printed its READY line;
2. RSS and idle CPU (utime + stime over ``--idle`` s, from /proc) per node;
3. a publish of ``--pages`` random pages (R = ``--replicas``) in batches of ``--batch``:
   pages/s, failures; pages per node (max / mean); placement: the hosts of every page's R
   replicas (``replicas_holding``: every replica asked with HAS) are R distinct hosts;
4. a resolve of every page from the client namespace (a fresh client): pages/s, unresolved;
5. SIGKILL of every node of one host: a resolve of every page at once (0 may be unresolvable),
   then the time until every page has R copies again (a fresh client's view, every replica
   asked with HAS; polled, so the figure includes up to one check's duration);
6. restart of that host (same data directories: a host that rebooted): the time until the
   surplus copies the survivors made meanwhile are dropped (page counts), then until a check
   finds every page on its R replicas of the new view ("rebalanced"). Nodes drop surplus after ``--grace``
   seconds, checked by sweeps every ``--interval`` seconds: both far shorter than a
   production node's defaults (600 s, 60 s) so the run ends in minutes; the report says so.

Everything is bounded in time; ``--check`` makes it exit 1 if a target failed (0 pages lost,
R copies restored, surplus dropped, R distinct hosts per page). The process that builds the
namespaces runs the measurements in a child inside the client namespace and, whatever happens to
that child (an error, ctrl-C, SIGTERM), kills the node processes it started by PID and deletes
the namespaces it created. Prints a table and writes JSON (``--out``, default
bench/results/multihost.json).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tmdht.domains import VIRTUAL_IDS

NET = "10.213.0"
"""The bench's /24: it exists only on the bridge this script creates."""
HOST_BASE = 10
CLIENT_OCTET = 250
PREFIX = "multihost-"
BRIDGE = "mhbr0"
TICKS = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    """A step of the bench failed (the message says which)."""


def sh(*args: str, timeout: float = 30.0) -> str:
    """Run a command; raise BenchError with its stderr if it fails."""
    done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise BenchError(f"{' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout


# -- the namespaces (the guardian process) ---------------------------------------------------------


def host_ns(tag: str, index: int) -> str:
    return f"{tag}-h{index}"


def host_address(index: int) -> str:
    return f"{NET}.{HOST_BASE + index}"


def build_network(tag: str, hosts: int, mtu: int) -> list[str]:
    """The hub (bridge), ``hosts`` host namespaces and the client's; returns every namespace
    created (in creation order, so a failure halfway can still delete what exists)."""
    created: list[str] = []
    hub = f"{tag}-hub"
    sh("ip", "netns", "add", hub)
    created.append(hub)
    sh("ip", "-n", hub, "link", "add", BRIDGE, "mtu", str(mtu), "type", "bridge")
    sh("ip", "-n", hub, "link", "set", BRIDGE, "up")
    sh("ip", "-n", hub, "link", "set", "lo", "up")
    members = [(host_ns(tag, i), host_address(i)) for i in range(hosts)]
    members.append((f"{tag}-c", f"{NET}.{CLIENT_OCTET}"))
    for n, (ns, address) in enumerate(members):
        sh("ip", "netns", "add", ns)
        created.append(ns)
        port = f"mhv{n}"
        sh("ip", "-n", hub, "link", "add", port, "mtu", str(mtu), "type", "veth",
           "peer", "name", "mh0", "netns", ns)  # fmt: skip
        sh("ip", "-n", hub, "link", "set", port, "master", BRIDGE, "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", ns, "addr", "add", f"{address}/24", "dev", "mh0")
        sh("ip", "-n", ns, "link", "set", "mh0", "mtu", str(mtu), "up")
    return created


def delete_namespaces(names: Sequence[str]) -> None:
    for ns in reversed(names):
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False, timeout=30)


def sweep_stale() -> None:
    """Delete namespaces of earlier runs whose guardian is gone (a SIGKILLed run)."""
    try:
        listed = sh("ip", "netns", "list")
    except BenchError:
        return
    for line in listed.splitlines():
        name = line.split()[0] if line.split() else ""
        match = re.fullmatch(rf"{PREFIX}(\d+)-\w+", name)
        if match and not Path(f"/proc/{match.group(1)}").exists():
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


def kill_listed(pid_file: Path, work: Path) -> int:
    """SIGKILL every process listed in ``pid_file`` that still runs with ``work`` on its command
    line (so a reused PID is never hit); returns how many were killed."""
    killed = 0
    with contextlib.suppress(OSError):
        for line in pid_file.read_text().split():
            pid = int(line)
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if str(work).encode() in cmdline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                    killed += 1
    return killed


def guardian(args: argparse.Namespace, argv: list[str]) -> int:
    if os.geteuid() != 0:
        print("bench/multihost.py needs root (it creates network namespaces)", file=sys.stderr)
        return 2
    if shutil.which("ip") is None:
        print("bench/multihost.py needs iproute2's ip", file=sys.stderr)
        return 2
    sweep_stale()
    tag = f"{PREFIX}{os.getpid()}"
    work = Path(tempfile.mkdtemp(prefix=f"{tag}-"))
    pid_file = work / "pids"
    created: list[str] = []
    child: subprocess.Popen[bytes] | None = None

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        created = build_network(tag, args.hosts, args.mtu)
        inner = ["ip", "netns", "exec", f"{tag}-c", sys.executable, __file__, *argv,
                 "--inner", "--tag", tag, "--work", str(work)]  # fmt: skip
        child = subprocess.Popen(inner)
        return child.wait(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        print(f"bench/multihost.py: no result within {args.timeout:.0f} s", file=sys.stderr)
        return 1
    except BenchError as exc:
        print(f"bench/multihost.py: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench/multihost.py: interrupted; cleaning up", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        if child is not None and child.poll() is None:
            child.terminate()
            try:
                child.wait(timeout=20)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait(timeout=10)
        kill_listed(pid_file, work)
        delete_namespaces(created)
        shutil.rmtree(work, ignore_errors=True)


# -- the node processes (the child, inside the client namespace) -----------------------------------


@dataclass
class Node:
    index: int
    host: int
    data_dir: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    status: dict[str, Any] = field(default_factory=dict)

    def address(self, plane: str) -> tuple[str, int]:
        host, port = self.status[plane]
        return str(host), int(port)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class Ring:
    """The bench's node processes (launch, kill, restart by PID)."""

    def __init__(self, args: argparse.Namespace, tag: str, work: Path) -> None:
        from tmdht.launch import tmdht_argv  # noqa: PLC0415 (the guardian imports no tmdht)

        self.args = args
        self.tag = tag
        self.work = work
        self.key_file = work / "cluster.key"
        self.key_file.write_text(os.urandom(32).hex() + "\n")
        self.key_file.chmod(0o600)
        self.pid_file = work / "pids"
        self._argv = tmdht_argv
        self.nodes = [
            Node(i, i // args.nodes_per_host, work / f"node-{i}", work / f"node-{i}.log")
            for i in range(args.hosts * args.nodes_per_host)
        ]
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("TMDHT_NODE_")}
        self.env["TMDHT_NODE_SURPLUS_GRACE"] = str(args.grace)
        self.env["TMDHT_NODE_REPLICATION_INTERVAL"] = str(args.interval)

    def _seed(self, node: Node) -> list[str]:
        for other in self.nodes:
            if other is not node and other.running and other.status:
                return ["--seed", "{}:{}".format(*other.address("kademlia"))]
        return []

    def launch(self, nodes: Sequence[Node]) -> None:
        """Start ``nodes`` together and wait (bounded) for every READY line."""
        from tmdht.node.local import read_ready_line  # noqa: PLC0415

        for node in nodes:
            node.data_dir.mkdir(parents=True, exist_ok=True)
            argv = self._argv(
                "node", "run", "--data-dir", node.data_dir, "--host", host_address(node.host),
                "--kademlia-port", "0", "--data-port", "0", "--metrics-port", "0",
                "--replicas", str(self.args.replicas), "--cluster-key-file", self.key_file,
                "--virtual-ids", str(self.args.virtual_ids),
                "--host-label", f"h{node.host}", "--ready-line", *self._seed(node),
            )  # fmt: skip
            with node.log.open("ab") as log:
                node.proc = subprocess.Popen(
                    ["ip", "netns", "exec", host_ns(self.tag, node.host), *argv],
                    stdout=subprocess.PIPE, stderr=log, env=self.env,
                )  # fmt: skip
            with self.pid_file.open("a") as f:
                f.write(f"{node.proc.pid}\n")
        for node in nodes:
            assert node.proc is not None
            node.status = read_ready_line(node.proc, 180, f"node {node.index}", node.log)

    def start(self) -> None:
        self.launch(self.nodes[:1])  # everyone's seed
        self.launch(self.nodes[1:])

    def kill_host(self, host: int) -> list[Node]:
        victims = [n for n in self.nodes if n.host == host]
        for node in victims:
            assert node.proc is not None
            node.proc.send_signal(signal.SIGKILL)
        for node in victims:
            assert node.proc is not None
            node.proc.wait(timeout=30)
            if node.proc.stdout is not None:
                node.proc.stdout.close()
        return victims

    def stop(self) -> None:
        for node in self.nodes:
            if node.running:
                assert node.proc is not None
                node.proc.terminate()
        for node in self.nodes:
            if node.proc is not None:
                try:
                    node.proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    node.proc.kill()
                    node.proc.wait(timeout=10)
                if node.proc.stdout is not None:
                    node.proc.stdout.close()

    def live(self) -> list[Node]:
        return [n for n in self.nodes if n.running]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def known_peers(node: Node) -> int:
    host, port = node.address("metrics")
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    match = re.search(r"^tmdht_known_peers (\S+)$", text, re.MULTILINE)
    return int(float(match.group(1))) if match else -1


# -- the measurements ----------------------------------------------------------------------------


def client(ring: Ring, **options: Any) -> Any:
    from tmdht.client.store import TemplateStoreClient  # noqa: PLC0415

    seeds = [n.address("kademlia") for n in ring.live()[:: ring.args.nodes_per_host]]
    key = ring.key_file.read_text().strip()
    return TemplateStoreClient(seeds, cluster_key=key, replicas=ring.args.replicas,
                               virtual_ids=ring.args.virtual_ids, **options)


async def full_view(store: Any, count: int, limit: float) -> int:
    deadline = time.monotonic() + limit
    while len(store.members) < count and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        await store.refresh()
    return len(store.members)


async def wait_views(ring: Ring, limit: float) -> float:
    """Seconds until every live node knows every other live node (bounded by ``limit``)."""
    started = time.monotonic()
    live = ring.live()
    pending = list(live)
    while pending and time.monotonic() - started < limit:
        counts = await asyncio.gather(
            *(asyncio.to_thread(known_peers, n) for n in pending), return_exceptions=True
        )
        pending = [n for n, c in zip(pending, counts, strict=True) if c != len(live) - 1]
        if pending:
            await asyncio.sleep(0.5)
    if pending:
        raise BenchError(f"{len(pending)} nodes still lack a complete view after {limit:.0f} s")
    return time.monotonic() - started


async def replica_check(ring: Ring, digests: Sequence[bytes], chunk: int = 5000) -> dict[str, Any]:
    """A fresh client's view; every replica of every page asked with HAS. Returns the pages
    short of R held copies and those whose R replicas are not on R distinct hosts."""
    # Sorted, a chunk covers one stretch of the key space: a few replica sets, so each chunk's
    # HAS goes to a few nodes rather than to all of them.
    digests = sorted(digests)
    async with client(ring) as store:
        members = await full_view(store, len(ring.live()), 60)
        host_of = {m.node_id: m.domain.host for m in store.members}
        distinct = min(ring.args.replicas, len(set(host_of.values())))
        short = spread = unknown = 0
        for start in range(0, len(digests), chunk):
            rows = await store.replicas_holding(digests[start : start + chunk])
            for row in rows:
                held = [node for node, has in row if has]
                unknown += sum(1 for _, has in row if has is None)
                short += len(held) < ring.args.replicas
                spread += len({host_of[node] for node, _ in row}) < distinct
    return {"members": members, "short": short, "not_distinct_hosts": spread,
            "unanswered": unknown}  # fmt: skip


async def until_replicated(
    ring: Ring, digests: Sequence[bytes], limit: float, since: float, *, copies: int | None = None
) -> dict[str, Any]:
    """Poll :func:`replica_check` until no page is short (bounded); seconds from ``since``.

    With ``copies``, first poll the live nodes' page counts (cheap: one NODE_INFO each, every
    second) until they hold that many together; ``counted`` is when they did. A check asks
    every replica of every page, so its own duration is part of ``seconds``."""
    started = time.monotonic()
    checks = 0
    counted = None
    if copies is not None:
        _, held = await until_counts(ring, copies, limit, at_least=True, every=1.0)
        counted = round(time.monotonic() - since, 2) if held >= copies else None
    while True:
        result = await replica_check(ring, digests)
        checks += 1
        done = result["short"] == 0 and result["members"] == len(ring.live())
        if done or time.monotonic() - started > limit:
            result.update(seconds=round(time.monotonic() - since, 2), checks=checks,
                          restored=done, counted=counted)  # fmt: skip
            return result
        await asyncio.sleep(2)


async def stored_counts(ring: Ring) -> dict[int, int]:
    """Pages each live node holds (NODE_INFO), by node index."""
    by_port = {n.address("data"): n.index for n in ring.live()}
    async with client(ring) as store:
        await full_view(store, len(ring.live()), 60)
        statuses = await store.cluster_status()
    counts = {}
    for status in statuses:
        index = by_port.get((status.member.host, status.member.data_port))
        if index is not None and status.info is not None:
            counts[index] = status.info.pages_stored
    return counts


async def resolve_all(
    ring: Ring, digests: Sequence[bytes], chunk: int, *, kill_host: int | None = None
) -> dict[str, Any]:
    """Resolve every digest with a fresh client; with ``kill_host``, that host's nodes are
    SIGKILLed once the client's view is complete (its view then still lists them)."""
    async with client(ring) as store:
        await full_view(store, len(ring.live()), 60)
        if kill_host is not None:
            await asyncio.to_thread(ring.kill_host, kill_host)
        started = time.monotonic()
        unresolved = 0
        for start in range(0, len(digests), chunk):
            _found, missing = await store.resolve(digests[start : start + chunk])
            unresolved += len(missing)
        seconds = time.monotonic() - started
        return {"seconds": round(seconds, 2), "pages_per_second": round(len(digests) / seconds),
                "unresolved": unresolved, "failovers": store.stats.failovers,
                "hedges": store.stats.hedges, "timeouts": store.stats.timeouts}  # fmt: skip


async def publish(ring: Ring, pages: int, batch: int) -> tuple[list[bytes], dict[str, Any]]:
    from publish_scale import random_pages  # noqa: PLC0415 (bench/, beside this script)

    from tmdht.client.errors import PublishFailed  # noqa: PLC0415

    digests: list[bytes] = []
    failed = under = 0
    seconds = 0.0
    async with client(ring) as store:
        await full_view(store, len(ring.nodes), 60)
        for start in range(0, pages, batch):
            chunk = random_pages(min(batch, pages - start))
            digests += [d for d, _ in chunk]
            t = time.monotonic()
            try:
                summary = await store.put_many(chunk)
                under += len(summary.under_replicated)
            except PublishFailed as exc:
                failed += len(exc.digests)
            seconds += time.monotonic() - t
        stats = store.stats
    return digests, {"pages": pages, "batch": batch, "seconds": round(seconds, 2),
                     "pages_per_second": round(pages / seconds), "failed": failed,
                     "under_replicated": under, "retries": stats.retries,
                     "timeouts": stats.timeouts}  # fmt: skip


async def until_counts(
    ring: Ring, total: int, limit: float, *, at_least: bool = False, every: float = 2.0
) -> tuple[float, int]:
    """Seconds until the live nodes hold ``total`` pages together (``at_least``: or more),
    and how many they held last (bounded by ``limit``)."""
    started = time.monotonic()
    held = -1
    while time.monotonic() - started < limit:
        held = sum((await stored_counts(ring)).values())
        if held == total or (at_least and held > total):
            break
        await asyncio.sleep(every)
    return time.monotonic() - started, held


async def measure(ring: Ring, args: argparse.Namespace) -> dict[str, Any]:
    report: dict[str, Any] = {}
    t0 = time.monotonic()
    await asyncio.to_thread(ring.start)
    report["start_seconds"] = round(time.monotonic() - t0, 2)
    report["view_seconds"] = round(await wait_views(ring, args.phase_limit), 2)
    pids = {n.index: n.proc.pid for n in ring.nodes if n.proc is not None}
    cpu0 = {i: cpu_seconds(p) for i, p in pids.items()}
    t = time.monotonic()
    await asyncio.sleep(args.idle)
    wall = time.monotonic() - t
    idle = {i: (cpu_seconds(p) - cpu0[i]) / wall for i, p in pids.items()}
    rss = {i: rss_mib(p) for i, p in pids.items()}
    report["idle"] = {
        "seconds": round(wall, 1),
        "cpu_share_per_node_median": round(statistics.median(idle.values()), 5),
        "cpu_share_per_node_max": round(max(idle.values()), 5),
        "cpu_share_all_nodes": round(sum(idle.values()), 4),
        "rss_mib_median": round(statistics.median(rss.values()), 1),
        "rss_mib_max": round(max(rss.values()), 1),
    }
    print(f"ring up: {len(ring.nodes)} nodes, views complete {report['view_seconds']} s",
          file=sys.stderr)  # fmt: skip

    digests, report["publish"] = await publish(ring, args.pages, args.batch)
    print(f"published: {report['publish']}", file=sys.stderr)
    counts = await stored_counts(ring)
    mean = sum(counts.values()) / len(ring.nodes)
    report["pages_per_node"] = {
        "max": max(counts.values()), "min": min(counts.values()), "mean": round(mean, 1),
        "max_over_mean": round(max(counts.values()) / mean, 3),
        "total": sum(counts.values()), "answered": len(counts),
    }  # fmt: skip
    report["placement"] = await replica_check(ring, digests)
    report["resolve"] = await resolve_all(ring, digests, args.batch)
    print(f"resolved: {report['resolve']}", file=sys.stderr)

    victim = args.kill_host
    killed = [n for n in ring.nodes if n.host == victim]
    t_kill = time.monotonic()
    report["kill"] = {"host": victim, "nodes": len(killed)}
    report["kill"]["resolve"] = await resolve_all(ring, digests, args.batch, kill_host=victim)
    print(f"host {victim} killed; resolve: {report['kill']['resolve']}", file=sys.stderr)
    copies = args.replicas * len(digests)
    replicated = await until_replicated(ring, digests, args.phase_limit, t_kill, copies=copies)
    report["kill"]["replicated"] = replicated
    print(f"after the kill: {replicated}", file=sys.stderr)

    t_restart = time.monotonic()
    await asyncio.to_thread(ring.launch, killed)
    report["restart"] = {"ready_seconds": round(time.monotonic() - t_restart, 2)}
    report["restart"]["view_seconds"] = round(await wait_views(ring, args.phase_limit), 2)
    # The survivors' copies made while the host was down are surplus now: counted (cheaply)
    # until they are dropped, then the full check that every page is on its R replicas.
    surplus_before = sum((await stored_counts(ring)).values()) - copies
    _, held = await until_counts(
        ring, copies, args.grace + 4 * args.interval + args.phase_limit, every=1.0
    )
    report["restart"]["surplus_copies_before"] = surplus_before
    report["restart"]["surplus_copies_after"] = held - copies
    report["restart"]["surplus_dropped_seconds_since_restart"] = round(
        time.monotonic() - t_restart, 2
    )
    rebalanced = await until_replicated(ring, digests, args.phase_limit, t_restart)
    report["restart"]["rebalanced"] = rebalanced
    print(f"after the restart: {report['restart']}", file=sys.stderr)
    return report


def verdicts(report: dict[str, Any], args: argparse.Namespace) -> dict[str, bool]:
    return {
        "publish: 0 failed": report["publish"]["failed"] == 0,
        "placement: R distinct hosts per page": report["placement"]["not_distinct_hosts"] == 0,
        "resolve: 0 unresolved": report["resolve"]["unresolved"] == 0,
        "host killed: 0 unresolvable": report["kill"]["resolve"]["unresolved"] == 0,
        "host killed: R copies restored": report["kill"]["replicated"]["restored"],
        "restart: rebalanced": report["restart"]["rebalanced"]["restored"],
        "restart: surplus dropped": report["restart"]["surplus_copies_after"] == 0,
    }


def _secs(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def print_table(report: dict[str, Any], args: argparse.Namespace) -> None:
    idle, pub, per = report["idle"], report["publish"], report["pages_per_node"]
    kill, restart = report["kill"], report["restart"]
    rows = [
        ("nodes / hosts", f"{args.hosts * args.nodes_per_host} / {args.hosts} (+1 client ns), "
                          f"R={args.replicas}, V={args.virtual_ids}"),
        ("start, all READY", f"{report['start_seconds']:.1f} s"),
        ("views complete after READY", f"{report['view_seconds']:.1f} s"),
        ("RSS per node (median / max)", f"{idle['rss_mib_median']:.0f} / "
                                        f"{idle['rss_mib_max']:.0f} MiB"),
        ("idle CPU per node (median / max)", f"{idle['cpu_share_per_node_median']:.2%} / "
                                             f"{idle['cpu_share_per_node_max']:.2%} of a core"),
        (f"publish {pub['pages']:,} pages (R={args.replicas})",
         f"{pub['pages_per_second']:,} pages/s, {pub['failed']} failed, "
         f"{pub['under_replicated']} under-R"),
        ("pages per node (max / mean)", f"{per['max']:,} / {per['mean']:,.0f} = "
                                        f"{per['max_over_mean']:.2f}"),
        ("pages not on R distinct hosts", f"{report['placement']['not_distinct_hosts']}"),
        ("resolve all from client ns", f"{report['resolve']['pages_per_second']:,} pages/s, "
                                       f"{report['resolve']['unresolved']} unresolved"),
        (f"SIGKILL host {kill['host']} ({kill['nodes']} nodes): resolve all",
         f"{kill['resolve']['pages_per_second']:,} pages/s, "
         f"{kill['resolve']['unresolved']} unresolved"),
        ("  R copies again: counts / checked", f"{_secs(kill['replicated']['counted'])} / "
         f"{kill['replicated']['seconds']:.1f} s after the kill "
         f"({'yes' if kill['replicated']['restored'] else 'NO'})"),
        ("restart host: READY / views", f"{restart['ready_seconds']:.1f} / "
                                        f"{restart['view_seconds']:.1f} s"),
        ("  every page on its R replicas (checked)", f"{restart['rebalanced']['seconds']:.1f} s "
                               f"({'yes' if restart['rebalanced']['restored'] else 'NO'})"),
        (f"  surplus dropped after (grace {args.grace:g} s)",
         f"{restart['surplus_dropped_seconds_since_restart']:.1f} s "
         f"({restart['surplus_copies_before']:,} -> {restart['surplus_copies_after']:,} copies)"),
    ]  # fmt: skip
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    for name, ok in report["verdicts"].items():
        print(f"{'ok  ' if ok else 'FAIL'} {name}")


def inner(args: argparse.Namespace) -> int:
    work = Path(args.work)
    ring = Ring(args, args.tag, work)

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    load_before = os.getloadavg()
    try:
        report = asyncio.run(measure(ring, args))
    finally:
        ring.stop()
    report["verdicts"] = verdicts(report, args)
    report["conditions"] = {
        "machine": {"cores": os.cpu_count(), "platform": platform.platform(), "shared": True},
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "surplus_grace_seconds": args.grace, "replication_interval_seconds": args.interval,
        "mtu": args.mtu, "network": f"{NET}.0/24 on a bridge in its own namespace",
    }  # fmt: skip
    report["args"] = {k: v for k, v in vars(args).items() if k not in ("inner", "tag", "work")}
    print_table(report, args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    if args.check and not all(report["verdicts"].values()):
        return 1
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hosts", type=int, default=8)
    parser.add_argument("--nodes-per-host", type=int, default=4)
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--virtual-ids", type=int, default=VIRTUAL_IDS,
                        help="placement tokens per node, nodes and client alike")
    parser.add_argument("--pages", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=20_000)
    parser.add_argument("--idle", type=float, default=10.0, help="seconds of idle CPU sampling")
    parser.add_argument("--grace", type=float, default=30.0, help="the nodes' surplus_grace")
    parser.add_argument("--interval", type=float, default=10.0,
                        help="the nodes' replication_interval")  # fmt: skip
    parser.add_argument("--kill-host", type=int, default=1)
    parser.add_argument("--mtu", type=int, default=9000, help="of the veths and the bridge")
    parser.add_argument("--phase-limit", type=float, default=300.0,
                        help="seconds any one wait may take")  # fmt: skip
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds for the whole run")
    parser.add_argument("--check", action="store_true", help="exit 1 if a target failed")
    parser.add_argument("--out", default="bench/results/multihost.json")
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tag", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    argv = sys.argv[1:]
    args = parser.parse_args(argv)
    if args.hosts < 2 or not 0 <= args.kill_host < args.hosts:
        parser.error("need --hosts >= 2 and 0 <= --kill-host < --hosts")
    if args.hosts > 200:
        parser.error("at most 200 hosts (one /24)")
    if args.inner:
        return inner(args)
    args.out = str(Path(args.out).resolve())
    argv = [*argv, "--out", args.out]  # the child runs elsewhere: an absolute path (last wins)
    return guardian(args, argv)


if __name__ == "__main__":
    sys.exit(main())
