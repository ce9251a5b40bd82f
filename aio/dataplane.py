"""The data-plane client: the asyncio skin over the request engine, on one UDP socket.

:class:`DataPlaneClient` only moves bytes: datagrams from its socket go into
:class:`tmdht.net.engine.RequestEngine`, what the engine wants sent goes out, one loop timer is
re-armed at the engine's next deadline, and each finished operation completes its caller's
future. Windows, retries, hedging, failover and verification are the engine's (see
:mod:`tmdht.net.engine`).

The client library (:mod:`tmdht.client.store`) resolves and publishes pages with it; a store
node's replication job (:mod:`tmdht.node.replication`) asks its peers HAS and PUT with it; a vnet
agent's MAC directory (:mod:`tmdht.vnet.directory`) keeps its records with RECORD_PUT/GET.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar, Unpack

from tmdht import wire
from tmdht.aio.sockets import SocketBuffers, open_udp_socket
from tmdht.auth import Authenticator
from tmdht.errors import NodeUnreachableError, TmdhtError
from tmdht.net.address import Address
from tmdht.net.engine import RequestEngine
from tmdht.net.operations import (
    EngineConfig,
    EngineSettings,
    EngineStats,
    Fetch,
    GetResult,
    HasQuery,
    HasResult,
    InfoQuery,
    NodeFailed,
    Operation,
    OperationResult,
    PutOutcome,
    RangeRead,
    RecordRead,
    RecordWrite,
    Store,
)

__all__ = ["DataPlaneClient"]

log = logging.getLogger("tmdht.aio.dataplane")

R = TypeVar("R", GetResult, HasResult, PutOutcome)


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
        clock: Callable[[], float] = time.time,
        on_node_failed: Callable[[Address], None] | None = None,
        **settings: Unpack[EngineSettings],
    ) -> None:
        """``settings`` are :class:`~tmdht.net.engine.EngineConfig`'s (timeout, attempts,
        window, ...). ``clock`` is the wall clock stamped on datagrams; ``on_node_failed(address)``
        hears of every node the engine reports failed (e.g. to probe it, then :meth:`reinstate`
        it)."""
        self.config = EngineConfig(**settings)
        self.engine = RequestEngine(auth, self.config, wall_clock=clock)
        self.on_node_failed = on_node_failed
        self.buffers = SocketBuffers(0, 0, 0, None)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._transport: asyncio.DatagramTransport | None = None
        self._waiting: dict[int, asyncio.Future[OperationResult]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._burst: list[tuple[bytes, Address]] = []

    @classmethod
    async def open(
        cls,
        auth: Authenticator,
        *,
        host: str = "0.0.0.0",
        clock: Callable[[], float] = time.time,
        on_node_failed: Callable[[Address], None] | None = None,
        **settings: Unpack[EngineSettings],
    ) -> DataPlaneClient:
        """Bind a UDP socket on ``host`` (any port; all interfaces by default), ready to use."""
        client = cls(auth, clock=clock, on_node_failed=on_node_failed, **settings)
        loop = asyncio.get_running_loop()
        sock, client.buffers = open_udp_socket(host)
        try:
            transport, _ = await loop.create_datagram_endpoint(lambda: _Protocol(client), sock=sock)
        except BaseException:
            sock.close()
            raise
        client._loop, client._transport = loop, transport
        return client

    async def __aenter__(self) -> DataPlaneClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the socket; operations in flight end with what they got (the rest
        unanswered)."""
        if self._transport is None:
            return
        self.engine.close(self._now())
        self._service()
        self._transport.close()
        self._transport = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

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

    @property
    def stats(self) -> EngineStats:
        """Counters: datagrams, retries, timeouts, verification failures, hedges, ..."""
        return self.engine.stats

    def get_batch_size(self) -> int:
        """Digests per GET request."""
        return self.engine.get_batch

    def avoided(self, address: Address) -> bool:
        """True while the node at ``address`` failed recently (it is asked last)."""
        return self.engine.avoided(address, self._now())

    def avoid(self, address: Address) -> None:
        """Ask the node at ``address`` last for a while (the caller saw it fail)."""
        self.engine.avoid(address, self._now())

    def reinstate(self, address: Address) -> None:
        """The node at ``address`` answered again: stop avoiding it."""
        self.engine.reinstate(address)

    # -- operations ----------------------------------------------------------------------------

    async def fetch(
        self,
        digests: Sequence[bytes],
        rows: Sequence[list[int]],
        nodes: Sequence[Address],
        *,
        hedge: bool = True,
    ) -> GetResult:
        """Pages of distinct ``digests``, each from the first replica in its row (indices into
        ``nodes``, closest first) that serves it verified; hedged and failed over."""
        return await self._expect(GetResult, Fetch(digests, rows, nodes, hedge))

    async def get_pages(self, address: Address, digests: Sequence[bytes]) -> GetResult:
        """Fetch pages from one node; every page returned is verified."""
        unique = list(dict.fromkeys(bytes(d) for d in digests))
        return await self.fetch(unique, [[0] for _ in unique], [address], hedge=False)

    async def has(self, address: Address, digests: Sequence[bytes]) -> HasResult:
        """Which of these digests does one node hold?"""
        return await self._expect(HasResult, HasQuery(address, digests))

    async def put_pages(self, address: Address, pages: Sequence[tuple[bytes, bytes]]) -> PutOutcome:
        """Store pages on one node; the node verifies each against its digest."""
        return await self._expect(PutOutcome, Store(address, pages))

    async def node_info(self, address: Address) -> wire.NodeInfo:
        """Ask a node who it is; raises NodeUnreachableError if it does not answer."""
        info = await self._run(InfoQuery(address))
        if not isinstance(info, wire.NodeInfo):
            raise NodeUnreachableError(address, "NODE_INFO")
        return info

    async def put_record(
        self, address: Address, key: bytes, entry: wire.RecordEntry
    ) -> wire.RecordPutResult | None:
        """Keep a soft-state record entry on one node (RECORD_PUT); None if it did not
        answer (or refused the request)."""
        answer = await self._run(RecordWrite(address, key, entry))
        return answer if isinstance(answer, wire.RecordPutResult) else None

    async def get_records(self, address: Address, key: bytes) -> wire.Records | None:
        """The live record entries one node holds under ``key`` (RECORD_GET); None if it did
        not answer (or refused the request)."""
        answer = await self._run(RecordRead(address, key))
        return answer if isinstance(answer, wire.Records) else None

    async def range_hashes(self, query: RangeRead) -> wire.RangeHashes | None:
        """Counts and XOR hashes of groups of buckets on one node (RANGE_HASH, anti-entropy);
        None if it did not answer (or refused the request)."""
        answer = await self._run(query)
        return answer if isinstance(answer, wire.RangeHashes) else None

    async def _expect(self, kind: type[R], operation: Operation) -> R:
        result = await self._run(operation)
        assert isinstance(result, kind)
        return result

    async def _run(self, operation: Operation) -> OperationResult:
        if self._transport is None or self._loop is None:
            raise TmdhtError("client is closed")
        op = self.engine.submit(operation, self._loop.time())
        future: asyncio.Future[OperationResult] = self._loop.create_future()
        self._waiting[op] = future
        self._service()
        try:
            return await future
        except asyncio.CancelledError:
            if self._waiting.pop(op, None) is not None:
                self.engine.cancel(op, self._loop.time())
                self._service()
            raise

    # -- the skin ------------------------------------------------------------------------------

    def _now(self) -> float:
        return self._loop.time() if self._loop is not None else time.monotonic()

    def _on_datagram(self, data: bytes, addr: Address) -> None:
        """Datagrams the loop reads in one wake-up are collected and go into the engine as
        one burst (decoded in one native call) once the loop has read them all."""
        burst = self._burst
        burst.append((data, addr))
        if len(burst) == 1:
            assert self._loop is not None
            self._loop.call_soon(self._on_burst)

    def _on_burst(self) -> None:
        burst, self._burst = self._burst, []
        if self._loop is None or self._transport is None or not burst:
            return
        self.engine.receive_datagrams(burst, self._loop.time())
        self._service()

    def _on_timer(self) -> None:
        self._timer = self._timer_at = None
        assert self._loop is not None
        self.engine.handle_timer(self._loop.time())
        self._service()

    def _service(self) -> None:
        """After any input: send what the engine wants sent, complete what it finished, and
        make sure the loop wakes it up at its next deadline."""
        engine, transport = self.engine, self._transport
        if transport is not None:
            for datagram, address in engine.datagrams_to_send(self._now()):
                transport.sendto(datagram, address)
        while (event := engine.next_event()) is not None:
            if isinstance(event, NodeFailed):
                if self.on_node_failed is not None:
                    self.on_node_failed(event.address)
                continue
            future = self._waiting.pop(event.operation, None)
            if future is not None and not future.done():
                future.set_result(event.result)
        deadline = engine.get_timer()
        if (
            deadline is not None
            and self._loop is not None
            and transport is not None
            and (self._timer_at is None or deadline < self._timer_at)
        ):
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self._loop.call_at(deadline, self._on_timer)
            self._timer_at = deadline
