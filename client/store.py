"""The client library: resolve and publish template pages through the store cluster.

``async with TemplateStoreClient(seeds=[...], cluster_key=...) as store:`` then
``await store.get_many(digests)`` returns the pages in request order, each verified against its
digest, or raises :class:`PagesUnavailable` naming exactly the digests no replica could serve.

How a batch is resolved:

1. The zero page is answered locally (it is never stored) and cached pages are taken from the
   bounded cache.
2. The membership view (a client-mode Kademlia overlay: crawled at start, kept current by its
   membership events) gives every digest its replica list, closest first — one hop, computed
   locally (:func:`tmdht.placement.replica_indices`).
3. Digests are grouped per node and sent as pipelined batches (:class:`DataPlaneClient`).
   A batch whose node is slow is *hedged*: after ``hedge_after`` seconds the same digests go to
   the next replica too, and the first answer wins. What a node misses, serves corrupt, or
   never answers goes to the next replica (*failover*); a node that did not answer is avoided
   for a while and probed through the overlay.
4. Digests that every replica in the view failed are retried once after re-crawling the ring
   (the view may have been stale), then reported unavailable.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
import time
from collections.abc import Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from tmdht import wire
from tmdht.auth import Authenticator, ClusterKey, keyring_from, load_key, parse_cluster_keys
from tmdht.client.dataplane import DataPlaneClient
from tmdht.client.probe import ClusterUnreachable, explain_silence
from tmdht.client.resolver import Resolver
from tmdht.errors import TmdhtError, UsageError
from tmdht.node.overlay import Member, MembershipEventKind, Overlay, OverlayConfig, OverlayError
from tmdht.pages import ZERO_DIGEST, ZERO_PAGE, digest_page
from tmdht.placement import replica_rows

__all__ = [
    "BlockingTemplateStoreClient",
    "ClientMetrics",
    "ClusterUnreachable",
    "PagesUnavailable",
    "PublishFailed",
    "PutSummary",
    "TemplateStoreClient",
]

log = logging.getLogger("tmdht.client")

T = TypeVar("T")
RESOLVE_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    1.0,
    5.0,
)


class PagesUnavailable(TmdhtError):
    """No replica could serve these digests (every replica down, or the page missing)."""

    def __init__(self, digests: Iterable[bytes]) -> None:
        self.digests = frozenset(digests)
        first = min(self.digests).hex()[:16] if self.digests else "-"
        super().__init__(
            f"{len(self.digests)} pages unavailable from every replica (first {first})"
        )


class PublishFailed(TmdhtError):
    """Some pages could not be stored on any replica."""

    def __init__(self, digests: Iterable[bytes], reason: str) -> None:
        self.digests = frozenset(digests)
        super().__init__(f"{len(self.digests)} pages not stored: {reason}")


@dataclass
class PutSummary:
    """What :meth:`TemplateStoreClient.put_many` did."""

    pages: int = 0
    """Distinct non-zero pages offered."""
    stored: int = 0
    """Replica writes of new pages."""
    present: int = 0
    """Replica writes that found the page already there."""
    under_replicated: set[bytes] = field(default_factory=set)
    """Pages written to fewer than R replicas (the nodes' replication job completes them)."""


class ClientMetrics:
    """Client-side Prometheus metrics, in a registry the caller may pass."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.resolved = Counter(
            "tmdht_client_pages_resolved_total",
            "Pages resolved (verified), cache and zero pages included.",
            registry=r,
        )
        self.unavailable = Counter(
            "tmdht_client_unavailable_pages_total", "Pages no replica could serve.", registry=r
        )
        self.batches = Counter(
            "tmdht_client_batches_total", "GET batches sent to nodes.", registry=r
        )
        self.retries = Counter(
            "tmdht_client_retries_total", "Requests re-sent after lost datagrams.", registry=r
        )
        self.failovers = Counter(
            "tmdht_client_failovers_total",
            "Pages asked of a further replica after a miss or failure.",
            registry=r,
        )
        self.hedges = Counter(
            "tmdht_client_hedges_total", "Batches hedged to a second replica.", registry=r
        )
        self.verification_failures = Counter(
            "tmdht_client_verification_failures_total",
            "Pages that did not match their digest.",
            registry=r,
        )
        self.cache_hits = Counter(
            "tmdht_client_cache_hits_total", "Pages served from the client cache.", registry=r
        )
        self.published = Counter(
            "tmdht_client_pages_published_total", "Replica writes of pages.", registry=r
        )
        self.latency = Histogram(
            "tmdht_client_resolve_duration_seconds",
            "Time to resolve one get_many call.",
            buckets=RESOLVE_BUCKETS,
            registry=r,
        )
        self.members = Gauge(
            "tmdht_client_members", "Store nodes in the client's view.", registry=r
        )


class _Cache:
    """A bounded LRU of verified pages."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._pages: collections.OrderedDict[bytes, bytes] = collections.OrderedDict()

    def get(self, digest: bytes) -> bytes | None:
        page = self._pages.get(digest)
        if page is not None:
            self._pages.move_to_end(digest)
        return page

    def put(self, digest: bytes, page: bytes) -> None:
        if self.capacity <= 0:
            return
        self._pages[digest] = page
        self._pages.move_to_end(digest)
        while len(self._pages) > self.capacity:
            self._pages.popitem(last=False)


class TemplateStoreClient:
    """Resolve and publish pages through a store cluster (see the module docstring)."""

    def __init__(
        self,
        seeds: Sequence[tuple[str, int]],
        *,
        cluster_key: bytes | str | None = None,  # a key file's text, or a raw 32-byte key
        open_mode: bool = False,
        replicas: int = 3,
        host: str = "0.0.0.0",  # clients reach nodes on other hosts too
        max_datagram: int = 32768,
        timeout: float = 0.2,
        attempts: int = 3,
        window: int = 16,
        hedge_after: float = 0.05,
        avoid_for: float = 5.0,
        cache_pages: int = 0,
        registry: CollectorRegistry | None = None,
    ) -> None:
        if not seeds:
            raise UsageError("at least one seed (a node's Kademlia host:port) is needed")
        if cluster_key is None and not open_mode:
            raise UsageError("a cluster key is needed (or open_mode=True for an open cluster)")
        self.seeds = tuple(seeds)
        # A key file's text: one key, or ``id:hex`` lines during a rotation (the first is used to
        # send, all are accepted) -- the same format the nodes read.
        self._keys: list[ClusterKey] = []
        if isinstance(cluster_key, str):
            self._keys = parse_cluster_keys(cluster_key)
        elif cluster_key is not None:
            self._keys = [ClusterKey(1, load_key(cluster_key))]
        self._key = self._keys[0].secret if self._keys else None
        self.auth = (
            Authenticator.keyed(keyring_from(self._keys))
            if self._keys
            else Authenticator.open_mode()
        )
        self.replicas = replicas
        self.host = host
        self.max_datagram = max_datagram
        self.timeout = timeout
        self.attempts = attempts
        self.window = window
        self.hedge_after = hedge_after
        self.avoid_for = avoid_for
        self.metrics = ClientMetrics(registry)
        self._cache = _Cache(cache_pages)
        self._overlay: Overlay | None = None
        self._dataplane: DataPlaneClient | None = None
        self._members: list[Member] = []
        self._ids: list[bytes] = []
        self._avoid: dict[bytes, float] = {}  # node id -> monotonic time until which it is avoided
        self._resolver: Resolver | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> TemplateStoreClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Open the data-plane socket, join the ring as a client and learn the members."""
        try:
            self._dataplane = await DataPlaneClient.open(
                self.auth,
                host=self.host,
                max_datagram=self.max_datagram,
                timeout=self.timeout,
                attempts=self.attempts,
                window=self.window,
                on_retry=self.metrics.retries.inc,
            )
            self._resolver = Resolver(
                self._dataplane,
                self.metrics,
                hedge_after=self.hedge_after,
                avoided=self._avoided,
                failed=self._node_failed,
            )
            self._overlay = await Overlay.start(
                OverlayConfig(
                    data_port=0,
                    join=False,
                    host=self.host,
                    seeds=self.seeds,
                    cluster_key=self._key,
                    accepted_cluster_keys=tuple(k.secret for k in self._keys[1:]),
                )
            )
            await self.refresh()
            if not self._members:
                # Why: nothing there, or a node with another key (it drops us silently).
                raise ClusterUnreachable(await asyncio.to_thread(explain_silence, self.seeds))
            subscription = self._overlay.subscribe(replay=False)
            self._spawn(self._follow(subscription))
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Stop the background task, the overlay and the socket (idempotent)."""
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._overlay is not None:
            await self._overlay.stop()
            self._overlay = None
        if self._dataplane is not None:
            await self._dataplane.close()
            self._dataplane = None
            self._resolver = None

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self._tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.error("client background task failed: %r", t.exception())

        task.add_done_callback(done)

    async def refresh(self) -> list[Member]:
        """Crawl the ring again and replace the membership view."""
        if self._overlay is None:
            raise TmdhtError("client is closed")
        members = await self._overlay.crawl()
        self._set_members(members)
        return members

    def _set_members(self, members: Iterable[Member]) -> None:
        self._members = sorted(members, key=lambda m: m.node_id)
        self._ids = [m.node_id for m in self._members]
        self.metrics.members.set(len(self._members))

    async def _follow(self, subscription: Any) -> None:
        try:
            async for event in subscription:
                if event.kind in (
                    MembershipEventKind.JOINED,
                    MembershipEventKind.LEFT,
                    MembershipEventKind.UPDATED,
                ):
                    assert self._overlay is not None
                    self._set_members(self._overlay.members())
        finally:
            subscription.close()

    @property
    def members(self) -> list[Member]:
        """The current membership view."""
        return list(self._members)

    @property
    def stats(self) -> Any:
        """Transport counters (datagrams, retries, timeouts, verification failures)."""
        assert self._dataplane is not None
        return self._dataplane.stats

    # -- placement ---------------------------------------------------------------------------

    def _replica_lists(self, digests: Sequence[bytes]) -> list[list[Member]]:
        """Per digest, the members to try in order: the R closest, avoided nodes last.

        Members, not indices: the view may change (membership events) while an operation
        awaits, and an operation keeps the members it started with.
        """
        view, rows = self._replica_rows(digests)
        return [[view[i] for i in row] for row in rows]

    def _replica_rows(self, digests: Sequence[bytes]) -> tuple[list[Member], list[list[int]]]:
        """The view (a snapshot: it may change while an operation awaits) and per digest the
        indices into it of the members to try in order: the R closest, avoided nodes last."""
        view, ids = self._members, self._ids
        if not view:
            return view, [[] for _ in digests]
        rows = replica_rows(digests, ids, self.replicas)
        if not self._avoid:
            return view, rows
        now = time.monotonic()
        avoided = {i for i, m in enumerate(view) if self._avoid.get(m.node_id, 0) > now}
        if avoided:
            rows = [
                [i for i in row if i not in avoided] + [i for i in row if i in avoided]
                for row in rows
            ]
        return view, rows

    def _node_failed(self, member: Member) -> None:
        self._avoid[member.node_id] = time.monotonic() + self.avoid_for
        if self._overlay is not None:
            self._spawn(self._probe(member.node_id))

    async def _probe(self, node_id: bytes) -> None:
        assert self._overlay is not None
        with contextlib.suppress(OverlayError):
            await self._overlay.probe(node_id)
            self._avoid.pop(node_id, None)  # it answered: use it again

    # -- reads -------------------------------------------------------------------------------

    async def get_many(self, digests: Sequence[bytes]) -> list[bytes]:
        """The pages of ``digests``, in request order, each verified; raises PagesUnavailable."""
        found, unavailable = await self.resolve(digests)
        if unavailable:
            raise PagesUnavailable(unavailable)
        return [found[d] for d in digests]

    async def resolve(self, digests: Sequence[bytes]) -> tuple[dict[bytes, bytes], set[bytes]]:
        """Resolve what can be resolved: (pages by digest, digests no replica could serve)."""
        if self._dataplane is None:
            raise TmdhtError("client is closed")
        started = time.perf_counter()
        found: dict[bytes, bytes] = {}
        wanted: list[bytes] = []
        for digest in dict.fromkeys(bytes(d) for d in digests):
            if len(digest) != 32:
                raise UsageError(f"a digest is 32 bytes, got {len(digest)}")
            if digest == ZERO_DIGEST:
                found[digest] = ZERO_PAGE
                continue
            cached = self._cache.get(digest) if self._cache.capacity > 0 else None
            if cached is not None:
                found[digest] = cached
                self.metrics.cache_hits.inc()
            else:
                wanted.append(digest)
        unavailable = await self._fetch(wanted, found)
        if unavailable:
            await self.refresh()  # the view may be stale: one more try with a fresh ring
            unavailable = await self._fetch(sorted(unavailable), found)
        if self._cache.capacity > 0:
            for digest in wanted:
                page = found.get(digest)
                if page is not None:
                    self._cache.put(digest, page)
        self.metrics.resolved.inc(len(found))
        if unavailable:
            self.metrics.unavailable.inc(len(unavailable))
        self.metrics.latency.observe(time.perf_counter() - started)
        return found, unavailable

    def _avoided(self, member: Member) -> bool:
        if not self._avoid:  # the common case, checked per digest: no clock read
            return False
        return self._avoid.get(member.node_id, 0.0) > time.monotonic()

    async def _fetch(self, digests: list[bytes], found: dict[bytes, bytes]) -> set[bytes]:
        """Resolve ``digests`` into ``found``; returns what no replica served."""
        assert self._resolver is not None
        view, rows = self._replica_rows(digests)
        pages, unavailable = await self._resolver.resolve(digests, rows, view)
        found.update(pages)
        return unavailable

    async def replicas_holding(
        self, digests: Sequence[bytes]
    ) -> list[list[tuple[bytes, bool | None]]]:
        """Per digest, its replicas (closest first) and whether each holds it (HAS): True,
        False, or None when the node did not answer."""
        assert self._dataplane is not None
        rows = self._replica_lists(list(digests))
        nodes = list({m.node_id: m for row in rows for m in row}.values())
        answers = await asyncio.gather(
            *(self._dataplane.has(m.data_address, list(digests)) for m in nodes)
        )
        by_node = {m.node_id: a for m, a in zip(nodes, answers, strict=True)}

        def holds(node_id: bytes, digest: bytes) -> bool | None:
            answer = by_node[node_id]
            return None if digest in answer.unanswered else digest in answer.held

        return [
            [(m.node_id, holds(m.node_id, d)) for m in row]
            for d, row in zip(digests, rows, strict=True)
        ]

    async def has_many(self, digests: Sequence[bytes]) -> list[bool]:
        """Whether any replica holds each digest (the zero page counts as held)."""
        assert self._dataplane is not None
        unique = [d for d in dict.fromkeys(bytes(d) for d in digests) if d != ZERO_DIGEST]
        held: set[bytes] = {ZERO_DIGEST}
        lists = dict(zip(unique, self._replica_lists(unique), strict=True))
        pending = set(unique)
        for step in range(self.replicas):
            groups: dict[Member, list[bytes]] = {}
            for digest in pending:
                if step < len(lists[digest]):
                    groups.setdefault(lists[digest][step], []).append(digest)
            results = await asyncio.gather(
                *(self._dataplane.has(n.data_address, ds) for n, ds in groups.items())
            )
            for result in results:
                held |= result.held
            pending -= held
            if not pending:
                break
        return [bytes(d) in held for d in digests]

    # -- writes ------------------------------------------------------------------------------

    async def put_many(self, pages: Iterable[bytes | tuple[bytes, bytes]]) -> PutSummary:
        """Store pages on their R replicas; raises PublishFailed for pages stored nowhere."""
        if self._dataplane is None:
            raise TmdhtError("client is closed")
        items: dict[bytes, bytes] = {}
        for item in pages:
            digest, page = item if isinstance(item, tuple) else (digest_page(item), item)
            if len(page) != 4096:
                raise UsageError(f"a page is 4096 bytes, got {len(page)}")
            if digest != ZERO_DIGEST:
                items[bytes(digest)] = bytes(page)
        summary = PutSummary(pages=len(items))
        digests = list(items)
        per_node: dict[Member, list[tuple[bytes, bytes]]] = {}
        lists = self._replica_lists(digests)
        for digest, row in zip(digests, lists, strict=True):
            for node in row:
                per_node.setdefault(node, []).append((digest, items[digest]))
        nodes = list(per_node)
        outcomes = await asyncio.gather(
            *(self._dataplane.put_pages(n.data_address, per_node[n]) for n in nodes)
        )
        copies: collections.Counter[bytes] = collections.Counter()
        rejected: dict[bytes, str] = {}
        for node, outcome in zip(nodes, outcomes, strict=True):
            if outcome.unanswered:
                self._node_failed(node)
            for digest, status in outcome.status.items():
                if status == wire.PutStatus.STORED:
                    summary.stored += 1
                    copies[digest] += 1
                elif status == wire.PutStatus.PRESENT:
                    summary.present += 1
                    copies[digest] += 1
                else:
                    rejected[digest] = status.name.lower()
        self.metrics.published.inc(summary.stored + summary.present)
        wanted = min(self.replicas, len({m.node_id for row in lists for m in row}) or 1)
        summary.under_replicated = {d for d in digests if 0 < copies[d] < wanted}
        failed = [d for d in digests if copies[d] == 0]
        if failed:
            reasons = sorted({rejected.get(d, "no replica answered") for d in failed})
            raise PublishFailed(failed, ", ".join(reasons))
        return summary


class BlockingTemplateStoreClient:
    """The same client for callers without an event loop: a loop runs on a thread it owns."""

    def __init__(self, seeds: Sequence[tuple[str, int]], **kw: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="tmdht-client", daemon=True
        )
        self._thread.start()
        self._client = TemplateStoreClient(seeds, **kw)
        try:
            self._call(self._client.start())
        except BaseException:
            self._stop_loop()
            raise

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def __enter__(self) -> BlockingTemplateStoreClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def metrics(self) -> ClientMetrics:
        """The client's Prometheus metrics."""
        return self._client.metrics

    def get_many(self, digests: Sequence[bytes]) -> list[bytes]:
        """See :meth:`TemplateStoreClient.get_many`."""
        return self._call(self._client.get_many(digests))

    def resolve(self, digests: Sequence[bytes]) -> tuple[dict[bytes, bytes], set[bytes]]:
        """See :meth:`TemplateStoreClient.resolve`."""
        return self._call(self._client.resolve(digests))

    def put_many(self, pages: Iterable[bytes | tuple[bytes, bytes]]) -> PutSummary:
        """See :meth:`TemplateStoreClient.put_many`."""
        return self._call(self._client.put_many(pages))

    def has_many(self, digests: Sequence[bytes]) -> list[bool]:
        """See :meth:`TemplateStoreClient.has_many`."""
        return self._call(self._client.has_many(digests))

    def close(self) -> None:
        """Close the client and stop the loop thread."""
        if self._thread.is_alive():
            self._call(self._client.close())
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()
