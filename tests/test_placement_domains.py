"""Failure-domain-aware placement: the rule of tmdht/placement.py, property by property, with one
token per member (placement by node ID) and with several (virtual IDs)."""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tmdht.errors import UsageError
from tmdht.placement import (
    VIRTUAL_IDS,
    WINDOW,
    FailureDomain,
    Ring,
    closest,
    replica_indices,
    replica_rows,
    tokens_of,
)

LEVELS = ("zone", "rack", "host")


@dataclass(frozen=True)
class Case:
    """A ring (unique IDs, one failure domain each), some digests, R and V."""

    ids: list[bytes]
    domains: list[FailureDomain]
    digests: list[bytes]
    replicas: int
    virtual_ids: int = 1


def make_ids(rng: random.Random, count: int, clustered: bool) -> list[bytes]:
    """Unique random IDs; clustered ones share long prefixes, so the window must widen."""
    prefixes = [rng.randbytes(rng.choice((1, 2, 7, 8, 9))) for _ in range(3)]
    ids: dict[bytes, None] = {}
    while len(ids) < count:
        head = rng.choice(prefixes) if clustered else b""
        ids[head + rng.randbytes(20 - len(head))] = None
    return list(ids)


@st.composite
def cases(draw: st.DrawFn, max_nodes: int = 90) -> Case:
    rng = random.Random(draw(st.integers(0, 2**32 - 1)))
    count = draw(st.integers(1, max_nodes))
    zones, racks, hosts = (
        draw(st.integers(1, 6)),
        draw(st.integers(1, 3)),
        draw(st.integers(1, count)),
    )
    domains = [
        FailureDomain(
            f"z{rng.randrange(zones)}", f"r{rng.randrange(racks)}", f"h{rng.randrange(hosts)}"
        )
        for _ in range(count)
    ]
    ids = make_ids(rng, count, draw(st.booleans()))
    # Keys next to node IDs as well as random ones: the edges of a window matter.
    digests = [rng.randbytes(32) for _ in range(24)]
    digests += [i[:19] + rng.randbytes(13) for i in rng.sample(ids, min(8, count))]
    # Keys next to derived tokens too (with V > 1 those are most of the ring's points).
    virtual_ids = draw(st.sampled_from((1, 1, 2, 5, VIRTUAL_IDS)))
    tokens = [t for i in ids for t in tokens_of(i, virtual_ids)[1:]]
    digests += [t[:19] + rng.randbytes(13) for t in rng.sample(tokens, min(8, len(tokens)))]
    return Case(ids, domains, digests, draw(st.integers(1, 5)), virtual_ids)


def shared_levels(a: FailureDomain, b: FailureDomain) -> int:
    """How many labels, from the zone down, two domains share."""
    same = 0
    for x, y in zip(a.path, b.path, strict=True):
        if x != y:
            break
        same += 1
    return same


def oracle(
    key: bytes,
    ids: list[bytes],
    domains: list[FailureDomain] | None,
    replicas: int,
    virtual_ids: int = 1,
) -> list[int]:
    """The rule as the module docstring states it, by brute force: over every member's tokens,
    the member being the narrowest domain (a fourth level below zone, rack and host)."""
    target = int.from_bytes(key[:20], "big")
    points = [(m, t) for m in range(len(ids)) for t in tokens_of(ids[m], virtual_ids)]
    rank = {
        p: r
        for r, p in enumerate(
            sorted(range(len(points)), key=lambda p: int.from_bytes(points[p][1], "big") ^ target)
        )
    }
    chosen: list[int] = []  # points
    for _ in range(min(replicas, len(ids))):

        def sharing(p: int) -> int:
            member = points[p][0]
            return max(
                (
                    4 if points[c][0] == member
                    else 0 if domains is None
                    else shared_levels(domains[member], domains[points[c][0]])
                    for c in chosen
                ),
                default=0,
            )

        chosen.append(
            min((p for p in rank if p not in chosen), key=lambda p: (sharing(p), rank[p]))
        )
    return [points[p][0] for p in sorted(chosen, key=rank.__getitem__)]


def member_order(key: bytes, ids: list[bytes], virtual_ids: int) -> list[int]:
    """Members by the XOR distance of their closest token to ``key``."""
    target = int.from_bytes(key[:20], "big")
    nearest = [
        min(int.from_bytes(t, "big") ^ target for t in tokens_of(i, virtual_ids)) for i in ids
    ]
    return sorted(range(len(ids)), key=nearest.__getitem__)


def placed_ids(case: Case, ids: list[bytes], domains: list[FailureDomain]) -> list[list[bytes]]:
    return [
        [ids[i] for i in row]
        for row in Ring(ids, domains, virtual_ids=case.virtual_ids)
        .replica_indices(case.digests, case.replicas)
        .tolist()
    ]


