"""The request engine: every data-plane request to store nodes, as one sans-IO state machine.

A client (and a node's replication job) asks store nodes for pages (GET), whether they hold some
(HAS), to store pages (PUT) and who they are (NODE_INFO); a vnet agent keeps soft-state records
on them (RECORD_PUT, RECORD_GET: the virtual network's MAC directory). :class:`RequestEngine`
does all of it without a socket or a clock, in the manner of aioquic's connection: operations go
in with :meth:`~RequestEngine.submit`, datagrams with :meth:`~RequestEngine.receive_datagram` (or a
burst with :meth:`~RequestEngine.receive_datagrams`), the passing of time with
:meth:`~RequestEngine.handle_timer`; what to send comes out of
:meth:`~RequestEngine.datagrams_to_send`, when to wake it up out of
:meth:`~RequestEngine.get_timer`, and what finished out of :meth:`~RequestEngine.next_event`.
Every time is a ``now`` parameter in seconds of a monotonic clock; the auth block's timestamp
is wall-clock time, read from the ``wall_clock`` the engine is given (the cluster's replay
window compares wall clocks across hosts).

An operation becomes *requests*: batches of digests (or pages) that fit a datagram, one node
each. Per request:

- **Windows.** :class:`~tmdht.net.window.RequestWindow` decides when it may go: per node,
  client-wide for requests with bulky answers (all nodes answer into one socket buffer), and
  for every request together by an AIMD congestion window that halves on timeouts and lost
  parts and grows with answers. The rest wait in a queue per node; a request that ends lets the
  next ones go, one per node in turn.
- **Parts and retries.** An answer may span several datagrams (parts). When every part of the
  latest attempt is in and some items were in none (a part was lost), exactly those are asked
  again at once; at the node's adaptive timeout (:class:`~tmdht.net.window.RttEstimator`,
  doubling per attempt: back-off) likewise, up to ``attempts`` times -- and ``alive_attempts``
  more for a HAS, PUT or NODE_INFO to a node that answered other requests meanwhile (it is
  slow, not gone). Answers to earlier attempts still count. While a node is behind (no request
  sent to it after a timed-out one was answered), only one of its timed-out requests is sent
  again at a time and the rest wait for that one (TCP's one retransmission timer).
- **Verification.** A page counts only once its BLAKE3 digest matches (checked by the burst
  decoder, :mod:`tmdht.net.burst`); a wrong page is counted and treated as not served.

A GET operation (:class:`Fetch`) has, per digest, a replica list (closest first), and on top:

- **Hedging.** ``hedge_after`` seconds after a request went out without any answer, each of its
  open digests is also asked of its next replica; the first verified page wins. A request whose
  answer is only partly in by then asks its node again for the rest (a part was lost).
- **Failover.** A digest the node misses, serves corrupt or never answers goes to its next
  replica. A digest is *unresolved* when its list is used up.
- **Failed nodes.** A node that sent nothing in every attempt of a request, or that stays
  silent while hedges win its batches ``silent_limit`` times in a row, is *avoided* for
  ``avoid_for`` seconds (asked last) and reported (:class:`NodeFailed`: the caller may probe it
  and :meth:`~RequestEngine.reinstate` it).

The results are :class:`GetResult`, :class:`HasResult`, :class:`PutOutcome`,
:class:`tmdht.wire.NodeInfo`, :class:`tmdht.wire.RecordPutResult` and
:class:`tmdht.wire.Records` (None: the node did not answer), in :class:`OperationDone` events
(the types are in :mod:`tmdht.net.operations`).

Two seams are left on purpose. :meth:`~RequestEngine.receive_datagrams` takes a whole burst (what
one wake-up of the socket read) and decodes it in one call to :func:`tmdht.net.burst.decode_burst`
(natively where ``tmdht._native`` is built: auth tag, header and a BLAKE3 per page for every
PAGES answer of the burst), so the per-type handlers get PAGES parts whose pages are already
checked (:class:`~tmdht.net.burst.VerifiedPages`); PUT_RESULT answers are decoded there too.
Likewise every PUT one input lets go is sealed at its end in one call to
:func:`tmdht.net.burst.encode_put_requests` (natively where built).
:class:`~tmdht.net.window.RequestWindow` is the one client-wide bound on every kind of request;
its congestion controller is fed by ``answered`` and ``lost``.
"""

from __future__ import annotations

import collections
import heapq
import logging
import secrets
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Final, TypeAlias

from tmdht import wire
from tmdht.auth import Authenticator
from tmdht.errors import DecodeError, TmdhtError
from tmdht.net.address import Address
from tmdht.net.burst import PutRequest, VerifiedPages, decode_burst, encode_put_requests
from tmdht.net.operations import (
    EngineConfig,
    EngineStats,
    Event,
    Fetch,
    GetResult,
    HasQuery,
    HasResult,
    InfoQuery,
    NodeFailed,
    Operation,
    OperationDone,
    OperationResult,
    PutOutcome,
    RangeRead,
    RecordRead,
    RecordWrite,
    Store,
)
from tmdht.net.window import CongestionWindow, RequestWindow, RttEstimator
from tmdht.pages import PageDigest

