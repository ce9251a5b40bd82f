"""Anti-entropy traffic: the full HAS sweep vs range-hash comparison, and repair of a lost store.

Three real node processes on loopback, R = 3 (every page on every node), each store filled
*directly* with ``--pages`` random pages (node 0's LMDB store is written with
``PageStore.put_many`` in batches, then its files are copied to nodes 1 and 2: publishing a
million pages through the cluster would take far longer on a shared 2-core machine and measures
nothing this bench is about). Then, in one run:

1. ``--anti-entropy full`` (the earlier sweep): every node asks both peers HAS about every page.
2. ``--anti-entropy range`` (bucket hashes): the same stores, the same node identities.
   For each, one complete sweep per node is measured from the nodes' own counters
   (``tmdht_replication_traffic``: datagrams and bytes their replication client sent and
   received, UDP payloads), sampled in the idle gap after a sweep and after the next one.
3. Node 2 loses its whole store (its ``pages`` directory is deleted while it is down; it keeps
   its identity) and restarts; the range sweeps of nodes 0 and 1 repair it. Repair traffic is
   every replication datagram sent or received by any node from the restart until node 2 holds
   every page again and every node has finished a sweep after that, against the page bytes it
   lost (pages x 4096).

    python bench/antientropy.py                    # 1M pages (~13 GB of stores on disk)
    python bench/antientropy.py --pages 100000

Prints a table and writes JSON to bench/results/antientropy.json (``--out``). The stores are
deleted at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from support.cluster import metric, scrape

from tmdht.native import digest_pages
from tmdht.node.local import LocalCluster
from tmdht.node.storage import PageStore
from tmdht.pages import PAGE_SIZE

BATCH = 4096
QUIESCENT = 5.0
REPAIR_INTERVAL = 10.0
"""Sweep interval of the repair phase: node 2 restarts with its old identity, which its peers
see as an update, not a join, so the next periodic sweep repairs it. Sources other than a
bucket's designated one wait ``max(interval, surplus_grace)`` (3600 s here) before they push."""


def fill(path: Path, pages: int, capacity: int, seed: int) -> float:
    """Write ``pages`` random pages into a new store at ``path``; returns seconds taken."""
    rng = np.random.default_rng(seed)
    started = time.monotonic()
    with PageStore.open(path, capacity_bytes=capacity) as store:
        done = 0
        while done < pages:
            n = min(BATCH, pages - done)
            raw = rng.bytes(n * PAGE_SIZE)
            views = [raw[i * PAGE_SIZE : (i + 1) * PAGE_SIZE] for i in range(n)]
            digests = digest_pages(views)
            store.put_many(list(zip(digests, views, strict=True)))
            done += n
        assert store.page_count == pages
    return time.monotonic() - started


def traffic(c: LocalCluster, i: int) -> dict[str, float]:
    samples = scrape(c, i)
    out = {
        f"{direction}_{unit}": metric(samples, "tmdht_replication_traffic",
                                      direction=direction, unit=unit)
        for direction in ("sent", "received")
        for unit in ("datagrams", "bytes")
    }
    out["sweeps"] = metric(samples, "tmdht_replication_sweeps_total")
    out["pages"] = metric(samples, "tmdht_stored_pages")
    out["peers"] = metric(samples, "tmdht_known_peers")
    return out


def wait(check: Any, timeout: float, what: str, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / interval) + 2):  # bounded by count and time
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            break
        time.sleep(interval)  # polling other processes' metrics
    raise SystemExit(f"timed out: {what}")


def one_sweep_each(c: LocalCluster, timeout: float) -> dict[int, dict[str, float]]:
    """Per node, the replication traffic of exactly one complete sweep: counters read right
    after a sweep ends (the gap before the next one is the sweep interval) and right after the
    next one ends."""
    start: dict[int, dict[str, float]] = {}
    end: dict[int, dict[str, float]] = {}
    last = {i: traffic(c, i)["sweeps"] for i in range(3)}
    deadline = time.monotonic() + timeout
    while len(end) < 3:
        if time.monotonic() > deadline:
            raise SystemExit("timed out waiting for sweeps")
        for i in range(3):
            if i in end:
                continue
            now = traffic(c, i)
            if now["sweeps"] > last[i]:
                if i not in start:
                    start[i] = now
                elif now["sweeps"] == start[i]["sweeps"] + 1:
                    end[i] = now
                else:  # missed the boundary: start over from here
                    start[i] = now
                last[i] = now["sweeps"]
        time.sleep(0.05)  # polling other processes' metrics
    keys = ("sent_datagrams", "sent_bytes", "received_datagrams", "received_bytes")
    return {i: {k: end[i][k] - start[i][k] for k in keys} for i in range(3)}


def node_args(mode: str, interval: float) -> list[str]:
    return [
        "--anti-entropy", mode, "--replication-interval", str(interval),
        "--replication-rate", "200000", "--surplus-grace", "3600", "--capacity", "16GiB",
        "--log-format", "text",
    ]  # fmt: skip


