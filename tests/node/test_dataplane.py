"""The data plane over real UDP sockets: a node's server and the client transport."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import uvloop
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tmdht import wire
from tmdht.aio.dataplane import DataPlaneClient
from tmdht.auth import Authenticator, ClusterKey, KeyRing
from tmdht.errors import UsageError
from tmdht.net.address import Address
from tmdht.node.dataplane import DataPlaneServer
from tmdht.node.groupcommit import CommitPacing
from tmdht.node.metrics import NodeMetrics
from tmdht.node.storage import PageStore
from tmdht.pages import ZERO_PAGE, digest_page

KEY = ClusterKey(1, os.urandom(32))
STORED = wire.PutStatus.STORED


def keyed() -> Authenticator:
    return Authenticator.keyed(KeyRing(KEY))


def pages(n: int, seed: int = 0) -> list[tuple[bytes, bytes]]:
    out = []
    for i in range(n):
        page = ((seed + 1).to_bytes(4, "big") + i.to_bytes(4, "big")) * 512
        out.append((digest_page(page), page))
    return out


def run(coro: Callable[[], Awaitable[None]], loop: str = "asyncio") -> None:
    if loop == "uvloop":
        uvloop.run(asyncio.wait_for(coro(), 60))
    else:
        asyncio.run(asyncio.wait_for(coro(), 60))


@asynccontextmanager
async def node(
    tmp: Path, *, max_datagram: int = 32768, capacity: int = 64 << 20, **kw: Any
) -> AsyncIterator[tuple[DataPlaneServer, NodeMetrics]]:
    metrics = NodeMetrics()
    store = PageStore.open(tmp / "store", capacity_bytes=capacity)

    def info(rid: int) -> wire.NodeInfo:
        return wire.NodeInfo(
            request_id=rid,
            node_id=b"\x01" * 20,
            data_address=server.address,
            kademlia_port=1,
            metrics_port=2,
            version="test",
            pages_stored=store.page_count,
            bytes_stored=store.bytes_stored,
            capacity_bytes=store.capacity_bytes,
        )

    server = await DataPlaneServer.start(
        "127.0.0.1",
        0,
        store=store,
        auth=keyed(),
        max_datagram=max_datagram,
        metrics=metrics,
        node_info=info,
        **kw,
    )
    try:
        yield server, metrics
    finally:
        await server.drain(5)
        server.close()
        store.close()


def sample(metrics: NodeMetrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels or None)
    return value or 0.0


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_put_get_has_info(tmp_path: Path, loop: str) -> None:
    async def main() -> None:
        async with (
            node(tmp_path) as (server, metrics),
            await DataPlaneClient.open(keyed()) as client,
        ):
            data = pages(300)
            put = await client.put_pages(server.address, data)
            assert not put.unanswered
            assert set(put.status.values()) == {wire.PutStatus.STORED}
            again = await client.put_pages(server.address, data[:10])
            assert set(again.status.values()) == {wire.PutStatus.PRESENT}
            absent = [d for d, _ in pages(20, seed=9)]
            got = await client.get_pages(server.address, [d for d, _ in data] + absent)
            assert got.pages == dict(data)
            assert got.missing == set(absent) and not got.unanswered and not got.corrupt
            has = await client.has(server.address, [data[0][0], absent[0]])
            assert has.held == {data[0][0]} and has.lacking == {absent[0]}
            info = await client.node_info(server.address)
            assert info.pages_stored == 300 and info.data_address == server.address
            assert sample(metrics, "tmdht_requests_total", type="get_pages") >= 1
            assert sample(metrics, "tmdht_pages_served_total") == 300
            assert sample(metrics, "tmdht_misses_total") == 20
            assert sample(metrics, "tmdht_put_pages_total", result="stored") == 300

    run(main, loop)


class _FullSocket:
    """Stands in for the server's socket: every sendmsg finds the send buffer full."""

    def __init__(self) -> None:
        self.refused = 0

    def sendmsg(self, *args: Any) -> int:
        self.refused += 1
        raise BlockingIOError


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_gets_fall_back_to_the_transport_when_the_socket_is_full(tmp_path: Path, loop: str) -> None:
    """Datagrams sendmsg cannot take are joined (copied out of the read transaction) and queued
    on the transport: every page still arrives, intact."""

    async def main() -> None:
        async with (
            node(tmp_path) as (server, _),
            await DataPlaneClient.open(keyed()) as client,
        ):
            data = pages(40)
            await client.put_pages(server.address, data)
            full = _FullSocket()
            server._sock = full  # type: ignore[assignment]
            got = await client.get_pages(server.address, [d for d, _ in data])
            assert got.pages == dict(data) and not got.corrupt and not got.unanswered
            assert full.refused >= 3  # 40 pages at 32 KiB datagrams: at least 6 parts

    run(main, loop)


