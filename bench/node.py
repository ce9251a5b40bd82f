"""One store node serving a batched client: pages/s, latency, on-disk overhead; uvloop vs asyncio.

    python bench/node.py [--pages 50000] [--seconds 60] [--out bench/results/node.json]
    python bench/node.py --serve-cpu [--pages 50000] [--requests 3000] [--serve-digests 56-120,1-1]

For each event loop (the node's and the client's): start one real node process (R=1) on
loopback, PUT the pages through the data plane (group commit), GET them all back with a
pipelined client (verification on), then time single-page GETs one after another for latency.
The on-disk ratio is the node's own tmdht_disk_bytes / tmdht_stored_bytes after the PUTs.
Every phase is bounded by --seconds.

``--serve-cpu`` instead measures the node's CPU per page served, in process: a DataPlaneServer
(keyed auth) over a store of --pages pages answers pre-encoded GET_PAGES requests of random
digests, fed straight to ``datagram_received``; the thread CPU time of those calls (decode,
store read, encode, seal, send to a loopback socket) is divided by the pages served and by the
requests. Each range of ``--serve-digests`` (default ``56-120,1-1``: batched GETs, then
single-page GETs, whose cost is the per-request fixed cost) is measured on its own. The
answers are drained and spot-checked between calls, and the event loop runs its callbacks
(the node's timers), outside the timed region; ``--out`` gets the figures as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tmdht import wire
from tmdht.aio.dataplane import DataPlaneClient
from tmdht.auth import Authenticator, ClusterKey, KeyRing, load_key
from tmdht.node.dataplane import DataPlaneServer
from tmdht.node.local import LocalCluster
from tmdht.node.metrics import NodeMetrics
from tmdht.node.storage import PageStore
from tmdht.pages import check_page, digest_page


def make_pages(n: int) -> list[tuple[bytes, bytes]]:
    out = []
    for i in range(n):
        page = os.urandom(64) * 64
        out.append((digest_page(page), page))
        del i
    return out


def scrape(host: str, port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels}


async def measure(cluster: LocalCluster, pages: list[tuple[bytes, bytes]], budget: float) -> dict[str, Any]:
    key = load_key(cluster.key_file.read_text().strip())
    auth = Authenticator.keyed(KeyRing(ClusterKey(1, key)))
    address = cluster.nodes[0].address("data")
    digests = [d for d, _ in pages]
    async with await DataPlaneClient.open(auth, window=32, timeout=0.5) as client:
        started = time.perf_counter()
        batch = 2048
        for i in range(0, len(pages), batch):
            outcome = await client.put_pages(address, pages[i : i + batch])
            assert not outcome.unanswered
            if time.perf_counter() - started > budget:
                break
        put_seconds = time.perf_counter() - started
        put_count = min(len(pages), i + batch)

        started = time.perf_counter()
        fetched = 0
        for i in range(0, put_count, 8192):
            got = await asyncio.wait_for(client.get_pages(address, digests[i : i + 8192]), budget)
            assert not got.unanswered and not got.corrupt and not got.missing, (len(got.unanswered), len(got.missing))
            fetched += len(got.pages)
            if time.perf_counter() - started > budget:
                break
        get_seconds = time.perf_counter() - started

        latencies = []
        deadline = time.perf_counter() + min(budget, 20)
        for d in digests[:2000]:
            t = time.perf_counter()
            got = await client.get_pages(address, [d])
            latencies.append(time.perf_counter() - t)
            assert d in got.pages
            if time.perf_counter() > deadline:
                break
    metrics = scrape(*cluster.nodes[0].address("metrics"))
    latencies.sort()
    return {
        "put_pages_per_s": put_count / put_seconds,
        "get_pages_per_s": fetched / get_seconds,
        "get_latency_p50_us": statistics.median(latencies) * 1e6,
        "get_latency_p99_us": latencies[int(len(latencies) * 0.99) - 1] * 1e6,
        "disk_ratio": metrics.get("tmdht_disk_bytes", 0) / max(1.0, metrics.get("tmdht_stored_bytes", 0)),
        "pages": put_count,
    }


def run_one(loop_name: str, pages: list[tuple[bytes, bytes]], budget: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="tmdht-bench-node-") as tmp:
        args = ["--event-loop", loop_name, "--log-level", "warning", "--capacity", "4GiB"]
        with LocalCluster(Path(tmp), 1, replicas=1, extra_args=args) as cluster:
            if loop_name == "uvloop":
                import uvloop  # noqa: PLC0415

                return uvloop.run(measure(cluster, pages, budget))
            return asyncio.run(measure(cluster, pages, budget))


async def serve_cpu(
    store: PageStore, digests: list[bytes], requests: int, seed: int, sizes: tuple[int, int]
) -> dict[str, float]:
    """Thread CPU of ``datagram_received`` per page served (see the module docstring)."""
    key = ClusterKey(1, bytes(range(32)))
    client_auth = Authenticator.keyed(KeyRing(key))
    server = await DataPlaneServer.start(
        "127.0.0.1",
        0,
        store=store,
        auth=Authenticator.keyed(KeyRing(key)),
        max_datagram=wire.MAX_DATAGRAM,
        metrics=NodeMetrics(),
        node_info=lambda rid: None,  # type: ignore[arg-type,return-value]
    )
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    sink.setblocking(False)
    address = sink.getsockname()
    rng = random.Random(seed)
    now = time.time()
    batch = [
        wire.encode(
            wire.GetPages(request_id=i, digests=tuple(rng.sample(digests, rng.randint(*sizes)))),
            max_datagram=wire.MAX_DATAGRAM,
            auth=client_auth,
            now=now,
        )
        for i in range(requests)
    ]
    cpu = wall = 0.0
    served = datagrams = 0
    try:
        for index, request in enumerate(batch):
            started_cpu, started_wall = time.thread_time(), time.perf_counter()
            server.datagram_received(request, address)
            cpu += time.thread_time() - started_cpu
            wall += time.perf_counter() - started_wall
            for _ in range(1000):  # drain what the node sent (bounded)
                try:
                    answer = sink.recv(65536)
                except BlockingIOError:
                    break
                datagrams += 1
                if index < 20:  # spot-check: authentic, decodable, every page verifies
                    msg = wire.decode(answer, max_datagram=wire.MAX_DATAGRAM, auth=client_auth, now=time.time())
                    assert isinstance(msg, wire.Pages) and not msg.missing, msg
                    for digest, page in msg.pages:
                        check_page(digest, page)
            await asyncio.sleep(0)  # untimed: let the loop run the node's timers (snapshot release)
        served = int(server.metrics.registry.get_sample_value("tmdht_pages_served_total") or 0)
    finally:
        sink.close()
        server.close()
    return {
        "requests": requests,
        "pages_served": served,
        "datagrams_received": datagrams,
        "cpu_us_per_page": cpu / served * 1e6,
        "wall_us_per_page": wall / served * 1e6,
        "cpu_us_per_request": cpu / requests * 1e6,
    }


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """``"56-120,1-1"`` -> [(56, 120), (1, 1)]: digests per GET, drawn uniformly."""
    sizes = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        low, high = int(lo), int(hi or lo)
        if not 1 <= low <= high <= wire.max_digests_per_request(wire.MAX_DATAGRAM):
            raise SystemExit(f"bad --serve-digests range {part!r}")
        sizes.append((low, high))
    return sizes


def run_serve_cpu(pages: list[tuple[bytes, bytes]], requests: int, sizes: list[tuple[int, int]]) -> dict[str, Any]:
    import uvloop  # noqa: PLC0415

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="tmdht-bench-serve-") as tmp:
        store = PageStore.open(Path(tmp), capacity_bytes=4 << 30)
        try:
            for i in range(0, len(pages), 4096):
                store.put_many(pages[i : i + 4096])
            digests = [d for d, _ in pages]
            for lo, hi in sizes:
                for name, runner in (("uvloop", uvloop.run), ("asyncio", asyncio.run)):
                    runner(serve_cpu(store, digests, requests // 5, 1, (lo, hi)))  # warm up
                    results[f"{name} {lo}-{hi}"] = runner(serve_cpu(store, digests, requests, 2, (lo, hi)))
        finally:
            store.close()
    print(f"node CPU per GET served: {len(pages):,} pages stored, keyed auth, {requests:,} requests each")
    for name, r in results.items():
        print(
            f"  {name:16} {r['cpu_us_per_page']:6.2f} us/page CPU, {r['wall_us_per_page']:6.2f} us/page wall, "
            f"{r['cpu_us_per_request']:7.1f} us/request ({r['pages_served']:,} pages, {r['datagrams_received']:,} datagrams)"
        )
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pages", type=int, default=50000)
    parser.add_argument("--seconds", type=float, default=60.0, help="time bound of each phase")
    parser.add_argument("--out", type=Path, default=Path("bench/results/node.json"))
    parser.add_argument("--serve-cpu", action="store_true", help="in-process node CPU per page served")
    parser.add_argument("--requests", type=int, default=3000, help="GET requests timed by --serve-cpu")
    parser.add_argument(
        "--serve-digests", default="56-120,1-1", help="--serve-cpu: digests per GET, ranges LO-HI, comma-separated"
    )
    args = parser.parse_args()
    if args.serve_cpu:
        sizes = parse_sizes(args.serve_digests)
        count = max(1000, min(args.pages, 1_000_000))
        served = run_serve_cpu(make_pages(count), max(10, args.requests), sizes)
        doc = {"pages": count, "serve_cpu": served, "cpus": os.cpu_count()}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {args.out}")
        return 0
    pages = make_pages(max(1000, min(args.pages, 1_000_000)))
    results = {name: run_one(name, pages, args.seconds) for name in ("uvloop", "asyncio")}
    u, a = results["uvloop"], results["asyncio"]
    print(f"one node, {len(pages):,} pages of 4 KiB, loopback, verification on, keyed auth")
    print(f"{'':26}{'uvloop':>12}{'asyncio':>12}{'ratio':>8}")
    for key, label in (
        ("put_pages_per_s", "PUT pages/s"),
        ("get_pages_per_s", "GET pages/s (pipelined)"),
        ("get_latency_p50_us", "1-page GET p50 (us)"),
        ("get_latency_p99_us", "1-page GET p99 (us)"),
        ("disk_ratio", "on-disk / page bytes"),
    ):
        digits = 3 if key == "disk_ratio" else 1
        print(f"{label:26}{u[key]:12.{digits}f}{a[key]:12.{digits}f}{u[key] / a[key]:8.2f}")
    doc = {"pages": len(pages), "results": results, "chosen_loop": "uvloop", "cpus": os.cpu_count()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
