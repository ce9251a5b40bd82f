"""Replication leaves writes in flight alone, for a bounded time: a fresh page a replica lacks at
its check is sent only if it still lacks it FRESH_RECHECK later; a range sweep leaves a bucket
that differs only because it is being written to the next sweep, never longer."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import cast

import pytest
from support.cluster import random_pages

from tmdht import wire
from tmdht.aio.dataplane import DataPlaneClient
from tmdht.net.address import Address
from tmdht.net.membership import Member
from tmdht.net.operations import HasResult, PutOutcome, RangeRead
from tmdht.node.metrics import NodeMetrics
from tmdht.node.replication import FRESH_RECHECK, Replicator
from tmdht.node.storage import PageStore
from tmdht.placement import FailureDomain
from tmdht.rangehash import BucketTable, bucket_of, mask_from_bits


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Peer:
    """The other replica, in memory: answers HAS, PUT and RANGE_HASH from the pages it holds."""

    def __init__(self, held: Sequence[bytes] = ()) -> None:
        self.held: set[bytes] = set(held)
        self.sent: list[bytes] = []  # pages PUT to it, in order
        self.range_queries = 0
        self.on_range_query: list[object] = []  # callables run at the first RANGE_HASH

    async def has(self, address: Address, digests: Sequence[bytes]) -> HasResult:
        return HasResult(held={d for d in digests if d in self.held},
                         lacking={d for d in digests if d not in self.held})

    async def put_pages(self, address: Address, pages: Sequence[tuple[bytes, bytes]]) -> PutOutcome:
        for digest, _ in pages:
            self.sent.append(digest)
            self.held.add(digest)
        return PutOutcome(status={d: wire.PutStatus.STORED for d, _ in pages})

    async def range_hashes(self, query: RangeRead) -> wire.RangeHashes:
        self.range_queries += 1
        while self.on_range_query:
            self.on_range_query.pop()()  # type: ignore[operator]
        table = BucketTable.from_digests(self.held)
        mask = mask_from_bits(query.mask, query.groups << query.group_bits)
        return wire.RangeHashes(
            request_id=1, bucket_bits=query.bucket_bits, group_bits=query.group_bits,
            first=query.first, entries=table.encode_entries(
                mask, query.first, query.groups, query.group_bits))


def member(i: int) -> Member:
    return Member(node_id=bytes([i]) * 20, host="10.0.0.1", port=1000 + i, data_host="10.0.0.1",
                  data_port=2000 + i, metrics_port=0, version="test", last_seen=0.0,
                  domain=FailureDomain(host=f"h{i}"))


def replicator(store: PageStore, peer: Peer, clock: Clock) -> Replicator:
    members = [member(0), member(1)]  # R=2 of 2 nodes: both hold every bucket
    return Replicator(
        store=store, client=cast(DataPlaneClient, peer), self_id=members[0].node_id,
        members=lambda: members, replicas=2, rate=1_000_000, interval=60.0, grace=600.0,
        metrics=NodeMetrics(), clock=clock)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[PageStore]:
    with PageStore.open(tmp_path / "store", capacity_bytes=64 << 20) as opened:
        yield opened


def stored(store: PageStore, count: int) -> tuple[Clock, Peer, Replicator, list[bytes]]:
    """A replicator over ``store`` holding ``count`` new pages, its peer (holding none yet) and
    its clock; the digests stored."""
    clock, peer = Clock(), Peer()
    items = random_pages(count)
    store.put_many(items)
    return clock, peer, replicator(store, peer, clock), [d for d, _ in items]


def test_a_fresh_page_the_replica_lacks_is_sent_only_if_it_still_lacks_it_later(
    store: PageStore,
) -> None:
    clock, peer, job, digests = stored(store, 20)
    job.pages_added(digests)
    clock.now += job.fresh_wait
    asyncio.run(job._push_fresh())  # the check: the peer lacks all 20, on their way perhaps
    assert peer.sent == []
    arriving = set(digests[:15])
    peer.held |= arriving  # the client's own PUTs reach the peer meanwhile
    assert job._fresh_due() == clock.now + FRESH_RECHECK
    clock.now += FRESH_RECHECK
    asyncio.run(job._push_fresh())
    assert sorted(peer.sent) == sorted(set(digests) - arriving)  # only what is still missing
    assert job._fresh_due() == float("inf")


def test_a_bucket_written_during_the_sweep_is_left_to_the_next_sweep_only(
    store: PageStore,
) -> None:
    _, peer, job, digests = stored(store, 40)
    lost, written = digests[0], random_pages(1)[0]
    # The peer holds everything but `lost`. A write lands in `lost`'s bucket while the sweep
    # compares hashes (here: a page with the same 16-bit prefix is stored at the first query).
    peer.held = set(digests) - {lost}
    while bucket_of(written[0]) != bucket_of(lost):
        written = random_pages(1)[0]
    peer.on_range_query.append(lambda: store.put_many([written]))
    first = asyncio.run(job.sweep())
    assert first.complete and first.in_flight_buckets == 1
    assert peer.sent == []  # the bucket differs because a write is in flight: not repaired yet
    second = asyncio.run(job.sweep())  # it still differs (the write never reached the peer)
    assert second.complete and second.in_flight_buckets == 0
    assert sorted(peer.sent) == sorted([lost, written[0]])
    third = asyncio.run(job.sweep())
    assert third.differing_buckets == 0 and third.in_flight_buckets == 0


def test_buckets_of_pages_due_a_fresh_check_wait_one_sweep_and_no_longer(
    store: PageStore,
) -> None:
    _, peer, job, digests = stored(store, 40)
    peer.held = set(digests[5:])
    job.pages_added(digests[:2])  # two of the five lacking pages were stored just now
    fresh_buckets = {bucket_of(d) for d in digests[:2]}
    first = asyncio.run(job.sweep())
    assert first.in_flight_buckets == len(fresh_buckets)
    assert job._fresh_pages == 2  # a sweep that left buckets alone does not stand in for checks
    assert set(peer.sent) == set(digests[2:5]) - {d for d in digests[2:5]
                                                   if bucket_of(d) in fresh_buckets}
    job.pages_added(digests[:2])  # still fresh at the next sweep: repaired all the same
    second = asyncio.run(job.sweep())
    assert second.in_flight_buckets == 0
    assert set(peer.sent) == set(digests[:5])
