"""CPU per page of the data path's hot loops, in process: native against the pure-Python reference.

    python bench/datapath.py [--pages 8192] [--repeat 5] [--burst 8] [--out bench/results/datapath.json]

On a shared machine wall-clock throughput (bench/resolve.py) moves with the load; process CPU of
one loop, native and reference measured back to back in one run, much less. Figures (median of
--repeat, µs of process CPU per 4 KiB page, keyed auth, 32 KiB datagrams of 7 pages):

- client engine: a RequestEngine fetching --pages pages from one node, the node's answers
  prebuilt and fed back in bursts of --burst datagrams (submit, GET encoding, burst decoding and
  verification, bookkeeping); each implementation in its own process (TMDHT_NATIVE=0 for the
  reference, since the engine picks its decoder at import);
- client engine, PUT: the same engine storing --pages pages on 3 nodes (R=3: submit, PUT_PAGES
  encoding and sealing, PUT_RESULT decoding, bookkeeping), the nodes' answers recorded once and
  replayed (``--put-engine-only`` prints this one figure for this process's path, e.g. to
  compare two trees with PYTHONPATH);
- burst decoder alone: tmdht.net.burst.decode_burst_native vs decode_burst_reference;
- node answer: encode_pages_answer_native vs encode_pages_answer_reference for GETs of 56 pages;
- bulk hashing: tmdht._native.digest_pages on one thread, across cores (rayon), and blake3-py
  page by page (the mining/publish target: both cores >= 1.8x one).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeAlias

from tmdht import wire
from tmdht.auth import Authenticator, ClusterKey, KeyRing
from tmdht.pages import PAGE_SIZE, PageDigest, digest_page

KEY = ClusterKey(1, bytes(range(32)))
NODE = ("127.0.0.1", 9)


def make_pages(count: int) -> tuple[list[bytes], list[PageDigest]]:
    rng = random.Random(1)
    pages = [rng.randbytes(PAGE_SIZE) for _ in range(count)]
    return pages, [PageDigest(digest_page(p)) for p in pages]


def node_auth() -> Authenticator:
    return Authenticator(keyring=KeyRing(KEY), replay=None)


def cpu_per_page(run: Callable[[], object], pages: int, repeat: int) -> float:
    samples = []
    for _ in range(repeat):
        started = time.process_time()
        run()
        samples.append((time.process_time() - started) / pages * 1e6)
    return statistics.median(samples)


Steps: TypeAlias = list[list[tuple[bytes, tuple[str, int]]]]
"""The nodes' answers to an engine, one list per round of its requests."""


def record_answers(
    engine: Any, answer: Callable[[wire.Message, tuple[str, int]], list[bytes]]
) -> Steps:
    """Drive ``engine`` to the end, each request it sends answered by ``answer(request,
    node)`` (its answer datagrams, sealed by the nodes' key): the answers, round by round."""
    answer_auth = node_auth()
    steps: Steps = []
    while out := engine.datagrams_to_send(0.0):
        step = []
        for data, node in out:
            request = wire.decode(data, max_datagram=wire.MAX_DATAGRAM, auth=answer_auth,
                                  now=time.time())
            step += [(datagram, node) for datagram in answer(request, node)]
        steps.append(step)
        engine.receive_datagrams(step, 0.0)
    return steps


def replay(engine: Any, steps: Steps, burst: int) -> None:
    """Feed recorded answers to a fresh ``engine`` (request ids are predictable), ``burst``
    datagrams per wake-up: only the client's work runs."""
    for step in steps:
        engine.datagrams_to_send(0.0)
        for at in range(0, len(step), burst):
            engine.receive_datagrams(step[at : at + burst], 0.0)