__all__ = ["RESPONSE_DATAGRAMS_PER_REQUEST", "RequestEngine"]

log = logging.getLogger("tmdht.net.engine")

_Answer: TypeAlias = wire.Message | VerifiedPages
"""A decoded datagram (PAGES parts come verified)."""

RESPONSE_DATAGRAMS_PER_REQUEST: Final = 8
"""Bound on the datagrams one GET answer may take, so a window of requests fits the socket."""


# -- operations and requests in flight ------------------------------------------------------------

_MISSING: Final = 1
_CORRUPT: Final = 2
_UNANSWERED: Final = 3


class _Op:
    """One submitted operation: its result and the requests still working for it."""

    __slots__ = ("done", "op_id", "requests")

    def __init__(self, op_id: int) -> None:
        self.op_id = op_id
        self.requests: set[_Request] = set()
        self.done = False


class _FetchOp(_Op):
    """The state of one GET operation."""

    __slots__ = ("asking", "hedge", "nodes", "open", "outbox", "pos", "reason", "result", "rows")

    def __init__(self, op_id: int, fetch: Fetch) -> None:
        super().__init__(op_id)
        self.nodes = fetch.nodes
        self.hedge = fetch.hedge
        self.rows: dict[bytes, list[int]] = dict(zip(fetch.digests, fetch.rows, strict=True))
        self.pos = dict.fromkeys(self.rows, 1)  # index in its row of the next replica to ask
        self.asking = dict.fromkeys(self.rows, 1)  # requests in flight that name it
        self.open = set(self.rows)  # neither found nor given up
        self.reason: dict[bytes, int] = {}  # why the last replica asked did not serve it
        self.result = GetResult()
        self.outbox: dict[Address, list[bytes]] = {}


class _SingleOp(_Op):
    """A HAS, PUT or NODE_INFO operation: requests to one node."""

    __slots__ = ("result",)

    def __init__(self, op_id: int, result: OperationResult) -> None:
        super().__init__(op_id)
        self.result = result


class _Request:
    """One request (with its retries) to one node: what the window counts."""

    __slots__ = (
        "address",
        "attempt",
        "datagrams",
        "deadline",
        "done",
        "ids",
        "op",
        "parts_left",
        "sent",
        "sent_at",
        "timer",
    )

    small: bool = False
    """Its answers are a few bytes (see :class:`RequestWindow`)."""

    def __init__(self, op: _Op, address: Address) -> None:
        self.op = op
        self.address = address
        self.attempt = 0
        self.datagrams = 0
        self.ids: list[int] = []
        self.parts_left: dict[int, int] = {}  # request id -> parts of its answer not yet seen
        self.sent_at = 0.0
        self.sent: list[float] = []  # when each of ``ids`` went out
        self.timer = 0  # sequence number of its live timer entry (0: none)
        self.deadline = 0.0  # of that timer
        self.done = False

    def message(self, request_id: int) -> wire.Message:
        """The request for what is still open."""
        raise NotImplementedError

    def absorb(self, engine: RequestEngine, message: _Answer) -> None:
        """Take in one datagram of the answer."""
        raise NotImplementedError

    def complete(self) -> bool:
        """Nothing is left to ask for."""
        raise NotImplementedError

    def give_up(self, engine: RequestEngine) -> None:
        """The node will not serve what is still open (an ERROR, or every attempt lost)."""
        raise NotImplementedError


class _Get(_Request):
    __slots__ = ("digests", "hedge", "hedged", "open")

    def __init__(self, op: _FetchOp, address: Address, digests: list[bytes], hedge: bool) -> None:
        super().__init__(op, address)
        self.digests = digests
        self.open = set(digests)
        self.hedge = hedge  # a hedge request is not hedged again and not held back
        self.hedged = False

    def message(self, request_id: int) -> wire.Message:
        open_ = self.open
        digests = tuple(PageDigest(d) for d in self.digests if d in open_)
        return wire.GetPages(request_id=request_id, digests=digests)

    def prune(self) -> None:
        """Drop digests a hedge (or another request) already resolved."""
        op = self.op
        assert isinstance(op, _FetchOp)
        self.open = {d for d in self.open if d in op.open}

    def absorb(self, engine: RequestEngine, message: _Answer) -> None:
        if not isinstance(message, VerifiedPages):
            return
        op = self.op
        assert isinstance(op, _FetchOp)
        found, open_, asking, op_open = op.result.pages, self.open, op.asking, op.open
        for digest, page in message.pages:  # verified by the burst decoder
            if digest in open_:
                open_.discard(digest)
                asking[digest] -= 1
                if digest in op_open:  # else a hedge was faster
                    found[digest] = page
                    op_open.discard(digest)
        corrupt = 0
        for digest in message.corrupt:
            if digest in open_:
                open_.discard(digest)
                asking[digest] -= 1
                if digest in op_open:
                    corrupt += 1
                    engine._reroute(op, digest, _CORRUPT)
        engine.stats.pages_received += len(message.pages) + len(message.corrupt)
        if corrupt:
            engine.stats.verification_failures += corrupt
            log.warning("node %s:%d served %d corrupt pages", *self.address, corrupt)
        for digest in message.missing:
            if digest in open_:
                open_.discard(digest)
                asking[digest] -= 1
                engine._reroute(op, digest, _MISSING)

    def complete(self) -> bool:
        return not self.open

    def give_up(self, engine: RequestEngine) -> None:
        op = self.op
        assert isinstance(op, _FetchOp)
        open_, self.open = self.open, set()
        for digest in open_:
            op.asking[digest] -= 1
        for digest in open_:
            engine._reroute(op, digest, _UNANSWERED)