def ring_of(case: Case) -> Ring:
    return Ring(case.ids, case.domains, virtual_ids=case.virtual_ids)


@settings(max_examples=300, deadline=None)
@given(cases())
def test_every_path_follows_the_rule(case: Case) -> None:
    want = [
        oracle(d, case.ids, case.domains, case.replicas, case.virtual_ids) for d in case.digests
    ]
    ring = ring_of(case)
    as_array = np.frombuffer(b"".join(case.digests), np.uint8).reshape(-1, 32)
    assert ring.replica_indices(case.digests, case.replicas).tolist() == want
    assert ring.replica_indices(as_array, case.replicas).tolist() == want
    assert [ring.place(d, case.replicas) for d in case.digests] == want
    assert ring.replica_rows(case.digests[:5], case.replicas) == want[:5]
    v = case.virtual_ids
    assert replica_rows(case.digests, case.ids, case.replicas, domains=case.domains,
                        virtual_ids=v) == want
    assert (
        replica_indices(case.digests, case.ids, case.replicas, domains=case.domains,
                        virtual_ids=v).tolist()
        == want
    )


@settings(max_examples=150, deadline=None)
@given(cases(), st.randoms(use_true_random=False))
def test_placement_ignores_the_order_of_members(case: Case, shuffle: random.Random) -> None:
    members = list(zip(case.ids, case.domains, strict=True))
    shuffle.shuffle(members)
    ids, domains = [m[0] for m in members], [m[1] for m in members]
    assert placed_ids(case, ids, domains) == placed_ids(case, case.ids, case.domains)
    assert placed_ids(case, ids, domains) == placed_ids(case, ids, domains)  # and is deterministic


@settings(max_examples=150, deadline=None)
@given(cases())
def test_replicas_spread_over_as_many_domains_as_the_ring_has(case: Case) -> None:
    rows = ring_of(case).replica_indices(case.digests, case.replicas).tolist()
    for depth in (1, 2, 3):
        in_ring = len({d.path[:depth] for d in case.domains})
        for row in rows:
            assert len({case.domains[i].path[:depth] for i in row}) == min(len(row), in_ring), (
                LEVELS[depth - 1]
            )


@settings(max_examples=150, deadline=None)
@given(cases())
def test_replicas_are_closest_first_and_the_first_is_the_closest_node(case: Case) -> None:
    rows = ring_of(case).replica_indices(case.digests, case.replicas).tolist()
    for digest, row in zip(case.digests, rows, strict=True):
        # A member's place is its closest token's (its others can only be skipped like it).
        order = member_order(digest, case.ids, case.virtual_ids)
        assert [order.index(i) for i in row] == sorted(order.index(i) for i in row)
        assert row[0] == order[0]
        if case.virtual_ids == 1:
            assert row[0] == closest(digest, case.ids, 1)[0]
        assert len(set(row)) == len(row) == min(case.replicas, len(case.ids))


@settings(max_examples=150, deadline=None)
@given(cases(), st.sampled_from(["none", "zones", "hosts", "one zone"]))
def test_domains_that_all_differ_place_like_plain_xor(case: Case, kind: str) -> None:
    domains: list[FailureDomain] | None = {
        "none": None,
        "zones": [FailureDomain(zone=f"z{i}", rack="r") for i in range(len(case.ids))],
        "hosts": [FailureDomain(host=f"h{i}") for i in range(len(case.ids))],
        "one zone": [FailureDomain("z", f"r{i}", "h") for i in range(len(case.ids))],
    }[kind]
    ring = Ring(case.ids, domains, virtual_ids=1)
    assert not ring.spreads_domains
    want = [closest(d, case.ids, case.replicas) for d in case.digests]
    assert ring.replica_indices(case.digests, case.replicas).tolist() == want
    assert replica_rows(case.digests, case.ids, case.replicas, domains=domains,
                        virtual_ids=1) == want
    # With tokens: the first R distinct members in the order of their closest tokens.
    v = max(2, case.virtual_ids)
    want = [member_order(d, case.ids, v)[: case.replicas] for d in case.digests]
    assert Ring(case.ids, domains, virtual_ids=v).replica_indices(
        case.digests, case.replicas).tolist() == want


@settings(max_examples=150, deadline=None)
@given(cases(), st.integers(1, 3), st.integers(0, 2**16))
def test_losing_a_whole_domain_never_loses_every_replica(
    case: Case, depth: int, which: int
) -> None:
    labels = sorted({d.path[:depth] for d in case.domains})
    if len(labels) < 2 or case.replicas < 2:
        return
    lost = labels[which % len(labels)]
    rows = ring_of(case).replica_indices(case.digests, case.replicas).tolist()
    for row in rows:
        assert any(case.domains[i].path[:depth] != lost for i in row)


