"""Publish throughput and failures against ring size: 8 vs 32 local node processes.

    python bench/publish_scale.py [--nodes 8 32] [--pages 100000] [--batch 20000] [--repeat 1]

For each ring size: starts a local cluster of real node processes (R = --replicas), waits until
the client's view holds every node, measures the nodes' idle CPU for --idle seconds (the
overlay's background work: what the extra processes cost before any page moves), then publishes
--pages random pages with ``put_many`` in batches of --batch and records pages/s, pages that
raised ``PublishFailed``, under-replicated pages and the engine's retries/timeouts.

CPU share of the extra processes: every node's CPU time (utime + stime from /proc/PID/stat) is
read before and after the idle period and the publish. ``idle CPU share`` = the nodes' CPU
seconds while idle / (cores x seconds): the share of the machine the ring takes doing nothing,
which the publish cannot use. The throughput target compares the N-node figure with the 8-node
figure scaled by (1 - extra idle share).

Per page published, from the nodes' /metrics and /proc: node CPU (``node ms/pg``; ``-idle``
subtracts what the ring spent idle at the idle rate over the same wall time, so a publish that
took longer on a busier machine is not charged for the overlay's background work), HAS and PUT
requests served, pages per group commit and pages the replication job copied (``copied/pg``:
near 0 when the client wrote every replica and the nodes did not send the pages again). ``load``
is the host's 1-minute load average at the end of each ring's run: the machine may be shared.
``--commit-delay`` sets the nodes' commit_delay (0: commit as soon as the writer is free).

Everything runs on this host (nodes and client share its cores). Prints a table and writes JSON
(--out, default bench/results/publish_scale.json).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from tmdht.client.errors import PublishFailed
from tmdht.client.store import TemplateStoreClient
from tmdht.domains import VIRTUAL_IDS
from tmdht.node.local import LocalCluster
from tmdht.pages import digest_page

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of the processes, in seconds (a process that is gone counts 0)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / TICKS


_COUNTERS = {  # extra node counters summed over the ring, by the key they get here
    "group_commits": "tmdht_group_commit_pages_count",
    "group_commit_pages": "tmdht_group_commit_pages_sum",
    "replicated_pages": "tmdht_replicated_pages_total",
}


def node_requests(cluster: LocalCluster) -> dict[str, float]:
    """Data-plane requests every node served so far, by message type, plus the _COUNTERS (group
    commits and their pages, pages the replication job copied), summed over the nodes'
    /metrics."""
    totals: dict[str, float] = {}
    for node in cluster.nodes:
        host, port = node.address("metrics")
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as answer:
            for key, value in metric_totals(answer.read().decode()).items():
                totals[key] = totals.get(key, 0.0) + value
    return totals


def metric_totals(text: str) -> dict[str, float]:
    """One node's requests by type and _COUNTERS, from its Prometheus text exposition."""
    totals: dict[str, float] = {}
    for kind, value in re.findall(r'^tmdht_requests_total\{type="(\w+)"\} (\S+)$', text, re.M):
        totals[kind] = totals.get(kind, 0.0) + float(value)
    for key, name in _COUNTERS.items():
        for value in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M):
            totals[key] = totals.get(key, 0.0) + float(value)
    return totals


def random_pages(count: int) -> list[tuple[bytes, bytes]]:
    out = []
    for _ in range(count):
        page = os.urandom(4096)
        out.append((digest_page(page), page))
    return out