def test_a_page_altered_in_the_bulk_is_refused_by_its_digest(tmp_path: Path) -> None:
    """Wire v2 carries pages outside the tag: a PUT whose page bytes were changed on the way
    still authenticates, and the node refuses the page because its digest does not match."""

    async def main() -> None:
        async with node(tmp_path) as (server, metrics):
            (d1, p1), (d2, p2) = pages(2, seed=5)
            auth = keyed()
            datagram = bytearray(
                wire.encode(
                    wire.PutPages(request_id=77, pages=((d1, p1), (d2, p2))),
                    max_datagram=32768,
                    auth=auth,
                    now=time.time(),
                )
            )
            datagram[-100] ^= 0x01  # a byte of the second page, in the bulk
            loop = asyncio.get_running_loop()
            raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            raw.setblocking(False)
            try:
                raw.bind(("127.0.0.1", 0))
                await loop.sock_sendto(raw, bytes(datagram), server.address)
                answer = await asyncio.wait_for(loop.sock_recv(raw, 65536), 10)
            finally:
                raw.close()
            result = wire.decode(answer, max_datagram=65507, auth=auth, now=time.time())
            assert isinstance(result, wire.PutResult) and result.request_id == 77
            assert dict(result.results) == {
                d1: wire.PutStatus.STORED,
                d2: wire.PutStatus.REJECTED_DIGEST,
            }
            assert server.store.has_many([d1, d2]) == [True, False]
            assert sample(metrics, "tmdht_put_rejected_total", reason="digest") == 1
            assert sample(metrics, "tmdht_bad_datagrams_total", reason="auth") == 0

    run(main)


def test_wrong_digest_and_zero_page_are_rejected(tmp_path: Path) -> None:
    async def main() -> None:
        async with (
            node(tmp_path) as (server, metrics),
            await DataPlaneClient.open(keyed()) as client,
        ):
            (d1, _), (d2, p2) = pages(2)
            put = await client.put_pages(
                server.address, [(d1, p2), (digest_page(ZERO_PAGE), ZERO_PAGE), (d2, p2)]
            )
            assert put.status[d1] == wire.PutStatus.REJECTED_DIGEST
            assert put.status[digest_page(ZERO_PAGE)] == wire.PutStatus.REJECTED_ZERO
            assert put.status[d2] == wire.PutStatus.STORED
            assert (await client.get_pages(server.address, [d1])).missing == {d1}
            assert sample(metrics, "tmdht_put_rejected_total", reason="digest") == 1
            assert sample(metrics, "tmdht_put_rejected_total", reason="zero") == 1
            assert sample(metrics, "tmdht_put_pages_total", result="rejected_zero") == 1
            assert sample(metrics, "tmdht_put_pages_total", result="stored") == 1

    run(main)


