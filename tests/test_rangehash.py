"""Bucket tables, bucket ownership and the range comparison (tmdht.rangehash), in memory."""

from __future__ import annotations

import random
from collections.abc import Callable

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tmdht.domains import FailureDomain
from tmdht.placement import Ring, tokens_of
from tmdht.rangehash import (
    BUCKETS,
    LEVELS,
    BucketOwners,
    BucketTable,
    RangeComparison,
    RangeQuery,
    bucket_of,
    bucket_prefix,
    designated_source,
    mask_from_bits,
    mask_to_bits,
)

digests = st.binary(min_size=32, max_size=32)
ALL = np.ones(BUCKETS, np.bool_)


def rand_digests(count: int, seed: int = 0, prefix: bytes = b"") -> list[bytes]:
    rng = random.Random(seed)
    return [prefix + rng.randbytes(32 - len(prefix)) for _ in range(count)]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.booleans(), digests), max_size=60), st.lists(digests, max_size=20))
def test_incremental_table_equals_rebuilt(ops: list[tuple[bool, bytes]], start: list[bytes]) -> None:
    held = set(start)
    table = BucketTable.from_digests(held)
    for add, digest in ops:
        if add and digest not in held:
            held.add(digest)
            table.toggle([digest], 1)
        elif not add and digest in held:
            held.discard(digest)
            table.toggle([digest], -1)
    assert table == BucketTable.from_digests(held)
    assert int(table.counts.sum()) == len(held)


def test_bucket_is_the_digest_prefix() -> None:
    for digest in rand_digests(100):
        assert digest.startswith(bucket_prefix(bucket_of(digest)))


@settings(max_examples=50, deadline=None)
@given(st.lists(digests, max_size=40), st.sampled_from(LEVELS), st.data())
def test_fold_is_the_xor_of_masked_buckets(items: list[bytes], group_bits: int, data: st.DataObject) -> None:
    table = BucketTable.from_digests(set(items))
    groups = data.draw(st.integers(1, min(8, BUCKETS >> group_bits)))
    first = data.draw(st.integers(0, (BUCKETS >> group_bits) - groups)) << group_bits
    size = groups << group_bits
    seed = data.draw(st.integers(0, 1000))
    mask = np.random.default_rng(seed).random(size) < 0.5
    counts, hashes = table.fold(mask, first, groups, group_bits)
    for g in range(groups):
        chosen = [
            d for d in set(items)
            if first + g * (1 << group_bits) <= bucket_of(d) < first + (g + 1) * (1 << group_bits)
            and mask[bucket_of(d) - first]
        ]
        xor = 0
        for d in chosen:
            xor ^= int.from_bytes(d, "little")
        assert counts[g] == len(chosen)
        assert hashes[g].astype("<u8").tobytes() == xor.to_bytes(32, "little")


def test_mask_bits_round_trip() -> None:
    mask = np.random.default_rng(1).random(100) < 0.3
    assert np.array_equal(mask_from_bits(mask_to_bits(mask), 100), mask)


# -- the comparison, driven in memory ----------------------------------------------------------


def run(
    local: BucketTable, peer: BucketTable, mask: np.ndarray, max_groups: int = 905,
    max_mask_bytes: int = 32700, answer: Callable[[RangeQuery], bool] = lambda q: True,
) -> RangeComparison:
    comparison = RangeComparison(local, mask, max_mask_bytes=max_mask_bytes, max_groups=max_groups)
    rounds = 0
    while not comparison.done:
        rounds += 1
        assert rounds <= len(LEVELS)
        for query in comparison.queries():
            assert (query.groups << query.group_bits) <= max_mask_bytes * 8
            assert query.groups <= max_groups
            if answer(query):
                # What the peer answers: the query travels as bits.
                mask_bits = mask_from_bits(query.mask_bits, query.groups << query.group_bits)
                comparison.answer(
                    query, peer.encode_entries(mask_bits, query.first, query.groups,
                                               query.group_bits))
            else:
                comparison.unanswered(query)
    return comparison


def test_quiet_tables_cost_one_query() -> None:
    items = rand_digests(50_000)
    local, peer = BucketTable.from_digests(items), BucketTable.from_digests(items)
    comparison = run(local, peer, ALL)
    assert comparison.differing == []
    assert comparison.queries_sent == 1


def test_exactly_the_buckets_with_pages_the_peer_lacks_differ() -> None:
    items = rand_digests(20_000, seed=2)
    lost = items[:7] + rand_digests(5, seed=3, prefix=b"\x12\x34")
    extra = rand_digests(9, seed=4)  # the peer has pages this node lacks: the peer pushes
    local = BucketTable.from_digests(items + lost[7:])
    peer = BucketTable.from_digests([d for d in items if d not in lost] + extra)
    comparison = run(local, peer, ALL)
    assert sorted(comparison.differing) == sorted({bucket_of(d) for d in lost} |
                                                  ({bucket_of(d) for d in extra}
                                                   & {bucket_of(d) for d in items}))
    # Descent: one top query, then one per differing group per level at most.
    assert comparison.queries_sent <= 1 + 2 * len(lost + extra)


