"""What the overlay keeps from the kademlia package, and how it fixes the rest.

Kept from the package (bmuller/kademlia 2.2.3): :class:`kademlia.node.Node` and ``NodeHeap``, the
k-bucket :class:`kademlia.routing.RoutingTable`, the iterative
:class:`kademlia.crawling.NodeSpiderCrawl` and :class:`kademlia.protocol.KademliaProtocol` as the
replaceable protocol class, plus rpcudp's datagram framing (``0x00``/``0x01``, a 20-byte message
id, a msgpack body) so the control plane still reads like kademlia on the wire.

Fixed here by subclassing (the package's files are not copied):

- :class:`RoutingTable` does no IO. The package's table fires
  ``asyncio.ensure_future(call_ping(head))`` when a bucket is full (a task nobody owns); ours only
  records the head so the overlay can probe it from a task it owns. Its bucket search also puts
  an id equal to a bucket's upper bound in the bucket the split put it in.
- :class:`OverlayProtocol` replaces rpcudp's datagram handling: every datagram is size-checked,
  optionally authenticated, decoded by :func:`tmdht.net.overlay.decode_datagram` (which raises only
  :class:`~tmdht.errors.DecodeError`) and answered synchronously through an explicit table of
  handlers. rpcudp instead spawned two unowned tasks per datagram, unpacked network bytes
  unguarded, resolved calls to ``(ok, value)`` tuples and turned any unknown attribute into a
  remote call. Calls here raise :class:`RpcTimeoutError` and are bounded in number, so a burst of
  replies cannot overflow the socket's receive buffer.
- :class:`NodeLookup` is the package's ``NodeSpiderCrawl`` fed by a typed ``ask`` coroutine that
  returns contacts or raises, instead of ``(ok, value)`` tuples.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import logging
import os
import random
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, cast

from kademlia.crawling import NodeSpiderCrawl
from kademlia.node import Node
from kademlia.protocol import KademliaProtocol
from kademlia.routing import RoutingTable as _PackageRoutingTable

from tmdht.auth import ReplayWindow
from tmdht.errors import (
    DecodeError,
    OverlayClosedError,
    ReplayError,
    RpcTimeoutError,
    TmdhtError,
    UnauthenticatedError,
)
from tmdht.net.address import Address
from tmdht.net.overlay import (
    ID_BITS,
    ID_SIZE,
    Request,
    Response,
    decode_datagram,
    encode_request,
    encode_response,
)

__all__ = [
    "NodeLookup",
    "OverlayProtocol",
    "ProtocolStats",
    "RequestHandler",
    "RoutingTable",
]

log = logging.getLogger("tmdht.aio.overlay")

_ID_LIMIT: Final = 1 << ID_BITS
_U64_MAX: Final = (1 << 64) - 1
_REPLAY_CAPACITY: Final = 1 << 16
"""Nonces the overlay's replay window remembers (its traffic is a few datagrams per second)."""
_MAX_REMEMBERED: Final = 4096
"""Peer addresses remembered as speaking stamped, or only unstamped, frames."""


