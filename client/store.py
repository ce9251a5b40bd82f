"""The client library: resolve and publish template pages through the store cluster.

``async with TemplateStoreClient(seeds=[...], cluster_key=...) as store:`` then
``await store.get_many(digests)`` returns the pages in request order, each verified against its
digest, or raises :class:`PagesUnavailable` naming exactly the digests no replica could serve.

How a batch is resolved:

1. The zero page is answered locally (it is never stored) and cached pages are taken from the
   bounded cache.
2. The membership view (a client-mode Kademlia overlay: crawled at start, kept current by its
   membership events) gives every digest its replica list, closest first — one hop, computed
   locally from the members' ids and failure domains (a :class:`tmdht.placement.Ring` per view,
   the same placement the nodes compute, with the virtual IDs per node V the members advertise).
3. The request engine (:mod:`tmdht.net.engine`, through :class:`DataPlaneClient`) sends the
   digests per node as pipelined batches, hedges a slow node's batch to the next replica, and
   fails over what a node misses, serves corrupt or never answers; a node that did not answer
   is avoided for a while and probed through the overlay.
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
import urllib.error
import urllib.request
from collections.abc import Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypedDict, TypeVar, Unpack

from prometheus_client import CollectorRegistry

from tmdht import wire
from tmdht.aio.dataplane import DataPlaneClient
from tmdht.aio.overlay import MembershipSubscription, Overlay
from tmdht.aio.tasks import TaskSet
from tmdht.client.errors import ClusterUnreachable, PagesUnavailable, PublishFailed
from tmdht.client.metrics import ClientMetrics
from tmdht.client.probe import explain_silence
from tmdht.errors import NodeUnreachableError, OverlayError, TmdhtError, UsageError
from tmdht.net.address import Address, format_address
from tmdht.net.credentials import ClusterAccess, ClusterCredentials
from tmdht.net.membership import ClusterRule, Member, MembershipEventKind
from tmdht.net.operations import EngineStats
from tmdht.net.overlay import OverlayConfig
from tmdht.pages import DIGEST_SIZE, PAGE_SIZE, ZERO_DIGEST, ZERO_PAGE, digest_page
from tmdht.placement import VIRTUAL_IDS, Ring

__all__ = [
    "BlockingTemplateStoreClient",
    "ClientMetrics",
    "ClientOptions",
    "MemberStatus",
    "PagesUnavailable",
    "PublishFailed",
    "PutSummary",
    "StoreOptions",
    "TemplateStoreClient",
]

log = logging.getLogger("tmdht.client")

T = TypeVar("T")
HEALTH_TIMEOUT = 2.0
"""Seconds to wait for a member's /readyz in :meth:`TemplateStoreClient.cluster_status`."""
PUT_ROUNDS = 4
"""Rounds of :meth:`TemplateStoreClient.put_many`: the first, then retries of what went
unanswered (to the node again if it is alive, else to the next members)."""
PUT_RETRY_BACKOFF = 0.5
"""Seconds before the first retry round; doubled for each further one."""
PUT_TIMEOUT = 1.0
"""Seconds a PUT waits for its first answer at least (the floor of its adaptive timeout): a
node answers once the group commit holding the pages is synced, which a busy disk or a loaded
host delays by hundreds of ms. With the 0.2 s of reads, publish on a loaded 2-core host timed
out 2-5 % of its PUTs, wrote their pages twice and halved its window (30-80 pages per group
commit instead of ~160, ~30 % more node CPU per page); 0.5 s still timed out 1-3 % at load 20+,
1.0 s none in the runs of bench/publish.py. The price: a dead node costs a publish round a few
seconds more before its pages move on."""


class StoreOptions(TypedDict, total=False):
    """:class:`TemplateStoreClient`'s settings as keyword arguments (see its constructor)."""

    replicas: int
    virtual_ids: int | None
    host: str
    max_datagram: int
    timeout: float
    put_timeout: float
    attempts: int
    window: int
    hedge_after: float
    avoid_for: float
    cache_pages: int
    registry: CollectorRegistry | None


class ClientOptions(StoreOptions, total=False):
    """The settings and how the cluster's keys are given (see :class:`TemplateStoreClient`)."""

    cluster_key: bytes | str | None
    open_mode: bool
    credentials: ClusterCredentials | None


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


