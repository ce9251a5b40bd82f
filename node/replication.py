"""Replication maintenance: keep every page on its R closest live nodes.

A *sweep* (``anti_entropy="range"``, the default) compares bucket hashes with each replica
(:mod:`tmdht.rangehash`): the store keeps per key-space bucket the count and XOR of the digests
it holds (:mod:`tmdht.node.buckets`); for every peer it shares buckets with, the node asks the
peer's hashes of the buckets both should hold (RANGE_HASH), descends only into the groups that
differ, and for the buckets that differ asks which pages the peer lacks (HAS) and sends them
(PUT) -- if it is the bucket's designated source for that peer, or if the bucket still differs
``max(interval, grace)`` later. Pages in buckets this node no longer owes, or whose replica set
is not the same across the bucket, go through the per-page path below. A quiet cluster's sweep
costs a datagram or two per peer. A bucket that differs while this node is writing to it (written
since the sweep began, or holding pages still due their fresh check) differs because writes are
in flight: it is left to the next sweep, once (the next sweep repairs it whatever it sees).

Pages a client stored here are checked on their other replicas a second or more later (*fresh*
checks, batched: one HAS per replica for up to FRESH_CHUNK pages); a page a replica lacks then is
sent only if it still lacks it FRESH_RECHECK later, as the client writes every replica itself
and its PUTs to the others may simply not have arrived yet.

The per-page path (and the whole sweep with ``anti_entropy="full"``, the earlier behaviour) walks
digests in order, a chunk at a time (short read transactions, no full scan held in memory). For
each chunk it computes the replica set of every page from the current membership and the
members' failure domains (a :class:`tmdht.placement.Ring` per membership view, the same
placement clients compute), asks each other replica which of those pages it holds (HAS), and
sends it the ones it lacks (PUT). So:

- a node that joins receives, from every node holding them, the pages it is now responsible for;
- when a node disappears, the survivors find the new members of each replica set lacking and
  restore R copies;
- a page this node no longer owes (all R replicas confirmed holding it) is kept for a grace
  period and then dropped; if this node becomes responsible again first, it is kept.

Sweeps run when membership changes (a joined or departed member wakes the job; a change during a
sweep restarts it) and otherwise every ``interval`` seconds as anti-entropy. Pages moved are
rate-limited (``rate`` pages per second). The job is one task owned by the node, cancelled on
shutdown.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np

from tmdht import wire
from tmdht.aio.dataplane import DataPlaneClient
from tmdht.net.address import Address
from tmdht.net.membership import Member
from tmdht.net.operations import RangeRead
from tmdht.node.metrics import NodeMetrics
from tmdht.node.storage import PageStore
from tmdht.placement import VIRTUAL_IDS, Ring
from tmdht.rangehash import (
    BUCKET_BITS,
    BucketOwners,
    BucketTable,
    RangeComparison,
    bucket_of,
    bucket_prefix,
    buckets_of,
    designated_source,
)

__all__ = ["Replicator", "SweepReport", "sweep_log_level"]

log = logging.getLogger("tmdht.node.replication")

CHUNK: Final = 1024
"""Digests examined per step of a sweep."""
PUSH_BATCH: Final = 256
"""Pages read from the store and PUT to a replica per step (bounds memory and each burst)."""
FRESH_DELAY: Final = 1.0
"""Seconds between a client's PUT and the check that its pages are on their replicas."""
FRESH_MAX_DELAY: Final = 5.0
"""Seconds a stored page may wait for that check while fewer than FRESH_CHUNK pages are due: the
checks of many commits go out together, as one HAS per replica. Checked one commit at a time,
a node asked every other replica about a handful of digests after each small group commit, so
with 32 nodes the HAS traffic of a publish outgrew its PUT traffic (bench/publish_scale.py)."""
FRESH_SPREAD: Final = 0.5
"""Each round a node waits FRESH_MAX_DELAY times 1 to 1 + FRESH_SPREAD (drawn per round, from
a generator seeded with its id): nodes that began storing together -- every node of a publish
-- would otherwise check at the same moments, and 32 nodes on one host each checking ~1,000
pages with ~31 HAS stalled the host for a second, long enough for every PUT in flight to time
out (bench/publish_scale.py)."""
FRESH_CHUNK: Final = 4096
"""Due fresh pages that are checked at once instead of waiting for FRESH_MAX_DELAY, and the most
one check round takes. A round asks every replica it shares pages with (with virtual IDs, about
every other member), so its cost is one HAS per peer whatever the pages: counting *all* waiting
pages against CHUNK (1024) let a busy node check every second, each round taking only the few
hundred pages due by then (0.44 HAS per page published, 32 nodes, V=16). 4096 pages spread over
31 peers is ~260 digests per HAS, well within one datagram."""
FRESH_RECHECK: Final = 10.0
"""Seconds before a fresh page a replica lacked at its check is checked again, and only then
sent. A publish writes every replica itself, but not at the same moment: on a loaded ring (32
nodes on 2 cores) one replica of a page may get it tens of seconds after another, so the first
check found many pages "lacking" that were on their way, and the nodes sent them again beside
the client (bench/publish_scale.py: copied pages per page published)."""


