"""The client library's Prometheus metrics (``tmdht_client_*``), in a registry the caller may
pass.

The request engine's counters (batches, retries, failovers, hedges, verification failures) are
plain numbers it keeps (:class:`tmdht.net.engine.EngineStats`); they are exported at scrape time
by a collector, the way a node exports its data-plane counters. The rest are updated by
:class:`~tmdht.client.store.TemplateStoreClient` per call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from tmdht.net.operations import EngineStats

__all__ = ["RESOLVE_BUCKETS", "ClientMetrics"]

RESOLVE_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0,
)  # fmt: skip

_ENGINE_COUNTERS = (
    ("tmdht_client_batches", "GET batches sent to nodes.", "batches"),
    ("tmdht_client_retries", "Requests re-sent after lost datagrams.", "retries"),
    (
        "tmdht_client_failovers",
        "Pages asked of a further replica after a miss or failure.",
        "failovers",
    ),
    ("tmdht_client_hedges", "Batches hedged to a second replica.", "hedges"),
    (
        "tmdht_client_verification_failures",
        "Pages that did not match their digest.",
        "verification_failures",
    ),
)


class _EngineCollector(Collector):
    """The request engine's counters, read at scrape time (zero before the client starts)."""

    def __init__(self) -> None:
        self.stats: Callable[[], EngineStats | None] = lambda: None

    def describe(self) -> list[Metric]:
        return list(self._families(None))

    def collect(self) -> Iterator[Metric]:
        yield from self._families(self.stats())

    @staticmethod
    def _families(stats: EngineStats | None) -> Iterator[Metric]:
        for name, documentation, field in _ENGINE_COUNTERS:
            family = CounterMetricFamily(name, documentation)
            family.add_metric([], getattr(stats, field) if stats is not None else 0)
            yield family


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
        self.virtual_ids = Gauge(
            "tmdht_client_virtual_ids",
            "Virtual IDs per node (V) pages are placed with: the one the members advertise.",
            registry=r,
        )
        self.placement_disagreements = Gauge(
            "tmdht_client_placement_disagreements",
            "Members advertising another V than the one pages are placed with (should be 0).",
            registry=r,
        )
        self._engine = _EngineCollector()
        r.register(self._engine)

    def watch(self, stats: Callable[[], EngineStats | None]) -> None:
        """Export the counters of the engine ``stats()`` returns (None: not running)."""
        self._engine.stats = stats
