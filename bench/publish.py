"""Publish throughput into a local cluster (R replicas, durable), against Redis MSET in the same run.

    python bench/publish.py [--pages 20000] [--repeat 3] [--nodes 4] [--replicas 3]
                            [--put-batch 4096] [--max-datagram N] [--node-arg ARG ...]
                            [--out bench/results/publish.json]

One run: a LocalCluster of --nodes real node processes (uvloop, keyed auth, fsync per group
commit: a PUT is answered only once its pages are durable) and one TemplateStoreClient in this
process; a redis-server child (no persistence) beside it. --repeat rounds, each a pass of
``put_many`` of --pages fresh distinct random 4 KiB pages in calls of --put-batch, then a pass of
Redis MSET of the same number of fresh pages (--redis-batch keys per command): the two alternate,
so a change in the machine's load hits both. Medians of the rounds are reported, with each
round's figures in the JSON.

Per pass: pages/s, CPU per page of this process and of the nodes (or redis-server), the nodes'
group commits (count and pages per commit, from their metrics) and under-replicated pages; the
load average at each pass. On a shared 2-core machine the wall-clock figures move with the load,
CPU per page much less. Needs redis-server and redis-py (bench/resolve.py installs them).

``--node-cpu`` instead measures one node's CPU per replica write in process, no other process
involved: a DataPlaneServer (keyed auth, a fresh LMDB store with fsync) is fed pre-encoded
PUT_PAGES datagrams straight into ``datagram_received``, --window requests at a time (what a
client keeps in flight), each window waited for until answered; the event loop thread's CPU time
(decode, queue, answer, send) and the whole process's (plus the writer thread: verification,
LMDB, commit) are divided by the pages stored. --repeat runs, median reported.
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
from resolve import (  # bench/ is sys.path[0]
    CpuMeter,
    chunks,
    ensure_baselines,
    git_state,
    redis_server,
    say,
)

from tmdht.node.local import LocalCluster
from tmdht.pages import digest_page


def node_counters(cluster: LocalCluster) -> dict[str, float]:
    """Group commits and the pages they stored, summed over the nodes' /metrics."""
    total = {"commits": 0.0, "commit_pages": 0.0, "put_pages": 0.0}
    for node in cluster.nodes:
        if not node.running:
            continue
        host, port = node.address("metrics")[:2]
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as answer:
            text = answer.read().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "tmdht_group_commit_pages_count":
                    total["commits"] += sample.value
                elif sample.name == "tmdht_group_commit_pages_sum":
                    total["commit_pages"] += sample.value
                elif sample.name == "tmdht_put_pages_total":
                    total["put_pages"] += sample.value
    return total


def fresh_pages(count: int) -> list[tuple[bytes, bytes]]:
    pages = [os.urandom(4096) for _ in range(count)]
    return [(digest_page(p), p) for p in pages]


async def tmdht_pass(store: Any, cluster: LocalCluster, count: int, put_batch: int) -> dict[str, Any]:
    items = fresh_pages(count)
    cpu = CpuMeter(lambda: [n.pid for n in cluster.nodes if n.running])
    before = node_counters(cluster)
    load = os.getloadavg()[0]
    stats0 = store.stats
    counters = ("requests", "retries", "timeouts", "window_decreases")
    first = {name: getattr(stats0, name) for name in counters}
    cpu.start()
    started = time.perf_counter()
    stored = under = 0
    for batch in chunks(items, put_batch):
        summary = await store.put_many(batch)
        stored += summary.stored + summary.present
        under += len(summary.under_replicated)
    seconds = time.perf_counter() - started
    mine, nodes = cpu.stop()
    after = node_counters(cluster)
    commits = after["commits"] - before["commits"]
    return {
        "pages": count, "replica_writes": stored, "under_replicated": under, "seconds": seconds,
        "pages_per_s": count / seconds, "client_cpu_us_per_page": mine / count * 1e6,
        "nodes_cpu_us_per_page": nodes / count * 1e6, "nodes_cpu_us_per_replica_write": nodes / max(1, stored) * 1e6,
        "group_commits": commits,
        "pages_per_group_commit": (after["commit_pages"] - before["commit_pages"]) / commits if commits else None,
        "load_average": load,
        "engine": {name: getattr(store.stats, name) - first[name] for name in counters},
    }


def redis_pass(client: Any, pid: int, count: int, batch: int) -> dict[str, Any]:
    items = fresh_pages(count)
    cpu = CpuMeter(lambda: [pid])
    load = os.getloadavg()[0]
    cpu.start()
    started = time.perf_counter()
    for part in chunks(items, batch):
        client.mset(dict(part))
    seconds = time.perf_counter() - started
    mine, server = cpu.stop()
    return {"pages": count, "seconds": seconds, "pages_per_s": count / seconds,
            "client_cpu_us_per_page": mine / count * 1e6, "server_cpu_us_per_page": server / count * 1e6,
            "load_average": load}


