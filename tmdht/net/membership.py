"""Ring membership, sans-IO: who the members are, and the liveness rules that decide it.

Every node, and every client, keeps the live members of the ring and where their data planes
listen (:class:`Member`). :class:`PeerBook` decides it from what happened -- who answered, who
asked, who missed an RPC, who a peer listed -- with the time as a parameter; the asyncio overlay
(:mod:`tmdht.aio.overlay`) feeds it and runs the probes it asks for.

- A contact becomes a *member* only after it answered a ``node_info`` RPC itself (id, data
  host/port, metrics port, version), validated before use.
- Liveness is local and forgiving: one missed RPC makes a contact *suspect* (skipped by lookups,
  still a member); ``max_failures`` missed RPCs in a row make it *dead* (evicted, ``LEFT``); a
  dead contact is remembered, so peers that still list it cannot hand it back, until it answers
  again (``JOINED``) or the record expires.
- The k-bucket routing table is the kademlia package's, which the book is handed
  (:class:`RoutingTable`): the package's module imports asyncio, so the table lives with the IO.
"""

from __future__ import annotations

import collections
import enum
import heapq
import logging
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any, Final, Protocol

from kademlia.node import Node

from tmdht.domains import FailureDomain
from tmdht.net.address import Address
from tmdht.net.overlay import NO_ID, PeerInfo

__all__ = [
    "NO_DOMAIN",
    "ClusterRule",
    "Member",
    "MembershipEvent",
    "MembershipEventKind",
    "PeerBook",
    "RoutingTable",
    "node_log",
    "short_id",
]

log = logging.getLogger("tmdht.net.membership")


NO_DOMAIN: Final = FailureDomain()
"""The domain of a :class:`Member` built without one (all labels empty)."""


@dataclass(frozen=True, slots=True)
class Member:
    """One live member of the ring, as this overlay knows it."""

    node_id: bytes
    """160-bit node id (20 bytes)."""
    host: str
    """IP of its kademlia socket (the address it answered from)."""
    port: int
    """Port of its kademlia socket."""
    data_host: str
    """IP of its page data plane."""
    data_port: int
    """UDP port of its page data plane."""
    metrics_port: int
    """Its Prometheus port (0: none)."""
    version: str
    """Its software version."""
    last_seen: float
    """``time.monotonic()`` when it last answered or asked us something directly."""
    suspect: bool = False
    """It missed its last RPC(s) but not yet ``max_failures`` in a row: still a member."""
    domain: FailureDomain = NO_DOMAIN
    """Its failure domain (zone, rack, host) as it advertised it; a node that advertised none
    (an older version) counts as its own host, named by its IP."""
    virtual_ids: int | None = None
    """The placement rule's V (tokens per member) it advertised; None: it advertised none (an
    older version, or a client)."""
    replicas: int | None = None
    """The replication factor R it advertised; None: it advertised none."""

    @property
    def data_address(self) -> Address:
        """(host, port) to send data-plane datagrams to."""
        return (self.data_host, self.data_port)

    def same_view(self, other: Member) -> bool:
        """True if nothing a user routes by differs (liveness fields aside)."""
        return replace(self, last_seen=0.0, suspect=False) == replace(
            other, last_seen=0.0, suspect=False
        )


@dataclass(frozen=True, slots=True)
class ClusterRule:
    """The placement rule (V, R) the members of a view advertise, and how far they agree.

    V decides where pages live, so a client places by what the nodes advertise, not by its own
    setting: by the value most members advertise (ties: the smallest), since a cluster in the
    middle of a change of V is a mistake to report, not a state to serve well.
    """

    virtual_ids: int | None
    """The V most members advertise; None: none advertised one (older nodes)."""
    replicas: int | None
    """The R most members advertise; None: none advertised one."""
    virtual_ids_seen: tuple[tuple[int, int], ...] = ()
    """(V, members advertising it) for every V advertised, most members first."""
    replicas_seen: tuple[tuple[int, int], ...] = ()
    """(R, members advertising it) for every R advertised, most members first."""

    @classmethod
    def of(cls, members: Iterable[Member]) -> ClusterRule:
        """The rule ``members`` advertise (members that advertise none are left out)."""
        views = list(members)
        v_seen = _tally(m.virtual_ids for m in views)
        r_seen = _tally(m.replicas for m in views)
        return cls(
            virtual_ids=v_seen[0][0] if v_seen else None,
            replicas=r_seen[0][0] if r_seen else None,
            virtual_ids_seen=v_seen,
            replicas_seen=r_seen,
        )

    @property
    def agreed(self) -> bool:
        """True if no two members advertise different V or R."""
        return len(self.virtual_ids_seen) <= 1 and len(self.replicas_seen) <= 1

    def describe(self) -> str:
        """The values advertised and by how many members, e.g. ``V=16 (4 members), V=4 (1)``."""
        parts = [f"V={v} ({n} members)" for v, n in self.virtual_ids_seen]
        parts += [f"R={r} ({n} members)" for r, n in self.replicas_seen]
        return ", ".join(parts) or "nothing advertised"


