"""The resolution engine against scripted nodes, in memory: no sockets, the loop's real timers.

A fake data plane records every request; each test's "nodes" answer (or not) through the same
handler interface the UDP client uses. Real processes are in test_store.py and test_failover.py.
"""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from tmdht import wire
from tmdht.client.dataplane import Address, ClientStats
from tmdht.client.resolver import Resolver
from tmdht.client.store import ClientMetrics
from tmdht.node.overlay import Member
from tmdht.pages import digest_page

Node = Callable[["FakeDataPlane", int, tuple[bytes, ...]], None]


def member(i: int) -> Member:
    return Member(bytes([i]) * 20, "127.0.0.1", 1000 + i, "127.0.0.1", 2000 + i, 0, "test", 0.0)


class FakeDataPlane:
    """What Resolver needs of DataPlaneClient; ``nodes[address]`` answers each request."""

    def __init__(self, nodes: dict[Address, Node], *, window: int = 4, batch: int = 8) -> None:
        self.nodes = nodes
        self.window = window
        self.total_window = 2 * window
        self.batch = batch
        self.attempts = 3
        self.closed = False
        self.stats = ClientStats()
        self.handlers: dict[int, Any] = {}
        self.sent: list[tuple[Address, tuple[bytes, ...]]] = []
        self.in_flight: dict[Address, int] = {}
        self.most_in_flight: dict[Address, int] = {}
        self._next = 0

    def get_batch_size(self) -> int:
        return self.batch

    def timeout_for(self, address: Address, attempt: int = 0) -> float:
        return 0.05 * 2**attempt

    def observe_rtt(self, address: Address, seconds: float) -> None:
        pass

    def retried(self) -> None:
        self.stats.retries += 1

    def send_request(
        self, address: Address, build: Callable[[int], wire.Message], handler: Any
    ) -> int:
        self._next += 1
        rid = self._next
        message = build(rid)
        assert isinstance(message, wire.GetPages)
        self.handlers[rid] = handler
        self.sent.append((address, message.digests))
        self.in_flight[address] = self.in_flight.get(address, 0) + 1
        self.most_in_flight[address] = max(
            self.most_in_flight.get(address, 0), self.in_flight[address]
        )
        asyncio.get_running_loop().call_soon(self.nodes[address], self, rid, message.digests)
        return rid

    def forget(self, request_id: int) -> None:
        handler = self.handlers.pop(request_id, None)
        if handler is not None and request_id == handler.ids[0]:
            self.in_flight[handler.address] -= 1

    def answer(
        self,
        rid: int,
        pages: list[tuple[bytes, bytes]],
        missing: Sequence[bytes] = (),
        part: int = 0,
        parts: int = 1,
    ) -> None:
        handler = self.handlers.get(rid)
        if handler is not None:
            handler.add(
                part,
                parts,
                wire.Pages(
                    request_id=rid,
                    pages=tuple(pages),
                    missing=tuple(missing),
                    part=part,
                    parts=parts,
                ),
            )


PAGES = {digest_page(p): p for p in (os.urandom(4096) for _ in range(40))}
DIGESTS = list(PAGES)


def serving(held: set[bytes] | None = None, corrupt: frozenset[bytes] = frozenset()) -> Node:
    def node(dp: FakeDataPlane, rid: int, digests: tuple[bytes, ...]) -> None:
        have = [d for d in digests if held is None or d in held]
        pages = [(d, bytes(4096) if d in corrupt else PAGES[d]) for d in have]
        dp.answer(rid, pages, [d for d in digests if d not in have])

    return node


def silent(dp: FakeDataPlane, rid: int, digests: tuple[bytes, ...]) -> None:
    pass


class Harness:
    def __init__(self, nodes: dict[int, Node], **kw: Any) -> None:
        self.members = {i: member(i) for i in nodes}
        self.dp = FakeDataPlane({self.members[i].data_address: n for i, n in nodes.items()}, **kw)
        self.metrics = ClientMetrics()
        self.failed: list[int] = []
        self.avoid: set[int] = set()
        self.resolver = Resolver(
            self.dp,  # type: ignore[arg-type]
            self.metrics,
            hedge_after=0.01,
            avoided=lambda m: m.node_id[0] in self.avoid,
            failed=self._failed,
        )

    def _failed(self, m: Member) -> None:
        self.failed.append(m.node_id[0])
        self.avoid.add(m.node_id[0])

    async def resolve(
        self, digests: list[bytes], order: list[int]
    ) -> tuple[dict[bytes, bytes], set[bytes]]:
        view = list(self.members.values())
        rows = [[view.index(self.members[i]) for i in order] for _ in digests]
        return await asyncio.wait_for(self.resolver.resolve(digests, rows, view), 10)

    def metric(self, name: str) -> float:
        return self.metrics.registry.get_sample_value(name) or 0.0