# The package ships no type information, so its classes are Any to mypy; strict mode refuses to
# subclass Any, which is exactly what this module is for.
class RoutingTable(_PackageRoutingTable):  # type: ignore[misc, unused-ignore]
    """The package's k-bucket table without its IO.

    When a bucket is full and may not split, the paper pings the bucket's least recently seen
    contact. The package does it with an unowned ``ensure_future``; this table records the head
    and its owner (:class:`tmdht.net.membership.PeerBook`) takes it with
    :meth:`take_full_heads` and decides whether and how to probe.
    """

    def __init__(self, ksize: int, node: Node) -> None:
        """Create an empty table for ``node``; no protocol is needed since it does no IO."""
        self._full_heads: list[Node] = []
        super().__init__(None, ksize, node)

    def add_contact(self, node: Node) -> bool:
        """Add or refresh a contact; False if it only went to a full bucket's replacement cache."""
        index = self.get_bucket_for(node)
        bucket = self.buckets[index]
        if bucket.add_node(node):
            return True
        # Section 4.2 of the paper, as in the package: split the bucket if it covers our own id
        # or if its depth is not a multiple of 5.
        if bucket.has_in_range(self.node) or bucket.depth() % 5 != 0:
            self.split_bucket(index)
            return self.add_contact(node)
        self._full_heads.append(bucket.head())
        return False

    def take_full_heads(self) -> list[Node]:
        """The heads of buckets found full since the last call (to probe)."""
        heads, self._full_heads = self._full_heads, []
        return heads

    def get_bucket_for(self, node: Node) -> int:
        """Index of the bucket whose (inclusive) range holds the node: a binary search.

        The package compares with ``<`` against the inclusive upper bound, so an id equal to a
        bound lands one bucket too far and can then never be removed.
        """
        uppers = [bucket.range[1] for bucket in self.buckets]
        return min(bisect.bisect_left(uppers, node.long_id), len(uppers) - 1)

    def contacts(self) -> list[Node]:
        """Every contact in the table (not the replacement caches)."""
        return [node for bucket in self.buckets for node in bucket.nodes.values()]

    def refresh_ids(self, max_age: float, now: float) -> list[bytes]:
        """A random id in each bucket not looked up for ``max_age`` seconds (``now`` monotonic).

        The package hard-codes an hour and can draw 2**160, which does not fit in 20 bytes.
        """
        ids = []
        for bucket in self.buckets:
            if now - bucket.last_updated >= max_age:
                low, high = bucket.range
                value = random.randint(low, min(high, _ID_LIMIT - 1))
                ids.append(value.to_bytes(ID_SIZE, "big"))
        return ids


AskFindNode = Callable[[Node, Node], Awaitable[list[Node]]]
"""``ask(peer, target)``: FIND_NODE on ``peer``; returns usable contacts or raises TmdhtError."""


class NodeLookup(NodeSpiderCrawl):  # type: ignore[misc, unused-ignore]
    """The package's iterative FIND_NODE crawl, driven by a typed ``ask`` coroutine.

    The package's crawl calls ``protocol.call_find_node`` and reads ``(ok, value)`` tuples; here
    ``ask`` returns the contacts worth querying (the overlay has already dropped the dead and the
    suspect ones) or raises, and a peer that failed is dropped from the candidates as before.
    """

    def __init__(
        self, ask: AskFindNode, target: Node, peers: list[Node], ksize: int, alpha: int
    ) -> None:
        """Prepare a lookup of ``target`` starting from ``peers``."""
        super().__init__(None, target, peers, ksize, alpha)
        self._ask = ask

    async def find(self) -> list[Node]:
        """Run the crawl to the end; return the (at most k) closest contacts that answered."""
        result: list[Node] = await self._find(self._ask_one)
        return result

    async def _ask_one(self, peer: Node, target: Node) -> list[Node] | TmdhtError:
        # Returned, not raised, so that gather() keeps the other answers of the round.
        try:
            return await self._ask(peer, target)
        except TmdhtError as exc:
            return exc

    async def _nodes_found(self, responses: Mapping[bytes, list[Node] | TmdhtError]) -> Any:
        failed = []
        for peer_id, response in responses.items():
            if isinstance(response, TmdhtError):
                failed.append(peer_id)
            else:
                self.nearest.push(response)
        self.nearest.remove(failed)
        if self.nearest.have_contacted_all():
            return list(self.nearest)
        return await self.find()


RequestHandler = Callable[[Address, tuple[object, ...]], object]
"""Answers one request synchronously; raises DecodeError if the arguments are bad."""


