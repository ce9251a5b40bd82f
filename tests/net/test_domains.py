"""Failure domains in the overlay's node_info answer and in the membership view."""

from __future__ import annotations

import pytest
import umsgpack
from kademlia.node import Node

from tmdht.aio.kademlia import RoutingTable
from tmdht.domains import MAX_VIRTUAL_IDS
from tmdht.errors import ConfigError, DecodeError
from tmdht.net.membership import ClusterRule, PeerBook
from tmdht.net.overlay import MAX_ADVERTISED_REPLICAS, OverlayConfig, PeerInfo, parse_peer_info
from tmdht.placement import FailureDomain

NODE = b"\x11" * 20


def test_a_domain_round_trips_through_node_info() -> None:
    info = PeerInfo(NODE, "10.0.0.1", 7401, 7402, "1.0", FailureDomain("eu-1", "r7", "h3"))
    wire = umsgpack.unpackb(umsgpack.packb(info.to_wire()))
    assert parse_peer_info(wire) == info


def test_an_answer_without_a_domain_is_accepted_as_before() -> None:
    """An older node sends no ``domain``: same protocol version, the field is optional."""
    raw = PeerInfo(NODE, "", 7401, 0, "0.9").to_wire()
    assert "domain" not in raw
    assert parse_peer_info(raw).domain is None


@pytest.mark.parametrize(
    "domain",
    [
        "eu-1",
        ["eu-1", "r7"],
        ["eu-1", "r7", 3],
        ["x" * 65, "", ""],
        ["bad\nlabel", "", ""],
        {"zone": "eu-1"},
    ],
)
def test_a_malformed_domain_is_refused(domain: object) -> None:
    raw = PeerInfo(NODE, "", 7401, 0, "1").to_wire()
    raw["domain"] = domain
    with pytest.raises(DecodeError):
        parse_peer_info(raw)


def book() -> PeerBook:
    me = b"\x00" * 20
    return PeerBook(
        me,
        router=RoutingTable(20, Node(me)),
        max_failures=3,
        silence_timeout=10,
        info_max_age=1000,
        dead_ttl=100,
        dead_retry_interval=5,
        max_peers=100,
    )


def test_a_member_carries_its_domain_or_its_ip_as_host() -> None:
    peers = book()
    placed = FailureDomain("z1", "r1", "h1")
    peers.got_info(PeerInfo(NODE, "", 7000, 0, "1", placed), ("10.0.0.5", 4000), now=0)
    peers.got_info(PeerInfo(b"\x22" * 20, "", 7001, 0, "0.9"), ("10.0.0.6", 4001), now=0)
    domains = {m.node_id: m.domain for m in peers.members()}
    assert domains == {NODE: placed, b"\x22" * 20: FailureDomain(host="10.0.0.6")}


# -- the placement rule (V, R) a node advertises ----------------------------------------------


def test_the_placement_rule_round_trips_through_node_info() -> None:
    info = PeerInfo(NODE, "", 7401, 0, "1", None, virtual_ids=4, replicas=2)
    raw = umsgpack.unpackb(umsgpack.packb(info.to_wire()))
    assert (raw["virtual_ids"], raw["replicas"]) == (4, 2)
    assert parse_peer_info(raw) == info


def test_an_answer_without_a_rule_is_accepted_as_before() -> None:
    raw = PeerInfo(NODE, "", 7401, 0, "0.9").to_wire()
    assert "virtual_ids" not in raw and "replicas" not in raw
    parsed = parse_peer_info(raw)
    assert (parsed.virtual_ids, parsed.replicas) == (None, None)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("virtual_ids", 0),
        ("virtual_ids", MAX_VIRTUAL_IDS + 1),
        ("virtual_ids", -3),
        ("virtual_ids", True),
        ("virtual_ids", "16"),
        ("virtual_ids", 4.0),
        ("replicas", 0),
        ("replicas", MAX_ADVERTISED_REPLICAS + 1),
        ("replicas", [3]),
    ],
)
def test_a_malformed_rule_is_refused_by_name(field: str, value: object) -> None:
    raw = PeerInfo(NODE, "", 7401, 0, "1").to_wire()
    raw[field] = value
    with pytest.raises(DecodeError, match=field):
        parse_peer_info(raw)


def test_an_overlay_config_refuses_a_rule_it_could_not_advertise() -> None:
    assert OverlayConfig(data_port=1, virtual_ids=4, replicas=3).virtual_ids == 4
    for bad in ({"virtual_ids": 0}, {"replicas": MAX_ADVERTISED_REPLICAS + 1}):
        with pytest.raises(ConfigError):
            OverlayConfig(data_port=1, **bad)  # type: ignore[arg-type]


def test_members_carry_the_rule_and_a_view_tallies_it() -> None:
    peers = book()
    ids = [bytes([i]) * 20 for i in range(1, 5)]
    rules = [(4, 3), (4, 3), (16, 2), (None, None)]
    for i, (node_id, (v, r)) in enumerate(zip(ids, rules, strict=True)):
        info = PeerInfo(node_id, "", 7000 + i, 0, "1", virtual_ids=v, replicas=r)
        peers.got_info(info, (f"10.0.0.{i + 1}", 4000 + i), now=0)
    members = peers.members()
    assert {m.node_id: (m.virtual_ids, m.replicas) for m in members} == dict(
        zip(ids, rules, strict=True)
    )
    rule = ClusterRule.of(members)
    assert (rule.virtual_ids, rule.replicas, rule.agreed) == (4, 3, False)
    assert rule.virtual_ids_seen == ((4, 2), (16, 1))
    assert rule.describe() == "V=4 (2 members), V=16 (1 members), R=3 (2 members), R=2 (1 members)"


def test_a_tie_goes_to_the_smallest_v_and_nothing_advertised_is_none() -> None:
    peers = book()
    for i, v in enumerate((16, 4)):
        info = PeerInfo(bytes([i + 1]) * 20, "", 7000 + i, 0, "1", virtual_ids=v)
        peers.got_info(info, (f"10.0.0.{i + 1}", 4000 + i), now=0)
    assert ClusterRule.of(peers.members()).virtual_ids == 4
    empty = ClusterRule.of([])
    assert (empty.virtual_ids, empty.replicas, empty.agreed) == (None, None, True)