def test_pages_come_back_verified_in_batches_within_the_window() -> None:
    h = Harness({1: serving(), 2: serving()}, window=2, batch=4)
    found, failed = asyncio.run(h.resolve(DIGESTS, [1, 2]))
    assert found == PAGES and not failed
    assert all(len(ds) <= 4 for _, ds in h.dp.sent)
    assert {a for a, _ in h.dp.sent} == {h.members[1].data_address}  # the closest replica only
    assert h.dp.most_in_flight[h.members[1].data_address] <= 2
    assert not h.dp.handlers  # every request forgotten


def test_a_corrupt_or_missing_page_fails_over_to_the_next_replica() -> None:
    bad, absent = DIGESTS[0], DIGESTS[1]
    h = Harness({1: serving(held=set(DIGESTS) - {absent}, corrupt={bad}), 2: serving()})
    found, failed = asyncio.run(h.resolve(DIGESTS[:10], [1, 2]))
    assert found == {d: PAGES[d] for d in DIGESTS[:10]} and not failed
    assert h.metric("tmdht_client_verification_failures_total") == 1
    assert h.metric("tmdht_client_failovers_total") == 2
    asked_next = {d for a, ds in h.dp.sent if a == h.members[2].data_address for d in ds}
    assert asked_next == {bad, absent}


def test_digests_no_replica_holds_are_named_exactly() -> None:
    gone = set(DIGESTS[:3])
    held = set(DIGESTS) - gone
    h = Harness({1: serving(held), 2: serving(held), 3: serving(held)})
    found, failed = asyncio.run(h.resolve(DIGESTS[:12], [1, 2, 3]))
    assert failed == gone
    assert found == {d: PAGES[d] for d in DIGESTS[3:12]}


def test_a_silent_node_is_hedged_then_reported_failed() -> None:
    h = Harness({1: silent, 2: serving()})

    async def main() -> None:
        for start in range(0, 9, 3):
            found, failed = await h.resolve(DIGESTS[start : start + 3], [1, 2])
            assert found == {d: PAGES[d] for d in DIGESTS[start : start + 3]} and not failed

    asyncio.run(main())
    assert h.metric("tmdht_client_hedges_total") >= 3
    assert h.failed == [1]  # silent while its hedges won 3 times in a row


