"""Tests of the overlay (tmdht.aio.overlay) on real UDP sockets on 127.0.0.1, port 0 everywhere.

pytest-asyncio is not a dependency: each test runs one coroutine with ``asyncio.run`` under a
deadline. Nothing sleeps to synchronise: tests wait for membership events or answers, each wait
bounded by ``asyncio.timeout``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import asyncio_dgram
import pytest
from support.overlay import BAD_DATAGRAMS, BAD_NODE_INFO, info_answer

from tmdht.aio.overlay import MembershipSubscription, Overlay
from tmdht.errors import OverlayClosedError, RpcTimeoutError, UnknownPeerError, UsageError
from tmdht.net.identity import NODE_FILE
from tmdht.net.membership import MembershipEventKind
from tmdht.net.overlay import (
    OverlayConfig,
    Request,
    Response,
    decode_datagram,
    encode_request,
    encode_response,
)
from tmdht.placement import distance

LOCAL = "127.0.0.1"
DEADLINE = 20.0
"""Seconds any single wait may take before the test fails."""

FAST = {
    "rpc_timeout": 0.3,
    "probe_interval": 0.05,
    "silence_timeout": 0.3,
    "dead_retry_interval": 0.2,
    "refresh_interval": 30.0,
}
"""Liveness timings that make failure detection take about a second."""


def run(test: Callable[[], Awaitable[None]], timeout: float = 45.0) -> None:
    """Run one async test under an overall deadline."""

    async def bounded() -> None:
        async with asyncio.timeout(timeout):
            await test()

    asyncio.run(bounded())


def config(
    tmp: Path | None, index: int, seeds: Iterable[tuple[str, int]] = (), **overrides: Any
) -> OverlayConfig:
    """A test node: data port 7000 + index is only advertised (nothing listens there)."""
    values: dict[str, Any] = {
        "data_dir": tmp / f"node{index}" if tmp is not None else None,
        "host": LOCAL,
        "data_port": 7000 + index,
        "metrics_port": 9000 + index,
        "seeds": tuple(seeds),
        **FAST,
    }
    values.update(overrides)
    return OverlayConfig(**values)


@contextlib.asynccontextmanager
async def ring(tmp: Path, count: int, **overrides: Any) -> AsyncIterator[list[Overlay]]:
    """``count`` overlays, all seeded by the first; every one stopped at the end."""
    async with contextlib.AsyncExitStack() as stack:
        first = await Overlay.start(config(tmp, 0, **overrides))
        stack.push_async_callback(first.stop)
        overlays = [first]
        for index in range(1, count):
            overlay = await Overlay.start(config(tmp, index, [(LOCAL, first.port)], **overrides))
            stack.push_async_callback(overlay.stop)
            overlays.append(overlay)
        yield overlays


async def until_members(overlay: Overlay, ids: set[bytes], timeout: float = DEADLINE) -> None:
    """Wait until ``overlay.members()`` holds exactly ``ids``, woken by membership events."""
    subscription = overlay.subscribe(replay=False)
    try:
        async with asyncio.timeout(timeout):
            while {m.node_id for m in overlay.members()} != ids:
                await subscription.get()
    finally:
        subscription.close()


async def next_event(
    subscription: MembershipSubscription, kind: MembershipEventKind, node_id: bytes
) -> None:
    """Wait for one event of ``kind`` about ``node_id``, skipping others."""
    async with asyncio.timeout(DEADLINE):
        while True:
            event = await subscription.get()
            if event.kind is kind and event.member.node_id == node_id:
                return


@contextlib.asynccontextmanager
async def fake_peer(
    answer: Callable[[Request], bytes | None],
) -> AsyncIterator[tuple[list[Request], tuple[str, int]]]:
    """A scripted UDP peer: every request it receives (listed), answered with ``answer``."""
    stream = await asyncio_dgram.bind((LOCAL, 0))
    requests: list[Request] = []

    async def serve() -> None:
        while True:
            data, addr = await stream.recv()
            message = decode_datagram(data)
            assert isinstance(message, Request)
            requests.append(message)
            reply = answer(message)
            if reply is not None:
                await stream.send(reply, addr)

    server = asyncio.create_task(serve())
    try:
        yield requests, stream.sockname[:2]
    finally:
        # Closing ends the server's recv() with TransportClosed once connection_lost has run,
        # which closes the socket: the port is free when the server task is done.
        stream.close()
        await asyncio.gather(server, return_exceptions=True)


# ----------------------------------------------------------------------------------------------
# Ring formation, identity


def test_four_overlays_form_a_ring_from_one_seed(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with ring(tmp_path, 4) as overlays:
            everyone = {o.node_id for o in overlays}
            for overlay in overlays:
                await until_members(overlay, everyone)
            for overlay in overlays:
                by_id = {m.node_id: m for m in overlay.members()}
                for other in overlays:
                    member = by_id[other.node_id]
                    assert (member.host, member.port) == (LOCAL, other.port)
                    assert member.data_address == (LOCAL, other.config.data_port)
                    assert member.metrics_port == other.config.metrics_port
                    assert not member.suspect
                assert overlay.stats().socket.dropped_malformed == 0

    run(scenario)


def test_a_node_whose_seed_was_not_up_yet_joins_within_seconds(tmp_path: Path) -> None:
    """Nodes started together (a StatefulSet, compose, systemd instances) find their seeds not
    listening yet: the lonely node asks again within seconds, not after the refresh interval."""

    async def scenario() -> None:
        async with fake_peer(lambda request: None) as (silent, address):
            lonely = await Overlay.start(config(tmp_path, 1, [address]))
        try:
            assert [m.node_id for m in lonely.members()] == [lonely.node_id] and silent
            async with await Overlay.start(config(tmp_path, 0, port=address[1])) as seed:
                started = time.monotonic()
                await until_members(lonely, {lonely.node_id, seed.node_id}, timeout=10)
                assert time.monotonic() - started < FAST["refresh_interval"] / 2
        finally:
            await lonely.stop()

    run(scenario)


def test_node_id_persists_across_restart(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with await Overlay.start(config(tmp_path, 0)) as first:
            node_id = first.node_id
        async with Overlay(config(tmp_path, 0)) as again:
            assert again.node_id == node_id
        stored = json.loads((tmp_path / "node0" / NODE_FILE).read_text())
        assert stored == {"format": 1, "node_id": node_id.hex()}
        assert len(node_id) == 20
        # No data dir: a fresh id each time (clients, throwaway nodes).
        assert Overlay(config(None, 1)).node_id != Overlay(config(None, 1)).node_id

    run(scenario)


# ----------------------------------------------------------------------------------------------
# Liveness


def test_stopped_node_leaves_and_lookups_stop_waiting_on_it(tmp_path: Path) -> None:
    timeout = 1.0

    async def scenario() -> None:
        async with ring(tmp_path, 4, rpc_timeout=timeout, silence_timeout=0.5) as overlays:
            first, victim = overlays[0], overlays[3]
            everyone = {o.node_id for o in overlays}
            for overlay in overlays:
                await until_members(overlay, everyone)
            watch = first.subscribe(replay=False)
            await victim.stop()
            key = os.urandom(20)

            started = time.monotonic()
            await first.closest(key, 3)
            assert time.monotonic() - started < 2.5 * timeout  # at most one timeout round
            for _ in range(3):
                # The others still list the victim until they notice; it is not asked again.
                started = time.monotonic()
                await first.closest(key, 3)
                assert time.monotonic() - started < 0.5 * timeout

            await next_event(watch, MembershipEventKind.LEFT, victim.node_id)
            for overlay in overlays[:3]:
                await until_members(overlay, everyone - {victim.node_id})
            assert first.stats().dead == 1
            result = await first.closest(victim.node_id, 4)
            assert victim.node_id not in {m.node_id for m in result}

            # It comes back on another port with the same id and is a member again.
            async with Overlay(
                config(tmp_path, 3, [(LOCAL, first.port)], rpc_timeout=timeout)
            ) as back:
                assert back.node_id == victim.node_id
                await next_event(watch, MembershipEventKind.JOINED, victim.node_id)
                member = first.member(victim.node_id)
                assert member is not None and member.port == back.port
                for overlay in overlays[:3]:
                    await until_members(overlay, everyone)
            watch.close()

    run(scenario)


def test_briefly_slow_node_is_not_evicted(tmp_path: Path) -> None:
    async def scenario() -> None:
        # A long silence timeout: only the test's own probes reach the slow node.
        async with ring(tmp_path, 2, silence_timeout=60.0) as (first, slow):
            await until_members(first, {first.node_id, slow.node_id})
            watch = first.subscribe(replay=False)
            protocol = slow._protocol
            assert protocol is not None
            dropped: list[bytes] = []

            def drop_one(data: bytes, addr: tuple[str, int]) -> None:
                if not dropped:
                    dropped.append(data)  # the slow node misses exactly one request
                    return
                type(protocol).datagram_received(protocol, data, addr)

            protocol.datagram_received = drop_one  # type: ignore[method-assign]
            with pytest.raises(RpcTimeoutError):
                await first.probe(slow.node_id)
            member = first.member(slow.node_id)
            assert member is not None and member.suspect
            assert slow.node_id in {n.id for n in first._book.router.contacts()}

            assert not (await first.probe(slow.node_id)).suspect
            assert slow.node_id in {n.id for n in first._book.router.contacts()}
            assert watch.get_nowait() is None  # neither LEFT nor JOINED
            watch.close()

    run(scenario)


# ----------------------------------------------------------------------------------------------
# Hostile input


def test_malformed_datagrams_are_dropped_and_counted(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with ring(tmp_path, 2) as (target, other):
            await until_members(target, {target.node_id, other.node_id})
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as raw:
                for datagram in BAD_DATAGRAMS:
                    raw.sendto(datagram, (LOCAL, target.port))
                raw.sendto(
                    encode_request(b"m" * 20, "store", [b"x" * 20, b"k" * 20, b"v"]),
                    (LOCAL, target.port),
                )
                raw.sendto(encode_response(os.urandom(20), [1, 2, 3]), (LOCAL, target.port))
                # A probe behind them in the queue is answered: nothing crashed or stalled.
                assert (await other.probe(target.node_id)).node_id == target.node_id
                raw.setblocking(False)
                raw.sendto(encode_request(b"q" * 20, "ping", [b""]), (LOCAL, target.port))
                async with asyncio.timeout(DEADLINE):
                    reply = await asyncio.get_running_loop().sock_recv(raw, 2048)
            assert decode_datagram(reply) == Response(b"q" * 20, target.node_id)
            stats = target.stats().socket
            assert stats.dropped_malformed == len(BAD_DATAGRAMS)
            assert stats.dropped_unknown_method == 1
            assert stats.unexpected_responses == 1
            assert target.running

    run(scenario)


def test_bad_answers_from_a_peer_do_not_crash_the_node(tmp_path: Path) -> None:
    async def scenario() -> None:
        fake_id = b"\x7f" * 20
        answers = iter(BAD_NODE_INFO)

        def bad_info(request: Request) -> bytes:
            return encode_response(request.msg_id, next(answers))

        async with (
            await Overlay.start(config(tmp_path, 0)) as node,
            fake_peer(bad_info) as (_, addr),
        ):
            for _ in BAD_NODE_INFO:
                assert await node.bootstrap([addr]) == []
            assert node.stats().bad_replies == len(BAD_NODE_INFO)
            assert [m.node_id for m in node.members()] == [node.node_id]

        # A peer whose node_info is fine but whose FIND_NODE answers are garbage (or bytes that
        # are not msgpack at all): it is probed, found wanting, and crawls still finish.
        garbage = iter([[["not", "a", "contact"]], b"\xc1", {"x": 1}] * 20)

        def bad_find_node(request: Request) -> bytes:
            if request.method == "node_info":
                return encode_response(request.msg_id, info_answer(fake_id))
            value = next(garbage)
            if isinstance(value, bytes):
                return b"\x01" + request.msg_id + value  # not msgpack
            return encode_response(request.msg_id, value)

        async with (
            await Overlay.start(config(tmp_path, 1)) as node,
            fake_peer(bad_find_node) as (requests, addr),
        ):
            assert [m.node_id for m in await node.bootstrap([addr])] == [fake_id]
            for _ in range(3):
                await node.crawl()
            assert any(r.method == "find_node" for r in requests)
            assert node.stats().bad_replies >= 1
            assert node.running

    run(scenario)


# ----------------------------------------------------------------------------------------------
# Routing


def test_closest_returns_the_xor_closest_members(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with ring(tmp_path, 6, silence_timeout=30.0) as overlays:
            everyone = {o.node_id for o in overlays}
            for overlay in overlays:
                await until_members(overlay, everyone)
            rng = random.Random(7)
            for overlay in overlays:
                for count in (1, 3, 6, 10):
                    key = rng.randbytes(20)
                    brute = sorted(everyone, key=lambda node_id: distance(node_id, key))[:count]
                    assert [m.node_id for m in await overlay.closest(key, count)] == brute
            with pytest.raises(UsageError):
                await overlays[0].closest(b"short", 3)

    run(scenario)


def test_a_client_crawls_the_whole_ring_without_joining(tmp_path: Path) -> None:
    async def scenario() -> None:
        # k = 3 makes the sweep split the id space several times with 24 nodes.
        async with ring(tmp_path, 24, ksize=3, alpha=2, silence_timeout=60.0) as overlays:
            everyone = {o.node_id for o in overlays}
            client_config = config(
                None, 99, [(LOCAL, overlays[5].port)], join=False, data_port=0, ksize=3
            )
            async with Overlay(client_config) as client:
                members = await client.crawl()
                assert {m.node_id for m in members} == everyone
                ports = {m.node_id: m.data_port for m in members}
                assert ports == {o.node_id: o.config.data_port for o in overlays}
                # The nodes answered the client but none lists it as a member or contact.
                for overlay in overlays:
                    assert client.node_id not in {m.node_id for m in overlay.members()}
                    assert client.node_id not in {n.id for n in overlay._book.router.contacts()}
            # Nodes crawling by themselves also end with the full view.
            for overlay in overlays[::7]:
                assert {m.node_id for m in await overlay.crawl()} == everyone

    run(scenario)


# ----------------------------------------------------------------------------------------------
# Load, authentication, lifecycle


def test_many_concurrent_rpcs_are_all_answered(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with ring(tmp_path, 2, max_in_flight=16, silence_timeout=60.0, rpc_timeout=2.0) as (
            a,
            b,
        ):
            await until_members(a, {a.node_id, b.node_id})
            buffers = a.socket_buffers
            cap = buffers.rmem_max if buffers.rmem_max is not None else buffers.requested
            assert buffers.receive >= min(buffers.requested, cap)

            results = await asyncio.gather(*(a.probe(b.node_id) for _ in range(256)))
            assert {m.node_id for m in results} == {b.node_id}
            assert a.stats().socket.rpc_timeouts == 0
            assert a.stats().socket.in_flight_peak <= 16

            # 2000 requests arrive while the event loop is busy (this very loop sends them):
            # the enlarged buffer holds them all (the 208 KiB default holds about 256).
            burst = 2000
            if buffers.receive < burst * 1024:
                pytest.skip(f"receive buffer {buffers.receive} too small: raise net.core.rmem_max")
            loop = asyncio.get_running_loop()
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as raw:
                raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
                raw.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * 1024 * 1024)
                raw.setblocking(False)
                for index in range(burst):
                    raw.sendto(
                        encode_request(index.to_bytes(20, "big"), "ping", [b""]), (LOCAL, a.port)
                    )
                answered = set()
                async with asyncio.timeout(DEADLINE):
                    while len(answered) < burst:
                        reply = decode_datagram(await loop.sock_recv(raw, 2048))
                        answered.add(reply.msg_id)
            assert a.stats().socket.dropped_malformed == 0

    run(scenario)


def test_cluster_key_keeps_strangers_out(tmp_path: Path) -> None:
    async def scenario() -> None:
        key = b"cluster-key-0123456789abcdef0123"
        async with ring(tmp_path, 3, cluster_key=key) as overlays:
            everyone = {o.node_id for o in overlays}
            for overlay in overlays:
                await until_members(overlay, everyone)
            seed = [(LOCAL, overlays[0].port)]
            for stranger_key in (None, b"another-key-0123456789abcdef0123"):
                async with Overlay(config(tmp_path, 9, seed, cluster_key=stranger_key)) as stranger:
                    assert [m.node_id for m in stranger.members()] == [stranger.node_id]
                    assert stranger.node_id not in {m.node_id for m in overlays[0].members()}
            assert overlays[0].stats().socket.dropped_unauthenticated >= 2

    run(scenario)


def test_stop_is_idempotent_and_ends_everything(tmp_path: Path) -> None:
    async def scenario() -> None:
        overlay = await Overlay.start(config(tmp_path, 0))
        subscription = overlay.subscribe()
        assert overlay._tasks  # the liveness and refresh jobs
        await asyncio.gather(overlay.stop(), overlay.stop())
        await overlay.stop()
        assert not overlay._tasks and not overlay.running
        assert overlay._transport is not None and overlay._transport.is_closing()
        assert [event async for event in subscription] == []
        with pytest.raises(OverlayClosedError):
            await overlay.crawl()
        with pytest.raises(OverlayClosedError):
            overlay.subscribe()
        with pytest.raises(UnknownPeerError):
            await overlay.probe(b"\x01" * 20)
        # The port is free again.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind((LOCAL, overlay.port))

    run(scenario)