@settings(max_examples=150, deadline=None)
@given(cases(), st.integers(0, 2**32 - 1))
def test_a_join_or_a_leave_moves_only_the_keys_whose_replica_set_holds_that_node(
    case: Case, seed: int
) -> None:
    rng = random.Random(seed)
    before = placed_ids(case, case.ids, case.domains)
    # A node joins, in an existing domain or a new one.
    newcomer = rng.randbytes(20)
    if newcomer in case.ids:
        return
    domain = rng.choice([*case.domains, FailureDomain("new", "r", "h")])
    after = placed_ids(case, [*case.ids, newcomer], [*case.domains, domain])
    for old, new in zip(before, after, strict=True):
        assert newcomer in new or new == old
    # A node leaves.
    if len(case.ids) == 1:
        return
    gone = rng.randrange(len(case.ids))
    after = placed_ids(
        case, case.ids[:gone] + case.ids[gone + 1 :], case.domains[:gone] + case.domains[gone + 1 :]
    )
    for old, new in zip(before, after, strict=True):
        assert case.ids[gone] in old or new == old


def test_ids_sharing_their_first_64_bits_are_placed_exactly() -> None:
    rng = random.Random(7)
    prefix = rng.randbytes(8)
    ids = [prefix + rng.randbytes(12) for _ in range(3 * WINDOW)]
    domains = [FailureDomain(f"z{i % 3}", host=f"h{i}") for i in range(len(ids))]
    digests = [prefix + rng.randbytes(24) for _ in range(40)]
    for doms in (None, domains):
        want = [oracle(d, ids, doms, 3) for d in digests]
        assert Ring(ids, doms, virtual_ids=1).replica_indices(digests, 3).tolist() == want


def test_a_large_ring_places_most_keys_in_the_window_and_the_rest_exactly() -> None:
    rng = random.Random(3)
    ids = make_ids(rng, 1000, clustered=False)
    domains = [
        FailureDomain(f"z{rng.randrange(3)}", f"r{rng.randrange(4)}", f"h{i // 2}")
        for i in range(1000)
    ]
    digests = [rng.randbytes(32) for _ in range(60)]
    # The last: one node alone in its zone is every key's second replica, far outside the window.
    for doms in (None, domains, [FailureDomain("z0")] * 999 + [FailureDomain("z1")]):
        for v in (1, 4):
            want = [oracle(d, ids, doms, 3, v) for d in digests]
            assert Ring(ids, doms, virtual_ids=v).replica_indices(digests, 3).tolist() == want


def test_fewer_domains_than_replicas_fill_with_the_closest_remaining_nodes() -> None:
    rng = random.Random(11)
    ids = make_ids(rng, 12, clustered=False)
    domains = [FailureDomain(f"z{i % 2}", f"r{i % 4}") for i in range(12)]  # 2 zones, 4 racks
    for row in (
        Ring(ids, domains).replica_indices([rng.randbytes(32) for _ in range(100)], 5).tolist()
    ):
        assert {domains[i].zone for i in row} == {"z0", "z1"}
        assert (
            len({domains[i].path[:2] for i in row}) == 4
        )  # every rack before a second copy in one


def test_bad_arguments_are_refused() -> None:
    ids = [bytes([i]) * 20 for i in range(3)]
    with pytest.raises(UsageError, match="failure domains"):
        Ring(ids, [FailureDomain()] * 2)
    with pytest.raises(UsageError, match="20 bytes"):
        Ring([b"short"])
    with pytest.raises(UsageError, match="replicas"):
        Ring(ids).place(b"k" * 32, 0)
    with pytest.raises(UsageError, match="at least 20 bytes"):
        Ring(ids).replica_rows([b"short"], 3)
    for bad in (0, 257):
        with pytest.raises(UsageError, match="virtual IDs"):
            Ring(ids, virtual_ids=bad)
        with pytest.raises(UsageError, match="virtual IDs"):
            tokens_of(ids[0], bad)
    with pytest.raises(UsageError, match="label"):
        FailureDomain(zone="x" * 65)
    with pytest.raises(UsageError, match="label"):
        FailureDomain(rack="a\nb")
    with pytest.raises(UsageError, match="string"):
        FailureDomain(host=3)  # type: ignore[arg-type]
    assert str(FailureDomain("eu-1", "r7", "10.0.0.5")) == "eu-1/r7/10.0.0.5"
    assert Ring([]).replica_indices([b"k" * 32], 3).shape == (1, 0)