async def run(cluster: LocalCluster, redis_client: Any, redis_pid: int, args: argparse.Namespace) -> dict[str, Any]:
    from tmdht.client.store import TemplateStoreClient  # noqa: PLC0415

    kw: dict[str, Any] = {"cluster_key": cluster.key_file.read_text().strip(), "replicas": args.replicas}
    if args.max_datagram:
        kw["max_datagram"] = args.max_datagram
    for name in ("window", "congestion_window", "timeout"):
        if getattr(args, name):
            kw[name] = getattr(args, name)
    rounds: list[dict[str, Any]] = []
    async with TemplateStoreClient([cluster.seed], **kw) as store:
        for _ in range(100):  # bounded: the view fills within a few crawls
            if len(store.members) >= args.nodes:
                break
            await asyncio.sleep(0.1)  # poll interval while the client's view fills
            await store.refresh()
        await tmdht_pass(store, cluster, min(2000, args.pages), args.put_batch)  # warm-up
        for index in range(args.repeat):
            tmdht = await tmdht_pass(store, cluster, args.pages, args.put_batch)
            redis = redis_pass(redis_client, redis_pid, args.pages, args.redis_batch)
            rounds.append({"tmdht": tmdht, "redis": redis})
            say(f"round {index + 1}: tmdht {tmdht['pages_per_s']:,.0f} pages/s "
                f"({tmdht['client_cpu_us_per_page']:.1f} + {tmdht['nodes_cpu_us_per_page']:.1f} us CPU/page, "
                f"{tmdht['pages_per_group_commit'] or 0:.0f} pages/commit), "
                f"Redis MSET {redis['pages_per_s']:,.0f} pages/s, load {tmdht['load_average']:.1f}")
    return {"rounds": rounds}


async def node_cpu_run(pages: int, window: int, max_datagram: int) -> dict[str, float]:
    """One in-process run of ``--node-cpu`` (see the module docstring)."""
    import socket  # noqa: PLC0415

    from tmdht import wire  # noqa: PLC0415
    from tmdht.auth import Authenticator, ClusterKey, KeyRing  # noqa: PLC0415
    from tmdht.node.dataplane import DataPlaneServer  # noqa: PLC0415
    from tmdht.node.metrics import NodeMetrics  # noqa: PLC0415
    from tmdht.node.storage import PageStore  # noqa: PLC0415

    key = ClusterKey(1, bytes(range(32)))
    client_auth = Authenticator.keyed(KeyRing(key))
    per = wire.max_pages_per_datagram(max_datagram)
    items = fresh_pages(pages)
    now = time.time()
    datagrams = [
        wire.encode(wire.PutPages(request_id=i, pages=tuple(items[at : at + per])),
                    max_datagram=max_datagram, auth=client_auth, now=now)
        for i, at in enumerate(range(0, pages, per))
    ]
    with tempfile.TemporaryDirectory(prefix="tmdht-bench-publish-node-") as tmp, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sink:
        sink.bind(("127.0.0.1", 0))
        sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        store = PageStore.open(Path(tmp), capacity_bytes=4 << 30)
        metrics = NodeMetrics()
        server = await DataPlaneServer.start(
            "127.0.0.1", 0, store=store, auth=Authenticator.keyed(KeyRing(key)), max_datagram=max_datagram,
            metrics=metrics, node_info=lambda rid: None,  # type: ignore[arg-type,return-value]
        )
        try:
            address = sink.getsockname()
            cpu, loop_cpu, wall = time.process_time(), time.thread_time(), time.perf_counter()
            for start in range(0, len(datagrams), window):
                for datagram in datagrams[start : start + window]:
                    server.datagram_received(datagram, address)
                await server._idle.wait()  # the group commits of this window are answered
            cpu, loop_cpu = time.process_time() - cpu, time.thread_time() - loop_cpu
            wall = time.perf_counter() - wall
            stored = store.page_count
            commits = metrics.registry.get_sample_value("tmdht_group_commit_pages_count") or 0
        finally:
            server.close()
            store.close()
    if stored != pages:
        raise SystemExit(f"node CPU run stored {stored} of {pages} pages")
    return {"pages": pages, "pages_per_datagram": per, "window": window, "pages_per_s": pages / wall,
            "process_cpu_us_per_page": cpu / pages * 1e6, "loop_cpu_us_per_page": loop_cpu / pages * 1e6,
            "group_commits": commits, "pages_per_group_commit": pages / commits if commits else float("nan")}


def node_cpu(args: argparse.Namespace) -> int:
    import uvloop  # noqa: PLC0415

    max_datagram = args.max_datagram or 32768
    runs = []
    for _ in range(args.repeat):
        runs.append(uvloop.run(node_cpu_run(args.pages, args.window or 64, max_datagram)))
        say(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in runs[-1].items()}))
    summary = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
    say(f"node PUT path in process: {summary['pages_per_datagram']} pages per datagram, window {summary['window']}, "
        f"{summary['pages_per_group_commit']:.0f} pages per group commit: CPU per replica write "
        f"{summary['process_cpu_us_per_page']:.1f} us (event loop thread {summary['loop_cpu_us_per_page']:.1f} us), "
        f"median of {len(runs)}, load {os.getloadavg()[0]:.1f}")
    write_json(args.out, {"git": git_state(), "mode": "node-cpu", "runs": runs, "summary": summary,
                          "load_average": os.getloadavg(), "shared_machine": True})
    return 0


