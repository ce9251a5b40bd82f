"""The node's data plane: GET_PAGES, PUT_PAGES, HAS and NODE_INFO over UDP.

An asyncio datagram protocol around :mod:`tmdht.wire`. Every datagram is authenticated and
decoded before anything else happens; bad ones are dropped and counted by reason. Reads (GET,
HAS) are served inline: LMDB reads take microseconds. A GET is answered without copying its
pages: they are views into an LMDB read transaction, handed to ``socket.sendmsg``
(scatter-gather) with the sealed head of each PAGES datagram while the transaction is open; a
datagram the socket cannot take right away is joined and queued on the transport instead.

The read transaction is a :class:`~tmdht.node.storage.PageSnapshot` kept open from request to
request (beginning one, with its cursors, cost more than a one-page lookup). It is renewed at
the first read after any write the store commits, so a GET sent after a PUT was acknowledged
sees the page; and it is released ``snapshot_max_age`` after its first use (a timer on the
loop), so it never pins old LMDB pages for longer than that, busy or idle. Only the event loop
touches it.

Writes go to one writer thread with *group commit*: PUTs that arrive while a commit is running
are stored together in the next transaction, so many small PUTs share one fsync; while PUTs
stream in, a commit may also wait briefly (bounded, ``commit_pacing``, off by default) for more
of them (:mod:`tmdht.node.groupcommit`). A PUT is answered only after its pages are durable; the
store verifies every page against its digest before storing it (wire version 2 carries pages
outside the tag: the digest check is what refuses a page altered on the way).

Before anything else, each source IP's datagrams pass a token bucket
(:class:`tmdht.ratelimit.SourceRateLimiter`): a flood from one address, authentic or forged, is
dropped (counted as ``rate_limited``) before it costs a tag check or a store read.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NotRequired, TypedDict, Unpack, cast

from tmdht import wire
from tmdht.aio.sockets import SocketBuffers, open_udp_socket
from tmdht.auth import AuthenticationError, Authenticator, ReplayError
from tmdht.errors import DecodeError, LimitExceededError, TmdhtError, UsageError
from tmdht.net.address import Address
from tmdht.net.burst import (
    PutAnswer,
    decode_request,
    encode_pages_answer,
    encode_put_answers,
)
from tmdht.node.groupcommit import CommitPacer, CommitPacing
from tmdht.node.metrics import NodeMetrics
from tmdht.node.storage import PageSnapshot, PageStore, PutResult
from tmdht.node.wavestore import ClaimStatus, WavePutResult, WaveStore
from tmdht.pages import ZERO_DIGEST, ByteView, PageDigest
from tmdht.rangehash import BUCKET_BITS, mask_from_bits
from tmdht.ratelimit import RateLimitConfig, SourceRateLimiter
from tmdht.records import RecordStore

__all__ = ["DataPlaneServer", "ServerSettings"]

log = logging.getLogger("tmdht.node.dataplane")

_STATUS = {
    PutResult.STORED: wire.PutStatus.STORED,
    PutResult.PRESENT: wire.PutStatus.PRESENT,
    PutResult.REJECTED_DIGEST: wire.PutStatus.REJECTED_DIGEST,
    PutResult.REJECTED_FULL: wire.PutStatus.REJECTED_FULL,
}
_STATUS_BY_ID = {id(result): status for result, status in _STATUS.items()}
_PUT_STATUS_BY_ID = {id(status): status for status in wire.PutStatus}
_TYPE_LABEL = {
    wire.GetPages: "get_pages",
    wire.PutPages: "put_pages",
    wire.Has: "has",
    wire.NodeInfoRequest: "node_info",
    wire.RecordPut: "record_put",
    wire.RecordGet: "record_get",
    wire.WaveGet: "wave_get",
    wire.WavePut: "wave_put",
    wire.WaveClaim: "wave_claim",
    wire.RangeHashQuery: "range_hash",
}
_DROP_REASONS = ("rate_limited", "malformed", "auth", "oversize", "replay", "unexpected")
MAX_GROUP_PAGES = 4096
"""Pages one group commit takes at most (bounds a transaction's size and the wait for it)."""
DEFAULT_SNAPSHOT_MAX_AGE = 0.01
"""Seconds a read snapshot serves GETs before it is released: LMDB cannot reuse pages freed by
writes after it began, so this bounds that dead space to ~10 ms of writes, while a busy node
still begins a transaction only every 10 ms instead of for every request."""


class ServerSettings(TypedDict):
    """:class:`DataPlaneServer`'s constructor arguments, for :meth:`DataPlaneServer.start`."""

    store: PageStore
    auth: Authenticator
    max_datagram: int
    metrics: NodeMetrics
    node_info: Callable[[int], wire.NodeInfo]
    on_stored: NotRequired[Callable[[Sequence[bytes]], None] | None]
    clock: NotRequired[Callable[[], float]]
    rate_limit: NotRequired[RateLimitConfig | None]
    snapshot_max_age: NotRequired[float]
    records: NotRequired[RecordStore | None]
    waves: NotRequired[WaveStore | None]
    commit_pacing: NotRequired[CommitPacing | None]


@dataclass
class _PendingPut:
    request: wire.PutPages
    address: Address
    arrived: float


def _drop_reason(exc: DecodeError) -> str:
    if isinstance(exc, ReplayError):
        return "replay"
    if isinstance(exc, AuthenticationError):
        return "auth"
    if isinstance(exc, LimitExceededError):
        return "oversize"
    return "malformed"


class DataPlaneServer(asyncio.DatagramProtocol):
    """Serves one node's page store. Create with :meth:`start`."""

    def __init__(
        self,
        *,
        store: PageStore,
        auth: Authenticator,
        max_datagram: int,
        metrics: NodeMetrics,
        node_info: Callable[[int], wire.NodeInfo],
        on_stored: Callable[[Sequence[bytes]], None] | None = None,
        clock: Callable[[], float] = time.time,
        rate_limit: RateLimitConfig | None = None,
        snapshot_max_age: float = DEFAULT_SNAPSHOT_MAX_AGE,
        records: RecordStore | None = None,
        waves: WaveStore | None = None,
        commit_pacing: CommitPacing | None = None,
    ) -> None:
        """``on_stored(digests)`` hears of every page a PUT stored (replication pushes them on).

        ``rate_limit`` bounds the datagrams each source IP may send (default: RateLimitConfig()).
        ``snapshot_max_age`` bounds how long one read transaction serves GETs (seconds, >= 0).
        ``records`` keeps the soft-state records of RECORD_PUT/RECORD_GET (the virtual network's
        MAC directory); without it those requests are answered with ERROR UNKNOWN_TYPE.
        ``waves`` keeps wave pages (WAVE_GET/WAVE_PUT/WAVE_CLAIM, :mod:`tmdht.node.wavestore`);
        without it those requests are answered with ERROR UNKNOWN_TYPE too.
        ``commit_pacing`` bounds how long a group commit may wait for more PUTs (default:
        CommitPacing(), no wait: a commit starts as soon as the writer is free).
        """
        if not snapshot_max_age >= 0:
            raise UsageError(f"snapshot_max_age must be >= 0 seconds, got {snapshot_max_age}")
        self.on_stored = on_stored
        self.store = store
        self.auth = auth
        self.max_datagram = max_datagram
        self.metrics = metrics
        self.node_info = node_info
        self.clock = clock
        self.records = records
        self.waves = waves
        self.buffers = SocketBuffers(0, 0, 0, None)
        self.limiter = SourceRateLimiter(rate_limit)
        self._snapshot = store.snapshot()
        self._snapshot_max_age = snapshot_max_age
        self._release_timer: asyncio.TimerHandle | None = None
        self._transport: asyncio.DatagramTransport | None = None
        self._sock: socket.socket | None = None  # the transport's socket, for sendmsg
        # Labelled metric children, bound once instead of looked up on every request.
        self._dropped = {reason: metrics.bad_datagrams.labels(reason) for reason in _DROP_REASONS}
        self._requests = {t: metrics.requests.labels(label) for t, label in _TYPE_LABEL.items()}
        self._request_pages = {
            t: metrics.request_pages.labels(label) for t, label in _TYPE_LABEL.items()
        }
        self._latency = {t: metrics.latency.labels(label) for t, label in _TYPE_LABEL.items()}
        self._pages_served = metrics.pages_served.labels()
        self._misses = metrics.misses.labels()
        self._commit_pages = metrics.group_commit_pages.labels()
        self._writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tmdht-writer")
        self._queue: collections.deque[_PendingPut] = collections.deque()
        self._commit: asyncio.Future[Any] | None = None
        self._pacer = CommitPacer(commit_pacing)
        self._queued_pages = 0  # pages of self._queue
        self._commit_timer: asyncio.Handle | None = None  # the next commit's start, scheduled
        self._commit_at = 0.0  # when it is due (time.perf_counter)
        self._accepting = False
        self._idle = asyncio.Event()
        self._idle.set()

    @classmethod
    async def start(
        cls, host: str, port: int, **settings: Unpack[ServerSettings]
    ) -> DataPlaneServer:
        """Bind ``host:port`` (0: any free port) and serve."""
        server = cls(**settings)
        loop = asyncio.get_running_loop()
        try:
            sock, server.buffers = open_udp_socket(host, port)
        except BaseException:
            server._end_snapshot()
            raise
        try:
            await loop.create_datagram_endpoint(lambda: server, sock=sock)
        except BaseException:
            sock.close()
            server._end_snapshot()
            raise
        server._sock = sock
        server._accepting = True
        return server

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # 3.11's selector datagram transport does not subclass DatagramTransport: cast, not check.
        self._transport = cast(asyncio.DatagramTransport, transport)

    @property
    def address(self) -> Address:
        """The bound address."""
        if self._transport is None:
            raise TmdhtError("data plane is not running")
        host, port = self._transport.get_extra_info("sockname")[:2]
        return host, port

    async def drain(self, timeout: float) -> None:
        """Stop taking requests; wait (bounded) until queued writes are committed and answered."""
        self._accepting = False
        self._release_snapshot()
        if self._commit_timer is not None:
            self._commit_due()  # no more PUTs will come: commit the waiting ones now
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            log.warning("data plane: writes still pending after %.1f s of draining", timeout)

    def close(self) -> None:
        """Close the socket, the read snapshot and the writer thread (after :meth:`drain`)."""
        self._accepting = False
        self._end_snapshot()
        if self._commit_timer is not None:
            self._commit_timer.cancel()
            self._commit_timer = None
        self._sock = None  # the transport closes it
        if self._transport is not None:
            self._transport.close()
            self._transport = None
        self._writer.shutdown(wait=True, cancel_futures=True)

    # -- the read snapshot ---------------------------------------------------------------------

    def _reading(self) -> PageSnapshot:
        """The read snapshot for a request; its first use since the last release arms the timer
        that ends it ``snapshot_max_age`` from now."""
        if self._release_timer is None:
            self._release_timer = asyncio.get_running_loop().call_later(
                self._snapshot_max_age, self._release_snapshot
            )
        return self._snapshot

    def _release_snapshot(self) -> None:
        """End the read transaction (timer, drain); the next GET begins a new one."""
        if self._release_timer is not None:
            self._release_timer.cancel()
            self._release_timer = None
        self._snapshot.release()

    def _end_snapshot(self) -> None:
        self._release_snapshot()
        self._snapshot.close()

    # -- requests ------------------------------------------------------------------------------

    def datagram_received(self, data: bytes, addr: Any) -> None:
        address: Address = (addr[0], addr[1])
        if not self._accepting:
            return
        arrived = time.perf_counter()
        if not self.limiter.allow(address[0], arrived):
            self._dropped["rate_limited"].inc()
            return
        try:
            message = decode_request(
                data, max_datagram=wire.MAX_DATAGRAM, auth=self.auth, now=self.clock()
            )
        except wire.MessageDecodeError as exc:
            self._dropped["malformed"].inc()
            self._send_error(address, exc.request_id, exc.code, str(exc))
            return
        except DecodeError as exc:
            self._dropped[_drop_reason(exc)].inc()
            log.debug("dropped datagram from %s: %s", address, exc)
            return
        kind = type(message)
        handler = _HANDLERS.get(kind)
        if handler is None:
            self._dropped["unexpected"].inc()  # a response sent to a server
            return
        self._requests[kind].inc()
        try:
            handler(self, message, address, arrived)
        except TmdhtError as exc:  # e.g. the store failed a read: answer, keep serving
            log.error("request %s from %s failed: %s", _TYPE_LABEL[kind], address, exc)
            self._send_error(address, message.request_id, wire.ErrorCode.INTERNAL, str(exc))

    def _send(self, address: Address, datagrams: list[bytes]) -> None:
        if self._transport is not None:
            for datagram in datagrams:
                self._transport.sendto(datagram, address)

    def _send_buffers(self, address: Address, datagrams: list[list[ByteView]]) -> None:
        """Send datagrams given as buffer lists, scatter-gather, before the buffers expire.

        ``sendmsg`` on the socket itself takes the buffers without joining them. If the socket
        cannot take a datagram now, the datagram is joined -- a copy that outlives the buffers
        -- and queued on the transport, which sends it when the socket drains: nothing is lost,
        and nothing is sent out of a dead buffer. (A datagram may then overtake queued ones;
        UDP promises no order, and every part of an answer stands alone.)
        """
        transport, sock = self._transport, self._sock
        if transport is None:
            return
        if sock is None:
            for buffers in datagrams:
                transport.sendto(b"".join(buffers), address)
            return
        sendmsg = sock.sendmsg
        for buffers in datagrams:
            try:
                sendmsg(buffers, (), 0, address)
            except (BlockingIOError, InterruptedError):
                transport.sendto(b"".join(buffers), address)
            except OSError as exc:  # what the transport would do: report, drop, keep serving
                self.error_received(exc)

    def _send_error(
        self, address: Address, request_id: int, code: wire.ErrorCode, text: str
    ) -> None:
        self.metrics.errors_sent.labels(code.name.lower()).inc()
        error = wire.Error.capped(request_id=request_id, code=code, message=text)
        self._send(
            address,
            [wire.encode(error, max_datagram=self.max_datagram, auth=self.auth, now=self.clock())],
        )

    def error_received(self, exc: Exception) -> None:
        """A send failed (e.g. no route): the datagram is lost, as UDP may lose any."""
        log.debug("data plane send failed: %s", exc)

    def _get_pages(self, msg: wire.GetPages, address: Address, arrived: float) -> None:
        digests = msg.digests
        datagrams, found = encode_pages_answer(  # sealed natively where built
            msg.request_id,
            digests,
            self._reading().views(digests),
            max_datagram=self.max_datagram,
            auth=self.auth,
            now=self.clock(),
        )
        self._send_buffers(address, datagrams)  # now: the views end with the snapshot
        self._request_pages[wire.GetPages].inc(len(digests))
        self._pages_served.inc(found)
        if found < len(digests):
            self._misses.inc(len(digests) - found)
        self._latency[wire.GetPages].observe(time.perf_counter() - arrived)

    def _has(self, msg: wire.Has, address: Address, arrived: float) -> None:
        held = self._reading().has(msg.digests)
        self._request_pages[wire.Has].inc(len(msg.digests))
        self._send(
            address,
            wire.encode_have_response(
                msg.request_id,
                held,
                max_datagram=self.max_datagram,
                auth=self.auth,
                now=self.clock(),
            ),
        )
        self._latency[wire.Has].observe(time.perf_counter() - arrived)

    def _node_info(self, msg: wire.NodeInfoRequest, address: Address, arrived: float) -> None:
        info = self.node_info(msg.request_id)
        self._send(
            address,
            [wire.encode(info, max_datagram=self.max_datagram, auth=self.auth, now=self.clock())],
        )
        self._latency[wire.NodeInfoRequest].observe(time.perf_counter() - arrived)

    def _range_hash(self, msg: wire.RangeHashQuery, address: Address, arrived: float) -> None:
        """Counts and XOR hashes of groups of buckets (anti-entropy, :mod:`tmdht.rangehash`),
        from the store's in-memory bucket table."""
        if msg.bucket_bits != BUCKET_BITS:
            self._send_error(address, msg.request_id, wire.ErrorCode.MALFORMED,
                             f"buckets here are {BUCKET_BITS} bits, not {msg.bucket_bits}")
            return
        if msg.groups > wire.max_range_groups(self.max_datagram):
            self._send_error(address, msg.request_id, wire.ErrorCode.TOO_LARGE,
                             f"at most {wire.max_range_groups(self.max_datagram)} groups")
            return
        mask = mask_from_bits(msg.mask, msg.groups << msg.group_bits)
        entries = self.store.buckets.entries(mask, msg.first, msg.groups, msg.group_bits)
        answer = wire.RangeHashes(request_id=msg.request_id, bucket_bits=msg.bucket_bits,
                                  group_bits=msg.group_bits, first=msg.first, entries=entries)
        self._send(address, [wire.encode(answer, max_datagram=self.max_datagram, auth=self.auth,
                                          now=self.clock())])
        self._latency[wire.RangeHashQuery].observe(time.perf_counter() - arrived)

    def _record_put(self, msg: wire.RecordPut, address: Address, arrived: float) -> None:
        if self.records is None:
            self._send_error(address, msg.request_id, wire.ErrorCode.UNKNOWN_TYPE, "no records")
            return
        status, version = self.records.put(msg.key, msg.entry_id, msg.version,
                                           msg.ttl_ms / 1000, msg.value, time.monotonic())
        answer = wire.RecordPutResult(request_id=msg.request_id, status=status, version=version)
        self._send(address, [wire.encode(answer, max_datagram=self.max_datagram, auth=self.auth,
                                          now=self.clock())])
        self._latency[wire.RecordPut].observe(time.perf_counter() - arrived)

    def _record_get(self, msg: wire.RecordGet, address: Address, arrived: float) -> None:
        if self.records is None:
            self._send_error(address, msg.request_id, wire.ErrorCode.UNKNOWN_TYPE, "no records")
            return
        now = time.monotonic()
        entries = tuple(
            wire.RecordEntry(e.entry_id, e.version, max(0, int(e.ttl * 1000)), e.value)
            for e in self.records.get(msg.key, now))
        answer = wire.Records(request_id=msg.request_id, entries=entries)
        self._send(address, [wire.encode(answer, max_datagram=self.max_datagram, auth=self.auth,
                                          now=self.clock())])
        self._latency[wire.RecordGet].observe(time.perf_counter() - arrived)

    def _wave_get(self, msg: wire.WaveGet, address: Address, arrived: float) -> None:
        if self.waves is None:
            self._send_error(address, msg.request_id, wire.ErrorCode.UNKNOWN_TYPE,
                             "this node keeps no wave pages")
            return
        found = self.waves.get_many(msg.keys, self.clock())
        keys = cast(tuple[PageDigest, ...], msg.keys)  # wave keys stand where digests do
        pages = [(k, p) for k, p in zip(keys, found, strict=True) if p is not None]
        missing = [k for k, p in zip(keys, found, strict=True) if p is None]
        self._send(address, wire.encode_pages_response(
            msg.request_id, pages, missing, max_datagram=self.max_datagram, auth=self.auth,
            now=self.clock(), message_type=wire.MessageType.WAVE_PAGES))
        self._request_pages[wire.WaveGet].inc(len(msg.keys))
        self._latency[wire.WaveGet].observe(time.perf_counter() - arrived)

    def _wave_put(self, msg: wire.WavePut, address: Address, arrived: float) -> None:
        if self.waves is None:
            self._send_error(address, msg.request_id, wire.ErrorCode.UNKNOWN_TYPE,
                             "this node keeps no wave pages")
            return
        results = self.waves.put_many(msg.pages, float(msg.ttl), self.clock())
        statuses = [(cast(PageDigest, key), _WAVE_STATUS[r])
                    for (key, _), r in zip(msg.pages, results, strict=True)]
        self._send(address, wire.encode_put_response(
            msg.request_id, statuses, max_datagram=self.max_datagram, auth=self.auth,
            now=self.clock()))
        self._request_pages[wire.WavePut].inc(len(msg.pages))
        self._latency[wire.WavePut].observe(time.perf_counter() - arrived)

    def _wave_claim(self, msg: wire.WaveClaim, address: Address, arrived: float) -> None:
        if self.waves is None:
            self._send_error(address, msg.request_id, wire.ErrorCode.UNKNOWN_TYPE,
                             "this node keeps no wave pages")
            return
        found = self.waves.claim_many(msg.keys, msg.claim_ms / 1000, self.clock())
        answer = wire.WaveClaims(request_id=msg.request_id,
                                 statuses=tuple(_CLAIM_STATUS[s] for s in found))
        self._send(address, [wire.encode(answer, max_datagram=self.max_datagram, auth=self.auth,
                                          now=self.clock())])
        self._request_pages[wire.WaveClaim].inc(len(msg.keys))
        self._latency[wire.WaveClaim].observe(time.perf_counter() - arrived)

    def _put_pages(self, msg: wire.PutPages, address: Address, arrived: float) -> None:
        self._request_pages[wire.PutPages].inc(len(msg.pages))
        self._queue.append(_PendingPut(msg, address, arrived))
        self._queued_pages += len(msg.pages)
        self._pacer.arrived(len(msg.pages), arrived)
        self._idle.clear()
        if self._commit is None:
            self._schedule_commit()

    # -- group commit ----------------------------------------------------------------------------

    def _schedule_commit(self) -> None:
        """The writer is free and PUTs are queued: commit them as soon as the loop has read
        the datagrams that arrived with them, or once the pacer says (at most its
        ``max_delay`` after the oldest arrived). Not at once: uvloop delivers a burst of
        datagrams one callback each within one wake-up, and a commit started at the first
        took that PUT alone while the rest of the burst waited for the next commit and fsync
        (32 nodes: 8.7 pages per commit; 21.6 once the burst is read first)."""
        now = time.perf_counter()
        at = max(now, self._pacer.start_at(self._queued_pages, self._queue[0].arrived, now))
        if self._commit_timer is not None:
            if at >= self._commit_at:
                return  # due no later already
            self._commit_timer.cancel()  # a waiting commit whose target a PUT just reached
        loop = asyncio.get_running_loop()
        self._commit_at = at
        if at <= now:
            self._commit_timer = loop.call_soon(self._commit_due)
        else:
            self._commit_timer = loop.call_later(at - now, self._commit_due)

    def _commit_due(self) -> None:
        self._commit_timer = None
        if self._commit is None and self._queue:
            self._start_commit()

    def _start_commit(self) -> None:
        if self._commit_timer is not None:
            self._commit_timer.cancel()
            self._commit_timer = None
        group: list[_PendingPut] = []
        pages = 0
        while self._queue and (
            not group or pages + len(self._queue[0].request.pages) <= MAX_GROUP_PAGES
        ):
            item = self._queue.popleft()
            group.append(item)
            pages += len(item.request.pages)
        self._queued_pages -= pages
        items = items_of(group)
        self._commit_pages.observe(len(items))
        loop = asyncio.get_running_loop()
        self._commit = loop.run_in_executor(self._writer, self.store.put_many, items)
        self._commit.add_done_callback(lambda fut: self._committed(fut, group))

    def _committed(self, fut: asyncio.Future[Any], group: list[_PendingPut]) -> None:
        self._commit = None
        if self._queue:
            self._schedule_commit()  # the writer syncs the next group while this one is answered
        try:
            results: list[PutResult] = fut.result()
        except (TmdhtError, OSError) as exc:  # the store failed the whole transaction
            log.error("group commit of %d requests failed: %s", len(group), exc)
            for item in group:
                self._send_error(
                    item.address, item.request.request_id, wire.ErrorCode.UNAVAILABLE, str(exc)
                )
        else:
            self._answer_group(group, results)
        if self._commit is None and not self._queue:
            self._idle.set()

    def _answer_group(self, group: list[_PendingPut], results: list[PutResult]) -> None:
        """Answer each PUT of a committed group and count its pages by status.

        Per page only C-level work: an enum member is looked up by ``id`` (hashing one calls
        Python code) and the statuses are counted once per group, not per page.
        """
        statuses = list(map(_STATUS_BY_ID.__getitem__, map(id, results)))
        if self.on_stored is not None:
            new = wire.PutStatus.STORED
            stored = [d for (d, _), s in zip(items_of(group), statuses, strict=True) if s is new]
            if stored:
                self.on_stored(stored)
        counts = collections.Counter(map(id, statuses))
        at = 0
        answers: list[PutAnswer] = []
        for item in group:
            digests = [d for d, _ in item.request.pages]
            answer: list[wire.PutStatus]
            if ZERO_DIGEST in digests:
                answer = []
                for digest in digests:
                    if digest == ZERO_DIGEST:
                        answer.append(wire.PutStatus.REJECTED_ZERO)
                        counts[id(wire.PutStatus.REJECTED_ZERO)] += 1
                    else:
                        answer.append(statuses[at])
                        at += 1
            else:
                answer = statuses[at : at + len(digests)]
                at += len(digests)
            answers.append((item.request.request_id, digests, answer))
        # All of the group's answers built and sealed in one call (natively where built).
        sealed = encode_put_answers(answers, max_datagram=self.max_datagram, auth=self.auth,
                                    now=self.clock())
        latency = self._latency[wire.PutPages]
        for item, datagrams in zip(group, sealed, strict=True):
            self._send(item.address, datagrams)
            latency.observe(time.perf_counter() - item.arrived)
        for key, count in counts.items():
            status = _PUT_STATUS_BY_ID[key]
            name = status.name.lower()
            self.metrics.puts.labels(name).inc(count)
            if status not in (wire.PutStatus.STORED, wire.PutStatus.PRESENT):
                self.metrics.rejected.labels(name.removeprefix("rejected_")).inc(count)


def items_of(group: list[_PendingPut]) -> list[tuple[PageDigest, bytes]]:
    """The pages of a commit group, in order, less zero pages (answered REJECTED_ZERO)."""
    return [(d, p) for item in group for d, p in item.request.pages if d != ZERO_DIGEST]


_HANDLERS: dict[type, Callable[[DataPlaneServer, Any, Address, float], None]] = {
    wire.GetPages: DataPlaneServer._get_pages,
    wire.PutPages: DataPlaneServer._put_pages,
    wire.Has: DataPlaneServer._has,
    wire.NodeInfoRequest: DataPlaneServer._node_info,
    wire.RecordPut: DataPlaneServer._record_put,
    wire.RecordGet: DataPlaneServer._record_get,
    wire.WaveGet: DataPlaneServer._wave_get,
    wire.WavePut: DataPlaneServer._wave_put,
    wire.WaveClaim: DataPlaneServer._wave_claim,
    wire.RangeHashQuery: DataPlaneServer._range_hash,
}
_CLAIM_STATUS = {
    ClaimStatus.CLAIMED: wire.WaveClaimStatus.CLAIMED,
    ClaimStatus.PENDING: wire.WaveClaimStatus.PENDING,
    ClaimStatus.HELD: wire.WaveClaimStatus.HELD,
}
_WAVE_STATUS = {
    WavePutResult.STORED: wire.PutStatus.STORED,
    WavePutResult.REFRESHED: wire.PutStatus.PRESENT,
    WavePutResult.FULL: wire.PutStatus.REJECTED_FULL,
    WavePutResult.INVALID: wire.PutStatus.REJECTED_DIGEST,
}