class _Items(_Request):
    """A HAS or PUT request: items (digests) asked until some answer mentions each."""

    __slots__ = ("items", "open")

    def __init__(self, op: _SingleOp, address: Address, items: Sequence[bytes]) -> None:
        super().__init__(op, address)
        self.items = items
        self.open = set(items)

    def asked(self) -> tuple[bytes, ...]:
        open_ = self.open
        return tuple(d for d in self.items if d in open_)

    def complete(self) -> bool:
        return not self.open

    def give_up(self, engine: RequestEngine) -> None:
        result = _result(self.op)
        assert isinstance(result, HasResult | PutOutcome)
        result.unanswered |= self.open
        self.open = set()


class _Has(_Items):
    __slots__ = ("batches",)

    def __init__(self, op: _SingleOp, address: Address, items: Sequence[bytes]) -> None:
        super().__init__(op, address, items)
        self.batches: dict[int, tuple[bytes, ...]] = {}  # request id -> the digests it named

    def message(self, request_id: int) -> wire.Message:
        batch = self.batches[request_id] = self.asked()
        return wire.Has(request_id=request_id, digests=tuple(PageDigest(d) for d in batch))

    def absorb(self, engine: RequestEngine, message: _Answer) -> None:
        if not isinstance(message, wire.Have):
            return
        result = _result(self.op)
        assert isinstance(result, HasResult)
        batch = self.batches.get(message.request_id, ())
        covered = batch[message.first : message.first + len(message.held)]
        for digest, held in zip(covered, message.held, strict=False):
            (result.held if held else result.lacking).add(digest)
            self.open.discard(digest)


class _Put(_Items):
    __slots__ = ("pages",)
    small = True

    def __init__(self, op: _SingleOp, address: Address, pages: dict[bytes, bytes]) -> None:
        super().__init__(op, address, list(pages))
        self.pages = pages

    def message(self, request_id: int) -> wire.Message:
        pages = self.pages
        return wire.PutPages(
            request_id=request_id, pages=tuple((PageDigest(d), pages[d]) for d in self.asked())
        )

    def put_request(self, request_id: int) -> PutRequest:
        """:meth:`message` as the window encoder takes it (no message object)."""
        asked = self.asked()
        return request_id, asked, list(map(self.pages.__getitem__, asked))

    def absorb(self, engine: RequestEngine, message: _Answer) -> None:
        if not isinstance(message, wire.PutResult):
            return
        result = _result(self.op)
        assert isinstance(result, PutOutcome)
        results = message.results
        result.status.update(results)  # C-level, both: a publish absorbs every page R times
        self.open.difference_update([digest for digest, _ in results])


class _Ask(_Request):
    """A request answered by one datagram of one type (NODE_INFO, RECORD_PUT, RECORD_GET)."""

    __slots__ = ("answer", "answered", "build")
    small = True

    def __init__(
        self,
        op: _SingleOp,
        address: Address,
        build: Callable[[int], wire.Message],
        answer: type[wire.NodeInfo | wire.RecordPutResult | wire.Records | wire.RangeHashes],
    ) -> None:
        super().__init__(op, address)
        self.build = build
        self.answer = answer
        self.answered = False

    def message(self, request_id: int) -> wire.Message:
        return self.build(request_id)

    def absorb(self, engine: RequestEngine, message: _Answer) -> None:
        if isinstance(message, self.answer):
            assert isinstance(self.op, _SingleOp)
            self.op.result = message
            self.answered = True

    def complete(self) -> bool:
        return self.answered

    def give_up(self, engine: RequestEngine) -> None:
        self.answered = True  # with no answer: the result stays None


# -- the engine -----------------------------------------------------------------------------------