async def run_publish(
    cluster: LocalCluster, pages: int, batch: int, idle: float, key: str, settle: float
) -> dict[str, Any]:
    pids = [n.pid for n in cluster.nodes]
    async with TemplateStoreClient(
        [cluster.seed], cluster_key=key, replicas=cluster.replicas
    ) as store:
        started = time.monotonic()
        for _ in range(200):  # bounded: the view fills within a few crawls
            if len(store.members) >= cluster.count or time.monotonic() - started > 60:
                break
            await asyncio.sleep(0.25)
            await store.refresh()
        view_seconds = time.monotonic() - started
        members = len(store.members)
        cpu0, t0 = cpu_seconds(pids), time.monotonic()
        await asyncio.sleep(idle)
        idle_cpu, idle_wall = cpu_seconds(pids) - cpu0, time.monotonic() - t0
        failed = under = 0
        errors: list[str] = []
        seconds = 0.0
        own0 = time.process_time()
        requests0 = node_requests(cluster)
        cpu1 = cpu_seconds(pids)
        samples: list[tuple[float, int]] = []  # (congestion window, requests in flight)
        sampler = asyncio.create_task(sample_window(store, samples))
        for start in range(0, pages, batch):
            chunk = random_pages(min(batch, pages - start))
            t = time.monotonic()
            try:
                summary = await store.put_many(chunk)
                under += len(summary.under_replicated)
            except PublishFailed as exc:
                failed += len(exc.digests)
                errors.append(str(exc))
            seconds += time.monotonic() - t
        sampler.cancel()
        node_cpu = cpu_seconds(pids) - cpu1
        client_cpu = time.process_time() - own0
        settle0 = time.monotonic()
        await asyncio.sleep(settle)  # the nodes' fresh-page checks of the last batch
        settled_cpu = cpu_seconds(pids) - cpu1
        # What the ring would have spent idle over the same wall time: the rest is the publish's.
        idle_rate = idle_cpu / idle_wall if idle_wall > 0 else 0.0
        above_idle = settled_cpu - idle_rate * (seconds + time.monotonic() - settle0)
        requests1 = node_requests(cluster)
        served = {k: v - requests0.get(k, 0.0) for k, v in requests1.items()}
        commits = served.pop("group_commits", 0.0)
        commit_pages = served.pop("group_commit_pages", 0.0)
        replicated = served.pop("replicated_pages", 0.0)
        stats = store.stats
        return {
            "members_seen": members,
            "view_seconds": round(view_seconds, 2),
            "idle_node_cpu_seconds": round(idle_cpu, 3),
            "idle_seconds": round(idle_wall, 2),
            "pages": pages,
            "batch": batch,
            "publish_seconds": round(seconds, 3),
            "pages_per_second": round(pages / seconds, 1),
            "failed": failed,
            "under_replicated": under,
            "errors": errors[:3],
            "publish_node_cpu_seconds": round(node_cpu, 2),
            "publish_client_cpu_seconds": round(client_cpu, 2),
            "node_cpu_ms_per_page": round(1000 * settled_cpu / pages, 3),
            "node_cpu_ms_per_page_above_idle": round(1000 * above_idle / pages, 3),
            "node_requests_per_page": {k: round(v / pages, 3) for k, v in sorted(served.items())},
            "pages_per_group_commit": round(commit_pages / commits, 1) if commits else 0.0,
            "replicated_per_page": round(replicated / pages, 3),
            "retries": stats.retries,
            "timeouts": stats.timeouts,
            "requests": stats.requests,
            "window_decreases": stats.window_decreases,
            "congestion_window_median": (
                round(statistics.median(w for w, _ in samples), 1) if samples else None),
            "in_flight_per_node_median": (
                round(statistics.median(f for _, f in samples) / members, 2)
                if samples and members else None),
        }


async def sample_window(store: TemplateStoreClient, out: list[tuple[float, int]]) -> None:
    """Every 0.1 s until cancelled (by its caller, at the publish's end): the client's congestion
    window and the requests it has in flight (the engine's own view, read in the loop)."""
    window = store._running().engine.window  # a bench reads the engine's state
    for _ in range(36_000):  # bounded: an hour of samples
        out.append((window.congestion.size, window.all_in_flight))
        await asyncio.sleep(0.1)


def one_ring(nodes: int, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="scale2-publish-") as tmp:
        cluster = LocalCluster(
            Path(tmp), nodes, replicas=args.replicas, ready_timeout=120,
            extra_args=["--virtual-ids", str(args.virtual_ids)] + (
                [] if args.commit_delay is None else ["--commit-delay", str(args.commit_delay)]),
        )
        with cluster:
            key = cluster.key_file.read_text().strip()
            result = asyncio.run(
                run_publish(cluster, args.pages, args.batch, args.idle, key, args.settle)
            )
    cores = os.cpu_count() or 1
    result["nodes"] = nodes
    result["load_average_1m"] = round(os.getloadavg()[0], 2)  # at the end: others share the host
    result["idle_cpu_share"] = round(
        result["idle_node_cpu_seconds"] / (cores * result["idle_seconds"]), 4
    )
    return result


