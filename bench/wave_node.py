"""A store node's CPU per wave page: WAVE_PUT in store() calls of different sizes, WAVE_GET.

One real node process (``LocalCluster``, loopback), one ``WaveStoreClient``; the node's CPU
(user + system, from /proc) is read before and after each phase, so each row is that phase's
node CPU divided by its pages. Store batch sizes alternate over ``--reps`` rounds (fresh random
pages every time) and the medians are reported. A migration receiver at 100 Mbit/s that stored
every few pages it learned (what it did before batching) is the ``--small`` row; the receiver now
stores 256 at a time (``client.migration.WAVE_STORE_BATCH``).

    python bench/wave_node.py            # 4000 pages per phase, batches 2 and 256, 3 rounds
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
from pathlib import Path
from typing import Any

from tmdht.client.migration import WAVE_STORE_BATCH
from tmdht.client.store import TemplateStoreClient
from tmdht.client.wave import open_wave_client
from tmdht.node.local import LocalCluster
from tmdht.pages import PAGE_SIZE, digest_page
from tmdht.wave import WaveCredentials

REPO = Path(__file__).resolve().parent.parent
NODE_ARGS = ["--log-format", "text", "--log-level", "warning", "--wave-capacity", str(1 << 30)]


def node_cpu(pid: int) -> float:
    """User + system CPU seconds of process ``pid``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measure(cluster: LocalCluster, pages: int, batches: list[int], reps: int
                  ) -> dict[str, list[float]]:
    pid = cluster.nodes[0].pid
    out: dict[str, list[float]] = {}
    async with TemplateStoreClient([cluster.seed], cluster_key=cluster.key_file.read_text(),
                                   replicas=1) as store:
        wave = await open_wave_client(store, WaveCredentials("bench", os.urandom(32)),
                                      timeout=5.0)
        try:
            for _ in range(reps):
                for batch in batches:
                    data = [os.urandom(PAGE_SIZE) for _ in range(pages)]
                    items = [(digest_page(p), p) for p in data]
                    before = node_cpu(pid)
                    stored = 0
                    for i in range(0, pages, batch):
                        stored += await wave.store(items[i : i + batch])
                    after = node_cpu(pid)
                    if stored != pages:
                        raise RuntimeError(f"stored {stored} of {pages} pages")
                    out.setdefault(f"store, {batch} per call", []).append(
                        (after - before) / pages * 1e6)
                    found: dict[bytes, bytes] = {}
                    for i in range(0, pages, 512):
                        found |= await wave.fetch([d for d, _ in items[i : i + 512]])
                    if len(found) != pages:
                        raise RuntimeError(f"found {len(found)} of {pages} pages")
                    out.setdefault("fetch, 512 per call", []).append(
                        (node_cpu(pid) - after) / pages * 1e6)
        finally:
            wave.close()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=4000)
    parser.add_argument("--small", type=int, default=2)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "wave_node.json")
    args = parser.parse_args(argv)
    batches = [args.small, WAVE_STORE_BATCH]
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="tmdht-wave-node-") as tmp, \
            LocalCluster(Path(tmp), 1, extra_args=NODE_ARGS) as cluster:
        rows = asyncio.run(measure(cluster, args.pages, batches, args.reps))
    results: dict[str, Any] = {
        "conditions": {"pages": args.pages, "batches": batches, "reps": args.reps,
                       "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
                       "started": time.strftime("%Y-%m-%d %H:%M:%S %z")},
        "node_cpu_us_per_page": {k: [round(v, 1) for v in vs] for k, vs in rows.items()},
    }
    print("| phase | node CPU us/page (median) | rounds |\n|---|---|---|")
    for name, values in rows.items():
        print(f"| {name} | {statistics.median(values):.0f} | "
              f"{', '.join(f'{v:.0f}' for v in values)} |")
    print(f"load average {load_start[0]:.1f} -> {os.getloadavg()[0]:.1f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
