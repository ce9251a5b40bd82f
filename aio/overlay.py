"""The overlay: ring membership and routing on the kademlia package, for nodes and clients.

Pages never travel here (the UDP data plane moves them). The overlay's job is that every node, and
every client, knows the live members of the ring and where their data planes listen:

- Node ids are 160-bit, drawn once and kept in ``<data dir>/node.json``
  (:mod:`tmdht.net.identity`), so a restarted node keeps its place in the ring.
- Contacts are learned from the package's FIND_NODE lookups and from requests; the liveness and
  membership rules are :class:`tmdht.net.membership.PeerBook`'s (sans-IO), the datagram format is
  :mod:`tmdht.net.overlay`'s.
- :meth:`Overlay.crawl` sweeps the whole id space with iterative lookups, so a node or a client
  ends up with the complete membership for one-hop routing; :meth:`Overlay.members` returns it.

:class:`Overlay` is the asyncio skin: it owns the socket, the RPCs in flight and the background
jobs (liveness probes, ring refresh). See :mod:`tmdht.aio.kademlia` for what is fixed in the
package itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import heapq
import ipaddress
import logging
import secrets
import socket
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Any, Self, TypeVar

from kademlia.node import Node

from tmdht import __version__
from tmdht.aio.kademlia import (
    NodeLookup,
    OverlayProtocol,
    ProtocolStats,
    RequestHandler,
    RoutingTable,
)
from tmdht.aio.sockets import SocketBuffers, open_udp_socket
from tmdht.aio.tasks import TaskSet
from tmdht.domains import FailureDomain
from tmdht.errors import (
    ConfigError,
    DecodeError,
    OverlayClosedError,
    OverlayError,
    RpcTimeoutError,
    TmdhtError,
    UnknownPeerError,
    UsageError,
)
from tmdht.files import atomic_write
from tmdht.net.address import Address
from tmdht.net.identity import load_or_create_node_id
from tmdht.net.membership import (
    Member,
    MembershipEvent,
    MembershipEventKind,
    PeerBook,
    node_log,
    short_id,
)
from tmdht.net.overlay import (
    ID_BITS,
    ID_SIZE,
    NO_ID,
    OverlayConfig,
    PeerInfo,
    check_node_id,
    derive_tag_key,
    parse_contacts,
    parse_peer_info,
    random_id_in,
    sender_id,
)
from tmdht.net.peercache import decode_peer_cache, encode_peer_cache, to_cache

__all__ = ["MembershipSubscription", "Overlay", "OverlayStats"]

log = logging.getLogger("tmdht.aio.overlay")

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class OverlayStats:
    """A snapshot of the overlay's counters (socket counters plus membership ones)."""

    socket: ProtocolStats
    """Datagram and RPC counters (see ProtocolStats)."""
    bad_replies: int
    """Answers that did not validate (counted as failures of the peer)."""
    members: int
    """Members now, self included."""
    suspects: int
    """Members that missed their last RPC."""
    dead: int
    """Dead contacts remembered."""
    routing_contacts: int
    """Contacts in the k-bucket routing table (suspects included, replacement caches not)."""


# ----------------------------------------------------------------------------------------------
# Subscriptions


class MembershipSubscription:
    """An ordered stream of membership events; iterate with ``async for`` or call :meth:`get`.

    Events are queued without bound (membership changes are rare); the stream ends when the
    subscription or the overlay is closed.
    """

    def __init__(self, on_close: Callable[[MembershipSubscription], None]) -> None:
        """Created by :meth:`Overlay.subscribe`."""
        self._queue: asyncio.Queue[MembershipEvent | None] = asyncio.Queue()
        self._on_close = on_close
        self._closed = False

    def _put(self, event: MembershipEvent) -> None:
        if not self._closed:
            self._queue.put_nowait(event)

    def close(self) -> None:
        """End the stream (idempotent); queued events are still delivered."""
        if not self._closed:
            self._closed = True
            self._queue.put_nowait(None)
            self._on_close(self)

    async def get(self) -> MembershipEvent:
        """The next event; raises OverlayClosedError once the stream has ended."""
        event = await self._queue.get()
        if event is None:
            self._queue.put_nowait(None)  # keep later get() calls ending too
            raise OverlayClosedError("membership subscription closed")
        return event

    def get_nowait(self) -> MembershipEvent | None:
        """The next event if one is queued, else None."""
        with contextlib.suppress(asyncio.QueueEmpty):
            event = self._queue.get_nowait()
            if event is None:
                self._queue.put_nowait(None)
            return event
        return None

    def __aiter__(self) -> AsyncIterator[MembershipEvent]:
        """Iterate until the stream ends."""
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[MembershipEvent]:
        while True:
            try:
                yield await self.get()
            except OverlayClosedError:
                return