def _median(values: Any) -> float:
    """Median of the values that are not None (0.0 if none is)."""
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--pages", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=20_000)
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--virtual-ids", type=int, default=VIRTUAL_IDS,
                        help="placement tokens per node (the nodes' setting; clients follow)")
    parser.add_argument("--commit-delay", type=float, default=None,
                        help="the nodes' commit_delay, seconds (default: theirs)")
    parser.add_argument("--idle", type=float, default=5.0, help="seconds of idle CPU sampling")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--settle", type=float, default=5.0,
                        help="seconds after the publish whose node CPU still counts (the nodes'"
                        " checks of fresh pages)")  # fmt: skip
    parser.add_argument("--out", default="bench/results/publish_scale.json")
    args = parser.parse_args()
    runs: dict[int, list[dict[str, Any]]] = {n: [] for n in args.nodes}
    for _ in range(args.repeat):
        for n in args.nodes:  # interleaved, so drift in the machine's load hits every size
            runs[n].append(one_ring(n, args))
            print(json.dumps(runs[n][-1]), file=sys.stderr)
    base = args.nodes[0]
    base_rate = statistics.median(r["pages_per_second"] for r in runs[base])
    base_idle = statistics.median(r["idle_cpu_share"] for r in runs[base])
    print(
        f"{'nodes':>5} {'pages/s':>9} {'vs ' + str(base):>7} {'failed':>7} {'under-R':>7} "
        f"{'idle CPU':>9} {'allowed':>8} {'retries':>8} {'timeouts':>8} {'node ms/pg':>10} {'-idle':>6} "
        f"{'HAS/pg':>7} {'PUT/pg':>7} {'pg/commit':>9} {'copied/pg':>9} {'cwnd':>6} {'flight/n':>8} "
        f"{'load':>5}"
    )
    summary = []
    for n in args.nodes:
        rate = statistics.median(r["pages_per_second"] for r in runs[n])
        idle = statistics.median(r["idle_cpu_share"] for r in runs[n])
        allowed = (1 - (idle - base_idle)) if n != base else 1.0
        row = {
            "nodes": n,
            "pages_per_second": rate,
            "ratio": round(rate / base_rate, 3),
            "failed": max(r["failed"] for r in runs[n]),
            "under_replicated": max(r["under_replicated"] for r in runs[n]),
            "idle_cpu_share": idle,
            "allowed_ratio": round(allowed, 3),
            "retries": statistics.median(r["retries"] for r in runs[n]),
            "timeouts": statistics.median(r["timeouts"] for r in runs[n]),
            "node_cpu_ms_per_page": statistics.median(r["node_cpu_ms_per_page"] for r in runs[n]),
            "node_cpu_ms_per_page_above_idle": statistics.median(
                r["node_cpu_ms_per_page_above_idle"] for r in runs[n]),
            "node_has_per_page": statistics.median(
                r["node_requests_per_page"].get("has", 0.0) for r in runs[n]
            ),
            "node_put_per_page": statistics.median(
                r["node_requests_per_page"].get("put_pages", 0.0) for r in runs[n]
            ),
            "pages_per_group_commit": statistics.median(
                r.get("pages_per_group_commit", 0.0) for r in runs[n]),
            "replicated_per_page": statistics.median(
                r.get("replicated_per_page", 0.0) for r in runs[n]),
            "congestion_window": _median(r.get("congestion_window_median") for r in runs[n]),
            "in_flight_per_node": _median(r.get("in_flight_per_node_median") for r in runs[n]),
            "load_average_1m": statistics.median(r["load_average_1m"] for r in runs[n]),
        }
        summary.append(row)
        print(
            f"{n:>5} {rate:>9,.0f} {row['ratio']:>7.2f} {row['failed']:>7} "
            f"{row['under_replicated']:>7} {idle:>8.1%} {allowed:>8.2f} "
            f"{row['retries']:>8} {row['timeouts']:>8} {row['node_cpu_ms_per_page']:>10.2f} "
            f"{row['node_cpu_ms_per_page_above_idle']:>6.2f} "
            f"{row['node_has_per_page']:>7.3f} {row['node_put_per_page']:>7.3f} "
            f"{row['pages_per_group_commit']:>9.1f} {row['replicated_per_page']:>9.3f} "
            f"{row['congestion_window']:>6.0f} {row['in_flight_per_node']:>8.2f} "
            f"{row['load_average_1m']:>5.1f}"
        )
    doc = {
        "machine": {"cores": os.cpu_count(), "platform": platform.platform(), "shared": True},
        "args": vars(args),
        "summary": summary,
        "runs": {str(n): r for n, r in runs.items()},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
