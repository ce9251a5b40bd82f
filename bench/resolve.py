"""Resolve and publish template pages through a local cluster, against Redis and the kademlia package.

    python bench/resolve.py [--pages 100000] [--nodes 4] [--replicas 3] [--batch 1024] [--max-datagram N]
                            [--repeat 3] [--latency-samples 2000] [--seconds 90]
                            [--out bench/results/resolve.json] [--plot bench/results/resolve.png]

One run, the same distinct random 4 KiB pages for every system, all on loopback:

- tmdht: a LocalCluster of --nodes real node processes (R = --replicas, uvloop, keyed auth) and
  one TemplateStoreClient in this process on uvloop (verification is always on). put_many of
  every page (publish), then get_many of every page in batches of --batch (best of --repeat
  passes, each checked byte for byte), then sequential get_many of one digest (latency), then
  one more pass during which node --kill-node is SIGKILLed half way: its throughput against
  the healthy passes, and every page must still come back identical.
- Redis: a redis-server child process this script starts on a free port (no persistence),
  redis-py with hiredis; MSET of the same pages in batches of --redis-batch (publish), MGET in
  batches of --redis-batch (best of --repeat), sequential GET (latency). An extra line times
  MGET plus a BLAKE3 check of every page, to show what verification alone costs.
- kademlia (bmuller/kademlia, the package's own Server): --nodes servers in a child process
  hold --kademlia-sample of the pages (4 KiB values fit rpcudp's 8 KiB datagram cap); a fresh
  client Server here times Server.get per page, one at a time and --kademlia-concurrency at
  once, bounded by --kademlia-seconds; the better figure is the baseline. The client Server
  keeps no values (a no-op storage), else kademlia would push every key to it on first
  contact and get() would answer from its own memory.

The client's and the nodes' data path is native (tmdht._native: PAGES bursts decoded and
verified in one call, answers sealed natively) where built; TMDHT_NATIVE=0 runs the pure-Python
reference for comparison ("data_path" in the JSON says which ran).

Every loop is bounded by a count and by --seconds. CPU seconds per page of this process, the
node processes and redis-server are recorded next to wall-clock figures: on a 2-core machine
shared with other work the wall-clock figures move with the load, CPU per page much less (the
load average is recorded too). Missing baselines are installed first (apt redis-server, pip
redis hiredis matplotlib) unless --no-install.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import importlib.util
import json
import logging
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tmdht.node.local import LocalCluster, read_ready_line
from tmdht.pages import PAGE_SIZE, digest_page

TARGETS = {
    "resolve_vs_redis": 1.0,
    "resolve_vs_kademlia": 100.0,
    "latency_p50_vs_redis": 1.0,  # tmdht p50 / Redis p50 must be below this
    "failover_vs_healthy": 0.8,
    "failover_pages_lost": 0,
}
CLK_TCK = os.sysconf("SC_CLK_TCK")


def say(text: str) -> None:
    print(text, flush=True)


# -- pages ----------------------------------------------------------------------------------------


def make_pages(count: int, seed: int) -> list[bytes]:
    """``count`` random 4 KiB pages; the first k are the same for any count >= k."""
    rng = random.Random(seed)
    return [rng.randbytes(PAGE_SIZE) for _ in range(count)]


def chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return float("nan")
    rank = max(1, min(len(sorted_values), round(q / 100 * len(sorted_values) + 0.5)))
    return sorted_values[rank - 1]


# -- processes and CPU ----------------------------------------------------------------------------


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system, all threads) a live process has used."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


class CpuMeter:
    """CPU seconds used by this process and some others over a phase."""

    def __init__(self, pids: Callable[[], Sequence[int]] = list) -> None:
        self._pids = pids
        self._start: dict[int, float] = {}
        self._self = 0.0

    def start(self) -> None:
        self._self = time.process_time()
        self._start = {pid: process_cpu(pid) for pid in self._pids()}

    def stop(self) -> tuple[float, float]:
        """(this process, the others) CPU seconds since start()."""
        others = sum(max(0.0, process_cpu(pid) - t) for pid, t in self._start.items())
        return time.process_time() - self._self, others


def socket_drops(ports: Sequence[int]) -> int:
    """Datagrams the kernel dropped (receive buffer full) on the UDP sockets bound to ``ports``."""
    wanted = {f"{port:04X}" for port in ports}
    drops = 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/net/udp").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[1].rsplit(":", 1)[1] in wanted:
                drops += int(fields[-1])
    return drops


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """End a child this script started, by PID: SIGTERM, a bounded wait, then SIGKILL."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


# -- baselines: install what is missing -----------------------------------------------------------