def totals(per_node: dict[int, dict[str, float]]) -> dict[str, float]:
    out = {k: sum(v[k] for v in per_node.values()) for k in next(iter(per_node.values()))}
    out["datagrams"] = out["sent_datagrams"] + out["received_datagrams"]
    out["bytes"] = out["sent_bytes"] + out["received_bytes"]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=1_000_000)
    parser.add_argument("--root", type=Path, default=None, help="where the stores go (tmp)")
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).parent / "results" / "antientropy.json")
    parser.add_argument("--keep", action="store_true", help="keep the stores")
    parser.add_argument("--sweep-timeout", type=float, default=3600.0)
    args = parser.parse_args(argv)

    root = Path(tempfile.mkdtemp(prefix="antientropy-bench-", dir=args.root))
    result: dict[str, Any] = {
        "pages": args.pages, "replicas": 3, "nodes": 3, "machine": platform.node(),
        "cpus": os.cpu_count(), "load_before": os.getloadavg(),
    }  # fmt: skip
    try:
        capacity = 16 << 30
        print(f"filling node 0's store with {args.pages:,} pages ...", flush=True)
        result["fill_seconds"] = fill(root / "node-0" / "pages", args.pages, capacity, seed=16)
        for i in (1, 2):
            (root / f"node-{i}").mkdir()
            shutil.copytree(root / "node-0" / "pages", root / f"node-{i}" / "pages")
        print(f"filled in {result['fill_seconds']:.0f} s, copied to nodes 1 and 2", flush=True)

        sweeps: dict[str, dict[str, Any]] = {}
        for mode, interval in (("full", 5.0), ("range", 5.0)):
            with LocalCluster(root, 3, replicas=3, extra_args=node_args(mode, interval),
                              ready_timeout=300) as c:
                wait(lambda c=c: all(traffic(c, i)["peers"] == 2 for i in range(3)), 120,
                     "a complete view on every node")
                started = time.monotonic()
                per_node = one_sweep_each(c, args.sweep_timeout)
                sweeps[mode] = {"per_node": per_node, "total": totals(per_node),
                                "wall_seconds": time.monotonic() - started}
                print(f"{mode}: {sweeps[mode]['total']}", flush=True)
                print(f"{mode}: per node {sweeps[mode]['per_node']}", flush=True)
        result["sweeps"] = sweeps

        # Node 2 loses its whole store; nodes 0 and 1 repair it by range comparison.
        with LocalCluster(root, 3, replicas=3, extra_args=node_args("range", REPAIR_INTERVAL),
                          ready_timeout=300) as c:
            wait(lambda: all(traffic(c, i)["peers"] == 2 for i in range(3)), 120, "the view")
            settle(c)  # sweeps started by the joins are over
            c.stop_node(2)
            shutil.rmtree(root / "node-2" / "pages")
            before = {i: traffic(c, i) for i in (0, 1)}
            started = time.monotonic()
            c.restart_node(2)
            wait(lambda: traffic(c, 2)["pages"] >= args.pages, args.sweep_timeout,
                 "node 2 holding every page again")
            repaired = time.monotonic() - started
            # Then until no replication datagram moves for QUIESCENT seconds: node 2 checks the
            # pages PUT to it on their replicas (HAS), sweeps restarted by the rejoin finish.
            after = settle(c)
            keys = ("sent_datagrams", "sent_bytes", "received_datagrams", "received_bytes")
            zero = dict.fromkeys(keys, 0.0)
            per_node = {
                i: {k: after[i][k] - before.get(i, zero)[k] for k in keys} for i in range(3)
            }
            lost = args.pages * PAGE_SIZE
            total = totals(per_node)
            result["repair"] = {
                "lost_pages": args.pages, "lost_bytes": lost, "seconds": repaired,
                "per_node": per_node, "total": total, "ratio": total["bytes"] / lost,
            }  # fmt: skip
    finally:
        result["load_after"] = os.getloadavg()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    full, rng = result["sweeps"]["full"]["total"], result["sweeps"]["range"]["total"]
    rows = [
        ("quiet sweep, datagrams", full["datagrams"], rng["datagrams"]),
        ("quiet sweep, bytes", full["bytes"], rng["bytes"]),
    ]
    print(f"\n{args.pages:,} pages on each of 3 nodes, R = 3; one sweep per node, all nodes summed")
    print(f"{'':28} {'full HAS':>14} {'range hash':>14} {'range/full':>11}")
    for name, a, b in rows:
        print(f"{name:28} {a:>14,.0f} {b:>14,.0f} {b / a:>10.3%}")
    rep = result["repair"]
    print(f"\nnode 2 lost {rep['lost_pages']:,} pages ({rep['lost_bytes']:,} bytes): repaired in "
          f"{rep['seconds']:.0f} s with {rep['total']['bytes']:,.0f} bytes of replication "
          f"traffic in {rep['total']['datagrams']:,.0f} datagrams = {rep['ratio']:.3f}x the "
          f"bytes lost")
    print(f"load average before {result['load_before']}, after {result['load_after']}")
    result["quiet_ratio"] = {"datagrams": rng["datagrams"] / full["datagrams"],
                             "bytes": rng["bytes"] / full["bytes"]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


def settle(c: LocalCluster, timeout: float = 600.0) -> dict[int, dict[str, float]]:
    """Counters of every node once none changed for QUIESCENT seconds."""
    last = {i: traffic(c, i) for i in range(3)}
    still_since = time.monotonic()
    deadline = still_since + timeout
    while time.monotonic() < deadline:
        time.sleep(0.5)  # polling other processes' metrics
        now = {i: traffic(c, i) for i in range(3)}
        moved = any(now[i]["sent_datagrams"] != last[i]["sent_datagrams"]
                    or now[i]["received_datagrams"] != last[i]["received_datagrams"]
                    for i in range(3))
        last = now
        if moved:
            still_since = time.monotonic()
        elif time.monotonic() - still_since >= QUIESCENT:
            return now
    raise SystemExit("replication traffic did not settle")


if __name__ == "__main__":
    sys.exit(main())