def engine_cpu(count: int, repeat: int, burst: int) -> float:
    """This process's engine (whichever decoder it picked at import)."""
    from tmdht.net.engine import RequestEngine  # noqa: PLC0415
    from tmdht.net.operations import EngineConfig, Fetch  # noqa: PLC0415

    pages, digests = make_pages(count)
    by_digest = dict(zip(digests, pages, strict=True))
    answer_auth = node_auth()

    def start() -> RequestEngine:
        eng = RequestEngine(node_auth(), EngineConfig(), first_request_id=1)
        eng.submit(Fetch(digests, [[0]] * count, [NODE], False), 0.0)
        return eng

    def serve(request: wire.Message, _: tuple[str, int]) -> list[bytes]:
        assert isinstance(request, wire.GetPages)
        return wire.encode_pages_response(
            request.request_id, [(d, by_digest[d]) for d in request.digests], [],
            max_datagram=32768, auth=answer_auth, now=time.time(),
        )

    steps = record_answers(start(), serve)  # once; then replayed

    def run() -> None:
        eng = start()
        replay(eng, steps, burst)
        event = eng.next_event()
        assert event is not None and len(getattr(event.result, "pages", ())) == count

    return cpu_per_page(run, count, repeat)


REPLICAS: tuple[tuple[str, int], ...] = tuple(("127.0.0.1", 10 + i) for i in range(3))


def put_engine_cpu(count: int, repeat: int, burst: int) -> float:
    """This process's engine storing --pages pages on 3 nodes (a publish at R=3): CPU per page
    of submit, PUT encoding and sealing, PUT_RESULT decoding and the bookkeeping; the nodes'
    answers recorded once and replayed in bursts, so only the client's work is timed."""
    from tmdht.net.engine import RequestEngine  # noqa: PLC0415
    from tmdht.net.operations import EngineConfig, Store  # noqa: PLC0415

    pages, digests = make_pages(count)
    items = list(zip(digests, pages, strict=True))
    answer_auth = node_auth()

    def start() -> RequestEngine:
        eng = RequestEngine(node_auth(), EngineConfig(), first_request_id=1)
        for node in REPLICAS:
            eng.submit(Store(node, items), 0.0)
        return eng

    def store(request: wire.Message, _: tuple[str, int]) -> list[bytes]:
        assert isinstance(request, wire.PutPages)
        return wire.encode_put_response(
            request.request_id, [(d, wire.PutStatus.STORED) for d, _ in request.pages],
            max_datagram=32768, auth=answer_auth, now=time.time())

    steps = record_answers(start(), store)

    def run() -> None:
        eng = start()
        replay(eng, steps, burst)
        done = [eng.next_event() for _ in REPLICAS]
        assert all(len(getattr(e, "result").status) == count for e in done)  # noqa: B009

    return cpu_per_page(run, count, repeat)


