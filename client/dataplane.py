"""The data-plane transport: batched, pipelined requests to store nodes over one UDP socket.

:class:`DataPlaneClient` speaks :mod:`tmdht.wire` to any number of nodes. A request is split into
batches that fit a datagram; batches to one node are pipelined up to a window; a response may
span several datagrams (parts). When parts are lost the client re-asks for exactly the digests no
part mentioned, a few times, and then reports them as *unanswered* (the node may be down) — never
as missing. Pages are verified against their digests on arrival; a wrong page is counted and
treated as not served by that node.

Store nodes use it for replication and the client library (:mod:`tmdht.client.store`) for
writes and HAS; the client's reads go through :mod:`tmdht.client.resolver`, which drives its own
requests with :meth:`DataPlaneClient.send_request`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import secrets
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from blake3 import blake3

from tmdht import wire
from tmdht.auth import Authenticator
from tmdht.errors import DecodeError, TmdhtError
from tmdht.pages import PageDigest

__all__ = [
    "Address",
    "ClientStats",
    "DataPlaneClient",
    "GetResult",
    "HasResult",
    "NodeUnreachableError",
    "PutOutcome",
    "tune_socket_buffers",
]

log = logging.getLogger("tmdht.client.dataplane")

Address = tuple[str, int]
SOCKET_BUFFER: Final = 16 << 20
# Python 3.11's socket module lacks these names; the values are Linux's (asm-generic/socket.h).
_SO_RCVBUFFORCE: Final = getattr(socket, "SO_RCVBUFFORCE", 33 if sys.platform == "linux" else None)
_SO_SNDBUFFORCE: Final = getattr(socket, "SO_SNDBUFFORCE", 32 if sys.platform == "linux" else None)
MAX_TIMEOUT: Final = 2.0
"""Upper bound of an adaptive request timeout, in seconds."""
RESPONSE_DATAGRAMS_PER_REQUEST: Final = 8
"""Bound on the datagrams one GET answer may take, so a window of requests fits the socket."""
PUT_WINDOW_FACTOR: Final = 4
"""PUTs in flight per node, in windows: their answers are tiny (they need no share of the socket
buffer), and a node commits the PUTs that arrive together in one transaction and fsync, so more
in flight means larger group commits (publish: 4.5k -> 9.0k pages/s at 4x, 4 nodes, R=3)."""


class NodeUnreachableError(TmdhtError):
    """A node did not answer a request after every retry."""

    def __init__(self, address: Address, what: str) -> None:
        super().__init__(f"node {address[0]}:{address[1]} did not answer {what}")
        self.address = address


def tune_socket_buffers(sock: socket.socket, size: int = SOCKET_BUFFER) -> tuple[int, int]:
    """Enlarge a UDP socket's buffers; returns what the kernel granted (receive, send).

    As root, SO_RCVBUFFORCE/SO_SNDBUFFORCE go past net.core.rmem_max; otherwise the request is
    capped there (4 MiB on these machines). A burst of responses that overflows the receive
    buffer is dropped silently by the kernel, so this matters for pipelining.
    """
    for force, plain in ((_SO_RCVBUFFORCE, socket.SO_RCVBUF), (_SO_SNDBUFFORCE, socket.SO_SNDBUF)):
        done = False
        if force is not None and os.geteuid() == 0:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, force, size)
                done = True
        if not done:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, plain, size)
    return (
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF),
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF),
    )


@dataclass
class ClientStats:
    """Counters of one client (the library's Prometheus metrics read them)."""

    requests: int = 0
    datagrams_sent: int = 0
    datagrams_received: int = 0
    retries: int = 0
    timeouts: int = 0
    bad_datagrams: int = 0
    unexpected: int = 0
    verification_failures: int = 0
    pages_received: int = 0


@dataclass
class GetResult:
    """What one node answered to a GET of some digests."""

    pages: dict[bytes, bytes] = field(default_factory=dict)
    """Pages received and verified."""
    missing: set[bytes] = field(default_factory=set)
    """Digests the node said it does not hold."""
    corrupt: set[bytes] = field(default_factory=set)
    """Digests whose page failed verification (the node is faulty for them)."""
    unanswered: set[bytes] = field(default_factory=set)
    """Digests no answer mentioned after every retry."""


@dataclass
class HasResult:
    """What one node answered to a HAS."""

    held: set[bytes] = field(default_factory=set)
    lacking: set[bytes] = field(default_factory=set)
    unanswered: set[bytes] = field(default_factory=set)


@dataclass
class PutOutcome:
    """What one node answered to a PUT."""

    status: dict[bytes, wire.PutStatus] = field(default_factory=dict)
    unanswered: set[bytes] = field(default_factory=set)


class _Rtt:
    """Smoothed round-trip time of one node (RFC 6298), for adaptive timeouts."""

    __slots__ = ("rttvar", "srtt")

    def __init__(self) -> None:
        self.srtt: float | None = None
        self.rttvar = 0.0

    def observe(self, sample: float) -> None:
        if self.srtt is None:
            self.srtt, self.rttvar = sample, sample / 2
        else:
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - sample)
            self.srtt = 0.875 * self.srtt + 0.125 * sample

    def timeout(self, floor: float, ceiling: float) -> float:
        if self.srtt is None:
            return floor
        return min(ceiling, max(floor, self.srtt + 4 * self.rttvar))