def _run(cmd: list[str], what: str) -> None:
    say(f"[setup] {what}: {' '.join(cmd)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    done = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False)
    if done.returncode != 0:
        tail = "\n".join(done.stdout.splitlines()[-15:])
        raise SystemExit(f"[setup] {what} failed (exit {done.returncode}):\n{tail}")


def redis_server_path() -> str | None:
    return shutil.which("redis-server") or next(
        (p for p in ("/usr/bin/redis-server", "/usr/sbin/redis-server") if os.access(p, os.X_OK)), None
    )


def ensure_baselines(install: bool) -> dict[str, Any]:
    """Make sure redis-server, redis-py + hiredis and matplotlib are there; returns what was done."""
    done: dict[str, Any] = {"installed": []}
    wanted = {"redis": "redis", "hiredis": "hiredis", "matplotlib": "matplotlib"}
    missing = [pkg for module, pkg in wanted.items() if importlib.util.find_spec(module) is None]
    if missing:
        if not install:
            raise SystemExit(f"missing Python packages {missing} (run without --no-install to install them)")
        _run([sys.executable, "-m", "pip", "install", "--quiet", *missing], f"installing {', '.join(missing)} with pip")
        importlib.invalidate_caches()
        done["installed"] += missing
    if redis_server_path() is None:
        if not install:
            raise SystemExit("redis-server is missing (run without --no-install, or apt-get install redis-server)")
        if os.geteuid() != 0:
            raise SystemExit("redis-server is missing and installing it needs root: apt-get install redis-server")
        policy = subprocess.run(["apt-cache", "policy", "redis-server"], capture_output=True, text=True, check=False)
        if "Candidate:" not in policy.stdout or "Candidate: (none)" in policy.stdout:
            _run(["apt-get", "-o", "DPkg::Lock::Timeout=300", "update"], "refreshing the apt package lists (redis-server has no candidate yet)")
        _run(["apt-get", "-o", "DPkg::Lock::Timeout=300", "install", "-y", "--no-install-recommends", "redis-server"], "installing redis-server with apt")
        done["installed"].append("redis-server (apt)")
        if redis_server_path() is None:
            raise SystemExit("redis-server still not found after apt-get install")
    version = subprocess.run([redis_server_path() or "redis-server", "--version"], capture_output=True, text=True, check=False)
    done["redis_server"] = version.stdout.strip()
    return done


# -- Redis ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def redis_server(root: Path) -> Iterator[tuple[int, int]]:
    """A redis-server child on a free loopback port, no persistence; yields (port, pid)."""
    import redis  # noqa: PLC0415 - installed by ensure_baselines

    port = free_port()
    path = redis_server_path()
    assert path is not None
    args = [
        path, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
        "--daemonize", "no", "--dir", str(root), "--loglevel", "warning", "--logfile", "",
    ]  # fmt: skip
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = redis.Redis(host="127.0.0.1", port=port)
        deadline = time.monotonic() + 15
        for _ in range(1500):
            if proc.poll() is not None:
                raise SystemExit(f"redis-server exited with code {proc.returncode} at start")
            with contextlib.suppress(redis.ConnectionError):
                if client.ping():
                    break
            if time.monotonic() > deadline:
                raise SystemExit("redis-server did not answer PING within 15 s")
            time.sleep(0.01)  # poll interval while another process starts
        client.close()
        yield port, proc.pid
    finally:
        stop_process(proc)


def measure_redis(root: Path, pages: list[bytes], digests: list[bytes], args: argparse.Namespace) -> dict[str, Any]:
    import redis  # noqa: PLC0415
    from blake3 import blake3  # noqa: PLC0415

    out: dict[str, Any] = {"batch": args.redis_batch}
    with redis_server(root) as (port, pid):
        r = redis.Redis(host="127.0.0.1", port=port)
        out["hiredis"] = bool(getattr(importlib.import_module("redis.utils"), "HIREDIS_AVAILABLE", False))
        cpu = CpuMeter(lambda: [pid])
        keys = digests
        # Publish: MSET of every page, --redis-batch pages per command.
        cpu.start()
        started = time.perf_counter()
        published = 0
        for ks, ps in zip(chunks(keys, args.redis_batch), chunks(pages, args.redis_batch), strict=True):
            r.mset(dict(zip(ks, ps, strict=True)))
            published += len(ks)
            if time.perf_counter() - started > args.seconds:
                break
        seconds = time.perf_counter() - started
        mine, server = cpu.stop()
        out["publish"] = {"pages": published, "seconds": seconds, "pages_per_s": published / seconds,
                          "client_cpu_us_per_page": mine / published * 1e6, "server_cpu_us_per_page": server / published * 1e6}
        keys, expected = keys[:published], pages[:published]
        # Resolve: MGET in batches (a short warm-up first), best of --repeat passes.
        for ks in chunks(keys[: max(1, len(keys) // 10)], args.redis_batch):
            r.mget(ks)
        passes = []
        for _ in range(args.repeat):
            cpu.start()
            started = time.perf_counter()
            fetched = 0
            for ks in chunks(keys, args.redis_batch):
                fetched += len(r.mget(ks))
                if time.perf_counter() - started > args.seconds:
                    break
            seconds = time.perf_counter() - started
            mine, server = cpu.stop()
            passes.append({"pages": fetched, "seconds": seconds, "pages_per_s": fetched / seconds,
                           "client_cpu_us_per_page": mine / fetched * 1e6, "server_cpu_us_per_page": server / fetched * 1e6})
        out["resolve_passes"] = passes
        out["resolve"] = max(passes, key=lambda p: p["pages_per_s"])
        # The same with a BLAKE3 check of every page, as tmdht's client does (information only).
        started = time.perf_counter()
        fetched = bad = 0
        for ks in chunks(keys, args.redis_batch):
            for k, v in zip(ks, r.mget(ks), strict=True):
                bad += v is None or blake3(v).digest() != k
            fetched += len(ks)
            if time.perf_counter() - started > args.seconds:
                break
        seconds = time.perf_counter() - started
        out["resolve_verified"] = {"pages": fetched, "seconds": seconds, "pages_per_s": fetched / seconds, "bad": bad}
        # Every page back, byte for byte (outside the timings).
        lost = 0
        for ks, ps in zip(chunks(keys, args.redis_batch), chunks(expected, args.redis_batch), strict=True):
            lost += sum(a != b for a, b in zip(r.mget(ks), ps, strict=True))
        out["pages_lost"] = lost
        # Latency: sequential single GETs of distinct keys after a warm-up.
        for k in keys[:200]:
            r.get(k)
        samples = []
        deadline = time.perf_counter() + args.seconds
        for k in keys[200 : 200 + args.latency_samples]:
            t = time.perf_counter()
            r.get(k)
            samples.append(time.perf_counter() - t)
            if time.perf_counter() > deadline:
                break
        out["latency"] = latency_summary(samples)
        r.close()
    return out


def latency_summary(samples: list[float]) -> dict[str, Any]:
    s = sorted(samples)
    return {"samples": len(s), "p50_us": percentile(s, 50) * 1e6, "p90_us": percentile(s, 90) * 1e6,
            "p99_us": percentile(s, 99) * 1e6, "max_us": s[-1] * 1e6 if s else float("nan"),
            "mean_us": statistics.fmean(s) * 1e6 if s else float("nan")}


# -- kademlia (the package) -----------------------------------------------------------------------


def _quiet_kademlia() -> None:
    for name in ("kademlia", "rpcudp"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


async def _kademlia_host(count: int, sample: int, seed: int, lifetime: float) -> None:
    """Child process: ``count`` kademlia Servers on loopback holding ``sample`` pages."""
    from kademlia.network import Server  # noqa: PLC0415

    _quiet_kademlia()
    servers = []
    for _ in range(count):
        server = Server()
        await server.listen(0, "127.0.0.1")
        servers.append(server)
    ports = [s.protocol.transport.get_extra_info("sockname")[1] for s in servers]
    for server in servers[1:]:
        await server.bootstrap([("127.0.0.1", ports[0])])
    pages = make_pages(sample, seed)
    started = time.perf_counter()
    stored = failed = 0
    errors: dict[str, int] = {}
    for i, page in enumerate(pages):
        try:
            ok = await servers[i % count].set(digest_page(page).hex(), page)
        except Exception as exc:  # noqa: BLE001 - report exactly what the package raised
            name = f"{type(exc).__name__}: {exc}"
            errors[name] = errors.get(name, 0) + 1
            ok = False
        stored += bool(ok)
        failed += not ok
    doc = {"ports": ports, "stored": stored, "failed": failed, "errors": errors,
           "set_seconds": time.perf_counter() - started}
    print("READY " + json.dumps(doc), flush=True)
    await asyncio.sleep(lifetime)  # until the parent stops this process (bounded)


class _NoStorage:
    """A storage that keeps nothing: the resolving Server is a client, not a replica."""

    def __setitem__(self, key: bytes, value: Any) -> None:
        pass

    def __getitem__(self, key: bytes) -> Any:
        raise KeyError(key)

    def get(self, key: bytes, default: Any = None) -> Any:
        return default

    def iter_older_than(self, seconds_old: float) -> Iterator[Any]:
        return iter(())

    def __iter__(self) -> Iterator[Any]:
        return iter(())


async def _kademlia_gets(ports: list[int], pages: list[bytes], args: argparse.Namespace) -> dict[str, Any]:
    from kademlia.network import Server  # noqa: PLC0415
    from kademlia.storage import IStorage  # noqa: PLC0415

    _quiet_kademlia()
    IStorage.register(_NoStorage)
    client = Server(storage=_NoStorage())
    await client.listen(0, "127.0.0.1")
    port = client.protocol.transport.get_extra_info("sockname")[1]
    try:
        await client.bootstrap([("127.0.0.1", p) for p in ports])
        keys = [digest_page(p).hex() for p in pages]
        out: dict[str, Any] = {}
        # One get at a time.
        started = time.perf_counter()
        good = bad = 0
        samples = []
        for key, page in zip(keys, pages, strict=True):
            t = time.perf_counter()
            value = await client.get(key)
            samples.append(time.perf_counter() - t)
            good += value == page
            bad += value != page
            if time.perf_counter() - started > args.kademlia_seconds:
                break
        seconds = time.perf_counter() - started
        out["sequential"] = {"gets": good + bad, "correct": good, "wrong_or_missing": bad, "seconds": seconds,
                             "pages_per_s": (good + bad) / seconds, "latency": latency_summary(samples)}
        # Several gets in flight (the package's best case on one event loop).
        window = asyncio.Semaphore(args.kademlia_concurrency)
        deadline = time.perf_counter() + args.kademlia_seconds
        results: list[bool] = []

        async def one(key: str, page: bytes) -> None:
            async with window:
                if time.perf_counter() > deadline:
                    return
                results.append(await client.get(key) == page)

        started = time.perf_counter()
        drops = socket_drops([port])
        await asyncio.wait_for(asyncio.gather(*(one(k, p) for k, p in zip(keys, pages, strict=True))),
                               args.kademlia_seconds + 30)
        seconds = time.perf_counter() - started
        out["concurrent"] = {"in_flight": args.kademlia_concurrency, "gets": len(results), "correct": sum(results),
                             "client_socket_drops": socket_drops([port]) - drops,
                             "wrong_or_missing": len(results) - sum(results), "seconds": seconds,
                             "pages_per_s": len(results) / seconds}
        return out
    finally:
        client.stop()


def measure_kademlia(pages: list[bytes], args: argparse.Namespace) -> dict[str, Any]:
    import uvloop  # noqa: PLC0415

    sample = min(args.kademlia_sample, len(pages))
    cmd = [sys.executable, __file__, "--serve-kademlia", "--nodes", str(args.nodes), "--kademlia-sample", str(sample),
           "--seed", str(args.seed), "--seconds", str(args.seconds)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE)
    try:
        ready = read_ready_line(proc, 60 + args.kademlia_seconds, "kademlia servers")
        out: dict[str, Any] = {"servers": args.nodes, "sample": sample, "set": {k: v for k, v in ready.items() if k != "ports"}}
        out["set"]["pages_per_s"] = sample / ready["set_seconds"] if ready["set_seconds"] else None
        out.update(uvloop.run(_kademlia_gets(ready["ports"], pages[:sample], args)))
    finally:
        stop_process(proc)
        if proc.stdout is not None:
            proc.stdout.close()
    best = max(("sequential", "concurrent"), key=lambda k: out[k]["pages_per_s"])
    out["best"] = best
    out["resolve"] = {"pages_per_s": out[best]["pages_per_s"]}
    return out


# -- tmdht ----------------------------------------------------------------------------------------


@dataclass
class Pass:
    pages: int = 0
    seconds: float = 0.0
    lost: int = 0
    batch_seconds: list[float] = field(default_factory=list)


async def _resolve_pass(store: Any, digests: list[bytes], pages: list[bytes], batch: int, budget: float,
                        on_half: Callable[[], None] | None = None) -> Pass:
    """get_many over ``digests`` in batches; time only the calls; check every page's bytes."""
    from tmdht.client.store import PagesUnavailable  # noqa: PLC0415

    result = Pass()
    half = len(digests) // 2
    started = time.perf_counter()
    for start in range(0, len(digests), batch):
        if on_half is not None and start >= half:
            on_half()
            on_half = None
        ds, expected = digests[start : start + batch], pages[start : start + batch]
        t = time.perf_counter()
        try:
            got = await store.get_many(ds)
        except PagesUnavailable as exc:
            elapsed = time.perf_counter() - t
            found, _ = await store.resolve(ds)  # what did come back (not timed)
            got = [found.get(d) for d in ds]
            del exc
        else:
            elapsed = time.perf_counter() - t
        result.batch_seconds.append(elapsed)
        result.seconds += elapsed
        result.pages += len(ds)
        result.lost += sum(a != b for a, b in zip(got, expected, strict=True))
        if time.perf_counter() - started > budget:
            break
    return result


def _pass_doc(p: Pass, cpu: tuple[float, float]) -> dict[str, Any]:
    return {"pages": p.pages, "seconds": p.seconds, "pages_per_s": p.pages / p.seconds if p.seconds else 0.0,
            "pages_lost": p.lost, "slowest_batch_ms": max(p.batch_seconds, default=0) * 1e3,
            "client_cpu_us_per_page": cpu[0] / max(1, p.pages) * 1e6, "nodes_cpu_us_per_page": cpu[1] / max(1, p.pages) * 1e6}


def _wait_quiet(cluster: LocalCluster, limit: float) -> float:
    """Wait (bounded) until the nodes use under 5% CPU each; returns the seconds waited."""
    started = time.monotonic()
    for _ in range(int(limit / 0.5) + 1):
        pids = [n.pid for n in cluster.nodes if n.running]
        before = {p: process_cpu(p) for p in pids}
        time.sleep(0.5)  # a sampling interval of other processes' CPU use
        busy = max((process_cpu(p) - t for p, t in before.items()), default=0.0) / 0.5
        if busy < 0.05 or time.monotonic() - started > limit:
            break
    return time.monotonic() - started


def _client_counters(store: Any) -> dict[str, float]:
    s = store.stats
    return {"retries": s.retries, "timeouts": s.timeouts, "datagrams_received": s.datagrams_received,
            "unexpected": s.unexpected, "verification_failures": s.verification_failures,
            "hedges": s.hedges, "failovers": s.failovers, "batches": s.batches}


async def _measure_tmdht(cluster: LocalCluster, pages: list[bytes], digests: list[bytes], args: argparse.Namespace) -> dict[str, Any]:
    from tmdht.client.store import TemplateStoreClient  # noqa: PLC0415

    out: dict[str, Any] = {}
    key = cluster.key_file.read_text().strip()
    kw: dict[str, Any] = {"cluster_key": key, "replicas": args.replicas}
    if args.window:
        kw["window"] = args.window
    if args.max_datagram:
        kw["max_datagram"] = args.max_datagram
    async with TemplateStoreClient([cluster.seed], **kw) as store:
        out["client"] = {"window": store.window, "timeout": store.timeout, "hedge_after": store.hedge_after,
                         "max_datagram": store.max_datagram, "get_batch_digests": store._dataplane.get_batch_size(),
                         "socket_buffers": [store._dataplane.buffers.receive, store._dataplane.buffers.send], "members": len(store.members)}
        cpu = CpuMeter(lambda: [n.pid for n in cluster.nodes if n.running])
        ports = [store._dataplane.address[1]]
        node_ports = [n.address("data")[1] for n in cluster.nodes]
        # Publish: put_many of every page, R replica writes each.
        drops = socket_drops(ports), socket_drops(node_ports)
        cpu.start()
        started = time.perf_counter()
        published = stored = present = 0
        under: set[bytes] = set()
        for ds, ps in zip(chunks(digests, args.put_batch), chunks(pages, args.put_batch), strict=True):
            summary = await store.put_many(list(zip(ds, ps, strict=True)))
            published += len(ds)
            stored += summary.stored
            present += summary.present
            under |= summary.under_replicated
            if time.perf_counter() - started > args.seconds:
                break
        seconds = time.perf_counter() - started
        mine, nodes = cpu.stop()
        out["publish"] = {"pages": published, "replica_writes": stored + present, "stored": stored, "present": present,
                          "under_replicated": len(under), "seconds": seconds, "pages_per_s": published / seconds,
                          "replica_writes_per_s": (stored + present) / seconds,
                          "client_cpu_us_per_page": mine / published * 1e6, "nodes_cpu_us_per_page": nodes / published * 1e6,
                          "client_socket_drops": socket_drops(ports) - drops[0], "node_socket_drops": socket_drops(node_ports) - drops[1]}
        digests, pages = digests[:published], pages[:published]
        out["settle_seconds"] = _wait_quiet(cluster, 10)
        # What the nodes burn with no client traffic (replication sweeps, ring upkeep), so the
        # CPU per resolved page can be told apart from background work.
        cpu.start()
        await asyncio.sleep(args.idle_seconds)
        idle_cores = cpu.stop()[1] / args.idle_seconds
        out["nodes_idle_cores"] = idle_cores
        # Resolve: warm-up, then best of --repeat passes.
        warm = max(1, len(digests) // 10)
        await _resolve_pass(store, digests[:warm], pages[:warm], args.batch, args.seconds)
        counters = _client_counters(store)
        drops = socket_drops(ports), socket_drops(node_ports)
        passes = []
        for _ in range(args.repeat):
            cpu.start()
            wall = time.perf_counter()
            p = await _resolve_pass(store, digests, pages, args.batch, args.seconds)
            doc = _pass_doc(p, cpu.stop())
            doc["nodes_cpu_us_per_page_less_idle"] = max(
                0.0, doc["nodes_cpu_us_per_page"] - idle_cores * (time.perf_counter() - wall) / max(1, p.pages) * 1e6
            )
            doc["load_average_1min"] = os.getloadavg()[0]
            passes.append(doc)
        out["resolve_passes"] = passes
        out["resolve"] = max(passes, key=lambda p: p["pages_per_s"])
        out["resolve_counters"] = {k: v - counters.get(k, 0) for k, v in _client_counters(store).items()}
        out["resolve_counters"]["client_socket_drops"] = socket_drops(ports) - drops[0]
        out["resolve_counters"]["node_socket_drops"] = socket_drops(node_ports) - drops[1]
        # Latency: sequential get_many of one digest, distinct digests, after a warm-up.
        for d in digests[:200]:
            await store.get_many([d])
        samples = []
        cpu.start()
        deadline = time.perf_counter() + args.seconds
        for d in digests[200 : 200 + args.latency_samples]:
            t = time.perf_counter()
            await store.get_many([d])
            samples.append(time.perf_counter() - t)
            if time.perf_counter() > deadline:
                break
        mine, nodes = cpu.stop()
        out["latency"] = latency_summary(samples)
        out["latency"]["client_cpu_us_per_get"] = mine / len(samples) * 1e6
        out["latency"]["nodes_cpu_us_per_get"] = nodes / len(samples) * 1e6
        out["latency"]["nodes_cpu_us_per_get_less_idle"] = max(0.0, (nodes - idle_cores * sum(samples)) / len(samples) * 1e6)
        # Failover: the same pass, one node SIGKILLed when half the batches are done.
        victim = args.kill_node % len(cluster.nodes)
        killed_at: list[float] = []

        def kill() -> None:
            cluster.kill_node(victim)
            killed_at.append(time.perf_counter())

        counters = _client_counters(store)
        drops = socket_drops(ports), socket_drops(node_ports)
        cpu.start()
        p = await _resolve_pass(store, digests, pages, args.batch, args.seconds, on_half=kill)
        doc = _pass_doc(p, cpu.stop())
        doc["client_socket_drops"] = socket_drops(ports) - drops[0]
        if killed_at:
            n_before = (len(digests) // 2 + args.batch - 1) // args.batch
            after = p.batch_seconds[n_before:]
            doc["killed_node"] = victim
            doc["after_kill"] = {"pages": p.pages - min(p.pages, n_before * args.batch), "seconds": sum(after),
                                 "pages_per_s": (p.pages - min(p.pages, n_before * args.batch)) / sum(after) if after else 0.0,
                                 "slowest_batch_ms": max(after, default=0) * 1e3}
        doc["counters"] = {k: v - counters.get(k, 0) for k, v in _client_counters(store).items()}
        doc["members_after"] = len(store.members)
        healthy = [q["pages_per_s"] for q in passes]
        doc["healthy_median_pages_per_s"] = statistics.median(healthy)
        out["failover"] = doc
    return out


def measure_tmdht(pages: list[bytes], digests: list[bytes], args: argparse.Namespace) -> dict[str, Any]:
    import uvloop  # noqa: PLC0415

    node_args = ["--log-level", "warning", "--log-format", "text", "--capacity", args.capacity, *args.node_arg]
    if args.max_datagram:
        node_args += ["--max-datagram", str(args.max_datagram)]
    with tempfile.TemporaryDirectory(prefix="tmdht-bench-resolve-") as tmp, \
            LocalCluster(Path(tmp), args.nodes, replicas=args.replicas, extra_args=node_args) as cluster:
        out = uvloop.run(_measure_tmdht(cluster, pages, digests, args))
        out["node_args"] = node_args
        out["nodes"] = args.nodes
        out["replicas"] = args.replicas
        out["batch"] = args.batch
    return out


# -- report ---------------------------------------------------------------------------------------


def rows(doc: dict[str, Any]) -> list[dict[str, Any]]:
    t, r, k = doc["tmdht"], doc["redis"], doc["kademlia"]
    f = t["failover"]
    tmdht_cpu = t["resolve"]["client_cpu_us_per_page"] + t["resolve"]["nodes_cpu_us_per_page_less_idle"]
    redis_cpu = r["resolve"]["client_cpu_us_per_page"] + r["resolve"]["server_cpu_us_per_page"]
    out = [
        {"figure": f"resolve pages/s (batch {t['batch']} vs MGET {r['batch']})", "tmdht": t["resolve"]["pages_per_s"],
         "baseline": r["resolve"]["pages_per_s"], "baseline_name": "Redis", "target": f">= {TARGETS['resolve_vs_redis']:g}x",
         "ratio": t["resolve"]["pages_per_s"] / r["resolve"]["pages_per_s"], "met": t["resolve"]["pages_per_s"] >= TARGETS["resolve_vs_redis"] * r["resolve"]["pages_per_s"]},
        {"figure": f"resolve pages/s vs kademlia get ({k['best']})", "tmdht": t["resolve"]["pages_per_s"],
         "baseline": k["resolve"]["pages_per_s"], "baseline_name": "kademlia", "target": f">= {TARGETS['resolve_vs_kademlia']:g}x",
         "ratio": t["resolve"]["pages_per_s"] / k["resolve"]["pages_per_s"], "met": t["resolve"]["pages_per_s"] >= TARGETS["resolve_vs_kademlia"] * k["resolve"]["pages_per_s"]},
        {"figure": "1-page resolve p50 (us)", "tmdht": t["latency"]["p50_us"], "baseline": r["latency"]["p50_us"],
         "baseline_name": "Redis GET", "target": "< 1x", "ratio": t["latency"]["p50_us"] / r["latency"]["p50_us"],
         "met": t["latency"]["p50_us"] < r["latency"]["p50_us"]},
        {"figure": "1-page resolve p99 (us)", "tmdht": t["latency"]["p99_us"], "baseline": r["latency"]["p99_us"],
         "baseline_name": "Redis GET", "target": "-", "ratio": t["latency"]["p99_us"] / r["latency"]["p99_us"], "met": None},
        {"figure": f"publish pages/s (R={t['replicas']} vs MSET)", "tmdht": t["publish"]["pages_per_s"],
         "baseline": r["publish"]["pages_per_s"], "baseline_name": "Redis", "target": "-",
         "ratio": t["publish"]["pages_per_s"] / r["publish"]["pages_per_s"], "met": None},
        {"figure": "resolve pages/s, 1 node SIGKILLed", "tmdht": f["pages_per_s"], "baseline": f["healthy_median_pages_per_s"],
         "baseline_name": "tmdht healthy (median)", "target": f">= {TARGETS['failover_vs_healthy']:g}x",
         "ratio": f["pages_per_s"] / f["healthy_median_pages_per_s"], "met": f["pages_per_s"] >= TARGETS["failover_vs_healthy"] * f["healthy_median_pages_per_s"]},
        {"figure": "CPU us per resolved page, all processes", "tmdht": tmdht_cpu, "baseline": redis_cpu, "baseline_name": "Redis MGET",
         "target": "-", "ratio": tmdht_cpu / redis_cpu, "met": None},
        {"figure": "pages lost, 1 node SIGKILLed", "tmdht": f["pages_lost"], "baseline": None, "baseline_name": "",
         "target": "0", "ratio": None, "met": f["pages_lost"] == 0},
    ]
    return out


def rates(passes: list[dict[str, Any]]) -> str:
    return ", ".join(f"{p['pages_per_s']:,.0f}" for p in passes)


def print_table(doc: dict[str, Any]) -> None:
    t, r, k = doc["tmdht"], doc["redis"], doc["kademlia"]
    say("")
    say(f"{t['nodes']} nodes, R={t['replicas']}, {t['publish']['pages']:,} distinct random 4 KiB pages, loopback, one client "
        f"process on uvloop, verification on; {doc['cpus']} CPUs, load average {doc['load_average']['start'][0]:.1f} at start, "
        f"{doc['load_average']['end'][0]:.1f} at end; datagrams of {t['client']['max_datagram']:,} bytes, "
        f"{t['client']['get_batch_digests']} digests per GET; data path {doc.get('data_path', '?')}")
    loads = ", ".join(f"{doc['load_average'][k][0]:.1f}" for k in ("redis", "kademlia", "tmdht"))
    say(f"load average (1 min) at the start of the Redis, kademlia and tmdht phases: {loads}")
    say(f"{'figure':44}{'tmdht':>12}{'baseline':>12}  {'(of)':24}{'ratio':>9}{'target':>9}  met?")
    for row in doc["rows"]:
        base = "-" if row["baseline"] is None else f"{row['baseline']:12,.0f}"
        ratio = "-" if row["ratio"] is None else f"{row['ratio']:.3g}x"
        met = "-" if row["met"] is None else ("yes" if row["met"] else "NO")
        say(f"{row['figure']:44}{row['tmdht']:12,.0f}{base:>12}  {row['baseline_name']:24}{ratio:>9}{row['target']:>9}  {met}")
    say("")
    say(f"Redis MGET {r['batch']} + BLAKE3 check of every page: {r['resolve_verified']['pages_per_s']:,.0f} pages/s "
        f"(plain MGET {r['resolve']['pages_per_s']:,.0f}); hiredis: {r['hiredis']}")
    say(f"CPU per resolved page: tmdht client {t['resolve']['client_cpu_us_per_page']:.1f} us + nodes {t['resolve']['nodes_cpu_us_per_page_less_idle']:.1f} us "
        f"(nodes {t['resolve']['nodes_cpu_us_per_page']:.1f} us before taking off their idle {t['nodes_idle_cores']:.2f} cores); "
        f"Redis client {r['resolve']['client_cpu_us_per_page']:.1f} us + server {r['resolve']['server_cpu_us_per_page']:.1f} us")
    say(f"CPU per 1-page get: tmdht client {t['latency']['client_cpu_us_per_get']:.0f} us + nodes {t['latency']['nodes_cpu_us_per_get_less_idle']:.0f} us "
        f"(less idle)")
    say(f"tmdht resolve passes (pages/s): {rates(t['resolve_passes'])}; Redis: {rates(r['resolve_passes'])}")
    f = t["failover"]
    if "after_kill" in f:
        say(f"failover: node {f['killed_node']} killed half way; after the kill {f['after_kill']['pages_per_s']:,.0f} pages/s, "
            f"slowest batch {f['after_kill']['slowest_batch_ms']:.0f} ms; client counters {f['counters']}")
    say(f"kademlia: {k['set']['stored']}/{k['sample']} pages set ({k['set']['failed']} failed {k['set']['errors'] or ''}); "
        f"get one at a time {k['sequential']['pages_per_s']:,.0f}/s (p50 {k['sequential']['latency']['p50_us']:.0f} us), "
        f"{k['concurrent']['in_flight']} in flight {k['concurrent']['pages_per_s']:,.0f}/s "
        f"({k['concurrent']['client_socket_drops']} datagrams dropped at the client Server's socket)")
    say(f"tmdht publish: {t['publish']['replica_writes']:,} replica writes, {t['publish']['replica_writes_per_s']:,.0f}/s, "
        f"{t['publish']['under_replicated']} under-replicated")


def plot(doc: dict[str, Any], path: Path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    t, r, k = doc["tmdht"], doc["redis"], doc["kademlia"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 5))
    ax = axes[0]
    names = ["tmdht", "tmdht,\nnode\nkilled", f"Redis\nMGET\n{r['batch']}", "Redis\nMGET +\nBLAKE3", "kademlia\nget"]
    values = [t["resolve"]["pages_per_s"], t["failover"]["pages_per_s"], r["resolve"]["pages_per_s"],
              r["resolve_verified"]["pages_per_s"], k["resolve"]["pages_per_s"]]
    colors = ["tab:blue", "tab:cyan", "tab:red", "salmon", "tab:gray"]
    bars = ax.bar(names, values, color=colors)
    ax.set_yscale("log")
    ax.tick_params(axis="x", labelsize=8)
    ax.set_title("resolve throughput (pages/s, log)")
    ax.bar_label(bars, labels=[f"{v:,.0f}" for v in values], fontsize=8)
    ax = axes[1]
    values = [t["publish"]["pages_per_s"], r["publish"]["pages_per_s"]]
    bars = ax.bar([f"tmdht put_many\n(R={t['replicas']})", f"Redis MSET {r['batch']}"], values, color=["tab:blue", "tab:red"])
    ax.set_yscale("log")
    ax.set_title("publish throughput (pages/s, log)")
    ax.bar_label(bars, labels=[f"{v:,.0f}" for v in values], fontsize=8)
    ax = axes[2]
    x = [0, 1]
    width = 0.38
    tl = [t["latency"]["p50_us"], t["latency"]["p99_us"]]
    rl = [r["latency"]["p50_us"], r["latency"]["p99_us"]]
    b1 = ax.bar([i - width / 2 for i in x], tl, width, label="tmdht get_many(1)", color="tab:blue")
    b2 = ax.bar([i + width / 2 for i in x], rl, width, label="Redis GET", color="tab:red")
    ax.set_xticks(x, ["p50", "p99"])
    ax.set_yscale("log")
    ax.set_title("single-page resolve latency (us, log)")
    ax.bar_label(b1, labels=[f"{v:,.0f}" for v in tl], fontsize=8)
    ax.bar_label(b2, labels=[f"{v:,.0f}" for v in rl], fontsize=8)
    ax.legend()
    fig.suptitle(f"{t['nodes']} nodes R={t['replicas']}, {t['publish']['pages']:,} pages of 4 KiB, loopback, "
                 f"{doc['cpus']} CPUs (load {doc['load_average']['start'][0]:.1f})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -- main -----------------------------------------------------------------------------------------


def git_state() -> dict[str, Any]:
    here = Path(__file__).resolve().parent.parent
    head = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, check=False)
    dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, check=False)
    return {"commit": head.stdout.strip(), "modified_files": dirty.stdout.split("\n")[:20] if dirty.stdout.strip() else []}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pages", type=int, default=100_000)
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1024, help="digests per get_many call")
    parser.add_argument("--put-batch", type=int, default=4096, help="pages per put_many call")
    parser.add_argument("--window", type=int, default=0, help="client requests in flight per node (0: library default)")
    parser.add_argument("--max-datagram", type=int, default=0,
                        help="datagram size of the nodes and the client (0: their defaults, 32 KiB; loopback's MTU allows 65507)")
    parser.add_argument("--capacity", default="8GiB", help="--capacity of each node")
    parser.add_argument("--node-arg", action="append", default=[], help="extra flag for the nodes (repeatable)")
    parser.add_argument("--kill-node", type=int, default=3, help="index of the node SIGKILLed half way through the failover pass")
    parser.add_argument("--redis-batch", type=int, default=256, help="keys per MGET / MSET")
    parser.add_argument("--repeat", type=int, default=3, help="resolve passes (best is reported)")
    parser.add_argument("--latency-samples", type=int, default=2000)
    parser.add_argument("--kademlia-sample", type=int, default=500, help="pages set into / got from the kademlia servers")
    parser.add_argument("--kademlia-seconds", type=float, default=30.0)
    parser.add_argument("--kademlia-concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=90.0, help="time bound of each phase")
    parser.add_argument("--idle-seconds", type=float, default=3.0, help="how long idle node CPU is sampled")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--no-install", action="store_true", help="fail instead of installing missing baselines")
    parser.add_argument("--out", type=Path, default=Path("bench/results/resolve.json"))
    parser.add_argument("--plot", type=Path, default=Path("bench/results/resolve.png"))
    parser.add_argument("--serve-kademlia", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_kademlia:
        asyncio.run(_kademlia_host(args.nodes, args.kademlia_sample, args.seed, args.seconds * 4 + 120))
        return 0
    args.pages = max(1000, min(args.pages, 1_000_000))
    args.repeat = max(1, min(args.repeat, 10))
    args.latency_samples = max(100, min(args.latency_samples, 100_000))
    began = time.perf_counter()
    from tmdht.net.burst import burst_implementation  # noqa: PLC0415 - after argument parsing

    doc: dict[str, Any] = {"cpus": os.cpu_count(), "python": sys.version.split()[0], "git": git_state(),
                           "data_path": burst_implementation(),
                           "load_average": {"start": os.getloadavg()}, "targets": TARGETS}
    doc["setup"] = ensure_baselines(not args.no_install)
    say(f"generating {args.pages:,} random pages")
    pages = make_pages(args.pages, args.seed)
    digests = [digest_page(p) for p in pages]
    if len(set(digests)) != len(digests):
        raise SystemExit("pages are not distinct")
    with tempfile.TemporaryDirectory(prefix="tmdht-bench-redis-") as tmp:
        say("Redis: MSET, MGET, GET")
        doc["load_average"]["redis"] = os.getloadavg()
        doc["redis"] = measure_redis(Path(tmp), pages, digests, args)
    say(f"kademlia package: {args.nodes} servers, set and get {min(args.kademlia_sample, len(pages))} pages")
    doc["load_average"]["kademlia"] = os.getloadavg()
    doc["kademlia"] = measure_kademlia(pages, args)
    doc["load_average"]["tmdht"] = os.getloadavg()
    say(f"tmdht: {args.nodes} nodes, put_many, get_many, latency, SIGKILL of node {args.kill_node}")
    doc["tmdht"] = measure_tmdht(pages, digests, args)
    doc["load_average"]["end"] = os.getloadavg()
    doc["rows"] = rows(doc)
    doc["seconds"] = time.perf_counter() - began
    print_table(doc)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    say(f"wrote {args.out}")
    plot(doc, args.plot)
    say(f"wrote {args.plot} (run took {doc['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
