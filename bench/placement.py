"""Replica placement speed: microseconds per digest, this tree against a reference revision.

    python bench/placement.py [--ref main] [--nodes 4,32,1000,10000] [--batches 1,16,1024]
                              [--replicas 3] [--repeat 5] [--out bench/results/placement.json]

Times :func:`tmdht.placement.replica_rows` (what the client calls for every operation) of this
tree and of ``tmdht/placement.py`` at git revision ``--ref`` (loaded from ``git show`` into its
own module), interleaved in the same run, on the same random 32-byte digests and node IDs. The
same view is placed again and again, as a client does between membership changes. Also timed for
this tree: a prepared view (:class:`tmdht.placement.Ring`, what node and client keep per
membership view), the same with failure domains (10 zones x 4 racks, nodes spread at random),
and the cost of preparing a view with domains (paid once per membership change; the module
functions keep the last few views, so "this" pays it only once too).

Each figure is the median of --repeat rounds; a round calls each variant in turn for at least
50 ms, so a busy spell of a shared machine hits them alike. Compare the ratios (same run) rather
than absolute figures across runs.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from tmdht import placement
from tmdht.placement import FailureDomain, Ring

ROOT = Path(__file__).resolve().parent.parent


def load_reference(rev: str) -> ModuleType:
    """``tmdht/placement.py`` as of git revision ``rev``, as a module of its own."""
    source = subprocess.run(["git", "show", f"{rev}:tmdht/placement.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    spec = importlib.util.spec_from_loader(f"placement_at_{rev}", loader=None)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    exec(compile(source, f"{rev}:tmdht/placement.py", "exec"), module.__dict__)
    return module


def per_call_us(calls: Mapping[str, Callable[[], object]], repeat: int, min_time: float = 0.05) -> dict[str, float]:
    """Median over ``repeat`` rounds of the mean microseconds per call of each of ``calls``;
    the rounds take the calls in turn, so a busy spell of a shared machine hits them alike."""
    runs: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeat):
        for name, call in calls.items():
            count, started = 0, time.perf_counter()
            while True:
                call()
                count += 1
                elapsed = time.perf_counter() - started
                if elapsed >= min_time or count >= 100_000:
                    break
            runs[name].append(elapsed / count * 1e6)
    return {name: statistics.median(values) for name, values in runs.items()}


def zones(count: int, rng: np.random.Generator) -> list[FailureDomain]:
    """Failure domains of ``count`` nodes spread at random over 10 zones x 4 racks."""
    return [FailureDomain(zone=f"z{rng.integers(10)}", rack=f"r{rng.integers(4)}", host=f"h{i}")
            for i in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--ref", default="main", help="git revision to compare with (default main)")
    parser.add_argument("--nodes", default="4,32,1000,10000")
    parser.add_argument("--batches", default="1,16,1024")
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/placement.json")
    args = parser.parse_args()
    reference = load_reference(args.ref)
    rng = np.random.default_rng(args.seed)
    rows: list[dict[str, Any]] = []
    print(f"replica_rows, R={args.replicas}: microseconds per digest (median of {args.repeat}); "
          f"reference = {args.ref}")
    print(f"{'nodes':>6} {'batch':>6} {'ref':>9} {'this':>9} {'ref/this':>9} {'Ring':>9} "
          f"{'domains':>9} {'new view':>9}")
    for nodes in (int(n) for n in args.nodes.split(",")):
        ids = [rng.bytes(20) for _ in range(nodes)]
        domains = zones(nodes, rng)
        flat, spread = Ring(ids), Ring(ids, domains)
        view_us = per_call_us({"view": partial(Ring, ids, domains)}, args.repeat)["view"]
        for batch in (int(b) for b in args.batches.split(",")):
            digests = [rng.bytes(32) for _ in range(batch)]
            want = reference.replica_rows(digests, ids, args.replicas)
            if placement.replica_rows(digests, ids, args.replicas) != want:
                raise SystemExit(f"this tree places differently from {args.ref} ({nodes} nodes)")
            timed = {
                "ref": partial(reference.replica_rows, digests, ids, args.replicas),
                "this": partial(placement.replica_rows, digests, ids, args.replicas),
                "ring": partial(flat.replica_rows, digests, args.replicas),
                "domains": partial(spread.replica_rows, digests, args.replicas),
            }
            us = {name: value / batch for name, value in per_call_us(timed, args.repeat).items()}
            rows.append({"nodes": nodes, "batch": batch, "new_view_us": view_us,
                         **{f"{name}_us_per_digest": value for name, value in us.items()}})
            print(f"{nodes:>6} {batch:>6} {us['ref']:>9.2f} {us['this']:>9.2f} "
                  f"{us['ref'] / us['this']:>9.2f} {us['ring']:>9.2f} {us['domains']:>9.2f} {view_us:>9.0f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {"bench": "placement", "ref": args.ref, "replicas": args.replicas, "repeat": args.repeat,
              "machine": {"cpus": os.cpu_count(), "load_avg": os.getloadavg(), "python": sys.version.split()[0],
                          "platform": platform.platform(), "numpy": np.__version__},
              "rows": rows}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