# ----------------------------------------------------------------------------------------------
# The asyncio overlay


class Overlay:
    """A node's (or a client's) view of the ring, on a kademlia UDP socket.

    Use ``overlay = await Overlay.start(config)`` and ``await overlay.stop()``, or
    ``async with Overlay(config) as overlay``. Every background task is owned by the overlay and
    cancelled by :meth:`stop`.
    """

    def __init__(self, config: OverlayConfig) -> None:
        """Prepare an overlay; nothing happens until :meth:`start` (or ``async with``)."""
        self.config = config
        if config.data_dir is not None and config.join:
            self.node_id = load_or_create_node_id(config.data_dir)
        else:
            self.node_id = secrets.token_bytes(ID_SIZE)
        self._node = Node(self.node_id)
        self._log = node_log(log, self.node_id)
        self._router = RoutingTable(config.ksize, self._node)
        self._book = PeerBook(
            self.node_id,
            router=self._router,
            max_failures=config.max_failures,
            silence_timeout=config.silence_timeout,
            info_max_age=config.refresh_interval,
            dead_ttl=config.dead_ttl,
            dead_retry_interval=config.dead_retry_interval,
            max_peers=config.max_peers,
            authenticated=config.cluster_key is not None,
        )
        self._protocol: OverlayProtocol | None = None
        self._transport: asyncio.DatagramTransport | None = None
        self._tasks = TaskSet(self._log, quiet=(OverlayClosedError,))
        self._checks: dict[bytes, asyncio.Task[None]] = {}
        self._crawl_task: asyncio.Task[list[Member]] | None = None
        self._subscriptions: list[MembershipSubscription] = []
        self._bad_replies = 0
        self._peer_cache_bytes = b""  # what the peer cache file holds (as this overlay wrote it)
        self._started = False
        self._stopping = False
        self._stopped = asyncio.Event()
        self.port = 0
        self.socket_buffers = SocketBuffers(config.socket_buffer_bytes, 0, 0, None)

    # -- lifecycle --------------------------------------------------------------------------

    @classmethod
    async def start(cls, config: OverlayConfig) -> Overlay:
        """Bind, bootstrap from the seeds, crawl once and start the background jobs."""
        overlay = cls(config)
        await overlay._start()
        return overlay

    async def __aenter__(self) -> Self:
        """Start if not started yet."""
        if not self._started:
            await self._start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop."""
        await self.stop()

    async def _start(self) -> None:
        if self._started:
            raise UsageError("overlay already started")
        self._started = True
        loop = asyncio.get_running_loop()
        sock = self._open_socket()
        handlers: dict[str, RequestHandler] = {
            "ping": self._rpc_ping,
            "find_node": self._rpc_find_node,
            "node_info": self._rpc_node_info,
        }
        if not self.config.join:
            handlers = {"ping": self._rpc_ping}  # a client answers pings, never lists contacts
        tag_key = derive_tag_key(self.config.cluster_key) if self.config.cluster_key else None
        protocol = OverlayProtocol(
            self._node,
            self._router,
            handlers,
            rpc_timeout=self.config.rpc_timeout,
            max_in_flight=self.config.max_in_flight,
            tag_key=tag_key,
            other_tag_keys=[derive_tag_key(k) for k in self.config.accepted_cluster_keys]
            if tag_key is not None
            else [],
            replay_window=self.config.replay_window,
            require_stamped=self.config.require_stamped,
        )
        try:
            transport, _ = await loop.create_datagram_endpoint(lambda: protocol, sock=sock)
        except BaseException:
            sock.close()
            raise
        self._transport, self._protocol = transport, protocol
        self.port = sock.getsockname()[1]
        self._log.info(
            "overlay %s on %s:%d (data port %d, rcvbuf %d, sndbuf %d)",
            short_id(self.node_id),
            self.config.host,
            self.port,
            self.config.data_port,
            self.socket_buffers.receive,
            self.socket_buffers.send,
        )
        try:
            await self.bootstrap()
            self.save_peer_cache()
        except BaseException:
            await self.stop()
            raise
        self._spawn(self._liveness_loop(), "overlay-liveness")
        self._spawn(self._refresh_loop(), "overlay-refresh")

    def _open_socket(self) -> socket.socket:
        wanted = self.config.socket_buffer_bytes
        try:
            # The default (net.core.rmem_default, 208 KiB here) holds about 12 datagrams of 8 KiB
            # or 92 of 1 KiB: a burst of answers while the loop is busy overflows it.
            sock, self.socket_buffers = open_udp_socket(self.config.host, self.config.port, wanted)
        except OSError as exc:
            raise ConfigError(
                f"cannot bind the overlay socket to {self.config.host}:{self.config.port}: {exc}"
            ) from exc
        if self.socket_buffers.short:  # Linux caps the request at rmem_max (and doubles it)
            self._log.warning(
                "overlay socket got SO_RCVBUF %d < %d asked (net.core.rmem_max=%s): "
                "raise the sysctl to avoid dropped datagrams",
                self.socket_buffers.receive,
                wanted,
                self.socket_buffers.rmem_max,
            )
        return sock

    async def stop(self) -> None:
        """Cancel every background task, fail outstanding RPCs, close the socket (idempotent)."""
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        try:
            self.save_peer_cache()  # the members known last: the way back in after a restart
            await self._tasks.cancel_all()
            if self._transport is not None:
                self._transport.close()
            if self._protocol is not None:
                await self._protocol.wait_closed()
            for subscription in list(self._subscriptions):
                subscription.close()
        finally:
            self._stopped.set()
        self._log.info("overlay %s stopped", short_id(self.node_id))

    def set_cluster_keys(self, cluster_key: bytes, accepted: Sequence[bytes] = ()) -> None:
        """Tag with ``cluster_key`` and accept ``accepted`` too from now on (a key reload); an
        overlay started open (no key) stays open: UsageError."""
        if self.config.cluster_key is None:
            raise UsageError("an overlay started without a cluster key cannot take one")
        self.config = replace(
            self.config, cluster_key=cluster_key, accepted_cluster_keys=tuple(accepted)
        )
        if self._protocol is not None:
            self._protocol.set_tag_keys(
                derive_tag_key(cluster_key), [derive_tag_key(k) for k in accepted]
            )

    @property
    def running(self) -> bool:
        """True between start and stop."""
        return self._started and not self._stopping

    def _spawn(self, coro: Coroutine[Any, Any, T], name: str) -> asyncio.Task[T]:
        """Start an owned background task: kept until done, its failure logged, stop() ends it."""
        if self._stopping:
            coro.close()
            raise OverlayClosedError("overlay is stopped")
        return self._tasks.spawn(coro, name)

    # -- public API -------------------------------------------------------------------------

    @property
    def address(self) -> Address:
        """(host, port) the kademlia socket is bound to."""
        return (self.config.host, self.port)

    def members(self) -> list[Member]:
        """The live members this node knows, itself included (unless in client mode).

        Suspect members (missed their last RPC, not yet ``max_failures``) are included so one
        slow answer does not move replicas; dead ones never are.
        """
        members = self._book.members()
        if self.config.join:
            members.append(self._self_member())
            members.sort(key=lambda m: m.node_id)
        return members

    def member(self, node_id: bytes) -> Member | None:
        """One member by id, or None."""
        return next((m for m in self.members() if m.node_id == node_id), None)

    def _self_member(self) -> Member:
        host = self.config.advertised_host or self.config.host
        return Member(
            node_id=self.node_id,
            host=host,
            port=self.port,
            data_host=host,
            data_port=self.config.data_port,
            metrics_port=self.config.metrics_port,
            version=__version__,
            last_seen=time.monotonic(),
            domain=self.config.domain or FailureDomain(host=host),
            virtual_ids=self.config.virtual_ids,
            replicas=self.config.replicas,
        )

    def stats(self) -> OverlayStats:
        """A snapshot of the counters (for logs and Prometheus)."""
        suspects, dead = self._book.counts()
        socket_stats = replace(self._protocol.stats) if self._protocol else ProtocolStats()
        return OverlayStats(
            socket=socket_stats,
            bad_replies=self._bad_replies,
            members=len(self.members()),
            suspects=suspects,
            dead=dead,
            routing_contacts=len(self._router.contacts()),
        )

    def subscribe(self, *, replay: bool = True) -> MembershipSubscription:
        """A stream of membership events; ``replay`` first yields JOINED for current members."""
        if self._stopping:
            raise OverlayClosedError("overlay is stopped")
        subscription = MembershipSubscription(self._subscriptions.remove)
        if replay:
            for member in self._book.members():
                subscription._put(MembershipEvent(MembershipEventKind.JOINED, member))
        self._subscriptions.append(subscription)
        return subscription

    async def bootstrap(self, seeds: Iterable[tuple[str, int]] | None = None) -> list[Member]:
        """Ask each seed (default: the configured ones) for node_info, then crawl.

        Seeds that do not answer are logged and skipped: the first node of a cluster starts
        with none answering, and the refresh job retries while the node knows nobody.
        """
        addresses = await self._resolve(self.config.seeds if seeds is None else seeds)
        results = await asyncio.gather(
            *(self._fetch_info(None, addr) for addr in addresses), return_exceptions=True
        )
        answered = []
        for addr, result in zip(addresses, results, strict=True):
            if isinstance(result, PeerInfo):
                if result.node_id != self.node_id:
                    answered.append(result.node_id)
            elif isinstance(result, TmdhtError):
                self._log.info("seed %s:%d: %s", *addr, result)
            else:
                raise result
        if seeds is None and not answered and not self._book.members():
            answered = await self._bootstrap_from_cache()
        if addresses and not answered and not self._book.members():
            self._log.warning("no seed answered (%d tried)", len(addresses))
        if self._book.members() or answered:
            await self.crawl()
        return self._book.members()

    async def _bootstrap_from_cache(self) -> list[bytes]:
        """No seed answered: ask the peers of the cache file (as seeds; their answers are
        authenticated like any). Returns the ids that answered."""
        path = self.config.peer_cache
        if path is None:
            return []
        try:
            peers = decode_peer_cache(path.read_bytes())
        except FileNotFoundError:
            return []
        except (OSError, DecodeError) as exc:
            self._log.warning("peer cache %s unusable, ignored: %s", path, exc)
            return []
        addresses = [p.address for p in peers]
        results = await asyncio.gather(
            *(self._fetch_info(None, addr) for addr in addresses), return_exceptions=True
        )
        answered = []
        for result in results:
            if isinstance(result, PeerInfo):
                if result.node_id != self.node_id:
                    answered.append(result.node_id)
            elif not isinstance(result, TmdhtError):
                raise result
        self._log.info(
            "no seed answered: %d of %d cached peers did", len(answered), len(addresses)
        )
        return answered

    def save_peer_cache(self) -> None:
        """Write the members known to the peer cache file, if any changed (atomically)."""
        path = self.config.peer_cache
        if path is None or not self.config.join:
            return
        peers = to_cache(self._book.members(), self.node_id)
        if not peers:
            return  # knowing nobody teaches nothing: keep what the file says
        data = encode_peer_cache(peers)
        if data == self._peer_cache_bytes:
            return
        try:
            atomic_write(path, data)
        except OSError as exc:
            self._log.warning("cannot write the peer cache %s: %s", path, exc)
            return
        self._peer_cache_bytes = data

    async def crawl(self) -> list[Member]:
        """Discover the whole ring; return :meth:`members` once new contacts have answered.

        A lookup of our own id (the Kademlia join) and of stale buckets, then a sweep of the id
        space: a region whose lookup returns k contacts inside it may hold more, so it is split
        in two and each half is looked up, until every region holds fewer than k. That takes
        about 2 N / k lookups for N nodes. Concurrent callers share one crawl.
        """
        if self._crawl_task is None or self._crawl_task.done():
            self._crawl_task = self._spawn(self._crawl(), "overlay-crawl")
        task = self._crawl_task
        try:
            # shield: a caller that gives up must not cancel the crawl others are waiting for.
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if task.cancelled() and current is not None and not current.cancelling():
                raise OverlayClosedError("overlay stopped during the crawl") from None
            raise

    async def closest(self, key: bytes, count: int) -> list[Member]:
        """The ``count`` members closest to ``key`` by XOR distance, after an iterative lookup.

        Members include this node and suspects (see :meth:`members`); never dead contacts.
        """
        if not isinstance(key, bytes) or len(key) != ID_SIZE:
            raise UsageError(f"a key is {ID_SIZE} bytes")
        if count < 1:
            raise UsageError("count must be >= 1")
        found = await self._lookup(key)
        await self._settle_checks([node.id for node in found])
        number = int.from_bytes(key, "big")
        return heapq.nsmallest(
            count, self.members(), key=lambda m: int.from_bytes(m.node_id, "big") ^ number
        )

    async def probe(self, node_id: bytes) -> Member:
        """Ask a known contact for node_info now; raise RpcTimeoutError if it does not answer.

        The result counts for liveness like any probe. Useful when the data plane suspects a
        node. Raises UnknownPeerError for an id never heard of.
        """
        addr = self._book.peer_address(node_id)
        if addr is None:
            raise UnknownPeerError(f"no contact {node_id.hex()}")
        await self._fetch_info(node_id, addr)
        member = self.member(node_id)
        if member is None:
            raise UnknownPeerError(f"{node_id.hex()} answered but is no member")
        return member

    # -- requests we answer (synchronously, from datagram_received) -------------------------

    def _rpc_ping(self, addr: Address, args: tuple[object, ...]) -> bytes:
        self._heard(sender_id(args, 1), addr)
        return self.node_id

    def _rpc_find_node(self, addr: Address, args: tuple[object, ...]) -> list[list[object]]:
        sender = sender_id(args, 2)
        target = check_node_id(args[1], "find_node key")
        self._heard(sender, addr)
        neighbors = self._book.neighbors(target, self.config.ksize, exclude=sender)
        return [[node.id, node.ip, node.port] for node in neighbors]

    def _rpc_node_info(self, addr: Address, args: tuple[object, ...]) -> dict[str, object]:
        self._heard(sender_id(args, 1), addr)
        info = PeerInfo(
            node_id=self.node_id,
            data_host=self.config.advertised_host,
            data_port=self.config.data_port,
            metrics_port=self.config.metrics_port,
            version=__version__,
            domain=self.config.domain,
            virtual_ids=self.config.virtual_ids,
            replicas=self.config.replicas,
        )
        return info.to_wire()

    def _heard(self, sender: bytes, addr: Address) -> None:
        if sender != NO_ID:
            self._publish(self._book.heard(sender, addr, time.monotonic()))

    # -- requests we send -------------------------------------------------------------------

    @property
    def _sender(self) -> bytes:
        return self.node_id if self.config.join else NO_ID

    async def _call(
        self, expected: bytes | None, addr: Address, method: str, args: Sequence[object]
    ) -> object:
        if self._protocol is None:
            raise OverlayClosedError("overlay not started")
        try:
            return await self._protocol.call(addr, method, args)
        except RpcTimeoutError:
            if expected is not None:
                self._publish(self._book.failed(expected, addr, time.monotonic()))
            raise

    def _bad_reply(self, expected: bytes | None, addr: Address, exc: DecodeError) -> None:
        self._bad_replies += 1
        self._log.warning("bad answer from %s:%d: %s", *addr, exc)
        if expected is not None:
            self._publish(self._book.failed(expected, addr, time.monotonic()))

    async def _fetch_info(self, expected: bytes | None, addr: Address) -> PeerInfo:
        """node_info RPC: the probe that makes a contact a member (and keeps it one)."""
        raw = await self._call(expected, addr, "node_info", [self._sender])
        try:
            info = parse_peer_info(raw)
        except DecodeError as exc:
            self._bad_reply(expected, addr, exc)
            raise
        now = time.monotonic()
        if expected is not None and info.node_id != expected:
            # Another node now answers at that address (e.g. data dir wiped): the one we
            # expected is certainly not there; the new one is a fine contact.
            self._publish(self._book.failed(expected, addr, now, gone=True))
        if info.node_id != self.node_id:
            self._publish(self._book.got_info(info, addr, now))
        return info

    async def _find_node(self, peer: Node, target: Node) -> list[Node]:
        """FIND_NODE on ``peer`` for the lookup: the listed contacts worth querying."""
        addr = (peer.ip, peer.port)
        raw = await self._call(peer.id, addr, "find_node", [self._sender, target.id])
        try:
            contacts = parse_contacts(raw)
        except DecodeError as exc:
            self._bad_reply(peer.id, addr, exc)
            raise
        now = time.monotonic()
        self._publish(self._book.heard(peer.id, addr, now))
        usable = [node for c in contacts if (node := self._book.mentioned(c, now)) is not None]
        self._pump()
        return usable

    async def _lookup(self, target: bytes) -> list[Node]:
        start = self._book.lookup_start(target, self.config.ksize)
        lookup = NodeLookup(
            self._find_node, Node(target), start, self.config.ksize, self.config.alpha
        )
        return await lookup.find()

    async def _crawl(self) -> list[Member]:
        k = self.config.ksize
        found: set[bytes] = set()
        targets = [
            self.node_id,
            *self._router.refresh_ids(self.config.refresh_interval, time.monotonic()),
        ]
        for target in targets:
            found.update(node.id for node in await self._lookup(target))
        lookups = len(targets)
        regions: deque[tuple[int, int]] = deque([(0, 0)])
        while regions and lookups < self.config.max_crawl_lookups:
            prefix, bits = regions.popleft()
            nodes = await self._lookup(random_id_in(prefix, bits))
            lookups += 1
            found.update(node.id for node in nodes)
            inside = sum(1 for node in nodes if node.long_id >> (ID_BITS - bits) == prefix)
            if inside >= k and bits < ID_BITS:
                regions.extend(((prefix << 1, bits + 1), ((prefix << 1) | 1, bits + 1)))
        if regions:
            self._log.warning(
                "crawl stopped after %d lookups with %d regions left", lookups, len(regions)
            )
        # Every contact learned on the way, not only the lookups' results, should be a member
        # (with its data port) when crawl() returns.
        await self._settle_checks(found | set(self._checks))
        members = self.members()
        self._log.debug("crawl: %d lookups, %d members", lookups, len(members))
        return members

    # -- background jobs --------------------------------------------------------------------

    def _publish(self, events: list[MembershipEvent]) -> None:
        for event in events:
            self._log.info(
                "member %s %s (%s:%d, data %s:%d)",
                short_id(event.member.node_id),
                event.kind.value,
                event.member.host,
                event.member.port,
                event.member.data_host,
                event.member.data_port,
            )
            for subscription in self._subscriptions:
                subscription._put(event)
        self._pump()

    def _pump(self) -> None:
        """Start the probes the book asked for, one at a time per contact."""
        if self._stopping or self._protocol is None:
            return
        for node_id, addr in self._book.take_wanted().items():
            if node_id not in self._checks:
                task = self._spawn(self._check(node_id, addr), "overlay-check")
                self._checks[node_id] = task
                task.add_done_callback(functools.partial(self._check_done, node_id))

    def _check_done(self, node_id: bytes, _task: asyncio.Task[None]) -> None:
        self._checks.pop(node_id, None)

    async def _check(self, node_id: bytes, addr: Address) -> None:
        try:
            await self._fetch_info(node_id, addr)
        except (OverlayError, DecodeError) as exc:
            self._log.debug("probe of %s at %s:%d: %s", short_id(node_id), *addr, exc)

    async def _settle_checks(self, node_ids: Iterable[bytes]) -> None:
        """Wait for the running probes of the given contacts that have not answered node_info.

        Each probe is bounded by the RPC timeout, so this is bounded too.
        """
        self._pump()
        pending = {
            self._checks[n] for n in node_ids if n in self._checks and self._book.lacks_info(n)
        }
        if pending:
            await asyncio.wait(pending)

    async def _liveness_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.probe_interval)
            self._book.tick(time.monotonic())
            self._pump()

    async def _refresh_loop(self) -> None:
        # A node that knows nobody asks its seeds again after 1 s, 2 s, 4 s ... up to the refresh
        # interval: nodes started together (a StatefulSet, a compose file, several systemd
        # instances) all find their seeds not yet listening on the first try.
        alone_wait = 1.0
        while True:
            alone = not self._book.members() and bool(
                self.config.seeds or self.config.peer_cache
            )
            await asyncio.sleep(
                min(alone_wait, self.config.refresh_interval)
                if alone
                else self.config.refresh_interval
            )
            alone_wait = alone_wait * 2 if alone else 1.0
            try:
                if not self._book.members():
                    await self.bootstrap()
                else:
                    await self.crawl()
                self.save_peer_cache()
            except TmdhtError as exc:
                self._log.warning("ring refresh failed: %s", exc)
            except Exception:
                # A bug in one refresh must not end refreshing for the life of the node.
                log.exception("[%s] ring refresh failed unexpectedly", short_id(self.node_id))

    async def _resolve(self, seeds: Iterable[tuple[str, int]]) -> list[Address]:
        """Seeds as IP literals of the socket's family; unresolvable ones are logged, skipped."""
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in self.config.host else socket.AF_INET
        addresses: list[Address] = []
        for host, port in seeds:
            try:
                ipaddress.ip_address(host)
            except ValueError:
                try:
                    infos = await loop.getaddrinfo(
                        host, port, family=family, type=socket.SOCK_DGRAM
                    )
                except OSError as exc:
                    self._log.warning("seed %s:%d does not resolve: %s", host, port, exc)
                    continue
                addresses.extend((str(info[4][0]), int(info[4][1])) for info in infos[:1])
            else:
                addresses.append((host, port))
        return addresses
