"""Benchmark the node's page store against naive LMDB (one value per page), in the same run.

For each layout: put throughput (batches of --batch pages, one synced transaction each), random
get_many throughput and latency (batches of --batch), on-disk ratio (allocated bytes / page
bytes), then --churn-rounds rounds of churn (delete --churn of the pages at random, put as many
new ones) with their throughput, ratio and write amplification (bytes the process passed to
write calls per page put, from /proc/self/io). Both layouts verify digests on put, so the
difference is the layout. Rates are taken from the median call, so other load on a shared
machine skews them less; JSON also has whole-phase means.

    python bench/storage.py                       # 100k pages, slab 64 vs naive
    python bench/storage.py --count 20000 --slab-pages 16,32,64 --capacity-factor 1

Prints a table and writes JSON (--out, default bench/results/storage.json). Bounded by --count
pages and by --max-seconds per phase.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import lmdb

from tmdht.node.storage import PageStore, PutResult
from tmdht.pages import PAGE_SIZE, ZERO_DIGEST, digest_page

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "storage.json"


class Store(Protocol):
    """What the benchmark drives; PageStore and the naive baseline both provide it."""

    def put_many(self, items: Sequence[tuple[bytes, bytes]]) -> list[PutResult]: ...
    def get_many(self, digests: Sequence[bytes]) -> list[bytes | None]: ...
    def delete_many(self, digests: Sequence[bytes]) -> int: ...
    def disk_bytes(self) -> int: ...
    def close(self) -> None: ...


class NaiveStore:
    """The baseline: LMDB with digest -> page, one 4096-byte value (two LMDB pages) per page."""

    def __init__(self, path: Path, map_size: int) -> None:
        self._path = path
        self._env = lmdb.open(str(path), map_size=map_size, max_dbs=1, readahead=False)
        self._db = self._env.open_db(b"pages")

    def put_many(self, items: Sequence[tuple[bytes, bytes]]) -> list[PutResult]:
        """Verify like PageStore, then store each page as its own value in one transaction."""
        results = []
        with self._env.begin(write=True) as txn:
            for digest, page in items:
                if len(page) != PAGE_SIZE or digest == ZERO_DIGEST or digest_page(page) != digest:
                    results.append(PutResult.REJECTED_DIGEST)
                elif txn.put(digest, page, overwrite=False, db=self._db):
                    results.append(PutResult.STORED)
                else:
                    results.append(PutResult.PRESENT)
        return results

    def get_many(self, digests: Sequence[bytes]) -> list[bytes | None]:
        """Pages copied out of the map, None when missing."""
        with self._env.begin(buffers=True) as txn:
            out: list[bytes | None] = []
            for digest in digests:
                view = txn.get(digest, db=self._db)
                out.append(None if view is None else bytes(view))
            return out

    def delete_many(self, digests: Sequence[bytes]) -> int:
        """Delete in one transaction."""
        with self._env.begin(write=True) as txn:
            return sum(txn.delete(digest, db=self._db) for digest in digests)

    def disk_bytes(self) -> int:
        """Allocated bytes of the LMDB files."""
        return sum(
            os.stat(self._path / name).st_blocks * 512
            for name in ("data.mdb", "lock.mdb")
            if (self._path / name).exists()
        )

    def close(self) -> None:
        """Close the environment."""
        self._env.close()


@dataclass
class Timings:
    """Per-call timings of one phase: (pages, seconds) for each store call."""

    calls: list[tuple[int, float]] = field(default_factory=list)

    def add(self, pages: int, seconds: float) -> None:
        self.calls.append((pages, seconds))

    @property
    def pages(self) -> int:
        return sum(pages for pages, _ in self.calls)

    def rate(self) -> float:
        """Pages/s from the median call: robust to other load on a shared machine."""
        if not self.calls:
            return 0.0
        return statistics.median(pages / seconds for pages, seconds in self.calls)

    def mean_rate(self) -> float:
        """Pages/s over the whole phase."""
        total = sum(seconds for _, seconds in self.calls)
        return self.pages / total if total else 0.0

    def latency_ms(self, quantile: float) -> float:
        """A quantile of the per-call latency in ms."""
        ordered = sorted(seconds for _, seconds in self.calls)
        return ordered[min(len(ordered) - 1, int(quantile * len(ordered)))] * 1e3


@dataclass
class LayoutResult:
    """Figures for one layout. Rates come from the median call (see ``Timings.rate``)."""

    layout: str
    pages: int
    put_pages_per_s: float
    put_pages_per_s_mean: float
    get_pages_per_s: float
    get_pages_per_s_mean: float
    get_us_per_page: float
    get_batch_ms_p50: float
    get_batch_ms_p99: float
    disk_ratio: float
    put_write_bytes_per_page: float | None
    churn_pages: int
    delete_pages_per_s: float
    churn_put_pages_per_s: float
    churn_disk_ratio: float
    churn_disk_ratios: list[float]
    churn_write_bytes_per_page: float | None


def write_bytes() -> int | None:
    """Bytes this process has passed to write calls so far (Linux /proc/self/io ``wchar``).

    ``wchar`` is what the store asked the kernel to write: the layout's write amplification.
    (``write_bytes``, the block-layer figure, also counts filesystem effects; on the ext4 VM
    this was measured on it grew with the file size even for the same writes.)
    """
    try:
        with open("/proc/self/io", encoding="ascii") as io:
            for line in io:
                if line.startswith("wchar:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def per_page(before: int | None, after: int | None, pages: int) -> float | None:
    """Write bytes per page, when /proc/self/io is readable."""
    if before is None or after is None or pages == 0:
        return None
    return (after - before) / pages


def put_pages(
    store: Store, count: int, batch: int, deadline: float, timings: Timings
) -> list[bytes]:
    """Put ``count`` random pages in batches (until the deadline); returns their digests."""
    digests: list[bytes] = []
    while len(digests) < count and time.perf_counter() < deadline:
        n = min(batch, count - len(digests))
        buffer = os.urandom(n * PAGE_SIZE)
        pages = [buffer[i * PAGE_SIZE : (i + 1) * PAGE_SIZE] for i in range(n)]
        items = [(digest_page(page), page) for page in pages]
        start = time.perf_counter()
        results = store.put_many(items)
        timings.add(n, time.perf_counter() - start)
        if any(result is not PutResult.STORED for result in results):
            raise SystemExit(f"unexpected put results: {set(results)}")
        digests.extend(digest for digest, _ in items)
    return digests


def timed_batches(
    call: Callable[[list[bytes]], object],
    keys: list[bytes],
    batch: int,
    deadline: float,
    timings: Timings,
) -> int:
    """Run ``call`` over ``keys`` in batches until done or the deadline; returns keys done."""
    done = 0
    while done < len(keys) and time.perf_counter() < deadline:
        chunk = keys[done : done + batch]
        start = time.perf_counter()
        call(chunk)
        timings.add(len(chunk), time.perf_counter() - start)
        done += len(chunk)
    return done


def run_layout(
    name: str, open_store: Callable[[], Store], args: argparse.Namespace, rng: random.Random
) -> LayoutResult:
    """Fill, read, measure and churn one layout."""
    store = open_store()
    try:
        puts = Timings()
        before = write_bytes()
        digests = put_pages(
            store, args.count, args.batch, time.perf_counter() + args.max_seconds, puts
        )
        put_wb = per_page(before, write_bytes(), len(digests))
        ratio = store.disk_bytes() / (len(digests) * PAGE_SIZE)

        order = digests[:]
        rng.shuffle(order)

        def get(chunk: list[bytes]) -> None:
            pages = store.get_many(chunk)
            if any(page is None for page in pages):
                raise SystemExit(f"{name}: a stored page is missing")

        gets = Timings()
        timed_batches(get, order, args.batch, time.perf_counter() + args.max_seconds, gets)
        # Spot-check content outside the timed loop.
        sample = order[:256]
        if any(
            digest_page(page or b"") != d
            for d, page in zip(sample, store.get_many(sample), strict=True)
        ):
            raise SystemExit(f"{name}: a page came back corrupted")

        # Churn: delete a random share and put as many new pages, --churn-rounds times, the
        # pattern of a ring that rebalances; figures are over all rounds.
        live = digests[:]
        deletes, refills = Timings(), Timings()
        before = write_bytes()
        churn_ratios = []
        for _ in range(args.churn_rounds):
            rng.shuffle(live)
            cut = int(len(live) * args.churn)
            deadline = time.perf_counter() + args.max_seconds
            done = timed_batches(store.delete_many, live[:cut], args.batch, deadline, deletes)
            live = live[done:]
            deadline = time.perf_counter() + args.max_seconds
            live.extend(put_pages(store, done, args.batch, deadline, refills))
            churn_ratios.append(round(store.disk_bytes() / (len(live) * PAGE_SIZE), 4))
        churn_wb = per_page(before, write_bytes(), refills.pages)
        get_rate = gets.rate()
        return LayoutResult(
            layout=name,
            pages=len(digests),
            put_pages_per_s=puts.rate(),
            put_pages_per_s_mean=puts.mean_rate(),
            get_pages_per_s=get_rate,
            get_pages_per_s_mean=gets.mean_rate(),
            get_us_per_page=1e6 / get_rate if get_rate else 0.0,
            get_batch_ms_p50=gets.latency_ms(0.5),
            get_batch_ms_p99=gets.latency_ms(0.99),
            disk_ratio=ratio,
            put_write_bytes_per_page=put_wb,
            churn_pages=deletes.pages,
            delete_pages_per_s=deletes.rate(),
            churn_put_pages_per_s=refills.rate(),
            churn_disk_ratio=churn_ratios[-1] if churn_ratios else ratio,
            churn_disk_ratios=churn_ratios,
            churn_write_bytes_per_page=churn_wb,
        )
    finally:
        store.close()


def print_table(results: list[LayoutResult], args: argparse.Namespace) -> None:
    """One row per layout; speeds also relative to the naive baseline."""
    base = next(result for result in results if result.layout == "naive")
    header = (
        f"{'layout':<10} {'pages':>7} {'put p/s':>9} {'x':>5} {'get p/s':>9} {'x':>5} "
        f"{'us/pg':>6} {'ratio':>6} {'wr B/pg':>8} {'del p/s':>9} {'churn p/s':>9} "
        f"{'ratio':>6} {'wr B/pg':>8}"
    )
    print(header)
    print("-" * len(header))

    def kib(value: float | None) -> str:
        return "n/a" if value is None else f"{value:8.0f}"

    for r in results:
        print(
            f"{r.layout:<10} {r.pages:>7} {r.put_pages_per_s:>9.0f} "
            f"{r.put_pages_per_s / base.put_pages_per_s:>5.2f} {r.get_pages_per_s:>9.0f} "
            f"{r.get_pages_per_s / base.get_pages_per_s:>5.2f} {r.get_us_per_page:>6.2f} "
            f"{r.disk_ratio:>6.3f} {kib(r.put_write_bytes_per_page):>8} "
            f"{r.delete_pages_per_s:>9.0f} {r.churn_put_pages_per_s:>9.0f} "
            f"{r.churn_disk_ratio:>6.3f} {kib(r.churn_write_bytes_per_page):>8}"
        )
    print(
        "ratio = allocated disk bytes / page bytes; wr B/pg = bytes written per page put; "
        f"churn = {args.churn_rounds} rounds of deleting {args.churn:.0%} at random and "
        "putting as many new pages"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=100_000, help="pages to put per layout")
    parser.add_argument("--batch", type=int, default=256, help="pages per put_many/get_many")
    parser.add_argument("--churn", type=float, default=0.1, help="share deleted and refilled")
    parser.add_argument("--churn-rounds", type=int, default=3, help="delete/refill rounds")
    parser.add_argument(
        "--capacity-factor", type=float, default=1.5, help="store capacity / pages put"
    )
    parser.add_argument(
        "--slab-pages", default="64", help="comma-separated slab sizes to compare (e.g. 16,32,64)"
    )
    parser.add_argument("--max-seconds", type=float, default=60.0, help="time bound per phase")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--dir", type=Path, default=None, help="scratch dir (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file")
    args = parser.parse_args(argv)
    if args.count < args.batch or args.batch < 1 or not 0 <= args.churn < 1:
        parser.error("need count >= batch >= 1 and 0 <= churn < 1")
    if args.churn_rounds < 0 or args.capacity_factor < 1:
        parser.error("need --churn-rounds >= 0 and --capacity-factor >= 1")
    slab_sizes = [int(size) for size in args.slab_pages.split(",")]
    rng = random.Random(args.seed)

    scratch = Path(tempfile.mkdtemp(prefix="tmdht-bench-", dir=args.dir))
    # Below capacity, holes are refilled lazily (cheap writes); at capacity every hole is
    # refilled (dense, more rewriting). --capacity-factor 1 measures the latter.
    capacity = int((args.count + args.batch) * args.capacity_factor) * PAGE_SIZE
    try:
        results = [
            run_layout(
                "naive",
                lambda: NaiveStore(scratch / "naive", map_size=4 * capacity + (256 << 20)),
                args,
                rng,
            )
        ]
        for size in slab_sizes:
            opener = functools.partial(
                PageStore.open, scratch / f"slab{size}", capacity_bytes=capacity, slab_pages=size
            )
            results.append(run_layout(f"slab{size}", opener, args, rng))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    print_table(results, args)
    report = {
        "benchmark": "storage",
        "config": {key: str(value) for key, value in vars(args).items()},
        "environment": {
            "python": sys.version.split()[0],
            "lmdb": lmdb.version(),
            "py_lmdb": lmdb.__version__,
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
        },
        "results": [asdict(result) for result in results],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