def test_bad_datagrams_are_dropped_and_counted_while_serving(tmp_path: Path) -> None:
    async def main() -> None:
        async with (
            node(tmp_path) as (server, metrics),
            await DataPlaneClient.open(keyed()) as client,
        ):
            data = pages(5)
            await client.put_pages(server.address, data)
            raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                good = wire.encode(
                    wire.GetPages(request_id=7, digests=(data[0][0],)),
                    max_datagram=32768,
                    auth=keyed(),
                    now=time.time(),
                )
                stranger = wire.encode(
                    wire.GetPages(request_id=8, digests=(data[0][0],)),
                    max_datagram=32768,
                    auth=Authenticator.keyed(KeyRing(ClusterKey(1, os.urandom(32)))),
                    now=time.time(),
                )
                junk = [
                    b"",
                    b"\x01",
                    os.urandom(100),
                    good[:-1],
                    stranger,
                    good[:30] + b"\xff" + good[31:],
                ]
                for datagram in junk:
                    raw.sendto(datagram, server.address)
                raw.sendto(good, server.address)
                raw.sendto(good, server.address)  # a replay of a valid datagram
                # The node still serves after all that.
                got = await client.get_pages(server.address, [d for d, _ in data])
                assert got.pages == dict(data)
            finally:
                raw.close()
            dropped = sum(
                sample(metrics, "tmdht_bad_datagrams_total", reason=r)
                for r in ("auth", "malformed", "oversize", "replay")
            )
            assert dropped >= len(junk)  # the valid one and its replay: at most one served
            assert sample(metrics, "tmdht_bad_datagrams_total", reason="replay") == 1

    run(main)


def test_lost_parts_are_reasked(tmp_path: Path) -> None:
    """A client that loses answer datagrams re-asks for exactly what it did not hear about."""

    async def main() -> None:
        async with (
            node(tmp_path, max_datagram=wire.MIN_DATAGRAM) as (server, _),
            await DataPlaneClient.open(keyed(), timeout=0.1) as client,
        ):
            data = pages(40)
            await client.put_pages(server.address, data)
            original = client._on_datagram
            seen = 0

            def lossy(datagram: bytes, addr: Any) -> None:
                nonlocal seen
                seen += 1
                if seen <= 30 and seen % 3 == 0:
                    return  # every third of the first 30 answer datagrams is lost
                original(datagram, addr)

            client._on_datagram = lossy  # type: ignore[method-assign]
            got = await client.get_pages(server.address, [d for d, _ in data])
            assert got.pages == dict(data) and not got.unanswered
            assert client.stats.retries > 0

    run(main)


def test_unreachable_node_is_reported_as_unanswered(tmp_path: Path) -> None:
    async def main() -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))  # bound but never answers
        try:
            async with await DataPlaneClient.open(keyed(), timeout=0.05, attempts=2) as client:
                digests = [d for d, _ in pages(5)]
                got = await client.get_pages(sock.getsockname(), digests)
                assert got.unanswered == set(digests) and not got.pages and not got.missing
        finally:
            sock.close()

    run(main)


def test_group_commit_batches_concurrent_puts(tmp_path: Path) -> None:
    async def main() -> None:
        async with (
            node(tmp_path) as (server, metrics),
            # A timeout well above a commit's time on a busy machine: a retried PUT would be
            # counted twice below.
            await DataPlaneClient.open(keyed(), window=64, timeout=2.0) as client,
        ):
            data = pages(2000, seed=3)
            chunks = [data[i : i + 7] for i in range(0, len(data), 7)]
            outcomes = await asyncio.gather(*(client.put_pages(server.address, c) for c in chunks))
            assert all(not o.unanswered for o in outcomes)
            assert server.store.page_count == 2000
            count = metrics.registry.get_sample_value(
                "tmdht_request_duration_seconds_count", {"type": "put_pages"}
            )
            assert count == len(chunks)
            # Every page went through one group commit; PUTs in flight together shared them.
            commits = sample(metrics, "tmdht_group_commit_pages_count")
            assert sample(metrics, "tmdht_group_commit_pages_sum") == 2000
            assert 1 <= commits < len(chunks)

    run(main)


def put_datagrams(auth: Authenticator, first_id: int, count: int, seed: int) -> list[bytes]:
    """``count`` sealed PUT_PAGES datagrams of 7 pages each, request ids from ``first_id``."""
    data = pages(count * 7, seed=seed)
    return [
        wire.encode(
            wire.PutPages(request_id=first_id + i, pages=tuple(data[i * 7 : (i + 1) * 7])),  # type: ignore[arg-type]
            max_datagram=32768, auth=auth, now=time.time(),
        )
        for i in range(count)
    ]  # fmt: skip


