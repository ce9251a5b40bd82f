"""Replica placement speed, and load balance against virtual IDs.

    python bench/placement.py [--ref main] [--nodes 4,32,1000,10000] [--batches 1,16,1024]
                              [--replicas 3] [--repeat 5] [--out bench/results/placement.json]
                              [--vids 1,4,8,16,32] [--draws 20] [--keys 100000] [--skip-speed]

Speed: times :func:`tmdht.placement.replica_rows` (what the client calls for every operation)
with one token per node (``virtual_ids=1``, placement by node ID) of this tree and of
``tmdht/placement.py`` at git revision ``--ref`` (loaded from ``git show`` into its own module;
a revision without virtual IDs places by node ID), interleaved in the same run, on the same
random 32-byte digests and node IDs, after checking both place alike. The same view is placed
again and again, as a client does between membership changes. Also timed for this tree: a
prepared view (:class:`tmdht.placement.Ring`, what node and client keep per membership view),
the same with failure domains (10 zones x 4 racks, nodes spread at random), the same with
domains and the default virtual IDs, and the cost of preparing a view with domains and the
default virtual IDs (paid once per membership change).

Balance (``--vids``): for each V, ``--draws`` random rings of 32 nodes in 8 hosts of 4 (the
32-node ring of bench/multihost.py, each host a failure domain), ``--keys`` random keys, R
replicas: copies per node max/mean (median, min and max over the draws), the share of the
2**16 anti-entropy buckets that are not uniform (:class:`tmdht.rangehash.BucketOwners`), and
the microseconds per digest of a prepared view's ``replica_rows`` (batches of 1 and 1024) and
of preparing the view.

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
from tmdht.placement import VIRTUAL_IDS, FailureDomain, Ring
from tmdht.rangehash import BucketOwners

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


def hosts(count: int, per_host: int = 4) -> list[FailureDomain]:
    """Failure domains of ``count`` nodes, ``per_host`` to a host."""
    return [FailureDomain(host=f"h{i // per_host}") for i in range(count)]


def balance(vids: list[int], draws: int, keys: int, replicas: int, repeat: int, seed: int
            ) -> list[dict[str, Any]]:
    """The balance part (see the module docstring): one row per V."""
    rows: list[dict[str, Any]] = []
    domains = hosts(32)
    print(f"\n32 nodes in 8 hosts of 4, R={replicas}, {keys} random keys, {draws} draws: copies "
          f"per node max/mean; non-uniform buckets; us per digest (prepared view, batch 1 and "
          f"1024); ms to prepare the view")
    print(f"{'V':>4} {'median':>7} {'min':>6} {'max':>6} {'nonunif':>8} {'us/1':>7} "
          f"{'us/1024':>8} {'view ms':>8}")
    for v in vids:
        spreads, nonuniform = [], []
        for draw in range(draws):
            rng = np.random.default_rng([seed, draw])
            ids = [rng.bytes(20) for _ in range(32)]
            ring = Ring(ids, domains, virtual_ids=v)
            placed = ring.replica_indices(rng.integers(0, 256, (keys, 32), dtype=np.uint8), replicas)
            loads = np.bincount(placed.ravel(), minlength=32)
            spreads.append(float(loads.max() / loads.mean()))
            nonuniform.append(float(1 - BucketOwners(ring, replicas).uniform.mean()))
        rng = np.random.default_rng([seed, 99])
        ids = [rng.bytes(20) for _ in range(32)]
        ring = Ring(ids, domains, virtual_ids=v)
        one, batch = [rng.bytes(32)], [rng.bytes(32) for _ in range(1024)]
        us = per_call_us({"1": partial(ring.replica_rows, one, replicas),
                          "1024": partial(ring.replica_rows, batch, replicas),
                          "view": partial(Ring, ids, domains, virtual_ids=v)}, repeat)
        row = {"virtual_ids": v, "nodes": 32, "hosts": 8, "draws": draws, "keys": keys,
               "max_over_mean_median": statistics.median(spreads),
               "max_over_mean_min": min(spreads), "max_over_mean_max": max(spreads),
               "max_over_mean": spreads, "nonuniform_buckets_median": statistics.median(nonuniform),
               "us_per_digest_batch1": us["1"], "us_per_digest_batch1024": us["1024"] / 1024,
               "view_us": us["view"]}
        rows.append(row)
        print(f"{v:>4} {row['max_over_mean_median']:>7.3f} {row['max_over_mean_min']:>6.3f} "
              f"{row['max_over_mean_max']:>6.3f} {row['nonuniform_buckets_median']:>8.2%} "
              f"{us['1']:>7.2f} {us['1024'] / 1024:>8.3f} {us['view'] / 1000:>8.2f}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--ref", default="main", help="git revision to compare with (default main)")
    parser.add_argument("--nodes", default="4,32,1000,10000")
    parser.add_argument("--batches", default="1,16,1024")
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/placement.json")
    parser.add_argument("--vids", default="1,4,8,16,32", help="virtual IDs of the balance part")
    parser.add_argument("--draws", type=int, default=20)
    parser.add_argument("--keys", type=int, default=100_000)
    parser.add_argument("--skip-speed", action="store_true", help="only the balance part")
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    if not args.skip_speed:
        rows = speed(args)
    vids = balance([int(v) for v in args.vids.split(",")], args.draws, args.keys, args.replicas,
                   args.repeat, args.seed) if args.vids else []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {"bench": "placement", "ref": args.ref, "replicas": args.replicas, "repeat": args.repeat,
              "default_virtual_ids": VIRTUAL_IDS,
              "machine": {"cpus": os.cpu_count(), "load_avg": os.getloadavg(), "python": sys.version.split()[0],
                          "platform": platform.platform(), "numpy": np.__version__},
              "rows": rows, "virtual_ids": vids}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


def speed(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The speed part (see the module docstring)."""
    reference = load_reference(args.ref)
    rng = np.random.default_rng(args.seed)
    rows: list[dict[str, Any]] = []
    # A revision from before virtual IDs places by node ID alone.
    by_id = {"virtual_ids": 1} if "virtual_ids" in reference.replica_rows.__code__.co_varnames else {}
    print(f"replica_rows, R={args.replicas}: microseconds per digest (median of {args.repeat}); "
          f"reference = {args.ref}")
    print(f"{'nodes':>6} {'batch':>6} {'ref':>9} {'this':>9} {'ref/this':>9} {'Ring':>9} "
          f"{'domains':>9} {f'dom+V={VIRTUAL_IDS}':>9} {'new view':>9}")
    for nodes in (int(n) for n in args.nodes.split(",")):
        ids = [rng.bytes(20) for _ in range(nodes)]
        domains = zones(nodes, rng)
        flat, spread = Ring(ids, virtual_ids=1), Ring(ids, domains, virtual_ids=1)
        tokens = Ring(ids, domains)
        view_us = per_call_us({"view": partial(Ring, ids, domains)}, args.repeat)["view"]
        for batch in (int(b) for b in args.batches.split(",")):
            digests = [rng.bytes(32) for _ in range(batch)]
            want = reference.replica_rows(digests, ids, args.replicas, **by_id)
            if placement.replica_rows(digests, ids, args.replicas, virtual_ids=1) != want:
                raise SystemExit(f"this tree places differently from {args.ref} ({nodes} nodes)")
            timed = {
                "ref": partial(reference.replica_rows, digests, ids, args.replicas, **by_id),
                "this": partial(placement.replica_rows, digests, ids, args.replicas, virtual_ids=1),
                "ring": partial(flat.replica_rows, digests, args.replicas),
                "domains": partial(spread.replica_rows, digests, args.replicas),
                "tokens": partial(tokens.replica_rows, digests, args.replicas),
            }
            us = {name: value / batch for name, value in per_call_us(timed, args.repeat).items()}
            rows.append({"nodes": nodes, "batch": batch, "new_view_us": view_us,
                         **{f"{name}_us_per_digest": value for name, value in us.items()}})
            print(f"{nodes:>6} {batch:>6} {us['ref']:>9.2f} {us['this']:>9.2f} "
                  f"{us['ref'] / us['this']:>9.2f} {us['ring']:>9.2f} {us['domains']:>9.2f} "
                  f"{us['tokens']:>9.2f} {view_us:>9.0f}")
    return rows


if __name__ == "__main__":
    main()