def engine_in_subprocess(native: bool, args: argparse.Namespace, mode: str = "--engine-only") -> float:
    env = dict(os.environ, TMDHT_NATIVE="1" if native else "0")
    out = subprocess.run(
        [sys.executable, __file__, mode, "--pages", str(args.pages),
         "--repeat", str(args.repeat), "--burst", str(args.burst)],
        env=env, capture_output=True, text=True, check=True,
    )
    return float(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pages", type=int, default=8192)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--burst", type=int, default=8, help="datagrams per receive_datagrams")
    parser.add_argument("--out", type=Path, default=Path("bench/results/datapath.json"))
    parser.add_argument("--engine-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--put-engine-only", action="store_true",
                        help="print only the PUT engine's CPU us per page (this process's path)")
    args = parser.parse_args()
    args.pages = max(512, min(args.pages, 200_000))
    if args.engine_only:
        print(engine_cpu(args.pages, args.repeat, args.burst))
        return 0
    if args.put_engine_only:
        print(put_engine_cpu(args.pages, args.repeat, args.burst))
        return 0
    from tmdht import _native  # noqa: PLC0415 - the comparison needs the extension
    from tmdht.net.burst import (  # noqa: PLC0415
        decode_burst_native,
        decode_burst_reference,
        encode_pages_answer_native,
        encode_pages_answer_reference,
    )

    doc: dict[str, Any] = {"cpus": os.cpu_count(), "load_average_start": os.getloadavg(),
                           "pages": args.pages, "repeat": args.repeat, "burst": args.burst}
    rows: dict[str, tuple[float, float]] = {}
    rows["client engine (fetch, decode, verify, bookkeeping)"] = (
        engine_in_subprocess(True, args), engine_in_subprocess(False, args))
    rows["client engine, PUT to 3 replicas (encode, seal, answers)"] = (
        engine_in_subprocess(True, args, "--put-engine-only"),
        engine_in_subprocess(False, args, "--put-engine-only"))

    pages, digests = make_pages(args.pages)
    sealer = node_auth()
    datagrams: list[bytes] = []
    for at in range(0, args.pages, 7):
        pairs = list(zip(digests[at : at + 7], pages[at : at + 7], strict=True))
        datagrams += wire.encode_pages_response(at, pairs, [], max_datagram=32768, auth=sealer,
                                                now=time.time())
    bursts = [datagrams[at : at + args.burst] for at in range(0, len(datagrams), args.burst)]
    now = time.time()

    def decode_with(decode: Callable[..., list[Any]], **extra: Any) -> Callable[[], None]:
        def run() -> None:
            opener = node_auth()
            for burst in bursts:
                decode(burst, auth=opener, now=now, **extra)
        return run

    rows["burst decoder (auth, header, body, BLAKE3 per page)"] = (
        cpu_per_page(decode_with(decode_burst_native, native=_native), args.pages, args.repeat),
        cpu_per_page(decode_with(decode_burst_reference), args.pages, args.repeat),
    )

    views: list[memoryview | None] = [memoryview(p) for p in pages]

    def answer_with(encode: Callable[..., Any], **extra: Any) -> Callable[[], None]:
        def run() -> None:
            for at in range(0, args.pages, 56):
                encode(at, digests[at : at + 56], views[at : at + 56], max_datagram=32768,
                       auth=sealer, now=now, **extra)
        return run

    rows["node answer (plan, body, seal; GETs of 56)"] = (
        cpu_per_page(answer_with(encode_pages_answer_native, native=_native), args.pages,
                     args.repeat),
        cpu_per_page(answer_with(encode_pages_answer_reference), args.pages, args.repeat),
    )

    def wall_per_page(run: Callable[[], object]) -> float:
        samples = []
        for _ in range(args.repeat):
            started = time.perf_counter()
            run()
            samples.append((time.perf_counter() - started) / args.pages * 1e6)
        return statistics.median(samples)

    from blake3 import blake3  # noqa: PLC0415

    one = wall_per_page(lambda: _native.digest_pages(pages, threads=False))
    both = wall_per_page(lambda: _native.digest_pages(pages, threads=True))
    python = wall_per_page(lambda: [blake3(p).digest() for p in pages])
    doc["hashing_wall_us_per_page"] = {"native_one_thread": one, "native_rayon": both,
                                       "blake3_py_loop": python, "rayon_speedup": one / both}
    doc["cpu_us_per_page"] = {name: {"native": n, "reference": r} for name, (n, r) in rows.items()}
    doc["load_average_end"] = os.getloadavg()

    print(f"CPU us per 4 KiB page (median of {args.repeat}; {os.cpu_count()} CPUs, load average "
          f"{doc['load_average_start'][0]:.1f} at start, {doc['load_average_end'][0]:.1f} at end)")
    print(f"{'loop':52}{'native':>9}{'reference':>11}{'ratio':>8}")
    for name, (n, r) in rows.items():
        print(f"{name:52}{n:9.2f}{r:11.2f}{r / n:7.2f}x")
    print(f"bulk hashing, wall us/page: native one thread {one:.2f}, rayon {both:.2f} "
          f"({one / both:.2f}x; target >= 1.8x on 2 cores), blake3-py loop {python:.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
