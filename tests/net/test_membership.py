"""Ring membership and liveness (tmdht.net.membership), with no IO: the time is a parameter."""

from __future__ import annotations

from kademlia.node import Node

from tmdht.aio.kademlia import RoutingTable
from tmdht.net.membership import MembershipEventKind, PeerBook
from tmdht.net.overlay import PeerInfo

LOCAL = "127.0.0.1"


def test_peer_book_counts_failures_and_refuses_the_dead() -> None:
    me, other, alive = b"\x00" * 20, b"\x80" + b"\x01" * 19, b"\x40" + b"\x02" * 19
    book = PeerBook(
        me,
        router=RoutingTable(20, Node(me)),
        max_failures=3,
        silence_timeout=10,
        info_max_age=1000,
        dead_ttl=100,
        dead_retry_interval=5,
        max_peers=100,
    )
    addr = (LOCAL, 4000)
    info = PeerInfo(other, "", 7000, 0, "1")

    assert [e.kind for e in book.got_info(info, addr, now=0)] == [MembershipEventKind.JOINED]
    book.got_info(PeerInfo(alive, "", 7001, 0, "1"), (LOCAL, 4001), now=0)
    assert book.failed(other, addr, now=1) == []
    assert book.failed(other, addr, now=2) == []
    assert [m.suspect for m in book.members()] == [False, True]
    # A suspect is neither queried in lookups nor handed to others.
    assert book.mentioned(Node(other, *addr), now=2) is None
    assert [n.id for n in book.neighbors(other, 20, exclude=None)] == [alive]
    events = book.failed(other, addr, now=3)
    assert [e.kind for e in events] == [MembershipEventKind.LEFT]
    assert [m.node_id for m in book.members()] == [alive]
    assert other not in {n.id for n in book.router.contacts()}

    # Peers keep listing it: refused every time, re-probed in the background at most every 5 s.
    book.take_wanted()
    assert book.mentioned(Node(other, *addr), now=4) is None
    assert other not in book.take_wanted()
    assert book.mentioned(Node(other, *addr), now=8.5) is None
    assert book.take_wanted() == {other: addr}

    # It answers again: a member again once it has told us its (maybe new) info.
    assert book.heard(other, addr, now=9) == []
    assert book.take_wanted() == {other: addr}
    assert [e.kind for e in book.got_info(info, addr, now=9)] == [MembershipEventKind.JOINED]

    # A healthy member is not moved by one datagram from another address; its known one is probed.
    assert book.heard(other, (LOCAL, 5000), now=10) == []
    assert book.peer_address(other) == addr
    assert book.take_wanted() == {other: addr}

    # Once suspect, it may move: the next datagram from elsewhere is believed (it restarted).
    book.failed(other, addr, now=10.5)
    events = book.heard(other, (LOCAL, 5000), now=11)
    assert [(e.kind, e.member.port, e.member.suspect) for e in events] == [
        (MembershipEventKind.UPDATED, 5000, False)
    ]
    assert book.take_wanted() == {other: (LOCAL, 5000)}  # its info is asked again
    addr = (LOCAL, 5000)

    # Dead records expire.
    for now in (11, 12, 13):
        book.failed(other, addr, now=now)
    book.tick(now=200)
    assert book.peer_address(other) is None