async def exchange(
    sock: socket.socket, address: Address, burst: list[bytes], auth: Authenticator
) -> tuple[float, set[int]]:
    """Send ``burst`` from a raw non-blocking socket, every datagram before the loop runs the
    server again (so it reads them in one wake-up), and wait for one PUT_RESULT each: (seconds
    taken, the request ids answered)."""
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    for datagram in burst:
        sock.sendto(datagram, address)
    answered = set()
    for _ in burst:
        reply = await asyncio.wait_for(loop.sock_recv(sock, 65536), 10)
        message = wire.decode(reply, max_datagram=wire.MAX_DATAGRAM, auth=auth, now=time.time())
        assert isinstance(message, wire.PutResult)
        answered.add(message.request_id)
    return time.monotonic() - started, answered


def raw_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    sock.bind(("127.0.0.1", 0))
    return sock


def test_the_puts_of_one_burst_share_one_group_commit(tmp_path: Path) -> None:
    """PUTs that reach the socket together (a client sends the PUTs a node's answers free in one
    go) are read in one wake-up of the loop and committed in one group, one fsync; the commit
    starts once the burst is read, not at its first datagram (then the first PUT of every burst
    went alone and the rest waited for the next commit). Under uvloop, as nodes run."""

    async def main() -> None:
        async with node(tmp_path) as (server, metrics):
            auth = keyed()
            with raw_socket() as sock:
                _, answered = await exchange(
                    sock, server.address, put_datagrams(auth, 100, 8, seed=11), auth
                )
            assert answered == {100 + i for i in range(8)}
            assert server.store.page_count == 8 * 7
            assert sample(metrics, "tmdht_group_commit_pages_count") == 1
            assert sample(metrics, "tmdht_group_commit_pages_sum") == 8 * 7

    run(main, "uvloop")


def test_a_commit_waiting_for_more_puts_starts_once_they_reach_its_target(tmp_path: Path) -> None:
    """With a commit delay, a PUT that arrives while PUTs stream in waits for more (here about
    0.7 s: the pacer expects its target of 14 pages at the arrival rate); the PUT that brings the
    queue to the target starts the commit at once instead of leaving it to that wait."""

    async def main() -> None:
        pacing = CommitPacing(max_delay=1.0, target_pages=14)
        async with node(tmp_path, commit_pacing=pacing) as (server, metrics):
            auth = keyed()
            puts = put_datagrams(auth, 200, 8, seed=12)
            with raw_socket() as sock:
                # 42 pages stream in: the pacer's rate rises.
                await exchange(sock, server.address, puts[:6], auth)
                # 7 pages would wait ~0.7 s for more; the next 7 reach the target: both go now.
                seconds, answered = await exchange(sock, server.address, puts[6:], auth)
            assert answered == {206, 207}
            assert seconds < 0.45, seconds
            assert sample(metrics, "tmdht_group_commit_pages_count") == 2
            assert sample(metrics, "tmdht_group_commit_pages_sum") == 8 * 7

    run(main, "uvloop")


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_get_after_an_acknowledged_write_sees_it(tmp_path: Path, loop: str) -> None:
    """GETs share one long-lived read snapshot (here never released by age), yet a GET sent
    after a PUT was acknowledged finds the page; a write by another part of the node (the
    replicator, on a thread) or a delete is seen by the next GET too."""

    async def main() -> None:
        async with (
            node(tmp_path, snapshot_max_age=3600.0) as (server, _),
            await DataPlaneClient.open(keyed()) as client,
        ):
            a, b, c = pages(3, seed=11)
            assert (await client.put_pages(server.address, [a])).status[a[0]] == STORED
            assert (await client.get_pages(server.address, [a[0], b[0]])).missing == {b[0]}
            assert server._snapshot.is_open  # the snapshot the next GET would reuse
            assert (await client.put_pages(server.address, [b])).status[b[0]] == STORED
            got = await client.get_pages(server.address, [a[0], b[0]])
            assert got.pages == dict([a, b]) and not got.missing
            await asyncio.to_thread(server.store.put_many, [c])
            assert (await client.get_pages(server.address, [c[0]])).pages == dict([c])
            has = await client.has(server.address, [a[0], c[0]])
            assert has.held == {a[0], c[0]}
            await asyncio.to_thread(server.store.delete_many, [a[0]])
            got = await client.get_pages(server.address, [a[0], b[0], c[0]])
            assert got.missing == {a[0]} and got.pages == dict([b, c])
            assert (await client.has(server.address, [a[0]])).lacking == {a[0]}

    run(main, loop)