@dataclass(frozen=True, slots=True)
class MemberStatus:
    """One member of the cluster as :meth:`TemplateStoreClient.cluster_status` found it."""

    member: Member
    """Its ids and addresses, from the ring."""
    info: wire.NodeInfo | None
    """Its NODE_INFO answer (pages, bytes, capacity, version); None: it did not answer."""
    health: str
    """``ready``, ``not ready``, ``unreachable``, ``HTTP <code>``, or ``unknown`` (no metrics
    port advertised)."""


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
        seeds: Sequence[Address],
        *,
        cluster_key: bytes | str | None = None,  # a key file's text, or a raw 32-byte key
        open_mode: bool = False,
        credentials: ClusterCredentials | None = None,
        replicas: int = 3,
        virtual_ids: int | None = None,
        host: str = "0.0.0.0",  # clients reach nodes on other hosts too
        max_datagram: int = 32768,
        timeout: float = 0.2,
        put_timeout: float = PUT_TIMEOUT,
        attempts: int = 3,
        window: int = 16,
        hedge_after: float = 0.05,
        avoid_for: float = 5.0,
        cache_pages: int = 0,
        registry: CollectorRegistry | None = None,
    ) -> None:
        """``credentials``, or ``cluster_key`` (a key file's text: one key, or ``id:hex`` lines
        during a rotation; or a raw 32-byte key), or ``open_mode=True`` for an open cluster.
        ``replicas`` must be the nodes' (it decides where pages live; a different R advertised
        by the nodes is warned about once). ``virtual_ids`` (V) is the cluster's: the client
        places pages with the V the live members advertise (the one most of them advertise if
        they disagree, with one warning per disagreement and the
        ``tmdht_client_placement_disagreements`` gauge); an explicit ``virtual_ids`` that
        differs from the nodes' is warned about once and overridden. It is used only while no
        member advertises one (older nodes); None then means :data:`VIRTUAL_IDS`."""
        if not seeds:
            raise UsageError("at least one seed (a node's Kademlia host:port) is needed")
        if credentials is None:
            if cluster_key is not None:
                credentials = ClusterCredentials.from_key(cluster_key)
            elif open_mode:
                credentials = ClusterCredentials.open_mode()
            else:
                raise UsageError("a cluster key is needed (or open_mode=True for an open cluster)")
        self.seeds = tuple(seeds)
        self.credentials = credentials
        self.auth = credentials.authenticator()
        self.replicas = replicas
        self.requested_virtual_ids = virtual_ids
        """The ``virtual_ids`` asked for (None: follow the cluster)."""
        self.virtual_ids = VIRTUAL_IDS if virtual_ids is None else virtual_ids
        """The V pages are placed with: the members' (see :attr:`rule`)."""
        self.rule = ClusterRule(None, None)
        """The placement rule the current members advertise."""
        self._warned: set[tuple[object, ...]] = set()
        self.host = host
        self.max_datagram = max_datagram
        self.timeout = timeout
        self.put_timeout = put_timeout
        self.attempts = attempts
        self.window = window
        self.hedge_after = hedge_after
        self.avoid_for = avoid_for
        self.metrics = ClientMetrics(registry)
        self.metrics.watch(lambda: self._dataplane.stats if self._dataplane else None)
        self._cache = _Cache(cache_pages)
        self._overlay: Overlay | None = None
        self._dataplane: DataPlaneClient | None = None
        self._members: list[Member] = []
        self._ids: list[bytes] = []
        self._ring = Ring([], virtual_ids=self.virtual_ids)
        self._addresses: list[Address] = []
        self._tasks = TaskSet(log)

    @classmethod
    def connect(cls, access: ClusterAccess, **options: Unpack[StoreOptions]) -> TemplateStoreClient:
        """A client of the cluster ``access`` names (start it, or use ``async with``)."""
        return cls(access.seeds, credentials=access.credentials, **options)

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
                put_timeout=self.put_timeout,
                attempts=self.attempts,
                window=self.window,
                hedge_after=self.hedge_after,
                avoid_for=self.avoid_for,
                on_node_failed=self._node_failed,
            )
            self._overlay = await Overlay.start(
                OverlayConfig(
                    data_port=0,
                    join=False,
                    host=self.host,
                    seeds=self.seeds,
                    cluster_key=self.credentials.overlay_key,
                    accepted_cluster_keys=self.credentials.accepted_overlay_keys,
                )
            )
            await self.refresh()
            if not self._members:
                # Why: nothing there, or a node with another key (it drops us silently).
                reason = await asyncio.to_thread(explain_silence, self.seeds)
                raise ClusterUnreachable(self.seeds, reason)
            subscription = self._overlay.subscribe(replay=False)
            self._tasks.spawn(self._follow(subscription), "client-membership")
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Stop the background tasks, the overlay and the socket (idempotent)."""
        await self._tasks.cancel_all()
        if self._overlay is not None:
            await self._overlay.stop()
            self._overlay = None
        if self._dataplane is not None:
            await self._dataplane.close()
            self._dataplane = None

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
        self._follow_rule(ClusterRule.of(self._members))
        self._ring = Ring(self._ids, [m.domain for m in self._members],
                          virtual_ids=self.virtual_ids)
        self._addresses = [m.data_address for m in self._members]
        self.metrics.members.set(len(self._members))

    def _follow_rule(self, rule: ClusterRule) -> None:
        """Place with the V the members advertise; warn once per disagreement seen."""
        self.rule = rule
        asked = self.requested_virtual_ids
        self.virtual_ids = rule.virtual_ids or asked or VIRTUAL_IDS
        differ = sum(1 for m in self._members if m.virtual_ids not in (None, self.virtual_ids))
        self.metrics.virtual_ids.set(self.virtual_ids)
        self.metrics.placement_disagreements.set(differ)
        if not rule.agreed:
            self._warn_once(
                ("disagree", tuple(sorted(v for v, _ in rule.virtual_ids_seen)),
                 tuple(sorted(r for r, _ in rule.replicas_seen))),
                "store nodes disagree on the placement rule: %s; placing with V=%d "
                "(pages on the others are found by fallback only, or not at all)",
                rule.describe(), self.virtual_ids,
            )  # fmt: skip
        if asked is not None and rule.virtual_ids is not None and asked != rule.virtual_ids:
            self._warn_once(
                ("asked-v", asked, rule.virtual_ids),
                "virtual_ids=%d was asked for but the store nodes advertise V=%d: following "
                "the nodes", asked, rule.virtual_ids,
            )  # fmt: skip
        if rule.replicas is not None and rule.replicas != self.replicas:
            self._warn_once(
                ("asked-r", self.replicas, rule.replicas),
                "replicas=%d here but the store nodes advertise R=%d: pages are written to "
                "and looked up on %d replicas", self.replicas, rule.replicas, self.replicas,
            )  # fmt: skip

    def _warn_once(self, key: tuple[object, ...], message: str, *args: object) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message, *args)

    async def _follow(self, subscription: MembershipSubscription) -> None:
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
    def stats(self) -> EngineStats:
        """Request counters (datagrams, retries, timeouts, verification failures, hedges, ...)."""
        return self._running().stats

    def _running(self) -> DataPlaneClient:
        if self._dataplane is None:
            raise TmdhtError("client is closed")
        return self._dataplane

    # -- placement and failed nodes ----------------------------------------------------------

    def _replica_lists(self, digests: Sequence[bytes]) -> list[list[Member]]:
        """Per digest, the members to try in order: the R closest, avoided nodes last.

        Members, not indices: the view may change (membership events) while an operation
        awaits, and an operation keeps the members it started with.
        """
        view = self._members
        if not view:
            return [[] for _ in digests]
        dataplane = self._running()
        rows = self._ring.replica_rows(digests, self.replicas)
        avoided = {i for i, m in enumerate(view) if dataplane.avoided(m.data_address)}
        return [
            [view[i] for i in row if i not in avoided] + [view[i] for i in row if i in avoided]
            for row in rows
        ]

    def closest_members(self, keys: Sequence[bytes], count: int = 1) -> list[list[Member]]:
        """Per key, the ``count`` members to use first: placed like a page digest's replicas,
        nodes the engine avoids last (the wave store places wave keys with it)."""
        return [row[:count] for row in self._replica_lists(keys)]

    def _node_failed(self, address: Address) -> None:
        """The engine failed a node (it is avoided meanwhile): probe it through the overlay."""
        member = next((m for m in self._members if m.data_address == address), None)
        if member is not None and self._overlay is not None:
            self._tasks.spawn(self._probe(member), "client-probe")

    async def _probe(self, member: Member) -> None:
        assert self._overlay is not None
        with contextlib.suppress(OverlayError):
            await self._overlay.probe(member.node_id)
            if self._dataplane is not None:
                self._dataplane.reinstate(member.data_address)  # it answered: use it again

    # -- reads -------------------------------------------------------------------------------

    async def get_many(self, digests: Sequence[bytes]) -> list[bytes]:
        """The pages of ``digests``, in request order, each verified; raises PagesUnavailable."""
        found, unavailable = await self.resolve(digests)
        if unavailable:
            raise PagesUnavailable(unavailable)
        return [found[d] for d in digests]

    async def resolve(self, digests: Sequence[bytes]) -> tuple[dict[bytes, bytes], set[bytes]]:
        """Resolve what can be resolved: (pages by digest, digests no replica could serve)."""
        self._running()
        started = time.perf_counter()
        found: dict[bytes, bytes] = {}
        wanted: list[bytes] = []
        for digest in dict.fromkeys(bytes(d) for d in digests):
            if len(digest) != DIGEST_SIZE:
                raise UsageError(f"a digest is {DIGEST_SIZE} bytes, got {len(digest)}")
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

    async def _fetch(self, digests: list[bytes], found: dict[bytes, bytes]) -> set[bytes]:
        """Resolve ``digests`` into ``found``; returns what no replica served."""
        if not digests:
            return set()
        dataplane = self._running()
        nodes, ids = self._addresses, self._ids
        rows = self._ring.replica_rows(digests, self.replicas) if ids else [[] for _ in digests]
        result = await dataplane.fetch(digests, rows, nodes)
        found.update(result.pages)
        return result.unresolved

    async def replicas_holding(
        self, digests: Sequence[bytes]
    ) -> list[list[tuple[bytes, bool | None]]]:
        """Per digest, its replicas (closest first) and whether each holds it (HAS): True,
        False, or None when the node did not answer."""
        dataplane = self._running()
        rows = self._replica_lists(list(digests))
        nodes = list({m.node_id: m for row in rows for m in row}.values())
        answers = await asyncio.gather(
            *(dataplane.has(m.data_address, list(digests)) for m in nodes)
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
        dataplane = self._running()
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
                *(dataplane.has(n.data_address, ds) for n, ds in groups.items())
            )
            for result in results:
                held |= result.held
            pending -= held
            if not pending:
                break
        return [bytes(d) in held for d in digests]

    async def cluster_status(self) -> list[MemberStatus]:
        """Every member of a fresh crawl of the ring, with its NODE_INFO answer (pages, bytes,
        capacity) and its health (``/readyz`` on its metrics port)."""
        dataplane = self._running()
        members = await self.refresh()

        async def one(member: Member) -> MemberStatus:
            try:
                info: wire.NodeInfo | None = await dataplane.node_info(member.data_address)
            except NodeUnreachableError:
                info = None
            health = "unknown"
            if member.metrics_port:
                health = await asyncio.to_thread(_fetch_health, member.host, member.metrics_port)
            return MemberStatus(member, info, health)

        return list(await asyncio.gather(*(one(m) for m in members)))

    # -- writes ------------------------------------------------------------------------------

    async def put_many(self, pages: Iterable[bytes | tuple[bytes, bytes]]) -> PutSummary:
        """Store pages on their R replicas; raises PublishFailed for pages stored nowhere.

        A replica that does not answer (its requests timed out through every attempt, the
        engine's congestion window having already slowed the publish down) is probed through
        the overlay: if it answers it was only slow, and its pages go to it again; if not, it
        counts as gone and its pages go to the next members of their placement. Up to
        ``PUT_ROUNDS`` rounds; a page fails only when no replica took it in any of them.
        """
        dataplane = self._running()
        items: dict[bytes, bytes] = {}
        for item in pages:
            digest, page = item if isinstance(item, tuple) else (digest_page(item), item)
            if len(page) != PAGE_SIZE:
                raise UsageError(f"a page is {PAGE_SIZE} bytes, got {len(page)}")
            if digest != ZERO_DIGEST:
                items[bytes(digest)] = bytes(page)
        summary = PutSummary(pages=len(items))
        digests = list(items)
        lists = self._replica_lists(digests)
        wanted = min(self.replicas, len({m.node_id for row in lists for m in row}) or 1)
        holders: dict[bytes, set[bytes]] = {d: set() for d in digests}  # node ids that took it
        rejected: dict[bytes, str] = {}
        gone: set[bytes] = set()  # node ids that answered neither a PUT nor a probe
        # Grouped by id(): hashing a Member (a dataclass) runs Python code, R times a page.
        members: dict[int, Member] = {}
        grouped: dict[int, list[bytes]] = {}
        for digest, row in zip(digests, lists, strict=True):
            for node in row:
                key = id(node)
                if key not in grouped:
                    members[key], grouped[key] = node, []
                grouped[key].append(digest)
        work = {members[key]: pages_of for key, pages_of in grouped.items()}
        for round_ in range(PUT_ROUNDS):
            if not work:
                break
            if round_:
                await asyncio.sleep(PUT_RETRY_BACKOFF * 2 ** (round_ - 1))
            nodes = list(work)
            outcomes = await asyncio.gather(
                *(
                    dataplane.put_pages(n.data_address, [(d, items[d]) for d in work[n]])
                    for n in nodes
                )
            )
            silent: dict[Member, set[bytes]] = {}
            for node, outcome in zip(nodes, outcomes, strict=True):
                if outcome.unanswered:
                    silent[node] = set(outcome.unanswered)
                for digest, status in outcome.status.items():
                    if status == wire.PutStatus.STORED:
                        summary.stored += 1
                        holders[digest].add(node.node_id)
                    elif status == wire.PutStatus.PRESENT:
                        summary.present += 1
                        holders[digest].add(node.node_id)
                    else:
                        rejected[digest] = status.name.lower()
            work = await self._put_retries(silent, holders, rejected, gone, wanted)
        self.metrics.published.inc(summary.stored + summary.present)
        summary.under_replicated = {d for d in digests if 0 < len(holders[d]) < wanted}
        failed = [d for d in digests if not holders[d]]
        if failed:
            reasons = sorted({rejected.get(d, "no replica answered") for d in failed})
            raise PublishFailed(failed, ", ".join(reasons))
        return summary

    async def _put_retries(
        self,
        silent: dict[Member, set[bytes]],
        holders: dict[bytes, set[bytes]],
        rejected: dict[bytes, str],
        gone: set[bytes],
        wanted: int,
    ) -> dict[Member, list[bytes]]:
        """What the next PUT round sends: the pages of nodes that did not answer, to the same
        node if it answers a probe (it was slow), else to the next live members of the page's
        placement (it is gone)."""
        if not silent:
            return {}
        alive = await asyncio.gather(*(self._answers_probe(n) for n in silent))
        work: dict[Member, list[bytes]] = {}
        moved: set[bytes] = set()
        for (node, unanswered), up in zip(silent.items(), alive, strict=True):
            if up:
                work[node] = [d for d in unanswered if d not in rejected]
            else:
                gone.add(node.node_id)
                moved |= unanswered
        moved = {d for d in moved if d not in rejected and len(holders[d]) < wanted}
        if moved:
            live = [m for m in self._members if m.node_id not in gone]
            ids = [m.node_id for m in live]
            order = sorted(moved)
            # Enough candidates to find R members that have not taken the page yet.
            depth = min(len(ids), wanted + len(gone))
            ring = Ring(ids, [m.domain for m in live], virtual_ids=self.virtual_ids)
            rows = ring.replica_rows(order, depth) if ids else [[] for _ in order]
            for digest, row in zip(order, rows, strict=True):
                need = wanted - len(holders[digest])
                for index in row:
                    if need <= 0:
                        break
                    member = live[index]
                    if member.node_id in holders[digest]:
                        continue
                    work.setdefault(member, []).append(digest)
                    need -= 1
        return {n: ds for n, ds in work.items() if ds}

    async def _answers_probe(self, member: Member) -> bool:
        """Whether ``member`` answers the overlay now (then the engine uses it again)."""
        if self._overlay is None:
            return False
        try:
            await self._overlay.probe(member.node_id)
        except OverlayError:
            return False
        self._running().reinstate(member.data_address)
        return True


def _fetch_health(host: str, port: int) -> str:
    """A member's /readyz verdict (blocking: run it in a thread)."""
    url = f"http://{format_address((host, port))}/readyz"
    try:
        with urllib.request.urlopen(url, timeout=HEALTH_TIMEOUT) as response:
            return "ready" if response.status == 200 else f"HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        return "not ready" if exc.code == 503 else f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError):
        return "unreachable"


class BlockingTemplateStoreClient:
    """The same client for callers without an event loop: a loop runs on a thread it owns."""

    def __init__(self, seeds: Sequence[Address], **kw: Unpack[ClientOptions]) -> None:
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
