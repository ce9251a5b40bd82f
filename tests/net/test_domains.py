"""Failure domains in the overlay's node_info answer and in the membership view."""

from __future__ import annotations

import pytest
import umsgpack
from kademlia.node import Node

from tmdht.aio.kademlia import RoutingTable
from tmdht.errors import DecodeError
from tmdht.net.membership import PeerBook
from tmdht.net.overlay import PeerInfo, parse_peer_info
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