@dataclass
class SweepReport:
    """What one sweep did."""

    examined: int = 0
    copied: int = 0
    under_replicated: int = 0
    dropped: int = 0
    unanswered: int = 0
    complete: bool = False
    seconds: float = 0.0
    compared_buckets: int = 0
    """Buckets compared by hash with some peer (range sweeps)."""
    differing_buckets: int = 0
    """(peer, bucket) pairs whose hashes differed."""
    deferred_buckets: int = 0
    """(peer, bucket) pairs left to their designated source this sweep."""
    in_flight_buckets: int = 0
    """(peer, bucket) pairs left to the next sweep because this node wrote the bucket since the
    sweep began or holds pages there still due a fresh check: they differ because writes are in
    flight (a pair is left so once; the next sweep repairs it if it still differs)."""


def sweep_log_level(report: SweepReport, previous: SweepReport | None) -> int:
    """INFO for a sweep that moved or dropped pages or found a different number of pages short
    of replicas than the last one; DEBUG for the quiet ones (every few seconds on an idle node).
    """
    changed = previous is None or report.under_replicated != previous.under_replicated
    return logging.INFO if report.copied or report.dropped or changed else logging.DEBUG


def _batched(items: Iterable[bytes], size: int) -> Iterator[list[bytes]]:
    """Lists of up to ``size`` consecutive items (itertools.batched, Python 3.12)."""
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