def test_masked_buckets_are_not_compared() -> None:
    items = rand_digests(1000, seed=5)
    local = BucketTable.from_digests(items)
    peer = BucketTable()
    mask = np.zeros(BUCKETS, np.bool_)
    mask[: BUCKETS // 2] = True
    comparison = run(local, peer, mask)
    expected = sorted({bucket_of(d) for d in items if bucket_of(d) < BUCKETS // 2})
    assert sorted(comparison.differing) == expected
    # An empty peer is known differing from the top level on: no descent.
    assert comparison.queries_sent == 1


def test_small_datagrams_split_queries() -> None:
    items = rand_digests(3000, seed=6)
    local = BucketTable.from_digests(items)
    peer = BucketTable.from_digests(items[1:])
    comparison = run(local, peer, ALL, max_groups=10, max_mask_bytes=4096 // 8 * 2)
    assert comparison.differing == [bucket_of(items[0])]


def test_unanswered_queries_leave_buckets_unknown() -> None:
    items = rand_digests(1000, seed=7)
    local = BucketTable.from_digests(items)
    comparison = run(local, BucketTable(), ALL, answer=lambda q: False)
    assert comparison.differing == []
    assert comparison.unanswered_buckets == len({bucket_of(d) for d in items})


# -- ownership ----------------------------------------------------------------------------------


def keys_in(bucket: int, points: list[bytes], rng: random.Random) -> list[bytes]:
    """Keys of ``bucket``: random ones, and ones beside each point (token) in it, on both sides
    of every bit where they could split the points' order."""
    prefix = bucket_prefix(bucket)
    keys = [prefix + rng.randbytes(30) for _ in range(8)]
    for point in (p for p in points if p[:2] == prefix):
        for bit in range(16, 48):
            flipped = int.from_bytes(point, "big") ^ (1 << (159 - bit))
            keys += [point + rng.randbytes(12), flipped.to_bytes(20, "big") + rng.randbytes(12)]
    return keys


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.integers(2, 40), st.integers(1, 4), st.integers(0, 3), st.sampled_from((1, 2, 8, 16)),
    st.integers(0, 2**32),
)
def test_uniform_buckets_have_one_replica_set(
    nodes: int, replicas: int, collisions: int, virtual_ids: int, seed: int
) -> None:
    rng = random.Random(seed)
    ids = [rng.randbytes(20) for _ in range(nodes)]
    for _ in range(collisions):
        # Points sharing their first 16 bits swap order within a bucket: a node ID beside
        # another member's token (its ID, or a derived one).
        a, b = rng.sample(range(nodes), 2)
        ids[b] = rng.choice(tokens_of(ids[a], virtual_ids))[:2] + ids[b][2:]
    zones = [FailureDomain(zone=f"z{rng.randrange(3)}") for _ in range(nodes)]
    ring = Ring(ids, zones, virtual_ids=virtual_ids)
    owners = BucketOwners(ring, replicas)
    points = [t for i in ids for t in tokens_of(i, virtual_ids)]
    buckets = rng.sample(range(BUCKETS), 16) + [bucket_of(p) for p in points]
    for bucket in buckets:
        sets = {frozenset(ring.place(k, replicas)) for k in keys_in(bucket, points, rng)}
        assert frozenset(owners.rows[bucket].tolist()) in sets
        if owners.uniform[bucket]:
            assert sets == {frozenset(owners.rows[bucket].tolist())}


def test_tokens_in_one_bucket_leave_most_buckets_uniform() -> None:
    # 32 nodes of 16 tokens: a few tokens share a bucket with another member's, but only the
    # buckets where that decides the replica set go through per-page HAS.
    rng = random.Random(5)
    ids = [rng.randbytes(20) for _ in range(32)]
    hosts = [FailureDomain(host=f"h{i // 4}") for i in range(32)]
    ring = Ring(ids, hosts, virtual_ids=16)
    owners = BucketOwners(ring, 3)
    points = [t for i in ids for t in tokens_of(i, 16)]
    shared = {bucket_of(p) for p in points if sum(bucket_of(q) == bucket_of(p) for q in points) > 1}
    assert shared  # the seed gives some
    assert owners.uniform.mean() > 0.995
    for bucket in np.flatnonzero(~owners.uniform).tolist():
        sets = {frozenset(ring.place(k, 3)) for k in keys_in(bucket, points, rng)}
        assert len(sets) > 1  # non-uniform only where the set really varies (as found here)


def test_without_collisions_every_bucket_is_uniform() -> None:
    ids = [bytes([i * 16, 0]) + bytes(18) for i in range(8)]
    owners = BucketOwners(Ring(ids, virtual_ids=1), 3)
    assert owners.uniform.all()
    assert owners.joint(0, 1).sum() > 0
    assert not (owners.joint(0, 1) & ~owners.holds(0)).any()


def test_designated_source_is_the_first_other_replica() -> None:
    rows = np.array([[0, 1, 2], [1, 0, 2], [2, 1, 0]])
    assert designated_source(rows, 0).tolist() == [1, 1, 2]
    assert designated_source(rows, 1).tolist() == [0, 0, 2]
    assert designated_source(np.array([[3]]), 3).tolist() == [-1]