class RequestEngine:
    """Data-plane requests to store nodes, sans-IO (see the module docstring)."""

    def __init__(
        self,
        auth: Authenticator,
        config: EngineConfig | None = None,
        *,
        wall_clock: Callable[[], float] = time.time,
        first_request_id: int | None = None,
    ) -> None:
        """``auth`` seals and opens datagrams (one engine per socket). ``wall_clock`` stamps
        the auth blocks; ``first_request_id`` makes request ids predictable (tests)."""
        self.config = config or EngineConfig()
        self.auth = auth
        self.stats = EngineStats()
        self.window = RequestWindow(
            self.config.window,
            congestion=CongestionWindow(
                self.config.congestion_window, limit=self.config.max_congestion_window
            ),
        )
        self.rtt = RttEstimator(
            self.config.timeout, max(self.config.timeout, self.config.max_timeout)
        )
        self._wall = wall_clock
        self._next_id = secrets.randbits(63) if first_request_id is None else first_request_id
        self._next_op = 0
        self._now = 0.0
        self._pending: dict[int, _Request] = {}  # request id -> the request it belongs to
        self._ops: dict[int, _Op] = {}
        self._queues: dict[tuple[Address, bool], collections.deque[_Request]] = {}
        self._timers: list[tuple[float, int, _Request]] = []
        self._timer_seq = 0
        self._outbox: list[tuple[bytes, Address]] = []
        self._unsent: list[tuple[PutRequest, Address]] = []  # PUTs encoded together, see _seal
        self._events: collections.deque[Event] = collections.deque()
        self._avoid: dict[Address, float] = {}  # address -> until when it is asked last
        self._silent: dict[Address, int] = {}
        self._heard: dict[Address, float] = {}  # address -> when it last answered anything
        # address -> until when requests to a node that is behind wait for the one re-sent
        self._backoff: dict[Address, float] = {}
        # address -> the highest request id it answered: ids grow by one per datagram sent
        # (from a random 63-bit start, so they do not wrap), so a higher one went out later
        self._answered_id: dict[Address, int] = {}
        self._touched: set[_FetchOp] = set()
        self._closed = False
        self.get_batch = min(
            wire.max_pages_per_datagram(self.config.max_datagram) * RESPONSE_DATAGRAMS_PER_REQUEST,
            wire.max_digests_per_request(self.config.max_datagram),
        )
        """Digests per GET request: an answer stays within a few datagrams."""
        self.has_batch = wire.max_digests_per_request(self.config.max_datagram)
        """Digests per HAS request."""
        self.put_batch = wire.max_pages_per_datagram(self.config.max_datagram)
        """Pages per PUT request."""

    # -- inputs ------------------------------------------------------------------------------------

    def submit(self, operation: Operation, now: float) -> int:
        """Start an operation; returns its id, which its :class:`OperationDone` event carries."""
        if self._closed:
            raise TmdhtError("the request engine is closed")
        self._now = now
        self._next_op += 1
        op_id = self._next_op
        if isinstance(operation, Fetch):
            self._start_fetch(op_id, operation)
        elif isinstance(operation, HasQuery):
            op = self._single(op_id, HasResult())
            for batch in _batches(list(dict.fromkeys(operation.digests)), self.has_batch):
                self._add(_Has(op, operation.address, batch))
            self._check_single(op)
        elif isinstance(operation, Store):
            op = self._single(op_id, PutOutcome())
            pages = dict(operation.pages)
            for batch in _batches(list(pages), self.put_batch):
                self._add(_Put(op, operation.address, {d: pages[d] for d in batch}))
            self._check_single(op)
        else:
            op = self._single(op_id, None)
            self._add(_ask(op, operation))
        self._settle()
        self._seal()
        return op_id

    def receive_datagram(self, data: bytes, address: Address, now: float) -> None:
        """One datagram from ``address`` (host, port)."""
        self.receive_datagrams(((data, address),), now)

    def receive_datagrams(self, burst: Iterable[tuple[bytes, Address]], now: float) -> None:
        """Datagrams read together (one wake-up of the socket), in arrival order: decoded in
        one call (:func:`tmdht.net.burst.decode_burst`: natively where built, every page
        verified), then handled one by one."""
        self._now = now
        burst = list(burst)
        stats = self.stats
        stats.datagrams_received += len(burst)
        stats.bytes_received += sum(len(data) for data, _ in burst)
        decoded = decode_burst([data for data, _ in burst], auth=self.auth, now=self._wall())
        for (_, address), message in zip(burst, decoded, strict=True):
            if isinstance(message, DecodeError):
                stats.bad_datagrams += 1
                log.debug("dropped datagram from %s: %s", address, message)
                continue
            self._on_message(message, address)
        self._seal()

    def handle_timer(self, now: float) -> None:
        """Time passed: run every deadline up to ``now`` (hedges, timeouts)."""
        self._now = now
        timers = self._timers
        while timers and timers[0][0] <= now:
            _, seq, request = heapq.heappop(timers)
            if request.timer == seq and not request.done:
                request.timer = 0
                self._on_timer(request)
                self._settle()
        self._seal()

    def cancel(self, operation: int, now: float) -> None:
        """Forget an operation (its caller went away): its requests end, no event follows."""
        self._now = now
        op = self._ops.pop(operation, None)
        if op is None:
            return
        op.done = True
        for request in list(op.requests):
            if request.ids:
                self._finish(request)
            else:  # still queued: the pump drops it
                request.done = True
        op.requests.clear()
        self._settle()
        self._seal()

    def close(self, now: float) -> None:
        """The socket is gone: every operation ends with what it has (the rest unanswered)."""
        self._now = now
        self._closed = True
        for op in list(self._ops.values()):
            for request in list(op.requests):
                request.done = True
                if isinstance(request, _Get):
                    assert isinstance(op, _FetchOp)
                    for digest in request.open:
                        op.asking[digest] -= 1
                    request.open = set()
                else:
                    request.give_up(self)
            op.requests.clear()
            if isinstance(op, _FetchOp):
                for digest in op.open:
                    op.reason[digest] = _UNANSWERED
                op.open.clear()
                self._check_fetch(op)
            else:
                assert isinstance(op, _SingleOp)
                self._check_single(op)
        self._pending.clear()
        self._queues.clear()
        self._timers.clear()
        self._outbox.clear()
        self._unsent.clear()

    def avoid(self, address: Address, now: float) -> None:
        """Ask the node at ``address`` last for ``avoid_for`` seconds (the caller saw it fail)."""
        self._avoid[address] = now + self.config.avoid_for

    def reinstate(self, address: Address) -> None:
        """A node reported failed answered again (e.g. a probe): stop avoiding it."""
        self._avoid.pop(address, None)
        self._silent.pop(address, None)

    # -- outputs -----------------------------------------------------------------------------------

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Address]]:
        """Datagrams to send now, with their destinations."""
        out, self._outbox = self._outbox, []
        return out

    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` should next run (None: nothing is waiting)."""
        timers = self._timers
        while timers:
            _, seq, request = timers[0]
            if request.timer == seq and not request.done:
                return timers[0][0]
            heapq.heappop(timers)
        return None

    def next_event(self) -> Event | None:
        """The next thing that happened, in order, or None."""
        return self._events.popleft() if self._events else None

    # -- views -------------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran."""
        return self._closed

    def avoided(self, address: Address, now: float | None = None) -> bool:
        """True while a node that failed is asked last."""
        if not self._avoid:  # the common case, checked per digest
            return False
        until = self._avoid.get(address)
        if until is None:
            return False
        if until > (self._now if now is None else now):
            return True
        del self._avoid[address]  # expired: the common case comes back
        return False

    def timeout_for(self, address: Address, attempt: int = 0) -> float:
        """The timeout of attempt ``attempt`` (0 first) of a request to ``address``."""
        return self.rtt.timeout(address, attempt)

    @property
    def in_flight(self) -> int:
        """Requests sent and not yet ended."""
        return sum(1 for op in self._ops.values() for r in op.requests if r.ids and not r.done)

    # -- GET: routing ------------------------------------------------------------------------------

    def _start_fetch(self, op_id: int, fetch: Fetch) -> None:
        op = _FetchOp(op_id, fetch)
        self._ops[op_id] = op
        nodes, outbox, avoid = op.nodes, op.outbox, self._avoid
        # Every digest to its first replica (inlined _route: this loop runs once per page).
        for digest, row in op.rows.items():
            if not row:
                op.asking[digest] = 0
                op.open.discard(digest)
                op.reason[digest] = _UNANSWERED
                continue
            address = nodes[row[0]]
            if avoid and self.avoided(address):
                op.pos[digest] = 0
                op.asking[digest] = 0
                self._route(op, digest)
                continue
            entry = outbox.get(address)
            if entry is None:
                outbox[address] = [digest]
            else:
                entry.append(digest)
        self._flush(op)
        self._check_fetch(op)

    def _route(self, op: _FetchOp, digest: bytes) -> bool:
        """Put ``digest`` in the outbox for its next replica; False if none is left."""
        row, nodes = op.rows[digest], op.nodes
        pos = op.pos[digest]
        if pos >= len(row):
            return False
        if self.avoided(nodes[row[pos]]):  # a node that failed meanwhile: try it last
            for later in range(pos + 1, len(row)):
                if not self.avoided(nodes[row[later]]):
                    row[pos], row[later] = row[later], row[pos]
                    break
        address = nodes[row[pos]]
        op.pos[digest] = pos + 1
        op.asking[digest] += 1
        entry = op.outbox.get(address)
        if entry is None:
            op.outbox[address] = [digest]
        else:
            entry.append(digest)
        return True

    def _reroute(self, op: _FetchOp, digest: bytes, reason: int) -> None:
        """A request for ``digest`` ended without its page: try the next replica unless another
        request for it is still in flight."""
        op.reason[digest] = reason
        if digest not in op.open or op.asking[digest]:
            return
        if self._route(op, digest):
            self.stats.failovers += 1
        else:
            op.open.discard(digest)
        self._touched.add(op)

    def _flush(self, op: _FetchOp, *, hedge: bool = False) -> None:
        """Turn the outbox into requests (batches of at most ``get_batch`` digests)."""
        if not op.outbox:
            return
        outbox, op.outbox = op.outbox, {}
        size = self.get_batch
        for address, digests in outbox.items():
            for start in range(0, len(digests), size):
                self._add(_Get(op, address, digests[start : start + size], hedge))

    def _skip(self, get: _Get) -> bool:
        """A queued request to a node that failed meanwhile goes to the next replicas instead,
        unless it is some digest's last chance."""
        if not self.avoided(get.address):
            return False
        op = get.op
        assert isinstance(op, _FetchOp)
        if any(op.pos[d] >= len(op.rows[d]) for d in get.open):
            return False
        for digest in get.open:
            op.asking[digest] -= 1
            self._route(op, digest)
            self.stats.failovers += 1
        get.open.clear()
        return True

    # -- requests ----------------------------------------------------------------------------------

    def _single(self, op_id: int, result: OperationResult) -> _SingleOp:
        op = _SingleOp(op_id, result)
        self._ops[op_id] = op
        return op

    def _add(self, request: _Request) -> None:
        """A new request: send it if the window admits it, else queue it."""
        request.op.requests.add(request)
        if self.window.admits(request.address, small=request.small):
            self._open(request)
        else:
            key = (request.address, request.small)
            queue = self._queues.get(key)
            if queue is None:
                queue = self._queues[key] = collections.deque()
            queue.append(request)

    def _send_queued(self, request: _Request) -> None:
        """Send a request that waited in a queue, unless what it asks for was settled meanwhile
        (or, for a GET, its node failed meanwhile: its digests go to their next replicas)."""
        if request.done:
            return
        if isinstance(request, _Get):
            request.prune()
            if not request.open or (not request.hedge and self._skip(request)):
                request.done = True
                request.op.requests.discard(request)
                op = request.op
                assert isinstance(op, _FetchOp)
                self._touched.add(op)
                return
        self._open(request)

    def _open(self, request: _Request) -> None:
        """Take a window slot and send the first attempt."""
        if isinstance(request, _Get):
            self.stats.batches += 1
        self.window.opened(request.address, small=request.small)
        self._transmit(request)

    def _transmit(self, request: _Request) -> None:
        """Send (or re-send) the request for what is still open, and arm its timer."""
        self._next_id = request_id = (self._next_id + 1) & ((1 << 64) - 1)
        if isinstance(request, _Put):
            self._unsent.append((request.put_request(request_id), request.address))
        else:
            datagram = wire.encode(
                request.message(request_id),
                max_datagram=self.config.max_datagram,
                auth=self.auth,
                now=self._wall(),
            )
            self._outbox.append((datagram, request.address))
            self.stats.bytes_sent += len(datagram)
        self._pending[request_id] = request
        self.stats.datagrams_sent += 1
        self.stats.requests += 1
        request.ids.append(request_id)
        request.sent_at = now = self._now
        request.sent.append(now)
        floor = self._timeout_floor(request)
        delay = self.rtt.timeout(request.address, request.attempt, floor=floor)
        if (
            isinstance(request, _Get)
            and self._may_hedge(request)
            and self.config.hedge_after < delay
        ):
            delay = self.config.hedge_after
        self._arm(request, now + delay)

    def _seal(self) -> None:
        """Encode the PUTs an input sent in one call (:func:`tmdht.net.burst.encode_put_requests`:
        natively where built, every datagram sealed there). A publish sends a PUT per answer,
        dozens per burst; encoding each with :func:`tmdht.wire.encode` was about 40 % of the
        engine's CPU per PUT. Runs at the end of every input, so errors still surface there."""
        unsent = self._unsent
        if not unsent:
            return
        self._unsent = []
        datagrams = encode_put_requests(
            [request for request, _ in unsent],
            max_datagram=self.config.max_datagram,
            auth=self.auth,
            now=self._wall(),
        )
        self.stats.bytes_sent += sum(map(len, datagrams))
        self._outbox += zip(datagrams, [address for _, address in unsent], strict=True)

    def _may_hedge(self, get: _Get) -> bool:
        op = get.op
        assert isinstance(op, _FetchOp)
        return op.hedge and not get.hedge and not get.hedged and self.config.hedge_after > 0

    def _arm(self, request: _Request, deadline: float) -> None:
        self._timer_seq += 1
        request.timer = self._timer_seq
        request.deadline = deadline
        heapq.heappush(self._timers, (deadline, self._timer_seq, request))

    def _on_message(self, message: _Answer, address: Address) -> None:
        self._heard[address] = self._now  # authenticated: the node is alive (if slow)
        request = self._pending.get(message.request_id)
        if request is None or request.address != address:
            self.stats.unexpected += 1  # a late answer to a retried request, or a stranger
            return
        if not request.datagrams:
            # From the attempt this answers (ids tell attempts apart, so unlike TCP a retried
            # request still measures the node's real round trip, queueing included).
            attempt = request.ids.index(message.request_id)
            sample = self._now - request.sent[attempt]
            if message.request_id > self._answered_id.get(address, -1):
                self._answered_id[address] = message.request_id
            late = self.rtt.late(address, sample, floor=self._timeout_floor(request))
            self.rtt.observe(address, sample)
            self._silent.pop(address, None)
            self.window.answered(address, grow=not late)
        request.datagrams += 1
        request_id = message.request_id
        parts = getattr(message, "parts", 1)
        left = request.parts_left.get(request_id, parts) - 1
        request.parts_left[request_id] = left
        if isinstance(message, wire.Error):
            log.info("node %s:%d: %s (%s)", *address, message.message, message.code.name)
            request.give_up(self)
        else:
            request.absorb(self, message)
        if request.complete():
            self._finish(request)
        elif left <= 0 and request_id == request.ids[-1]:
            # The whole answer is in and some items were in no part (parts were lost): ask for
            # exactly those again now rather than at the timeout.
            self._congested(request, lost_parts=True)
            self._retry_or_fail(request)
        self._settle()

    def _on_timer(self, request: _Request) -> None:
        if isinstance(request, _Get):
            request.prune()
            if not request.open:
                self._finish(request)
                return
            if self._may_hedge(request) and not request.datagrams:
                request.hedged = True
                op = request.op
                assert isinstance(op, _FetchOp)
                hedged = False
                for digest in request.open:
                    hedged |= self._route(op, digest)
                if hedged:
                    self.stats.hedges += len(op.outbox)
                    self._flush(op, hedge=True)
                    self._touched.add(op)
                timeout = self.rtt.timeout(request.address, request.attempt)
                self._arm(request, request.sent_at + max(timeout, self.config.hedge_after))
                return
        behind = not isinstance(request, _Get) and not self._later_answered(request)
        if behind:
            # No request sent to the node after this one was answered: it is behind (or
            # silent), not losing datagrams. If another request to it timed out and was sent
            # again meanwhile, this one waits for that one's answer or timeout (as TCP keeps
            # one retransmission timer per connection): when every node of a loaded host
            # stalled for a second (32 nodes on 2 cores, a burst of other work), each request in
            # flight timed out and was sent again, hundreds of duplicate PUTs queued behind the
            # ones the nodes still held. Once that one failed for good, the rest end at once.
            until = self._backoff.get(request.address)
            if until is not None and until > self._now:
                self._arm(request, until)
                return
            if until is not None and request.sent_at < until and self.avoided(request.address):
                request.give_up(self)  # it waited for one that failed (not a later probe)
                self._finish(request)
                return
        self.stats.timeouts += 1
        self._congested(request)
        self._retry_or_fail(request)
        if behind and not request.done:  # sent again: the others wait for its answer or timeout
            self._backoff[request.address] = request.deadline

    def _congested(self, request: _Request, *, lost_parts: bool = False) -> None:
        """A loss (a timeout, or parts of an answer missing): the node's congestion window
        halves, and the client-wide one too if datagrams were lost for sure -- parts of an
        answer missing, or a request sent *after* this one to the same node already answered
        (as TCP infers a loss from later segments acknowledged). A node that answers in order
        but later than the timeout is slow (its queue is long, its process starved of CPU):
        its own window shrinks, the others' requests are not slowed for it, and one silent
        throughout is down or drowning, its own problem too."""
        shared = lost_parts or self._later_answered(request)
        if self.window.lost(request.address, request.sent_at, self._now, shared=shared):
            self.stats.window_decreases += 1

    def _later_answered(self, request: _Request) -> bool:
        """True if the node answered a request sent after the latest attempt of ``request``
        (request ids grow with every datagram sent): evidence that this one was lost."""
        return self._answered_id.get(request.address, -1) > request.ids[-1]

    def _timeout_floor(self, request: _Request) -> float | None:
        """The floor of ``request``'s timeout: a PUT's own (a node answers it after its group
        commit's fsync), else the estimator's (None)."""
        return self.config.put_timeout if isinstance(request, _Put) else None

    def _retry_or_fail(self, request: _Request) -> None:
        if isinstance(request, _Get):
            request.prune()  # a hedge may have served some meanwhile
            if not request.open:
                self._finish(request)
                return
        request.attempt += 1
        limit = self.config.attempts
        if (
            not isinstance(request, _Get)
            and self._heard.get(request.address, -1.0) > request.sent[0]
        ):
            # The node answered other requests since this one went out: it is alive, only
            # slow (a GET fails over to another replica instead; a PUT has nowhere else to go).
            limit += self.config.alive_attempts
        if request.attempt < limit:
            self.stats.retries += 1
            self._transmit(request)
            return
        if request.datagrams == 0:
            self._node_failed(request.address)  # not one datagram in every attempt: it is down
        request.give_up(self)
        self._finish(request)

    def _node_failed(self, address: Address) -> None:
        """The node at ``address`` sent nothing through every attempt of a request (or let
        hedges win its batches too often): avoid it, report it, and end the HAS, PUT and other
        single-node requests still queued for it as unanswered now. Each would otherwise wait
        its turn in the node's window (one request, once its window has shrunk) and time out
        through every attempt: a publish that lost a replica mid-way waited a minute for the
        ~140 PUTs queued to it. Its queued GETs go to their next replicas when their turn
        comes (``_skip``); requests in flight end at their own timeouts."""
        self.avoid(address, self._now)
        self._events.append(NodeFailed(address))
        queue = self._queues.pop((address, True), None)
        bulky = self._queues.pop((address, False), None)
        kept: collections.deque[_Request] = collections.deque()
        for request in [*(queue or ()), *(bulky or ())]:
            if request.done:
                continue
            if isinstance(request, _Get):
                kept.append(request)
                continue
            request.done = True
            request.give_up(self)
            op = request.op
            assert isinstance(op, _SingleOp)
            op.requests.discard(request)
            self._check_single(op)
        if kept:
            self._queues[(address, False)] = kept

    def _finish(self, request: _Request) -> None:
        """The request is over: free its window slot and send what waited for it."""
        if request.done:
            return
        request.done = True
        request.timer = 0
        op = request.op
        op.requests.discard(request)
        address = request.address
        if isinstance(request, _Get):
            assert isinstance(op, _FetchOp)
            self._touched.add(op)
            if request.hedged and request.ids and not request.datagrams:
                # Its hedges did its work while it said nothing. A node that keeps losing like
                # this is failed, or every later batch would wait ``hedge_after`` for it.
                silent = self._silent[address] = self._silent.get(address, 0) + 1
                if silent >= self.config.silent_limit and not self.avoided(address):
                    self._node_failed(address)
        else:
            assert isinstance(op, _SingleOp)
            self._check_single(op)
        for request_id in request.ids:
            self._pending.pop(request_id, None)
        if request.ids:  # it was sent: it held a slot
            self.window.closed(address, small=request.small, lost=not request.datagrams)
            if request.small and request.datagrams:
                self._pump(first=(address, True))
            else:
                self._pump()

    def _pump(self, first: tuple[Address, bool] | None = None) -> None:
        """Send queued requests while the window allows, one per node in turn: a node whose
        request was sent goes to the back, so when the congestion window is what limits, its
        slots rotate over every node with work instead of staying with the nodes that held
        them. Only nodes with a queue are visited (``_queues`` holds no empty queue). Sending
        only fills windows, so a queue the window refused once is not asked again in this call
        (a publish pumps after every answer, and re-asking every refused node in a second pass
        was most of the pump's cost).

        ``first``: the queue of a node whose small request (a PUT) was just answered gets the
        slot back first, while the node holds less than its share of the window among the
        nodes with work queued. A node answers a group commit's PUTs together; handing their
        slots round-robin sent each to another node, so PUTs reached every node one at a time
        and each group commit (one fsync) held one or two of them (32 nodes: 8.7 pages per
        commit, 8 nodes: 37-73). Given back, a node's answers bring its next PUTs together."""
        queues = self._queues
        window = self.window
        if (
            first is not None
            and first in queues
            and window.in_flight(first[0]) * len(queues) < window.congestion.allowed
            and window.admits(first[0], small=first[1])
        ):
            queue = queues[first]
            self._send_queued(queue.popleft())
            if not queue:
                del queues[first]
        refused: set[tuple[Address, bool]] = set()
        for _ in range(sum(map(len, queues.values())) + 1):  # each pass sends one or ends
            if not queues or not window.has_room(small=True):
                return
            sent = False
            for key in list(queues):
                if key in refused:
                    continue
                address, key_small = key
                if not window.admits(address, small=key_small):
                    refused.add(key)
                    continue
                queue = queues.pop(key)
                self._send_queued(queue.popleft())
                sent = True
                if queue:
                    queues[key] = queue  # to the back: round-robin over nodes
                if not window.has_room(small=True):
                    return
            if not sent:
                return

    def _settle(self) -> None:
        """After an input: turn rerouted digests into requests, end what is complete."""
        while self._touched:
            op = self._touched.pop()
            if not op.done:
                self._flush(op)
                self._check_fetch(op)

    def _check_fetch(self, op: _FetchOp) -> None:
        if op.open or op.done:
            return
        op.done = True
        self._ops.pop(op.op_id, None)
        for request in list(op.requests):
            if request.ids:
                self._finish(request)
            else:
                request.done = True
        op.requests.clear()
        result = op.result
        for digest, reason in op.reason.items():
            if digest in result.pages:
                continue
            if reason == _MISSING:
                result.missing.add(digest)
            elif reason == _CORRUPT:
                result.corrupt.add(digest)
            else:
                result.unanswered.add(digest)
        self._events.append(OperationDone(op.op_id, result))

    def _check_single(self, op: _SingleOp) -> None:
        if op.requests or op.done:
            return
        op.done = True
        self._ops.pop(op.op_id, None)
        self._events.append(OperationDone(op.op_id, op.result))


def _ask(op: _SingleOp, operation: InfoQuery | RecordWrite | RecordRead | RangeRead) -> _Ask:
    """The one request of a NODE_INFO, RECORD_PUT, RECORD_GET or RANGE_HASH operation."""
    if isinstance(operation, RangeRead):
        r = operation
        return _Ask(
            op,
            r.address,
            lambda rid: wire.RangeHashQuery(
                request_id=rid, bucket_bits=r.bucket_bits, group_bits=r.group_bits,
                first=r.first, groups=r.groups, mask=r.mask,
            ),
            wire.RangeHashes,
        )
    if isinstance(operation, InfoQuery):
        return _Ask(op, operation.address, lambda rid: wire.NodeInfoRequest(request_id=rid),
                    wire.NodeInfo)
    if isinstance(operation, RecordWrite):
        key, entry = operation.key, operation.entry
        return _Ask(
            op,
            operation.address,
            lambda rid: wire.RecordPut(
                request_id=rid, key=key, entry_id=entry.entry_id, version=entry.version,
                ttl_ms=entry.ttl_ms, value=entry.value,
            ),
            wire.RecordPutResult,
        )
    key = operation.key
    return _Ask(op, operation.address, lambda rid: wire.RecordGet(request_id=rid, key=key),
                wire.Records)


def _result(op: _Op) -> OperationResult:
    assert isinstance(op, _SingleOp)
    return op.result


def _batches(items: list[bytes], size: int) -> list[list[bytes]]:
    return [items[i : i + size] for i in range(0, len(items), size)]
