"""The replication job's check of freshly stored pages: the pages of many small group commits are
checked together, one HAS per replica, not one round of HAS per commit (which, with 32 nodes,
made a publish's HAS traffic outgrow its PUT traffic)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from typing import cast

from tmdht.aio.dataplane import DataPlaneClient
from tmdht.net.address import Address
from tmdht.net.membership import Member
from tmdht.net.operations import HasResult
from tmdht.node.metrics import NodeMetrics
from tmdht.node.replication import (
    CHUNK,
    FRESH_CHUNK,
    FRESH_DELAY,
    FRESH_MAX_DELAY,
    FRESH_SPREAD,
    Replicator,
)
from tmdht.node.storage import PageStore
from tmdht.placement import FailureDomain


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class HoldsEverything:
    """A data-plane client whose every replica holds every page it is asked about."""

    def __init__(self) -> None:
        self.asked: list[tuple[Address, list[bytes]]] = []

    async def has(self, address: Address, digests: Sequence[bytes]) -> HasResult:
        self.asked.append((address, list(digests)))
        return HasResult(held=set(digests))


def replicator(nodes: int, clock: Clock, client: HoldsEverything) -> Replicator:
    members = [
        Member(
            node_id=bytes([i]) * 20,
            host="10.0.0.1",
            port=1000 + i,
            data_host="10.0.0.1",
            data_port=2000 + i,
            metrics_port=0,
            version="test",
            last_seen=0.0,
            domain=FailureDomain(host=f"h{i}"),
        )
        for i in range(nodes)
    ]
    return Replicator(
        store=cast(PageStore, object()),  # not touched: every replica holds every page
        client=cast(DataPlaneClient, client),
        self_id=members[0].node_id,
        members=lambda: members,
        replicas=3,
        rate=1_000_000,
        interval=60.0,
        grace=600.0,
        metrics=NodeMetrics(),
        clock=clock,
    )


def commits(count: int, pages: int) -> list[list[bytes]]:
    return [[os.urandom(32) for _ in range(pages)] for _ in range(count)]


def test_small_commits_are_checked_together_once_the_oldest_waited_long_enough() -> None:
    asyncio.run(small_commits())


async def small_commits() -> None:
    clock, client = Clock(), HoldsEverything()
    job = replicator(32, clock, client)
    groups = commits(100, 4)  # 100 group commits of 4 pages, 10 ms apart
    for group in groups:
        job.pages_added(group)
        await job._push_fresh()  # the job wakes on every commit
        clock.now += 0.01
    clock.now += FRESH_DELAY
    await job._push_fresh()
    assert client.asked == []  # fewer than FRESH_CHUNK pages: they wait for FRESH_MAX_DELAY
    first = 1000.0
    assert FRESH_MAX_DELAY <= job.fresh_wait <= FRESH_MAX_DELAY * (1 + FRESH_SPREAD)
    assert job._fresh_due() == first + job.fresh_wait
    clock.now = first + job.fresh_wait
    await job._push_fresh()
    addresses = [address for address, _ in client.asked]
    assert len(addresses) == len(set(addresses)) <= 31  # one HAS per replica, not per commit
    asked = {digest for _, digests in client.asked for digest in digests}
    assert asked == {digest for group in groups for digest in group}
    assert job._fresh_due() == float("inf")


def test_a_full_chunk_is_checked_after_fresh_delay() -> None:
    asyncio.run(full_chunk())


async def full_chunk() -> None:
    clock, client = Clock(), HoldsEverything()
    job = replicator(8, clock, client)
    groups = commits(2, FRESH_CHUNK // 2 + 1)
    for group in groups:
        job.pages_added(group)
    assert job._fresh_due() == 1000.0 + FRESH_DELAY
    await job._push_fresh()
    assert client.asked == []  # not due yet
    clock.now += FRESH_DELAY
    await job._push_fresh()
    assert client.asked  # checked without waiting FRESH_MAX_DELAY
    asked = {digest for _, digests in client.asked for digest in digests}
    assert asked == {digest for group in groups for digest in group}


def test_a_complete_sweep_covers_the_pages_stored_before_it_began() -> None:
    clock, client = Clock(), HoldsEverything()
    job = replicator(8, clock, client)
    job.pages_added(commits(1, 10)[0])
    clock.now += 0.5
    later = commits(1, 10)[0]
    job.pages_added(later)
    job._forget_fresh(stored_before=1000.2)  # a sweep that began between the two commits
    assert job._fresh_due() == 1000.5 + job.fresh_wait
    clock.now = 1000.5 + job.fresh_wait
    asyncio.run(job._push_fresh())
    assert {digest for _, digests in client.asked for digest in digests} == set(later)


def test_a_busy_node_checks_full_rounds_not_whatever_is_due_each_second() -> None:
    asyncio.run(busy_node())


async def busy_node() -> None:
    """Pages keep arriving faster than FRESH_CHUNK per FRESH_DELAY: rounds go out when
    FRESH_CHUNK pages are due (or the oldest waited FRESH_MAX_DELAY), not every time the
    waiting total passes a chunk while only a few hundred of them are due."""
    clock, client = Clock(), HoldsEverything()
    job = replicator(32, clock, client)
    per_commit, step = 64, 0.05  # 1280 pages a second: FRESH_CHUNK is due ~3.2 s after start
    rounds = 0
    checked = 0
    for _ in range(200):  # 10 s of commits
        job.pages_added(commits(1, per_commit)[0])
        before = len(client.asked)
        await job._push_fresh()
        if len(client.asked) > before:
            rounds += 1
            checked = sum(len(d) for _, d in client.asked)
        clock.now += step
    # Without the fix a round went out every wake-up once a chunk's worth waited (~100 rounds).
    assert 1 <= rounds <= 10 * 1280 // FRESH_CHUNK + 1
    assert checked >= FRESH_CHUNK * 2 * 2  # each round: FRESH_CHUNK pages x (R - 1) replicas
    assert CHUNK < FRESH_CHUNK
