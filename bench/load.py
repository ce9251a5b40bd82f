"""Load: concurrent migration receivers resolving different page sets from one cluster.

    python bench/load.py [--nodes 4] [--receivers 8] [--pages 50000] [--batch 1000]

Starts a local cluster of --nodes real node processes (R = --replicas), publishes
--receivers x --pages distinct pages through the client library, then starts --receivers
receiver processes at once (a barrier), each resolving its own --pages pages with
TemplateStoreClient.get_many in batches of --batch digests (every page verified against its
digest by the client, and checked against the expected content here). Reports, per receiver and
in aggregate, errors, pages/s and the latency of one get_many batch (p50/p99), and the nodes'
data-plane drop counters (rate limiting included) after the run.

Everything runs on this host: nodes and receivers share its cores, so the aggregate is a floor
for a real deployment. Prints a table and writes JSON (--out, default bench/results/load.json).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tmdht.client.store import TemplateStoreClient
from tmdht.node.local import LocalCluster
from tmdht.pages import digest_page


def pages_of(receiver: int, count: int) -> list[tuple[bytes, bytes]]:
    """Distinct, deterministic pages for one receiver."""
    out = []
    for i in range(count):
        page = (receiver.to_bytes(4, "big") + (i + 1).to_bytes(4, "big") + b"load") * 341
        page += bytes(4096 - len(page))
        out.append((digest_page(page), page))
    return out


def receive(
    receiver: int,
    count: int,
    batch: int,
    seed: tuple[str, int],
    key: str,
    barrier: Any,
    results: Any,
) -> None:
    pages = pages_of(receiver, count)
    digests = [d for d, _ in pages]

    async def main() -> dict[str, Any]:
        latencies: list[float] = []
        errors: list[str] = []
        async with TemplateStoreClient([seed], cluster_key=key) as store:
            await asyncio.to_thread(barrier.wait)
            started = time.perf_counter()
            for at in range(0, count, batch):
                t0 = time.perf_counter()
                try:
                    got = await store.get_many(digests[at : at + batch])
                except Exception as exc:  # noqa: BLE001 - reported, not hidden
                    errors.append(f"{type(exc).__name__}: {exc}"[:200])
                    continue
                latencies.append(time.perf_counter() - t0)
                if got != [p for _, p in pages[at : at + batch]]:
                    errors.append(f"wrong pages in batch at {at}")
            ended = time.perf_counter()
            stats = store.stats
        return {
            "receiver": receiver,
            "pages": count,
            "errors": errors,
            "started": started,
            "ended": ended,
            "seconds": ended - started,
            "latencies": latencies,
            "retries": stats.retries,
            "timeouts": stats.timeouts,
        }

    results.put(asyncio.run(main()))


def scrape(host: str, port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "tmdht_bad_datagrams_total":
                out[s.labels["reason"]] = out.get(s.labels["reason"], 0) + s.value
    return out


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--receivers", type=int, default=8)
    parser.add_argument("--pages", type=int, default=50_000, help="pages per receiver")
    parser.add_argument("--batch", type=int, default=1000, help="digests per get_many call")
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench/results/load.json"))
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="tmdht-load-") as tmp, LocalCluster(
        Path(tmp), args.nodes, replicas=args.replicas, extra_args=["--log-level", "warning"]
    ) as cluster:
        key = cluster.key_file.read_text().strip()
        seed = cluster.seed
        started = time.perf_counter()

        async def publish() -> None:
            async with TemplateStoreClient([seed], cluster_key=key) as store:
                for r in range(args.receivers):
                    pages = pages_of(r, args.pages)
                    for at in range(0, len(pages), 10_000):
                        await store.put_many(pages[at : at + 10_000])

        asyncio.run(publish())
        publish_seconds = time.perf_counter() - started
        total = args.receivers * args.pages
        print(f"published {total:,} pages x{args.replicas} in {publish_seconds:.1f} s")

        ctx = multiprocessing.get_context("spawn")
        barrier = ctx.Barrier(args.receivers)
        queue = ctx.Queue()
        procs = [
            ctx.Process(
                target=receive, args=(r, args.pages, args.batch, seed, key, barrier, queue)
            )
            for r in range(args.receivers)
        ]
        for p in procs:
            p.start()
        results = [queue.get(timeout=900) for _ in procs]
        for p in procs:
            p.join(timeout=60)
        drops: dict[str, float] = {}
        for node in cluster.nodes:
            for reason, value in scrape(*node.address("metrics")).items():
                drops[reason] = drops.get(reason, 0) + value

    results.sort(key=lambda r: r["receiver"])
    wall = max(r["ended"] for r in results) - min(r["started"] for r in results)
    latencies = [x for r in results for x in r["latencies"]]
    errors = sum(len(r["errors"]) for r in results)
    pages_ok = sum(r["pages"] for r in results if not r["errors"])
    print(f"{'receiver':>8} {'pages':>8} {'seconds':>8} {'pages/s':>9} {'p50 ms':>8} "
          f"{'p99 ms':>8} {'retries':>7} {'errors':>6}")  # fmt: skip
    for r in results:
        lat = r["latencies"] or [float("nan")]
        print(
            f"{r['receiver']:>8} {r['pages']:>8,} {r['seconds']:>8.2f} "
            f"{r['pages'] / r['seconds']:>9,.0f} {statistics.median(lat) * 1000:>8.1f} "
            f"{percentile(lat, 0.99) * 1000:>8.1f} {r['retries']:>7} {len(r['errors']):>6}"
        )
    aggregate = total / wall
    p50, p99 = statistics.median(latencies) * 1000, percentile(latencies, 0.99) * 1000
    print(f"{'all':>8} {total:>8,} {wall:>8.2f} {aggregate:>9,.0f} {p50:>8.1f} {p99:>8.1f} "
          f"{sum(r['retries'] for r in results):>7} {errors:>6}")  # fmt: skip
    print(f"batch = {args.batch} digests per get_many; data-plane drops on the nodes: {drops}")
    doc = {
        "benchmark": "load",
        "conditions": {
            "nodes": args.nodes,
            "replicas": args.replicas,
            "receivers": args.receivers,
            "pages_per_receiver": args.pages,
            "batch": args.batch,
            "same_host": True,
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "platform": platform.platform(),
        },
        "publish_seconds": round(publish_seconds, 2),
        "aggregate_pages_per_s": round(aggregate),
        "wall_seconds": round(wall, 2),
        "batch_latency_ms": {"p50": round(p50, 2), "p99": round(p99, 2)},
        "errors": errors,
        "pages_resolved_without_error": pages_ok,
        "node_bad_datagrams": drops,
        "receivers": [
            {k: v for k, v in r.items() if k not in ("latencies", "started", "ended")}
            | {
                "pages_per_s": round(r["pages"] / r["seconds"]),
                "p50_ms": round(statistics.median(r["latencies"]) * 1000, 2)
                if r["latencies"]
                else None,
                "p99_ms": round(percentile(r["latencies"], 0.99) * 1000, 2)
                if r["latencies"]
                else None,
            }
            for r in results
        ],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