class _Handler(Protocol):
    """Whoever waits for the answer to a request: the client routes its datagrams here."""

    address: Address

    def add(self, part: int, parts: int, message: wire.Message) -> None: ...

    def abort(self) -> None: ...


class _Exchange:
    """One request in flight: the parts of its answer received so far."""

    __slots__ = ("address", "done", "parts", "received")

    def __init__(self, address: Address) -> None:
        self.address = address
        self.parts: int | None = None
        self.received: dict[int, wire.Message] = {}
        self.done = asyncio.get_running_loop().create_future()

    def add(self, part: int, parts: int, message: wire.Message) -> None:
        if self.parts is None:
            self.parts = parts
        elif parts != self.parts:
            return  # inconsistent part count: ignore the odd datagram
        self.received[part] = message
        if len(self.received) >= self.parts and not self.done.done():
            self.done.set_result(None)

    def abort(self) -> None:
        if not self.done.done():
            self.done.cancel()


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, client: DataPlaneClient) -> None:
        self._client = client

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self._client._on_datagram(data, (addr[0], addr[1]))

    def error_received(self, exc: Exception) -> None:  # ICMP port unreachable and the like
        log.debug("datagram error: %s", exc)


class DataPlaneClient:
    """Requests to store nodes over one UDP socket. Use :meth:`open`; close when done."""

    def __init__(
        self,
        auth: Authenticator,
        *,
        max_datagram: int = 32768,
        timeout: float = 0.25,
        attempts: int = 4,
        window: int = 16,
        clock: Callable[[], float] = time.time,
        on_retry: Callable[[], None] | None = None,
    ) -> None:
        """``on_retry()`` is called for every request re-sent (e.g. a Prometheus counter)."""
        wire.check_max_datagram(max_datagram)
        self.on_retry = on_retry
        self.auth = auth
        self.max_datagram = max_datagram
        self.timeout = timeout
        self.attempts = max(1, attempts)
        self.window = max(1, window)
        self.clock = clock
        self.stats = ClientStats()
        self._transport: asyncio.DatagramTransport | None = None
        self._pending: dict[int, _Handler] = {}
        self._next_id = secrets.randbits(63)
        self._windows: dict[Address, asyncio.Semaphore] = {}
        self._put_windows: dict[Address, asyncio.Semaphore] = {}
        # All nodes answer into one socket: bound the requests in flight across nodes too, so
        # their answers fit the receive buffer (per-node windows alone let N * window through).
        self.total_window = 2 * self.window
        self._total = asyncio.Semaphore(self.total_window)
        self._rtt: dict[Address, _Rtt] = {}
        self.max_timeout = max(timeout, MAX_TIMEOUT)
        self.buffers: tuple[int, int] = (0, 0)

    @classmethod
    async def open(
        cls, auth: Authenticator, *, host: str = "0.0.0.0", **kw: Any
    ) -> DataPlaneClient:
        """Bind a UDP socket on ``host`` (any port; all interfaces by default), ready to use."""
        client = cls(auth, **kw)
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.bind((host, 0))
            client.buffers = tune_socket_buffers(sock)
            sock.setblocking(False)
            transport, _ = await loop.create_datagram_endpoint(lambda: _Protocol(client), sock=sock)
        except BaseException:
            sock.close()
            raise
        client._transport = transport
        return client

    async def __aenter__(self) -> DataPlaneClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the socket; requests in flight fail as unanswered."""
        if self._transport is not None:
            self._transport.close()
            self._transport = None
        pending, self._pending = self._pending, {}
        for handler in pending.values():
            handler.abort()

    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran (or before :meth:`open` bound a socket)."""
        return self._transport is None

    @property
    def address(self) -> Address:
        """The local address of the socket."""
        if self._transport is None:
            raise TmdhtError("client is closed")
        host, port = self._transport.get_extra_info("sockname")[:2]
        return host, port

    # -- datagrams ---------------------------------------------------------------------------

    def _on_datagram(self, data: bytes, addr: Address) -> None:
        self.stats.datagrams_received += 1
        try:
            message = wire.decode(
                data, max_datagram=wire.MAX_DATAGRAM, auth=self.auth, now=self.clock()
            )
        except DecodeError as exc:
            self.stats.bad_datagrams += 1
            log.debug("dropped datagram from %s: %s", addr, exc)
            return
        exchange = self._pending.get(message.request_id)
        if exchange is None or exchange.address != addr:
            self.stats.unexpected += 1  # a late answer to a retried request, or a stranger
            return
        part, parts = getattr(message, "part", 0), getattr(message, "parts", 1)
        exchange.add(part, parts, message)

    def retried(self) -> None:
        """Count a request re-sent (by this client or a caller driving its own requests)."""
        self.stats.retries += 1
        if self.on_retry is not None:
            self.on_retry()

    def send_request(
        self, address: Address, build: Callable[[int], wire.Message], handler: _Handler
    ) -> int:
        """Send one request without waiting: every datagram of its answer goes to
        ``handler.add`` until :meth:`forget`; ``handler.abort()`` if the client closes first.
        Returns the request id."""
        if self._transport is None:
            raise TmdhtError("client is closed")
        request_id = self._request_id()
        datagram = wire.encode(
            build(request_id), max_datagram=self.max_datagram, auth=self.auth, now=self.clock()
        )
        self._pending[request_id] = handler
        self._transport.sendto(datagram, address)
        self.stats.datagrams_sent += 1
        self.stats.requests += 1
        return request_id

    def forget(self, request_id: int) -> None:
        """Stop routing answers to ``request_id`` (late ones count as unexpected)."""
        self._pending.pop(request_id, None)

    def observe_rtt(self, address: Address, seconds: float) -> None:
        """Feed one round-trip time to ``address``'s adaptive timeout."""
        rtt = self._rtt.get(address)
        if rtt is None:
            rtt = self._rtt[address] = _Rtt()
        rtt.observe(seconds)

    def _request_id(self) -> int:
        self._next_id = (self._next_id + 1) & ((1 << 64) - 1)
        return self._next_id

    def _window(self, address: Address) -> asyncio.Semaphore:
        sem = self._windows.get(address)
        if sem is None:
            sem = self._windows[address] = asyncio.Semaphore(self.window)
        return sem

    @contextlib.asynccontextmanager
    async def _slots(self, address: Address, *, small_answers: bool) -> AsyncIterator[None]:
        """Hold the window slots of one request: its node's and the client-wide one, or for a
        request whose answer is small (PUT) a larger per-node window of its own."""
        if small_answers:
            sem = self._put_windows.get(address)
            if sem is None:
                sem = self._put_windows[address] = asyncio.Semaphore(
                    PUT_WINDOW_FACTOR * self.window
                )
            async with sem:
                yield
        else:
            async with self._window(address), self._total:
                yield

    def timeout_for(self, address: Address, attempt: int = 0) -> float:
        """The timeout of a request to ``address``: its smoothed RTT plus four deviations, at
        least ``timeout``, doubled for each retry (a loaded node is not declared dead early)."""
        rtt = self._rtt.get(address)
        base = self.timeout if rtt is None else rtt.timeout(self.timeout, self.max_timeout)
        return float(min(self.max_timeout, base * 2.0**attempt))

    async def _roundtrip(
        self, address: Address, build: Callable[[int], wire.Message], attempt: int = 0
    ) -> list[wire.Message]:
        """Send one request; return the parts of the answer that arrived before the timeout."""
        if self._transport is None:
            raise TmdhtError("client is closed")
        request_id = self._request_id()
        datagram = wire.encode(
            build(request_id), max_datagram=self.max_datagram, auth=self.auth, now=self.clock()
        )
        exchange = _Exchange(address)
        self._pending[request_id] = exchange
        started = time.perf_counter()
        try:
            self._transport.sendto(datagram, address)
            self.stats.datagrams_sent += 1
            self.stats.requests += 1
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(
                    asyncio.shield(exchange.done), self.timeout_for(address, attempt)
                )
        finally:
            self._pending.pop(request_id, None)  # close() may have cleared it already
        if exchange.done.done() and not exchange.done.cancelled():
            self.observe_rtt(address, time.perf_counter() - started)
        else:
            self.stats.timeouts += 1
        return [exchange.received[k] for k in sorted(exchange.received)]

    async def _with_retries(
        self,
        address: Address,
        items: Sequence[bytes],
        build: Callable[[tuple[bytes, ...], int], wire.Message],
        absorb: Callable[[wire.Message], Iterable[bytes]],
        *,
        small_answers: bool = False,
    ) -> set[bytes]:
        """Ask until every item was mentioned by some answer; returns the unanswered ones."""
        remaining = dict.fromkeys(items)
        async with self._slots(address, small_answers=small_answers):
            for attempt in range(self.attempts):
                if not remaining:
                    break
                if attempt:
                    self.retried()
                batch = tuple(remaining)
                for message in await self._roundtrip(
                    address, functools.partial(build, batch), attempt
                ):
                    if isinstance(message, wire.Error):
                        log.info(
                            "node %s:%d: %s (%s)", *address, message.message, message.code.name
                        )
                        continue
                    for item in absorb(message):
                        remaining.pop(item, None)
        return set(remaining)

    @staticmethod
    def _batches(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
        return [items[i : i + size] for i in range(0, len(items), size)]

    # -- operations --------------------------------------------------------------------------

    def get_batch_size(self) -> int:
        """Digests per GET request: answers stay within a few datagrams."""
        pages = wire.max_pages_per_datagram(self.max_datagram) * RESPONSE_DATAGRAMS_PER_REQUEST
        return min(pages, wire.max_digests_per_request(self.max_datagram))

    async def get_pages(self, address: Address, digests: Sequence[bytes]) -> GetResult:
        """Fetch pages from one node; every page returned is verified."""
        result = GetResult()

        def absorb(message: wire.Message) -> Iterable[bytes]:
            if not isinstance(message, wire.Pages):
                return ()
            seen = []
            for digest, page in message.pages:
                seen.append(digest)
                if blake3(page).digest() == digest:
                    result.pages[digest] = page
                else:
                    self.stats.verification_failures += 1
                    result.corrupt.add(digest)
            self.stats.pages_received += len(message.pages)
            result.missing.update(message.missing)
            seen.extend(message.missing)
            return seen

        def build(batch: tuple[bytes, ...], rid: int) -> wire.Message:
            return wire.GetPages(request_id=rid, digests=tuple(PageDigest(d) for d in batch))

        batches = self._batches(list(dict.fromkeys(digests)), self.get_batch_size())
        unanswered = await asyncio.gather(
            *(self._with_retries(address, b, build, absorb) for b in batches)
        )
        for u in unanswered:
            result.unanswered |= u
        return result

    async def has(self, address: Address, digests: Sequence[bytes]) -> HasResult:
        """Which of these digests does one node hold?"""
        result = HasResult()

        async def one(batch: Sequence[bytes]) -> set[bytes]:
            asked: list[tuple[bytes, ...]] = []  # attempts are sequential: the last is answered

            def build(b: tuple[bytes, ...], rid: int) -> wire.Message:
                asked.append(b)
                return wire.Has(request_id=rid, digests=tuple(PageDigest(d) for d in b))

            def absorb(message: wire.Message) -> Iterable[bytes]:
                if not isinstance(message, wire.Have):
                    return ()
                request = asked[-1]
                covered = request[message.first : message.first + len(message.held)]
                for digest, held in zip(covered, message.held, strict=False):
                    (result.held if held else result.lacking).add(digest)
                return covered

            return await self._with_retries(address, batch, build, absorb)

        size = wire.max_digests_per_request(self.max_datagram)
        for u in await asyncio.gather(
            *(one(b) for b in self._batches(list(dict.fromkeys(digests)), size))
        ):
            result.unanswered |= u
        return result

    async def put_pages(self, address: Address, pages: Sequence[tuple[bytes, bytes]]) -> PutOutcome:
        """Store pages on one node; the node verifies each against its digest."""
        outcome = PutOutcome()
        by_digest = dict(pages)

        def build(batch: tuple[bytes, ...], rid: int) -> wire.Message:
            return wire.PutPages(
                request_id=rid, pages=tuple((PageDigest(d), by_digest[d]) for d in batch)
            )

        def absorb(message: wire.Message) -> Iterable[bytes]:
            if not isinstance(message, wire.PutResult):
                return ()
            for digest, status in message.results:
                outcome.status[digest] = status
            return [d for d, _ in message.results]

        size = wire.max_pages_per_datagram(self.max_datagram)
        batches = self._batches(list(by_digest), size)
        for u in await asyncio.gather(
            *(self._with_retries(address, b, build, absorb, small_answers=True) for b in batches)
        ):
            outcome.unanswered |= u
        return outcome

    async def node_info(self, address: Address) -> wire.NodeInfo:
        """Ask a node who it is; raises NodeUnreachableError if it does not answer."""
        async with self._window(address):
            for attempt in range(self.attempts):
                if attempt:
                    self.retried()
                for message in await self._roundtrip(
                    address, lambda rid: wire.NodeInfoRequest(request_id=rid), attempt
                ):
                    if isinstance(message, wire.NodeInfo):
                        return message
        raise NodeUnreachableError(address, "NODE_INFO")
