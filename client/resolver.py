"""The resolution engine: one ``resolve`` call's GET requests, driven by datagrams and timers.

:class:`Resolver` turns a set of digests, each with its replica list (closest first), into GET
requests to store nodes and gathers the verified pages. It is callback driven: answers are
handled in the socket's datagram callback and deadlines by one loop timer per request, so a
batch costs one future however many requests, hedges and retries it takes (the coroutine-per-
request version spent ~500 Python calls and ~350 µs of CPU on a one-page get).

Per request (:class:`_Get`, a batch of digests for one node):

- **Windows.** At most ``window`` requests are in flight per node and ``total`` across nodes (all
  answers land in one socket buffer); the rest wait in a per-node queue.
- **Hedging.** ``hedge_after`` seconds after a request went out without its answer, each of its
  open digests is also asked of its next replica; the first verified page wins.
- **Retries.** At the node's adaptive timeout the digests nobody answered are asked again (a lost
  datagram), up to ``attempts`` times; answers to earlier attempts still count.
- **Failover.** A digest the node misses, serves corrupt (wrong BLAKE3) or never answers goes to
  its next replica. A node that never answers is reported failed (the caller avoids and probes
  it); so is one that stays silent while hedges win its batches ``silent_limit`` times in a row.
- A digest is *unavailable* when its replica list is used up with no verified page.

The zero page, the cache and the membership view stay with :class:`TemplateStoreClient`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Final

from blake3 import blake3

from tmdht import wire
from tmdht.client.dataplane import Address, DataPlaneClient
from tmdht.pages import PageDigest

if TYPE_CHECKING:
    from tmdht.client.store import ClientMetrics
    from tmdht.node.overlay import Member

__all__ = ["Resolver"]

log = logging.getLogger("tmdht.client")

SILENT_LIMIT: Final = 3
"""Batches in a row a node lets its hedges win without answering before it is reported failed."""


class _Run:
    """The state of one resolve call."""

    __slots__ = (
        "asking",
        "failed",
        "found",
        "future",
        "gets",
        "open",
        "outbox",
        "pos",
        "rows",
        "view",
    )

    def __init__(self, view: Sequence[Member]) -> None:
        self.view = view
        self.rows: dict[bytes, list[int]] = {}  # digest -> indices into view, closest first
        self.pos: dict[bytes, int] = {}  # digest -> index in its row of the next replica to ask
        self.asking: dict[bytes, int] = {}  # digest -> requests in flight that name it
        self.open: set[bytes] = set()  # neither found nor given up
        self.found: dict[bytes, bytes] = {}
        self.failed: set[bytes] = set()
        self.gets: set[_Get] = set()
        self.outbox: dict[Address, tuple[Member, list[bytes]]] = {}
        self.future: asyncio.Future[None] = asyncio.get_running_loop().create_future()


class _Get:
    """One GET request (with its retries) to one node; the data-plane client routes answers here
    by request id (``address`` and ``add`` are what it needs)."""

    __slots__ = (
        "address",
        "attempt",
        "datagrams",
        "digests",
        "done",
        "engine",
        "hedge",
        "hedged",
        "ids",
        "node",
        "open",
        "parts_left",
        "run",
        "sent_at",
        "timer",
    )

    def __init__(
        self, engine: Resolver, run: _Run, node: Member, digests: list[bytes], *, hedge: bool
    ) -> None:
        self.engine = engine
        self.run = run
        self.node = node
        self.address: Address = node.data_address
        self.digests = digests
        self.open = set(digests)
        self.hedge = hedge  # a hedge request is not hedged again and not held back
        self.hedged = False
        self.attempt = 0
        self.datagrams = 0
        self.ids: list[int] = []
        self.parts_left: dict[int, int] = {}  # request id -> parts of its answer not yet seen
        self.sent_at = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.done = False

    def add(self, part: int, parts: int, message: wire.Message) -> None:
        self.engine._on_answer(self, parts, message)

    def abort(self) -> None:
        self.engine._on_abort(self)


class Resolver:
    """GET requests for :class:`TemplateStoreClient.resolve` (see the module docstring)."""

    def __init__(
        self,
        dataplane: DataPlaneClient,
        metrics: ClientMetrics,
        *,
        hedge_after: float,
        avoided: Callable[[Member], bool],
        failed: Callable[[Member], None],
        silent_limit: int = SILENT_LIMIT,
    ) -> None:
        """``avoided(node)``: the caller avoids it now; ``failed(node)``: it did not answer."""
        self.dataplane = dataplane
        self.metrics = metrics
        self.hedge_after = hedge_after
        self.avoided = avoided
        self.failed = failed
        self.silent_limit = silent_limit
        self.batch = dataplane.get_batch_size()
        self.window = dataplane.window
        self.total = dataplane.total_window
        self._in_flight: dict[Address, int] = collections.defaultdict(int)
        self._total_in_flight = 0
        self._queues: dict[Address, collections.deque[_Get]] = {}
        self._silent: dict[Address, int] = {}

    # -- API -----------------------------------------------------------------------------------

    async def resolve(
        self, digests: Sequence[bytes], rows: Sequence[list[int]], view: Sequence[Member]
    ) -> tuple[dict[bytes, bytes], set[bytes]]:
        """Fetch ``digests`` (distinct, non-zero) from their replicas: ``rows[i]`` lists indices
        into ``view`` for ``digests[i]``, closest first (the lists are the engine's to reorder).
        Returns (verified pages, unavailable digests)."""
        run = _Run(view)
        run.rows = dict(zip(digests, rows, strict=True))
        run.open.update(run.rows)
        run.pos = dict.fromkeys(run.rows, 1)
        run.asking = dict.fromkeys(run.rows, 1)
        # Every digest to its first replica (inlined _route: this loop runs once per page).
        avoided, outbox = self.avoided, run.outbox
        for digest, row in run.rows.items():
            if not row:
                run.asking[digest] = 0
                run.open.discard(digest)
                run.failed.add(digest)
                continue
            node = view[row[0]]
            if avoided(node):
                run.pos[digest] = 0
                run.asking[digest] = 0
                self._route(run, digest)
                continue
            entry = outbox.get(node.data_address)
            if entry is None:
                outbox[node.data_address] = (node, [digest])
            else:
                entry[1].append(digest)
        self._flush(run)
        try:
            if run.open:
                await run.future
        finally:
            self._close(run)
        return run.found, run.failed

    # -- routing -------------------------------------------------------------------------------

    def _route(self, run: _Run, digest: bytes) -> bool:
        """Put ``digest`` in the outbox for its next replica; False if none is left."""
        row, view = run.rows[digest], run.view
        pos = run.pos[digest]
        if pos >= len(row):
            return False
        if self.avoided(view[row[pos]]):  # a node that failed meanwhile: try it last
            for later in range(pos + 1, len(row)):
                if not self.avoided(view[row[later]]):
                    row[pos], row[later] = row[later], row[pos]
                    break
        node = view[row[pos]]
        run.pos[digest] = pos + 1
        run.asking[digest] += 1
        entry = run.outbox.get(node.data_address)
        if entry is None:
            run.outbox[node.data_address] = (node, [digest])
        else:
            entry[1].append(digest)
        return True

    def _give_up_or_reroute(self, run: _Run, digest: bytes) -> None:
        """A request for ``digest`` ended without its page: try the next replica unless another
        request for it is still in flight."""
        if digest not in run.open or run.asking[digest]:
            return
        if self._route(run, digest):
            self.metrics.failovers.inc()
        else:
            run.open.discard(digest)
            run.failed.add(digest)

    def _flush(self, run: _Run, *, hedge: bool = False) -> None:
        """Turn the outbox into requests (batches of at most ``batch`` digests)."""
        if not run.outbox:
            return
        outbox, run.outbox = run.outbox, {}
        size = self.batch
        for node, digests in outbox.values():
            for start in range(0, len(digests), size):
                get = _Get(self, run, node, digests[start : start + size], hedge=hedge)
                run.gets.add(get)
                self._submit(get)

    def _submit(self, get: _Get) -> None:
        if self._in_flight[get.address] < self.window and self._total_in_flight < self.total:
            self._send(get)
        else:
            queue = self._queues.get(get.address)
            if queue is None:
                queue = self._queues[get.address] = collections.deque()
            queue.append(get)

    def _send(self, get: _Get) -> None:
        if get.done:
            return
        run = get.run
        if self.dataplane.closed:  # closed while this request waited in a queue
            self._abort(run)
            get.done = True
            run.gets.discard(get)
            return
        get.open = {d for d in get.open if d in run.open}
        if not get.open or (not get.hedge and self._skip(get)):
            self._finish(get)
            self._flush(run)
            self._check(run)
            return
        self._in_flight[get.address] += 1
        self._total_in_flight += 1
        self.metrics.batches.inc()
        self._transmit(get)

    def _skip(self, get: _Get) -> bool:
        """A queued request to a node that failed meanwhile goes to the next replicas instead,
        unless it is some digest's last chance."""
        if not self.avoided(get.node):
            return False
        run = get.run
        if any(run.pos[d] >= len(run.rows[d]) for d in get.open):
            return False
        for digest in get.open:
            run.asking[digest] -= 1
            self._route(run, digest)
            self.metrics.failovers.inc()
        get.open.clear()
        return True

    def _transmit(self, get: _Get) -> None:
        """Send (or re-send) the request for the digests still open, and arm its timer."""
        digests = tuple(PageDigest(d) for d in get.digests if d in get.open)
        rid = self.dataplane.send_request(
            get.address, lambda r: wire.GetPages(request_id=r, digests=digests), get
        )
        get.ids.append(rid)
        get.sent_at = time.perf_counter()
        loop = asyncio.get_running_loop()
        can_hedge = not get.hedge and not get.hedged and self.hedge_after > 0
        delay = self.dataplane.timeout_for(get.address, get.attempt)
        if can_hedge and self.hedge_after < delay:
            delay = self.hedge_after
        get.timer = loop.call_later(delay, self._on_timer, get)

    # -- events --------------------------------------------------------------------------------

    def _on_answer(self, get: _Get, parts: int, message: wire.Message) -> None:
        if get.done:
            return
        run = get.run
        if not get.datagrams:
            self.dataplane.observe_rtt(get.address, time.perf_counter() - get.sent_at)
            self._silent.pop(get.address, None)
        get.datagrams += 1
        rid = message.request_id
        left = get.parts_left.get(rid, parts) - 1
        get.parts_left[rid] = left
        if isinstance(message, wire.Pages):
            found, open_ = run.found, get.open
            corrupt = 0
            for digest, page in message.pages:
                if digest not in open_:
                    continue
                open_.discard(digest)
                run.asking[digest] -= 1
                if digest not in run.open:
                    continue  # a hedge was faster
                if blake3(page).digest() == digest:
                    found[digest] = page
                    run.open.discard(digest)
                else:
                    corrupt += 1
                    self._give_up_or_reroute(run, digest)
            self.dataplane.stats.pages_received += len(message.pages)
            if corrupt:
                self.dataplane.stats.verification_failures += corrupt
                self.metrics.verification_failures.inc(corrupt)
                log.warning("node %s served %d corrupt pages", get.node.node_id.hex()[:16], corrupt)
            for digest in message.missing:
                if digest in open_:
                    open_.discard(digest)
                    run.asking[digest] -= 1
                    self._give_up_or_reroute(run, digest)
        elif isinstance(message, wire.Error):
            log.info("node %s:%d: %s (%s)", *get.address, message.message, message.code.name)
            self._drop_open(get)
        if get.open and left <= 0 and rid == get.ids[-1]:
            # The whole answer is in and some digests were in no part (parts were lost): ask
            # for exactly those again now rather than at the timeout.
            self._retry_or_fail(get)
        elif not get.open:
            self._finish(get)
        self._flush(run)
        self._check(run)

    def _on_timer(self, get: _Get) -> None:
        get.timer = None
        if get.done:
            return
        run = get.run
        get.open = {d for d in get.open if d in run.open}
        if not get.open:
            self._finish(get)
        elif not get.hedge and not get.hedged and self.hedge_after > 0 and not get.datagrams:
            get.hedged = True
            hedged = False
            for digest in get.open:
                hedged |= self._route(run, digest)
            if hedged:
                self.metrics.hedges.inc(len(run.outbox))
                self._flush(run, hedge=True)
            remaining = self.dataplane.timeout_for(get.address, get.attempt) - self.hedge_after
            loop = asyncio.get_running_loop()
            get.timer = loop.call_later(max(0.0, remaining), self._on_timer, get)
        else:
            self.dataplane.stats.timeouts += 1
            self._retry_or_fail(get)
        self._flush(run)
        self._check(run)

    def _on_abort(self, get: _Get) -> None:
        """The socket closed under a request: its run's digests cannot be fetched any more."""
        self._abort(get.run)
        self._finish(get)

    def _abort(self, run: _Run) -> None:
        run.failed |= run.open
        run.open.clear()
        self._check(run)

    def _retry_or_fail(self, get: _Get) -> None:
        get.attempt += 1
        if get.attempt < self.dataplane.attempts:
            self.dataplane.retried()
            if get.timer is not None:
                get.timer.cancel()
            self._transmit(get)
            return
        if get.datagrams == 0:
            self.failed(get.node)  # not one datagram in every attempt: the node is down
        self._drop_open(get)

    def _drop_open(self, get: _Get) -> None:
        """The node will not serve the request's open digests: fail them over."""
        run = get.run
        open_, get.open = get.open, set()
        for digest in open_:
            run.asking[digest] -= 1
        for digest in open_:
            self._give_up_or_reroute(run, digest)
        self._finish(get)

    def _finish(self, get: _Get) -> None:
        """The request is over: free its window slot and send what waited for it."""
        if get.done:
            return
        get.done = True
        if get.timer is not None:
            get.timer.cancel()
            get.timer = None
        if get.hedged and get.ids and not get.datagrams:
            # Its hedges did its work while it said nothing. A node that keeps losing like this
            # is reported failed, or every later batch would wait ``hedge_after`` for it.
            silent = self._silent[get.address] = self._silent.get(get.address, 0) + 1
            if silent >= self.silent_limit and not self.avoided(get.node):
                self.failed(get.node)
        for rid in get.ids:
            self.dataplane.forget(rid)
        get.run.gets.discard(get)
        if get.ids:  # it was sent: it held a slot
            self._in_flight[get.address] -= 1
            self._total_in_flight -= 1
            self._pump(get.address)

    def _pump(self, first: Address) -> None:
        """Send queued requests while the windows allow, ``first``'s queue first. Only nodes
        with a queue are visited (``_queues`` holds no empty queue)."""
        if not self._queues:
            return
        order = [first, *(a for a in self._queues if a != first)]
        for address in order:
            queue = self._queues.get(address)
            while queue and self._total_in_flight < self.total:
                if self._in_flight[address] >= self.window:
                    break
                self._send(queue.popleft())
            if queue is not None and not queue and self._queues.get(address) is queue:
                del self._queues[address]
            if self._total_in_flight >= self.total:
                return

    def _check(self, run: _Run) -> None:
        if not run.open and not run.future.done():
            run.future.set_result(None)

    def _close(self, run: _Run) -> None:
        """End every request of a finished (or cancelled) run."""
        for get in list(run.gets):
            if get.ids:
                self._finish(get)
            else:  # still queued: _pump drops it
                get.done = True
                run.gets.discard(get)