class Replicator:
    """The replication job of one node."""

    def __init__(
        self,
        *,
        store: PageStore,
        client: DataPlaneClient,
        self_id: bytes,
        members: Callable[[], Sequence[Member]],
        replicas: int,
        rate: int,
        interval: float,
        grace: float,
        metrics: NodeMetrics,
        on_unanswered: Callable[[bytes], Awaitable[None]] | None = None,
        clock: Callable[[], float] = time.monotonic,
        anti_entropy: str = "range",
        max_datagram: int = 32768,
        virtual_ids: int = VIRTUAL_IDS,
    ) -> None:
        """``on_unanswered(node_id)`` is awaited when a replica did not answer (e.g. to probe it
        through the overlay, so a dead node is noticed at once rather than after a silence)."""
        self.store = store
        self.client = client
        self.self_id = self_id
        self.members = members
        self.replicas = replicas
        self.virtual_ids = virtual_ids
        self.rate = rate
        self.interval = interval
        self.grace = grace
        self.metrics = metrics
        self.clock = clock
        self.on_unanswered = on_unanswered
        # Pages stored by clients, to check on their replicas once FRESH_DELAY has passed (the
        # client usually writes every replica itself; by then a HAS finds them all there).
        self._fresh: collections.deque[tuple[float, list[bytes]]] = collections.deque()
        self._fresh_pages = 0  # digests in self._fresh
        self._random = random.Random(self_id)  # the rounds' spread: deterministic per node
        self.fresh_wait = self._fresh_spread()
        """Seconds the oldest fresh page waits for its check this round (FRESH_SPREAD)."""
        # Fresh pages some replica lacked at their check: checked again (and only then sent)
        # FRESH_RECHECK later, as (due, digests).
        self._recheck: collections.deque[tuple[float, list[bytes]]] = collections.deque()
        # (peer id, bucket) pairs the last complete range sweep left to this one because writes
        # were in flight there: this sweep repairs them whatever it sees.
        self._in_flight: set[tuple[bytes, int]] = set()
        self.sweeps = 0
        self._wake = asyncio.Event()
        self._changed = False
        self._surplus: dict[bytes, float] = {}  # digest -> when it was first seen surplus
        self._ring: Ring | None = None  # placement of the last membership view swept
        self._ring_key: tuple[tuple[bytes, object], ...] = ()
        self._owners: BucketOwners | None = None  # bucket replica sets of self._ring
        self._owners_ring: Ring | None = None
        self.anti_entropy = anti_entropy
        self.max_datagram = max_datagram
        # (peer id, bucket) -> when this node first saw the bucket differ and left it to the
        # bucket's designated source; pushed by this node once it still differs max(interval,
        # grace) later (a designated source that died changes the view, and with it the
        # designated source, so this only covers one that is alive but lacks pages too).
        self._deferred: dict[tuple[bytes, int], float] = {}

    def membership_changed(self) -> None:
        """Wake the job: replica sets may have moved. A running sweep starts over."""
        self._changed = True
        self._wake.set()

    def pages_added(self, digests: Sequence[bytes]) -> None:
        """Pages a client stored here: see to their replicas soon, not at the next sweep."""
        self._fresh.append((self.clock() + FRESH_DELAY, list(digests)))
        self._fresh_pages += len(digests)
        self._wake.set()

    def _fresh_due(self) -> float:
        """When the fresh pages are checked (those stored FRESH_DELAY ago or earlier): as soon
        as FRESH_CHUNK of them are due, else once the oldest has waited FRESH_MAX_DELAY."""
        recheck = self._recheck[0][0] if self._recheck else float("inf")
        if not self._fresh:
            return recheck
        latest = min(recheck, self._fresh[0][0] - FRESH_DELAY + self.fresh_wait)
        if self._fresh_pages < FRESH_CHUNK:
            return latest
        due = 0
        for when, digests in self._fresh:  # ends within FRESH_CHUNK pages' commits
            if when >= latest:
                break
            due += len(digests)
            if due >= FRESH_CHUNK:
                return when
        return latest

    def _fresh_spread(self) -> float:
        return FRESH_MAX_DELAY * (1.0 + FRESH_SPREAD * self._random.random())

    def _forget_fresh(self, stored_before: float) -> None:
        """A complete sweep checked every page stored before it began: no separate check."""
        while self._fresh and self._fresh[0][0] - FRESH_DELAY <= stored_before:
            self._fresh_pages -= len(self._fresh.popleft()[1])
        while self._recheck and self._recheck[0][0] - FRESH_RECHECK <= stored_before:
            self._recheck.popleft()

    def _fresh_buckets(self) -> np.ndarray:
        """The buckets of the pages still due a fresh check or a recheck."""
        digests = [d for queue in (self._fresh, self._recheck) for _, ds in queue for d in ds]
        return buckets_of(digests) if digests else np.zeros(0, np.intp)

    async def _push_fresh(self) -> None:
        """Check the fresh pages that are due; send the lacking ones of those checked before."""
        if self._fresh_due() > self.clock():
            return
        self.fresh_wait = self._fresh_spread()  # the next round's
        for _, batch in self._due(self._recheck):
            await self._step(batch, SweepReport())
        for taken, batch in self._due(self._fresh):
            self._fresh_pages -= taken
            lacking = await self._step(batch, SweepReport(), push=False)
            if lacking:
                self._recheck.append((self.clock() + FRESH_RECHECK, sorted(lacking)))

    def _due(
        self, queue: collections.deque[tuple[float, list[bytes]]]
    ) -> Iterator[tuple[int, list[bytes]]]:
        """Take the entries of ``queue`` (due time, digests) that are due, oldest first, in
        batches of FRESH_CHUNK digests or more (whole entries): (digests taken, the batch's
        distinct digests sorted). Entries added while a batch is checked join if due by then."""
        taken, batch = 0, []
        while queue and queue[0][0] <= self.clock():
            digests = queue.popleft()[1]
            taken += len(digests)
            batch.extend(digests)
            if len(batch) >= FRESH_CHUNK or not queue or queue[0][0] > self.clock():
                yield taken, sorted(set(batch))
                taken, batch = 0, []

    async def run(self) -> None:
        """Push fresh pages as they come; sweep on membership changes and every ``interval``."""
        next_sweep = self.clock() + self.interval
        previous: SweepReport | None = None
        while True:
            wait = min(next_sweep, self._fresh_due()) - self.clock()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(0.0, wait))
            self._wake.clear()
            await self._push_fresh()
            if not self._changed and self.clock() < next_sweep:
                continue
            report = await self.sweep()
            next_sweep = self.clock() + self.interval
            if report.complete:
                level = sweep_log_level(report, previous)
                previous = report
                log.log(
                    level,
                    "replication sweep: %d pages examined, %d copied, %d under-replicated, "
                    "%d surplus dropped in %.2f s",
                    report.examined,
                    report.copied,
                    report.under_replicated,
                    report.dropped,
                    report.seconds,
                )

    async def sweep(self) -> SweepReport:
        """One pass over the store; restarts (incomplete) if membership changes meanwhile."""
        self._changed = False
        report = SweepReport()
        started = self.clock()
        total = self.store.page_count
        self.metrics.backlog.set(total)
        if self.anti_entropy == "full":
            finished = await self._sweep_pages(self.store.iter_digests(), report, total)
        else:
            finished = await self._sweep_ranges(report, total)
        if not finished:
            return report  # incomplete: the caller's loop sweeps again at once
        if not report.in_flight_buckets:  # else their fresh checks still cover those pages
            self._forget_fresh(stored_before=started)
        report.complete = True
        report.seconds = self.clock() - started
        self.sweeps += 1
        self.metrics.sweeps.inc()
        self.metrics.sweep_seconds.set(report.seconds)
        self.metrics.under_replicated.set(report.under_replicated)
        self.metrics.backlog.set(0)
        return report

    async def _sweep_pages(self, digests: Iterable[bytes], report: SweepReport, total: int) -> bool:
        """The per-page path over ``digests`` (ascending): False if membership changed."""
        for chunk in _batched(digests, CHUNK):
            await self._step(chunk, report)
            self.metrics.backlog.set(max(0, total - report.examined))
            await self._push_fresh()
            if self._changed:
                return False
        return True

    async def _sweep_ranges(self, report: SweepReport, total: int) -> bool:
        """A range-hash sweep (see the module docstring): False if membership changed."""
        targets = list(self.members())
        ids = [t.node_id for t in targets]
        if self.self_id not in ids:
            return True  # not a member (yet): nothing to decide
        me = ids.index(self.self_id)
        ring = self._ring_of(targets)
        owners = await self._owners_of(ring)
        table = self.store.buckets.table()
        held = table.counts > 0
        mine = owners.uniform & owners.holds(me)
        # Pages in buckets this node does not owe, or whose replica set varies: per page.
        per_page = self._digests_in(np.flatnonzero(held & ~mine), table.counts)
        if not await self._sweep_pages(per_page, report, total):
            return False
        peers = sorted(set(owners.rows[held & mine].ravel().tolist()) - {me})
        compared = await asyncio.gather(
            *(self._compare(targets[p], table, owners.joint(me, p) & held) for p in peers)
        )
        if self._changed:
            return False
        report.examined += int(table.counts[held & mine].sum())
        report.compared_buckets = int((held & mine).sum())
        busy = self._written_since(table)
        now = self.clock()
        deferred: dict[tuple[bytes, int], float] = {}
        in_flight: set[tuple[bytes, int]] = set()
        for p, (differing, unanswered) in zip(peers, compared, strict=True):
            if unanswered:
                report.unanswered += unanswered
                if self.on_unanswered is not None:
                    await self.on_unanswered(ids[p])
            if not differing:
                continue
            report.differing_buckets += len(differing)
            source = designated_source(owners.rows[differing], p)
            push: list[int] = []
            for bucket, first in zip(differing, source.tolist(), strict=True):
                pair = (ids[p], bucket)
                if busy[bucket] and pair not in self._in_flight:
                    in_flight.add(pair)  # differs because writes are in flight: next sweep
                    report.in_flight_buckets += 1
                    continue
                since = self._deferred.get(pair, now)
                if first == me or now - since >= max(self.interval, self.grace):
                    push.append(bucket)
                else:
                    deferred[pair] = since
                    report.deferred_buckets += 1
                    report.under_replicated += int(table.counts[bucket])
            if not await self._push_buckets(targets[p], push, table.counts, report):
                return False
        self._deferred = deferred
        self._in_flight = in_flight
        log.debug(
            "range sweep: %d peers, %d buckets compared, %d differ, %d deferred, %d in flight, "
            "%d per page",
            len(peers), report.compared_buckets, report.differing_buckets,
            report.deferred_buckets, report.in_flight_buckets, int((held & ~mine).sum()),
        )
        return True

    def _written_since(self, table: BucketTable) -> np.ndarray:
        """Buckets where writes are in flight: written here since ``table`` was read (the
        sweep's start), or holding pages still due a fresh check (stored in the last seconds:
        their other replicas may not have them *yet*). A mask over the buckets."""
        now = self.store.buckets.table()
        busy: np.ndarray = (now.counts != table.counts) | (now.hashes != table.hashes).any(axis=1)
        busy[self._fresh_buckets()] = True
        return busy

    async def _compare(
        self, peer: Member, table: BucketTable, mask: np.ndarray
    ) -> tuple[list[int], int]:
        """Buckets of ``mask`` whose hashes differ on ``peer`` (where this node holds pages),
        and how many buckets it did not answer for."""
        comparison = RangeComparison(
            table,
            mask,
            max_mask_bytes=wire.max_range_mask_bytes(self.max_datagram),
            max_groups=wire.max_range_groups(self.max_datagram),
        )
        while not comparison.done:
            queries = comparison.queries()
            answers = await asyncio.gather(
                *(
                    self.client.range_hashes(
                        RangeRead(peer.data_address, BUCKET_BITS, q.group_bits, q.first,
                                  q.groups, q.mask_bits)
                    )
                    for q in queries
                )
            )
            for query, answer in zip(queries, answers, strict=True):
                if answer is None:
                    comparison.unanswered(query)
                else:
                    comparison.answer(query, answer.entries)
        return sorted(comparison.differing), comparison.unanswered_buckets

    async def _push_buckets(
        self, peer: Member, buckets: list[int], counts: np.ndarray, report: SweepReport
    ) -> bool:
        """Send ``peer`` the pages of ``buckets`` it lacks: False if membership changed."""
        for chunk in _batched(self._digests_in(buckets, counts), CHUNK):
            held, copied, unanswered = await self._reconcile(peer.data_address, chunk)
            report.copied += copied
            report.under_replicated += len(chunk) - len(held)
            report.unanswered += len(unanswered)
            await self._push_fresh()
            if self._changed:
                return False
        return True

    def _digests_in(self, buckets: Iterable[int], counts: np.ndarray) -> Iterator[bytes]:
        """The digests this node holds in ``buckets`` (ascending), read a run of consecutive
        buckets at a time; ``counts`` (the bucket table's) bounds each read."""
        runs: list[list[int]] = []
        for bucket in buckets:
            if runs and runs[-1][1] == bucket - 1:
                runs[-1][1] = int(bucket)
            else:
                runs.append([int(bucket), int(bucket)])
        for low, high in runs:
            limit = int(counts[low : high + 1].sum()) + 1
            for digest in self.store.iter_digests(bucket_prefix(low), limit):
                if bucket_of(digest) > high:
                    break
                yield digest

    async def _owners_of(self, ring: Ring) -> BucketOwners:
        """Bucket replica sets of ``ring`` (kept while the view stays the same). Placing 2**16
        keys takes a tenth to a few tenths of a second (more with virtual IDs and many
        members): in a thread, so the node keeps serving meanwhile."""
        if self._owners is None or self._owners_ring is not ring:
            self._owners = await asyncio.to_thread(BucketOwners, ring, self.replicas)
            self._owners_ring = ring
        return self._owners

    async def _step(
        self, digests: list[bytes], report: SweepReport, *, push: bool = True
    ) -> set[bytes]:
        """Check ``digests`` on their other replicas and send them what they lack (``push``),
        or only find out: returns the digests some replica answered it lacks."""
        targets = list(self.members())
        if not any(t.node_id == self.self_id for t in targets):
            return set()  # not a member (yet): nothing to decide
        report.examined += len(digests)
        ids = [t.node_id for t in targets]
        self_index = ids.index(self.self_id)
        placement = self._ring_of(targets).replica_indices(digests, self.replicas)
        wanted = min(self.replicas, len(targets))
        ask: dict[int, list[bytes]] = {}
        for digest, row in zip(digests, placement.tolist(), strict=True):
            for index in row:
                if index != self_index:
                    ask.setdefault(index, []).append(digest)
        confirmed: dict[bytes, int] = dict.fromkeys(digests, 0)
        for digest, row in zip(digests, placement.tolist(), strict=True):
            if self_index in row:
                confirmed[digest] = 1
        results = await asyncio.gather(
            *(self._reconcile(targets[i].data_address, ds, push=push) for i, ds in ask.items())
        )
        lacking: set[bytes] = set()
        for index, (held, copied, unanswered) in zip(ask, results, strict=True):
            report.copied += copied
            report.unanswered += len(unanswered)
            if unanswered and self.on_unanswered is not None:
                await self.on_unanswered(targets[index].node_id)
            for digest in held:
                confirmed[digest] += 1
            if not push:
                lacking.update(d for d in ask[index] if d not in held and d not in unanswered)
        now = self.clock()
        drop: list[bytes] = []
        for digest, row in zip(digests, placement.tolist(), strict=True):
            if confirmed[digest] < wanted:
                report.under_replicated += 1
            if self_index in row:
                self._surplus.pop(digest, None)
            elif confirmed[digest] >= wanted:
                since = self._surplus.setdefault(digest, now)
                if now - since >= self.grace:
                    drop.append(digest)
        if drop:
            report.dropped += self.store.delete_many(drop)
            self.metrics.surplus_dropped.inc(len(drop))
            for digest in drop:
                self._surplus.pop(digest, None)
        return lacking

    def _ring_of(self, targets: Sequence[Member]) -> Ring:
        """The placement ring of this membership view (kept while the view stays the same)."""
        key = tuple((t.node_id, t.domain) for t in targets)
        if self._ring is None or self._ring_key != key:
            self._ring = Ring([t.node_id for t in targets], [t.domain for t in targets],
                              virtual_ids=self.virtual_ids)
            self._ring_key = key
        return self._ring

    async def _reconcile(
        self, address: Address, digests: list[bytes], *, push: bool = True
    ) -> tuple[set[bytes], int, set[bytes]]:
        """Make one replica hold ``digests`` (or, without ``push``, only ask which it holds):
        returns (held now, copied, unanswered)."""
        has = await self.client.has(address, digests)
        held = set(has.held)
        lacking = sorted(has.lacking) if push else []
        copied = 0
        for start in range(0, len(lacking), PUSH_BATCH):
            batch = lacking[start : start + PUSH_BATCH]
            pages = self.store.get_many(batch)
            items = [(d, p) for d, p in zip(batch, pages, strict=True) if p is not None]
            outcome = await self.client.put_pages(address, items)
            stored = 0
            for digest, status in outcome.status.items():
                if status in (wire.PutStatus.STORED, wire.PutStatus.PRESENT):
                    held.add(digest)
                    stored += status == wire.PutStatus.STORED
            has.unanswered |= outcome.unanswered
            copied += stored
            self.metrics.replicated.inc(stored)
            await asyncio.sleep(len(items) / self.rate)  # rate limit, not synchronisation
        return held, copied, has.unanswered