def test_the_read_snapshot_is_released_after_its_max_age_and_on_drain(tmp_path: Path) -> None:
    """The snapshot must not pin old LMDB pages: its timer ends it (here at once), drain ends
    it, close closes it."""

    async def main() -> None:
        data = pages(5, seed=12)
        async with (
            node(tmp_path, snapshot_max_age=0.0) as (server, _),
            await DataPlaneClient.open(keyed()) as client,
        ):
            await client.put_pages(server.address, data)
            got = await client.get_pages(server.address, [d for d, _ in data])
            assert got.pages == dict(data)
            for _ in range(100):  # the release timer is due at once: a few loop turns
                if not server._snapshot.is_open:
                    break
                await asyncio.sleep(0)
            assert not server._snapshot.is_open
            got = await client.get_pages(server.address, [d for d, _ in data])
            assert got.pages == dict(data)  # the next GET begins a new one
        (tmp_path / "b").mkdir()
        async with (
            node(tmp_path / "b", snapshot_max_age=3600.0) as (server, _),
            await DataPlaneClient.open(keyed()) as client,
        ):
            await client.put_pages(server.address, data)
            await client.get_pages(server.address, [data[0][0]])
            assert server._snapshot.is_open
            await server.drain(5)
            assert not server._snapshot.is_open
            server.close()
            with pytest.raises(UsageError):
                server._snapshot.views([data[0][0]])

    run(main)


def test_bad_snapshot_max_age_is_refused(tmp_path: Path) -> None:
    async def main() -> None:
        with pytest.raises(UsageError):
            async with node(tmp_path, snapshot_max_age=-1.0):
                pass

    run(main)


def test_data_plane_metrics_keep_their_prometheus_names_and_types(tmp_path: Path) -> None:
    """The data plane counts in plain numbers, exported at scrape time: same families, types,
    labels and samples as prometheus-client counters and histograms."""

    async def main() -> None:
        async with (
            node(tmp_path) as (server, metrics),
            await DataPlaneClient.open(keyed()) as client,
        ):
            data = pages(30, seed=13)
            await client.put_pages(server.address, data)
            for i in range(5):
                await client.get_pages(server.address, [d for d, _ in data[i::5]])
            text = generate_latest(metrics.registry).decode()
        families = {f.name: f for f in text_string_to_metric_families(text)}
        for name in (
            "tmdht_requests",
            "tmdht_request_pages",
            "tmdht_pages_served",
            "tmdht_misses",
            "tmdht_put_pages",
            "tmdht_bad_datagrams",
        ):
            assert families[name].type == "counter", name
        latency = families["tmdht_request_duration_seconds"]
        assert latency.type == "histogram"
        get = [s for s in latency.samples if s.labels.get("type") == "get_pages"]
        buckets = [s.value for s in get if s.name.endswith("_bucket")]
        assert buckets == sorted(buckets) and buckets[-1] == 5  # cumulative, +Inf last
        (count,) = [s.value for s in get if s.name.endswith("_count")]
        (total,) = [s.value for s in get if s.name.endswith("_sum")]
        assert count == 5 and 0 < total < 60
        assert sample(metrics, "tmdht_requests_total", type="get_pages") == 5
        assert sample(metrics, "tmdht_request_pages_total", type="get_pages") == 30
        assert sample(metrics, "tmdht_pages_served_total") == 30
        assert sample(metrics, "tmdht_put_pages_total", result="stored") == 30
        assert metrics.registry.get_sample_value("tmdht_requests_created", {"type": "has"})
        assert "tmdht_request_duration_seconds_created" in text

    run(main)
