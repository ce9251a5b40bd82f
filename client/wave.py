"""The wave store through the cluster: fetch and store a migration wave's pages by wave key.

A migration receiver in a wave (``tmdht qemu receive --wave``) looks up offered pages here and
stores the full pages it received, for the wave's next VMs (:mod:`tmdht.wave`). It is a cache
with a fallback — every page it cannot get comes from the sender — so it is deliberately
simple: each wave key lives on the one member closest to it (placed like a page digest), a
request that gets no answer within ``timeout`` counts as a miss (no retries, no hedging), and a
bounded number of requests is in flight. Pages come back unverified (the node cannot check a
page it knows only by wave key): the receiver core checks each against the offered digest.

Datagrams go through a socket of its own (its own authenticator and replay window), not the
request engine: the engine verifies every page against the key it asked for, which a wave key
is not.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tmdht import wire
from tmdht.aio.sockets import open_udp_socket
from tmdht.errors import DecodeError, TmdhtError
from tmdht.net.address import Address
from tmdht.wave import DEFAULT_WAVE_TTL, WaveCredentials

__all__ = ["WaveClientStats", "WaveStoreClient"]

GET_BATCH = 64
"""Wave keys per WAVE_GET (its answer: about 64 / 7 datagrams of 32 KiB)."""

log = logging.getLogger("tmdht.wave")


@dataclass
class WaveClientStats:
    """What the wave client did."""

    lookups: int = 0
    """Wave keys asked for."""
    found: int = 0
    """Pages the store returned (checked later, by the receiver core)."""
    stored: int = 0
    """Pages a node stored (new, or its time-to-live refreshed)."""
    refused: int = 0
    """Pages a node refused (its wave store full)."""
    timeouts: int = 0
    """Requests that got no (complete) answer in time."""
    claims: int = 0
    """Wave keys asked about by WAVE_CLAIM."""
    claimed: int = 0
    """... and claimed by this client (it fetches them from its sender)."""
    pending: int = 0
    """... and found claimed by another receiver (answers, re-asks included)."""


@dataclass
class _Pending:
    future: asyncio.Future[None]
    parts_left: int = -1
    pages: dict[bytes, bytes] = field(default_factory=dict)
    statuses: list[wire.PutStatus] = field(default_factory=list)
    claims: tuple[wire.WaveClaimStatus, ...] = ()


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, owner: WaveStoreClient) -> None:
        self.owner = owner

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.owner._received(data)

    def error_received(self, exc: Exception) -> None:
        log.debug("wave store send failed: %s", exc)


class WaveStoreClient:
    """Fetch and store one wave's pages (see the module docstring). ``members(keys)`` gives,
    per key, the data-plane addresses of the members closest to it (the store client's
    placement); ``auth`` a fresh authenticator of the cluster's credentials."""

    def __init__(self, wave: WaveCredentials, auth: Any, members: Any, *,
                 host: str = "0.0.0.0", max_datagram: int = 32768,
                 ttl: float = DEFAULT_WAVE_TTL, timeout: float = 0.5,
                 in_flight: int = 32) -> None:
        self.wave = wave
        self.auth = auth
        self._members = members
        self.host = host
        self.max_datagram = max_datagram
        self.ttl = ttl
        self.timeout = timeout
        self.stats = WaveClientStats()
        self._slots = asyncio.Semaphore(in_flight)
        self._pending: dict[int, _Pending] = {}
        self._ids = itertools.count(int.from_bytes(os.urandom(4), "big") << 16)
        self._transport: asyncio.DatagramTransport | None = None

    async def start(self) -> None:
        """Open the socket."""
        loop = asyncio.get_running_loop()
        sock, _buffers = open_udp_socket(self.host, 0)  # large buffers: answers come in bursts
        try:
            transport, _ = await loop.create_datagram_endpoint(lambda: _Protocol(self),
                                                               sock=sock)
        except BaseException:
            sock.close()
            raise
        self._transport = transport

    def close(self) -> None:
        """Close the socket; requests in flight end as misses."""
        if self._transport is not None:
            self._transport.close()
            self._transport = None
        for pending in self._pending.values():
            if not pending.future.done():
                pending.future.set_result(None)

    # -- answers ---------------------------------------------------------------------------

    def _received(self, data: bytes) -> None:
        try:
            message = wire.decode(data, max_datagram=wire.MAX_DATAGRAM, auth=self.auth,
                                  now=time.time())
        except DecodeError as exc:
            log.debug("dropped a wave answer: %s", exc)
            return
        pending = self._pending.get(getattr(message, "request_id", -1))
        if pending is None or pending.future.done():
            return
        if isinstance(message, wire.WavePages):
            if pending.parts_left < 0:
                pending.parts_left = message.parts
            pending.parts_left -= 1
            pending.pages.update(message.pages)
            if pending.parts_left <= 0:
                pending.future.set_result(None)
        elif isinstance(message, wire.WaveClaims):
            pending.claims = message.statuses
            pending.future.set_result(None)
        elif isinstance(message, wire.PutResult):
            pending.statuses += [status for _, status in message.results]
            pending.future.set_result(None)
        elif isinstance(message, wire.Error):
            pending.future.set_result(None)

    async def _ask(self, address: Address,
                   message: wire.WaveGet | wire.WavePut | wire.WaveClaim) -> _Pending:
        loop = asyncio.get_running_loop()
        pending = _Pending(loop.create_future())
        async with self._slots:
            if self._transport is None:
                raise TmdhtError("the wave store client is closed")
            self._pending[message.request_id] = pending
            try:
                self._transport.sendto(wire.encode(message, max_datagram=self.max_datagram,
                                                   auth=self.auth, now=time.time()), address)
                try:
                    await asyncio.wait_for(asyncio.shield(pending.future), self.timeout)
                except TimeoutError:
                    self.stats.timeouts += 1
            finally:
                del self._pending[message.request_id]
        return pending

    def _by_node(self, keys: Sequence[bytes]) -> dict[Address, list[int]]:
        groups: dict[Address, list[int]] = {}
        for i, row in enumerate(self._members(keys)):
            if row:
                groups.setdefault(row[0], []).append(i)
        return groups

    # -- calls -----------------------------------------------------------------------------

    async def fetch(self, digests: Sequence[bytes]) -> dict[bytes, bytes]:
        """Pages of ``digests`` found in the wave store, by digest: UNVERIFIED (the caller
        checks each against its digest). Missing, lost and timed-out ones are absent."""
        keys = self.wave.wave_keys(digests)
        self.stats.lookups += len(keys)
        # Few keys per request: the answer is one datagram per few pages, sent back to back.
        batch = min(GET_BATCH, wire.max_digests_per_request(self.max_datagram))
        calls = []
        for address, rows in self._by_node(keys).items():
            for i in range(0, len(rows), batch):
                chunk = tuple(keys[j] for j in rows[i : i + batch])
                calls.append(self._ask(address, wire.WaveGet(request_id=next(self._ids),
                                                             keys=chunk)))
        by_key = dict(zip(keys, digests, strict=True))
        found: dict[bytes, bytes] = {}
        for pending in await asyncio.gather(*calls):
            for key, page in pending.pages.items():
                digest = by_key.get(key)
                if digest is not None:
                    found[digest] = page
        self.stats.found += len(found)
        return found

    async def claim(self, digests: Sequence[bytes], ttl: float
                    ) -> list[wire.WaveClaimStatus | None]:
        """Claim the pages of ``digests`` for ``ttl`` seconds where neither stored nor claimed
        (see :class:`tmdht.wire.WaveClaimStatus`), one status per digest; None where the node
        did not answer (or answered something else) in time."""
        keys = self.wave.wave_keys(digests)
        self.stats.claims += len(keys)
        batch = min(GET_BATCH * 16, wire.max_digests_per_request(self.max_datagram) - 1)
        claim_ms = max(1, int(ttl * 1000))
        calls = []
        for address, rows in self._by_node(keys).items():
            for i in range(0, len(rows), batch):
                chunk = rows[i : i + batch]
                calls.append((chunk, self._ask(address, wire.WaveClaim(
                    request_id=next(self._ids), claim_ms=claim_ms,
                    keys=tuple(keys[j] for j in chunk)))))
        out: list[wire.WaveClaimStatus | None] = [None] * len(keys)
        answers = await asyncio.gather(*(call for _, call in calls))
        for (rows, _), pending in zip(calls, answers, strict=True):
            if len(pending.claims) == len(rows):
                for j, status in zip(rows, pending.claims, strict=True):
                    out[j] = status
        self.stats.claimed += out.count(wire.WaveClaimStatus.CLAIMED)
        self.stats.pending += out.count(wire.WaveClaimStatus.PENDING)
        return out

    async def store(self, pages: Sequence[tuple[bytes, bytes]]) -> int:
        """Store ``(digest, page)`` pairs (already verified by the caller) under their wave
        keys for ``ttl``; returns how many a node took. Best effort: losses are not retried."""
        if not pages:
            return 0
        keys = self.wave.wave_keys([d for d, _ in pages])
        batch = wire.max_pages_per_datagram(self.max_datagram)
        ttl = max(1, int(self.ttl))
        calls = []
        for address, rows in self._by_node(keys).items():
            for i in range(0, len(rows), batch):
                chunk = tuple((keys[j], pages[j][1]) for j in rows[i : i + batch])
                calls.append(self._ask(address, wire.WavePut(request_id=next(self._ids),
                                                             ttl=ttl, pages=chunk)))
        stored = refused = 0
        for pending in await asyncio.gather(*calls):
            for status in pending.statuses:
                if status in (wire.PutStatus.STORED, wire.PutStatus.PRESENT):
                    stored += 1
                else:
                    refused += 1
        self.stats.stored += stored
        self.stats.refused += refused
        return stored


async def open_wave_client(store: Any, wave: WaveCredentials, *, ttl: float = DEFAULT_WAVE_TTL,
                           timeout: float = 0.5) -> WaveStoreClient:
    """A started wave client over a started :class:`~tmdht.client.store.TemplateStoreClient`
    (its membership, placement and credentials)."""
    client = WaveStoreClient(
        wave, store.credentials.authenticator(),
        lambda keys: [[m.data_address for m in row] for row in store.closest_members(keys)],
        host=store.host, max_datagram=store.max_datagram, ttl=ttl, timeout=timeout)
    await client.start()
    return client
