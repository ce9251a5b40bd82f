"""One store node serving a batched client: pages/s, latency, on-disk overhead; uvloop vs asyncio.

    python bench/node.py [--pages 50000] [--seconds 60] [--out bench/results/node.json]

For each event loop (the node's and the client's): start one real node process (R=1) on
loopback, PUT the pages through the data plane (group commit), GET them all back with a
pipelined client (verification on), then time single-page GETs one after another for latency.
The on-disk ratio is the node's own tmdht_disk_bytes / tmdht_stored_bytes after the PUTs.
Every phase is bounded by --seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tmdht.auth import Authenticator, ClusterKey, KeyRing, load_key
from tmdht.client.dataplane import DataPlaneClient
from tmdht.node.local import LocalCluster
from tmdht.pages import digest_page


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pages", type=int, default=50000)
    parser.add_argument("--seconds", type=float, default=60.0, help="time bound of each phase")
    parser.add_argument("--out", type=Path, default=Path("bench/results/node.json"))
    args = parser.parse_args()
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