def test_a_lost_part_is_asked_again_for_exactly_its_digests() -> None:
    asked: list[tuple[bytes, ...]] = []

    def lossy(dp: FakeDataPlane, rid: int, digests: tuple[bytes, ...]) -> None:
        asked.append(digests)
        if len(asked) == 1:  # first answer: part 0 of 2 arrives, part 1 is lost
            half = digests[: len(digests) // 2]
            dp.answer(rid, [(d, PAGES[d]) for d in half], part=0, parts=2)
        else:
            dp.answer(rid, [(d, PAGES[d]) for d in digests])

    h = Harness({1: lossy}, batch=8)
    found, failed = asyncio.run(h.resolve(DIGESTS[:8], [1]))
    assert found == {d: PAGES[d] for d in DIGESTS[:8]} and not failed
    assert asked == [tuple(DIGESTS[:8]), tuple(DIGESTS[4:8])]


def test_a_dead_last_replica_makes_its_digests_unavailable_after_retries() -> None:
    h = Harness({1: silent})
    found, failed = asyncio.run(h.resolve(DIGESTS[:5], [1]))
    assert not found and failed == set(DIGESTS[:5])
    assert h.dp.stats.retries == 2 and h.failed == [1]


@pytest.mark.parametrize("avoided_first", [True, False])
def test_an_avoided_replica_is_asked_last(avoided_first: bool) -> None:
    h = Harness({1: serving(), 2: serving()})
    if avoided_first:
        h.avoid.add(1)
    asyncio.run(h.resolve(DIGESTS[:4], [1, 2]))
    first = h.dp.sent[0][0]
    assert first == h.members[2 if avoided_first else 1].data_address


def chaotic(
    rng: random.Random, held: set[bytes], corrupt: set[bytes], lost_first: set[int]
) -> Node:
    """Answers in parts of 3 pages, each part after a random delay (reordering); the first answer
    to a request loses one of its parts with probability 0.3 (the retry is answered whole)."""

    def node(dp: FakeDataPlane, rid: int, digests: tuple[bytes, ...]) -> None:
        have = [d for d in digests if d in held]
        pages = [(d, bytes(4096) if d in corrupt else PAGES[d]) for d in have]
        missing = [d for d in digests if d not in held]
        chunks = [pages[i : i + 3] for i in range(0, len(pages), 3)] or [[]]
        lose = None
        if rid not in lost_first and rng.random() < 0.3 and len(chunks) > 1:
            lost_first.add(rid)
            lose = rng.randrange(len(chunks))
        loop = asyncio.get_running_loop()
        for part, chunk in enumerate(chunks):
            if part == lose:
                continue
            gone = missing if part == len(chunks) - 1 else []
            loop.call_later(rng.random() * 0.004, dp.answer, rid, chunk, gone, part, len(chunks))

    return node


@pytest.mark.parametrize("seed", range(8))
def test_randomised_faults_resolve_exactly_what_some_replica_can_serve(seed: int) -> None:
    """Nodes that hold random subsets, corrupt some pages, reorder and lose parts of answers, one
    of them silent: every digest comes back verified if some replica in its row holds it intact,
    and is reported unavailable otherwise; nothing is left in flight."""
    rng = random.Random(seed)
    nodes: dict[int, Node] = {}
    good: dict[int, set[bytes]] = {}
    lost: set[int] = set()
    mute = rng.randrange(4)
    for i in range(4):
        held = {d for d in DIGESTS if rng.random() < 0.7}
        corrupt = {d for d in held if rng.random() < 0.1}
        good[i] = set() if i == mute else held - corrupt
        nodes[i] = silent if i == mute else chaotic(rng, held, corrupt, lost)
    h = Harness(nodes, window=2, batch=5)
    view = list(h.members.values())
    rows = [rng.sample(range(4), 3) for _ in DIGESTS]

    async def main() -> tuple[dict[bytes, bytes], set[bytes]]:
        return await asyncio.wait_for(
            h.resolver.resolve(DIGESTS, [list(r) for r in rows], view), 20
        )

    found, failed = asyncio.run(main())
    servable = {d for d, row in zip(DIGESTS, rows, strict=True) if any(d in good[i] for i in row)}
    assert found == {d: PAGES[d] for d in servable}
    assert failed == set(DIGESTS) - servable
    assert not h.dp.handlers and h.resolver._total_in_flight == 0
    assert all(v == 0 for v in h.resolver._in_flight.values())


def test_a_cancelled_resolve_frees_its_window_slots() -> None:
    h = Harness({1: silent, 2: serving()}, window=1, batch=2)

    async def main() -> None:
        task = asyncio.ensure_future(h.resolve(DIGESTS[:6], [1]))  # only the silent node
        for _ in range(100):  # let the first request go out (bounded)
            if h.dp.sent:
                break
            await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not h.dp.handlers and h.resolver._total_in_flight == 0
        found, failed = await h.resolve(DIGESTS[:4], [2])  # the client still works
        assert found == {d: PAGES[d] for d in DIGESTS[:4]} and not failed

    asyncio.run(main())


def test_closing_the_socket_ends_every_resolve_in_flight_or_queued() -> None:
    """Requests in flight are aborted and requests still queued are never sent: every resolve
    returns, its digests unavailable, and nothing raises."""
    h = Harness({1: silent}, window=1, batch=2)

    def close() -> None:
        h.dp.closed = True
        handlers, h.dp.handlers = h.dp.handlers, {}
        for handler in handlers.values():
            handler.abort()

    async def main() -> None:
        first = asyncio.ensure_future(h.resolve(DIGESTS[:4], [1]))  # 2 requests, 1 window slot
        second = asyncio.ensure_future(h.resolve(DIGESTS[4:6], [1]))  # queued behind them
        for _ in range(100):  # let the first request go out (bounded)
            if h.dp.sent:
                break
            await asyncio.sleep(0)
        sent = len(h.dp.sent)
        close()
        assert await first == ({}, set(DIGESTS[:4]))
        assert await second == ({}, set(DIGESTS[4:6]))
        assert len(h.dp.sent) == sent  # nothing was sent after the close

    asyncio.run(main())