def _tally(values: Iterable[int | None]) -> tuple[tuple[int, int], ...]:
    counts = collections.Counter(v for v in values if v is not None)
    return tuple(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


class MembershipEventKind(enum.Enum):
    """What happened to a member."""

    JOINED = "joined"
    """It answered node_info and is now a member (new, or back from the dead)."""
    LEFT = "left"
    """It missed ``max_failures`` RPCs in a row (or was replaced by another id at its address)."""
    UPDATED = "updated"
    """Its address or advertised info changed (e.g. restarted on another port)."""


@dataclass(frozen=True, slots=True)
class MembershipEvent:
    """One membership change, delivered to subscribers in order."""

    kind: MembershipEventKind
    """joined, left or updated."""
    member: Member
    """The member after the change (for LEFT: as last known)."""


class RoutingTable(Protocol):
    """The k-bucket table a :class:`PeerBook` keeps its contacts in (no IO)."""

    def add_contact(self, node: Node) -> bool:
        """Add or refresh a contact; False if it only went to a full bucket's replacement cache."""
        ...

    def remove_contact(self, node: Node) -> None:
        """Forget a contact."""
        ...

    def contacts(self) -> list[Node]:
        """Every contact in the table."""
        ...

    def refresh_ids(self, max_age: float, now: float) -> list[bytes]:
        """A random id in each bucket not looked up for ``max_age`` seconds."""
        ...

    def take_full_heads(self) -> list[Node]:
        """The least recently seen contacts of buckets found full since the last call."""
        ...


class _NodeLog(logging.LoggerAdapter[logging.Logger]):
    """Prefixes messages with the overlay's short id: a process may run several (tests, bench)."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        return f"[{self.extra['node'] if self.extra else '?'}] {msg}", kwargs


def node_log(logger: logging.Logger, node_id: bytes) -> logging.LoggerAdapter[logging.Logger]:
    """``logger`` with every message prefixed by ``[short id]`` of the node it speaks for."""
    return _NodeLog(logger, {"node": short_id(node_id)})


@dataclass(slots=True)
class _Peer:
    """What the book knows about one contact."""

    node: Node
    """Its id and the kademlia address we trust (the last one it answered from)."""
    verified: bool = False
    """It answered us (or asked us) directly since it was learned or came back."""
    info: PeerInfo | None = None
    """Its last validated node_info answer."""
    info_at: float = 0.0
    """Monotonic time of that answer."""
    failures: int = 0
    """RPCs missed in a row."""
    dead: bool = False
    """It missed max_failures RPCs in a row: evicted, refused when peers list it."""
    last_seen: float = 0.0
    """Monotonic time of the last direct evidence."""
    expires: float = 0.0
    """Dead: forget the record after this."""
    retry_at: float = 0.0
    """Dead or suspect: earliest probe prompted by a peer listing it (or another address)."""
    announced: Member | None = None
    """What subscribers were last told (None: not a member for them)."""

    @property
    def healthy(self) -> bool:
        return not self.dead and self.failures == 0

    @property
    def address(self) -> Address:
        return (self.node.ip, self.node.port)


class PeerBook:
    """Liveness and membership of every contact; no IO, the time is a parameter.

    The overlay feeds it what happened (``heard``, ``got_info``, ``failed``, ``mentioned``,
    ``tick``) and runs the probes it asks for (:meth:`take_wanted`). Methods that change
    membership return the :class:`MembershipEvent` list to publish.
    """

    def __init__(
        self,
        self_id: bytes,
        *,
        router: RoutingTable,
        max_failures: int,
        silence_timeout: float,
        info_max_age: float,
        dead_ttl: float,
        dead_retry_interval: float,
        max_peers: int,
        authenticated: bool = False,
    ) -> None:
        """Create an empty book for the node ``self_id``.

        ``authenticated``: every datagram carries a valid cluster-key tag, so a datagram from a
        known node at a new address is the node itself (restarted elsewhere) and is believed at
        once; without a key the known address is probed first (anyone could claim the id).
        """
        self.self_id = self_id
        self._authenticated = authenticated
        self._log = node_log(log, self_id)
        self.router = router
        self._max_failures = max_failures
        self._silence_timeout = silence_timeout
        self._info_max_age = info_max_age
        self._dead_ttl = dead_ttl
        self._dead_retry = dead_retry_interval
        self._max_peers = max_peers
        self._peers: dict[bytes, _Peer] = {}
        self._wanted: dict[bytes, Address] = {}

    # -- what happened ----------------------------------------------------------------------

    def heard(self, node_id: bytes, addr: Address, now: float) -> list[MembershipEvent]:
        """``node_id`` answered us, or asked us something, from ``addr``."""
        if node_id in (self.self_id, NO_ID):
            return []
        peer = self._peers.get(node_id)
        refetch = False
        if peer is None:
            if len(self._peers) >= self._max_peers:
                return []
            peer = self._peers[node_id] = _Peer(Node(node_id, *addr))
        elif peer.address != addr:
            if peer.verified and peer.healthy and not self._authenticated:
                # A healthy contact is not moved on one datagram from elsewhere (that would let
                # anyone hijack it); probe the known address instead. If that fails, the contact
                # turns suspect and the next datagram from the new address is believed.
                if now >= peer.retry_at:
                    peer.retry_at = now + self._dead_retry
                    self._wanted.setdefault(node_id, peer.address)
                    self._log.info(
                        "%s heard from %s:%d, probing its known address first",
                        short_id(node_id),
                        *addr,
                    )
                return []
            # Restarted elsewhere: its data port may have changed too, so ask again (keeping the
            # old info meanwhile, so it stays a member and subscribers see UPDATED).
            peer.node = Node(node_id, *addr)
            refetch = True
        if peer.dead:
            self._log.info("%s at %s:%d answers again", short_id(node_id), *addr)
            peer.info = None  # it comes back (JOINED) with what it advertises now
            peer.retry_at = 0.0
        peer.verified, peer.dead, peer.failures = True, False, 0
        peer.last_seen = now
        if peer.info is None or refetch:
            self._wanted[node_id] = addr
        self.router.add_contact(peer.node)  # also moves it to its bucket's tail (most recent)
        return self._settle(peer, now)

    def got_info(self, info: PeerInfo, addr: Address, now: float) -> list[MembershipEvent]:
        """``info.node_id`` answered node_info from ``addr``: it is (still) a member."""
        events = self.heard(info.node_id, addr, now)
        peer = self._peers.get(info.node_id)
        if peer is not None and peer.address == addr and not peer.dead:
            peer.info, peer.info_at = info, now
            self._wanted.pop(info.node_id, None)
            events += self._settle(peer, now)
        return events

    def failed(
        self, node_id: bytes, addr: Address, now: float, *, gone: bool = False
    ) -> list[MembershipEvent]:
        """An RPC to ``node_id`` at ``addr`` got no (valid) answer.

        ``gone``: another node answered at that address, so this one is certainly not there.
        """
        peer = self._peers.get(node_id)
        if peer is None or peer.dead or peer.address != addr:
            return []  # a probe of some other address says nothing about the trusted one
        peer.failures = self._max_failures if gone else peer.failures + 1
        if peer.failures < self._max_failures:
            self._log.info(
                "%s at %s:%d missed %d RPC(s): suspect", short_id(node_id), *addr, peer.failures
            )
            return self._settle(peer, now)
        self._log.warning(
            "%s at %s:%d missed %d RPCs in a row: dead", short_id(node_id), *addr, peer.failures
        )
        peer.dead, peer.verified = True, False
        peer.expires = now + self._dead_ttl
        peer.retry_at = now + self._dead_retry
        self._wanted.pop(node_id, None)
        self.router.remove_contact(peer.node)
        return self._settle(peer, now)

    def mentioned(self, node: Node, now: float) -> Node | None:
        """A peer listed ``node`` in a FIND_NODE answer: the contact to query, or None.

        Dead and suspect contacts are refused, which is what keeps lookups from waiting on the
        same dead node again and again; a listed dead node is re-probed in the background at
        most every ``dead_retry_interval``. A healthy contact is returned at the address we
        trust, whatever address the peer gave.
        """
        if node.id == self.self_id:
            return None
        addr = (node.ip, node.port)
        peer = self._peers.get(node.id)
        if peer is None:
            if len(self._peers) >= self._max_peers:
                return None
            self._peers[node.id] = _Peer(Node(node.id, *addr))
            self._wanted[node.id] = addr
            return node
        if peer.healthy:
            return peer.node
        if peer.dead and peer.address != addr and not peer.verified:
            peer.node = Node(node.id, *addr)  # nothing trusted any more: try the new address
            self._wanted[node.id] = addr
            peer.retry_at = now + self._dead_retry
        elif now >= peer.retry_at:
            peer.retry_at = now + self._dead_retry
            self._wanted.setdefault(node.id, addr)
        return None

    def tick(self, now: float) -> None:
        """A liveness pass: forget expired dead contacts, ask to probe suspect/silent ones."""
        for node_id, peer in list(self._peers.items()):
            if peer.dead:
                if now >= peer.expires:
                    del self._peers[node_id]
                    self._wanted.pop(node_id, None)
                elif now >= peer.retry_at:
                    # Not only crashes kill contacts: after a network partition each side holds
                    # the other dead and no member mentions it any more, so without this retry
                    # the two sides would never look for each other again (found by
                    # tests/faults: a 3 | 2 split stayed split after the packets flowed again).
                    peer.retry_at = now + self._dead_retry
                    self._wanted.setdefault(node_id, peer.address)
                continue
            if (
                peer.failures
                or not peer.verified
                or peer.info is None
                or now - peer.last_seen >= self._silence_timeout
                # A node that restarted on the same address keeps talking to us, so it is never
                # silent; re-asking node_info now and then catches a changed data port.
                or now - peer.info_at >= self._info_max_age
            ):
                self._wanted.setdefault(node_id, peer.address)

    def take_wanted(self) -> dict[bytes, Address]:
        """The probes (node_info RPCs) the book wants run now, by node id; clears the list."""
        self._flush_full_heads()
        wanted, self._wanted = self._wanted, {}
        return wanted

    # -- views ------------------------------------------------------------------------------

    def peer_address(self, node_id: bytes) -> Address | None:
        """The trusted address of a remembered contact, dead or alive."""
        peer = self._peers.get(node_id)
        return peer.address if peer is not None else None

    def members(self) -> list[Member]:
        """Every live member we know except ourselves, ordered by node id."""
        return sorted(
            (m for peer in self._peers.values() if (m := self._member(peer)) is not None),
            key=lambda m: m.node_id,
        )

    def lacks_info(self, node_id: bytes) -> bool:
        """True if a live contact has not yet answered node_info."""
        peer = self._peers.get(node_id)
        return peer is not None and not peer.dead and peer.info is None

    def lookup_start(self, target: bytes, count: int) -> list[Node]:
        """Healthy contacts of the routing table closest to ``target``, to start a lookup."""
        return self.neighbors(target, count, exclude=None)

    def neighbors(self, target: bytes, count: int, exclude: bytes | None) -> list[Node]:
        """The FIND_NODE answer: healthy routing-table contacts closest to ``target``."""
        key = int.from_bytes(target, "big")
        candidates = (
            node
            for node in self.router.contacts()
            if node.id != exclude and (peer := self._peers.get(node.id)) and peer.healthy
        )
        return heapq.nsmallest(count, candidates, key=lambda node: node.long_id ^ key)

    def counts(self) -> tuple[int, int]:
        """(suspect members, dead contacts)."""
        suspects = sum(1 for p in self._peers.values() if self._member(p) and p.failures)
        return suspects, sum(1 for p in self._peers.values() if p.dead)

    # -- internals --------------------------------------------------------------------------

    def _member(self, peer: _Peer) -> Member | None:
        info = peer.info
        if info is None or peer.dead or not peer.verified:
            return None
        return Member(
            node_id=peer.node.id,
            host=peer.node.ip,
            port=peer.node.port,
            data_host=info.data_host or peer.node.ip,
            data_port=info.data_port,
            metrics_port=info.metrics_port,
            version=info.version,
            last_seen=peer.last_seen,
            suspect=peer.failures > 0,
            domain=info.domain or FailureDomain(host=peer.node.ip),
            virtual_ids=info.virtual_ids,
            replicas=info.replicas,
        )

    def _settle(self, peer: _Peer, now: float) -> list[MembershipEvent]:
        """Compare the member view with what subscribers were told; return what to tell."""
        self._flush_full_heads()
        current, before = self._member(peer), peer.announced
        peer.announced = current
        if current is None:
            return [] if before is None else [MembershipEvent(MembershipEventKind.LEFT, before)]
        if before is None:
            return [MembershipEvent(MembershipEventKind.JOINED, current)]
        if not current.same_view(before):
            return [MembershipEvent(MembershipEventKind.UPDATED, current)]
        return []

    def _flush_full_heads(self) -> None:
        # The paper probes the least recently seen contact of a full bucket; it is probed like
        # any other contact (and replaced only after max_failures missed RPCs).
        for head in self.router.take_full_heads():
            peer = self._peers.get(head.id)
            if peer is not None and not peer.dead:
                self._wanted.setdefault(head.id, peer.address)


def short_id(node_id: bytes) -> str:
    """The first 12 hex digits of a node id, for logs."""
    return node_id.hex()[:12]