def write_json(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")
    say(f"wrote {path}")


def median_of(rounds: list[dict[str, Any]], system: str, key: str) -> float:
    values = [r[system][key] for r in rounds if r[system].get(key) is not None]
    return statistics.median(values) if values else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pages", type=int, default=20_000, help="pages per pass")
    parser.add_argument("--repeat", type=int, default=3, help="rounds (a tmdht pass and a Redis pass each)")
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--put-batch", type=int, default=4096, help="pages per put_many call")
    parser.add_argument("--redis-batch", type=int, default=256, help="keys per MSET")
    parser.add_argument("--max-datagram", type=int, default=0, help="datagram size of nodes and client (0: default)")
    parser.add_argument("--window", type=int, default=0,
                        help="client window (0: library default); with --node-cpu, PUTs in flight (default 64)")
    parser.add_argument("--congestion-window", type=int, default=0, help="initial congestion window (0: default)")
    parser.add_argument("--timeout", type=float, default=0, help="client timeout floor, s (0: default)")
    parser.add_argument("--capacity", default="8GiB", help="--capacity of each node")
    parser.add_argument("--node-arg", action="append", default=[], help="extra flag for the nodes (repeatable)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/publish.json"))
    parser.add_argument("--node-cpu", action="store_true", help="one node's CPU per replica write, in process")
    args = parser.parse_args()
    args.pages = max(100, min(args.pages, 1_000_000))
    args.repeat = max(1, min(args.repeat, 20))
    if args.node_cpu:
        return node_cpu(args)
    ensure_baselines(install=True)
    import redis  # noqa: PLC0415
    import uvloop  # noqa: PLC0415

    from tmdht.net.burst import burst_implementation  # noqa: PLC0415

    doc: dict[str, Any] = {"cpus": os.cpu_count(), "git": git_state(), "data_path": burst_implementation(),
                           "args": {k: str(v) for k, v in vars(args).items()}, "shared_machine": True,
                           "load_average_start": os.getloadavg()}
    node_args = ["--log-level", "warning", "--log-format", "text", "--capacity", args.capacity, *args.node_arg]
    if args.max_datagram:
        node_args += ["--max-datagram", str(args.max_datagram)]
    with tempfile.TemporaryDirectory(prefix="tmdht-bench-publish-") as tmp:
        root = Path(tmp)
        (root / "redis").mkdir()
        with redis_server(root / "redis") as (port, pid), \
                LocalCluster(root / "nodes", args.nodes, replicas=args.replicas, extra_args=node_args) as cluster:
            client = redis.Redis(host="127.0.0.1", port=port)
            doc.update(uvloop.run(run(cluster, client, pid, args)))
            client.close()
    rounds = doc["rounds"]
    summary = {
        "tmdht_pages_per_s": median_of(rounds, "tmdht", "pages_per_s"),
        "redis_mset_pages_per_s": median_of(rounds, "redis", "pages_per_s"),
        "ratio_vs_redis": statistics.median(r["tmdht"]["pages_per_s"] / r["redis"]["pages_per_s"] for r in rounds),
        "client_cpu_us_per_page": median_of(rounds, "tmdht", "client_cpu_us_per_page"),
        "nodes_cpu_us_per_page": median_of(rounds, "tmdht", "nodes_cpu_us_per_page"),
        "nodes_cpu_us_per_replica_write": median_of(rounds, "tmdht", "nodes_cpu_us_per_replica_write"),
        "pages_per_group_commit": median_of(rounds, "tmdht", "pages_per_group_commit"),
        "under_replicated": sum(r["tmdht"]["under_replicated"] for r in rounds),
        "redis_cpu_us_per_page": median_of(rounds, "redis", "client_cpu_us_per_page")
        + median_of(rounds, "redis", "server_cpu_us_per_page"),
    }
    doc["summary"] = summary
    doc["load_average_end"] = os.getloadavg()
    say(f"{args.nodes} nodes, R={args.replicas}, {args.pages:,} random pages per pass, {args.repeat} rounds, "
        f"data path {doc['data_path']}, load {doc['load_average_start'][0]:.1f} -> {doc['load_average_end'][0]:.1f}")
    say(f"  tmdht put_many   {summary['tmdht_pages_per_s']:>9,.0f} pages/s  CPU/page client "
        f"{summary['client_cpu_us_per_page']:.1f} us + nodes {summary['nodes_cpu_us_per_page']:.1f} us "
        f"({summary['nodes_cpu_us_per_replica_write']:.1f} per replica write), "
        f"{summary['pages_per_group_commit']:.0f} pages per group commit, {summary['under_replicated']} under-replicated")
    say(f"  Redis MSET {args.redis_batch:<5} {summary['redis_mset_pages_per_s']:>9,.0f} pages/s  "
        f"CPU/page {summary['redis_cpu_us_per_page']:.1f} us (no persistence)")
    say(f"  ratio (median of rounds) {summary['ratio_vs_redis']:.3f}")
    write_json(args.out, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