@dataclass(slots=True)
class ProtocolStats:
    """Counters of the overlay's UDP socket, for logs and Prometheus."""

    datagrams_received: int = 0
    """Every datagram read from the socket."""
    dropped_malformed: int = 0
    """Datagrams (or request arguments) that did not decode; dropped."""
    dropped_unauthenticated: int = 0
    """Datagrams without a valid cluster tag; dropped."""
    dropped_replayed: int = 0
    """Stamped datagrams whose nonce was seen before or whose timestamp is outside the replay
    window (and unstamped ones when stamps are required); dropped."""
    unstamped_received: int = 0
    """Unstamped (version 1) datagrams accepted: peers of the previous release."""
    dropped_unknown_method: int = 0
    """Requests for a procedure this node does not offer; dropped."""
    unexpected_responses: int = 0
    """Answers to no outstanding call (late after a timeout, or forged); dropped."""
    requests_answered: int = 0
    """Requests answered."""
    rpcs_sent: int = 0
    """Requests sent."""
    rpc_timeouts: int = 0
    """Requests that got no answer within the RPC timeout."""
    in_flight_peak: int = 0
    """Highest number of requests outstanding at once (bounded by ``max_in_flight``)."""


class OverlayProtocol(KademliaProtocol):  # type: ignore[misc, unused-ignore]
    """The kademlia protocol class with rpcudp's datagram handling replaced.

    Inherited and used: ``router`` (replaced by the IO-free :class:`RoutingTable`) and
    ``source_node``. Not used: the package's ``rpc_*``/``call_*`` methods and the storage, since
    requests go through the explicit ``handlers`` table and pages never travel over kademlia.
    """

    def __init__(
        self,
        source_node: Node,
        router: RoutingTable,
        handlers: Mapping[str, RequestHandler],
        *,
        rpc_timeout: float,
        max_in_flight: int,
        tag_key: bytes | None,
        other_tag_keys: Sequence[bytes] = (),
        replay_window: float = 10.0,
        require_stamped: bool = False,
    ) -> None:
        """Create the protocol; it is connected by ``loop.create_datagram_endpoint``.

        Datagrams are sent with ``tag_key``; ``other_tag_keys`` are accepted too (key rotation).
        Stamped datagrams are checked by a replay window of ``replay_window`` seconds;
        unstamped ones are refused with ``require_stamped``.
        """
        super().__init__(source_node, {}, router.ksize)
        self.router = router
        self.transport: asyncio.DatagramTransport | None = None
        self._wait_timeout = rpc_timeout
        self._handlers = dict(handlers)
        self._tag_key = tag_key
        self._other_tag_keys = tuple(other_tag_keys)
        # Bounding outstanding calls bounds the replies that can arrive at once, so they fit in
        # the receive buffer even when the event loop is busy for a while.
        self._slots = asyncio.Semaphore(max_in_flight)
        self._outstanding: dict[bytes, asyncio.Future[object]] = {}
        self._closed = asyncio.get_running_loop().create_future()
        self.stats = ProtocolStats()
        self._replay = ReplayWindow(window=replay_window, capacity=_REPLAY_CAPACITY)
        self._require_stamped = require_stamped
        self._nonces = itertools.count(secrets.randbits(64))
        # Peers of the previous release (they send only unstamped frames and would drop ours).
        self._legacy: dict[Address, None] = {}
        self._stamped_peers: dict[Address, None] = {}

    def set_tag_keys(self, tag_key: bytes, other_tag_keys: Sequence[bytes] = ()) -> None:
        """Tag with ``tag_key`` and accept ``other_tag_keys`` too from now on (a key reload)."""
        self._tag_key = tag_key
        self._other_tag_keys = tuple(other_tag_keys)

    def __getattr__(self, name: str) -> Any:
        """Refuse unknown attributes; rpcudp would turn any name into a remote call."""
        raise AttributeError(f"{type(self).__name__!s} has no attribute {name!r}")

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Keep the datagram transport."""
        # The selector loop's datagram transport is not a DatagramTransport subclass.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        """Fail every outstanding call and mark the socket closed."""
        for future in self._outstanding.values():
            if not future.done():
                future.set_exception(OverlayClosedError("overlay socket closed"))
        if not self._closed.done():
            self._closed.set_result(None)

    def error_received(self, exc: Exception) -> None:
        """ICMP errors are not fatal for a datagram socket: the RPC timeout handles the peer."""
        log.debug("overlay socket error: %s", exc)

    async def wait_closed(self) -> None:
        """Return once the transport has closed the socket."""
        await asyncio.shield(self._closed)

    def _stamp(self) -> tuple[int, int]:
        return int(time.time() * 1000), next(self._nonces) & _U64_MAX

    def _remember(self, table: dict[Address, None], addr: Address) -> None:
        table.pop(addr, None)
        table[addr] = None
        if len(table) > _MAX_REMEMBERED:
            del table[next(iter(table))]  # the oldest

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        """Decode, then answer or resolve, synchronously: no task per datagram."""
        self.stats.datagrams_received += 1
        try:
            message = decode_datagram(
                data,
                self._tag_key,
                self._other_tag_keys,
                replay=self._replay,
                now=time.time(),
                require_stamped=self._require_stamped,
            )
        except UnauthenticatedError:
            self.stats.dropped_unauthenticated += 1
            log.debug("dropped an unauthenticated datagram from %s", addr)
            return
        except ReplayError as exc:
            self.stats.dropped_replayed += 1
            log.debug("dropped a replayed datagram from %s: %s", addr, exc)
            return
        except DecodeError as exc:
            self.stats.dropped_malformed += 1
            log.debug("dropped a malformed datagram from %s: %s", addr, exc)
            return
        peer = (addr[0], addr[1])
        if message.stamped:
            self._legacy.pop(peer, None)
            self._remember(self._stamped_peers, peer)
        else:
            self.stats.unstamped_received += 1
            self._remember(self._legacy, peer)
        if isinstance(message, Response):
            self._resolve(message)
        else:
            self._answer(message, peer)

    def _resolve(self, response: Response) -> None:
        future = self._outstanding.get(response.msg_id)
        if future is None or future.done():
            self.stats.unexpected_responses += 1
            return
        # Matched on the unguessable 160-bit message id alone, as rpcudp does: a multi-homed
        # peer bound to a wildcard address may answer from another source IP than we sent to.
        future.set_result(response.value)

    def _answer(self, request: Request, addr: Address) -> None:
        handler = self._handlers.get(request.method)
        if handler is None:
            self.stats.dropped_unknown_method += 1
            log.debug("dropped a request for unknown method %.40r from %s", request.method, addr)
            return
        try:
            value = handler(addr, request.args)
        except DecodeError as exc:
            self.stats.dropped_malformed += 1
            log.debug("dropped a bad %s request from %s: %s", request.method, addr, exc)
            return
        if self.transport is not None:
            stamp = self._stamp() if request.stamped else None  # answer in the request's version
            self.transport.sendto(
                encode_response(request.msg_id, value, self._tag_key, stamp), addr
            )
            self.stats.requests_answered += 1

    async def call(self, addr: Address, method: str, args: Sequence[object]) -> object:
        """Send one request and return the decoded answer (unvalidated).

        Raises :class:`RpcTimeoutError` if no answer comes within the RPC timeout (counted from
        the send, not from the wait for a free slot) and :class:`OverlayClosedError` once the
        socket is closed.
        """
        async with self._slots:
            if self.transport is None or self._closed.done():
                raise OverlayClosedError("overlay is stopped")
            msg_id = os.urandom(ID_SIZE)
            stamped = addr not in self._legacy
            datagram = encode_request(
                msg_id, method, args, self._tag_key, self._stamp() if stamped else None
            )
            future: asyncio.Future[object] = asyncio.get_running_loop().create_future()
            self._outstanding[msg_id] = future
            self.stats.in_flight_peak = max(self.stats.in_flight_peak, len(self._outstanding))
            try:
                self.transport.sendto(datagram, addr)
                self.stats.rpcs_sent += 1
                async with asyncio.timeout(self._wait_timeout):
                    return await future
            except TimeoutError:
                self.stats.rpc_timeouts += 1
                if stamped and addr not in self._stamped_peers:
                    # Perhaps a peer of the previous release, which drops stamped frames: try
                    # the next request unstamped (its first stamped frame undoes this).
                    self._remember(self._legacy, addr)
                raise RpcTimeoutError(
                    f"{method} to {addr[0]}:{addr[1]}: no answer in {self._wait_timeout:g} s"
                ) from None
            finally:
                del self._outstanding[msg_id]
