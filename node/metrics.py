"""Prometheus metrics of a store node, in a registry of its own (several nodes may share a
process in tests), plus process metrics. Names follow Prometheus conventions: ``tmdht_`` prefix,
``_total`` for counters, ``_bytes`` and ``_seconds`` units.

The data plane's per-request metrics are :class:`LoopCounter` / :class:`LoopHistogram` families:
plain numbers updated by the one thread that serves requests (the event loop) and read at scrape
time by :class:`LoopMetricsCollector`. A prometheus-client ``inc()`` takes a lock and checks its
argument (~1 µs with cold caches, and a GET made five of them); these are an attribute update.
Names, types, labels and samples (``_total``, ``_created``, ``_bucket``, ...) are the same.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client import metrics as _client_metrics
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from tmdht.aio.overlay import OverlayStats

__all__ = [
    "LoopCounter",
    "LoopHistogram",
    "LoopMetricsCollector",
    "NodeMetrics",
    "OverlayCollector",
]

LATENCY_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
)  # fmt: skip
GROUP_COMMIT_BUCKETS = (1, 8, 32, 128, 512, 1024, 2048, 4096)


class NodeMetrics:
    """Every metric a node exports."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self.info = Gauge(
            "tmdht_node_info", "Node identity (value 1).", ["node_id", "version"], registry=r
        )
        self.pages_stored = Gauge("tmdht_stored_pages", "Pages held by this node.", registry=r)
        self.bytes_stored = Gauge("tmdht_stored_bytes", "Page bytes held by this node.", registry=r)
        self.capacity = Gauge("tmdht_capacity_bytes", "Page bytes this node may hold.", registry=r)
        self.disk = Gauge("tmdht_disk_bytes", "Bytes the page store takes on disk.", registry=r)
        # Data-plane metrics: updated on the event loop for every request (see the docstring).
        self.requests = LoopCounter(
            "tmdht_requests_total", "Data-plane requests served, by message type.", ["type"]
        )
        self.request_pages = LoopCounter(
            "tmdht_request_pages_total",
            "Pages (or digests) handled in data-plane requests, by message type.",
            ["type"],
        )
        self.pages_served = LoopCounter("tmdht_pages_served_total", "Pages sent to clients.")
        self.misses = LoopCounter("tmdht_misses_total", "Pages asked for that this node lacks.")
        self.puts = LoopCounter(
            "tmdht_put_pages_total", "Pages offered by PUT, by result.", ["result"]
        )
        self.rejected = LoopCounter(
            "tmdht_put_rejected_total", "Pages refused by PUT, by reason.", ["reason"]
        )
        self.bad_datagrams = LoopCounter(
            "tmdht_bad_datagrams_total", "Datagrams dropped unread, by reason.", ["reason"]
        )
        self.errors_sent = LoopCounter(
            "tmdht_error_responses_total", "ERROR responses sent, by code.", ["code"]
        )
        self.latency = LoopHistogram(
            "tmdht_request_duration_seconds",
            "Time from a request's arrival to its last response datagram, by message type.",
            ["type"],
            buckets=LATENCY_BUCKETS,
        )
        self.group_commit_pages = LoopHistogram(
            "tmdht_group_commit_pages",
            "Pages per group commit of PUTs (one LMDB transaction, one fsync).",
            [],
            buckets=GROUP_COMMIT_BUCKETS,
        )
        r.register(
            LoopMetricsCollector(
                [
                    self.requests,
                    self.request_pages,
                    self.pages_served,
                    self.misses,
                    self.puts,
                    self.rejected,
                    self.bad_datagrams,
                    self.errors_sent,
                    self.latency,
                    self.group_commit_pages,
                ]
            )
        )
        self.routing_table = Gauge(
            "tmdht_routing_table_size", "Contacts in the Kademlia routing table.", registry=r
        )
        self.peers = Gauge(
            "tmdht_known_peers", "Live members known to this node, itself excluded.", registry=r
        )
        self.backlog = Gauge(
            "tmdht_replication_backlog_pages",
            "Pages waiting to be copied to their replicas.",
            registry=r,
        )
        self.under_replicated = Gauge(
            "tmdht_under_replicated_pages",
            "Pages held here with fewer than R live copies, as of the last replication sweep.",
            registry=r,
        )
        self.replicated = Counter(
            "tmdht_replicated_pages_total",
            "Pages copied to other nodes by replication.",
            registry=r,
        )
        self.surplus_dropped = Counter(
            "tmdht_surplus_pages_dropped_total",
            "Pages dropped after their grace period.",
            registry=r,
        )
        self.key_reloads = Counter(
            "tmdht_cluster_key_reloads_total",
            "Cluster key file re-reads (SIGHUP), by outcome (ok, failed).",
            ["outcome"],
            registry=r,
        )
        self.replication_traffic = Gauge(
            "tmdht_replication_traffic",
            "Data-plane traffic of the replication job's requests (HAS, PUT, RANGE_HASH) and "
            "their answers since start, by direction and unit (datagrams, bytes).",
            ["direction", "unit"],
            registry=r,
        )
        self.sweeps = Counter(
            "tmdht_replication_sweeps_total", "Completed replication sweeps.", registry=r
        )
        self.sweep_seconds = Gauge(
            "tmdht_replication_last_sweep_seconds",
            "Duration of the last full replication sweep.",
            registry=r,
        )
        self.ready = Gauge("tmdht_ready", "1 when the node serves requests.", registry=r)
        # Linux caps a socket buffer request at net.core.rmem_max/wmem_max without an error:
        # granted < requested means bursts of datagrams beyond the grant are dropped.
        self.socket_buffer = Gauge(
            "tmdht_socket_buffer_bytes",
            "Socket buffer size the kernel granted, by socket (kademlia, data, replication) "
            "and direction (receive, send).",
            ["socket", "direction"],
            registry=r,
        )
        self.socket_buffer_requested = Gauge(
            "tmdht_socket_buffer_requested_bytes",
            "Socket buffer size the node asked for, by socket and direction.",
            ["socket", "direction"],
            registry=r,
        )

    def watch_overlay(self, stats: Callable[[], OverlayStats | None]) -> None:
        """Export the overlay's datagram counters, read from ``stats()`` at scrape time."""
        self.registry.register(OverlayCollector(stats))


def _created_samples() -> bool:
    """Whether prometheus-client exports ``_created`` samples (see its disable_created_metrics)."""
    return bool(getattr(_client_metrics, "_use_created", True))


class _LoopCounterChild:
    """One series of a :class:`LoopCounter`."""

    __slots__ = ("created", "value")

    def __init__(self) -> None:
        self.value: float = 0
        self.created = time.time()

    def inc(self, amount: float = 1) -> None:
        """Add ``amount`` (>= 0: a counter only goes up; not checked, the callers are ours)."""
        self.value += amount


class LoopCounter:
    """A Prometheus counter (family) kept as plain numbers, for one updating thread.

    Like prometheus-client's ``Counter``: ``labels(*values)`` returns a child (created on first
    use, as a series of its own), ``inc()`` on an unlabelled counter counts on its one child.
    Updates are not locked: only one thread may update (the data plane's event loop); a scrape
    from another thread reads the numbers, which the GIL keeps whole.
    """

    __slots__ = ("_children", "_only", "documentation", "labelnames", "name")

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> None:
        self.name = name.removesuffix("_total")
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], _LoopCounterChild] = {}
        self._only = None if self.labelnames else self.labels()

    def labels(self, *values: str) -> _LoopCounterChild:
        """The child for these label values (one per label name, in order)."""
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, got {values}")
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = _LoopCounterChild()
        return child

    def inc(self, amount: float = 1) -> None:
        """Count on an unlabelled counter."""
        if self._only is None:
            raise ValueError(f"{self.name} has labels: use labels(...).inc()")
        self._only.value += amount

    def family(self, *, with_samples: bool = True) -> CounterMetricFamily:
        """The counter's current samples, for a collector."""
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        if with_samples:
            created = _created_samples()
            for values, child in list(self._children.items()):
                family.add_metric(values, child.value, created=child.created if created else None)
        return family


class _LoopHistogramChild:
    """One series of a :class:`LoopHistogram`: a count per bucket (not cumulative) and a sum."""

    __slots__ = ("_bounds", "counts", "created", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        self.counts = [0] * len(bounds)
        self.sum = 0.0
        self.created = time.time()

    def observe(self, value: float) -> None:
        """Count one observation in the first bucket whose upper bound (``le``) holds it."""
        self.counts[bisect.bisect_left(self._bounds, value)] += 1
        self.sum += value


class LoopHistogram:
    """A Prometheus histogram (family) kept as plain numbers, for one updating thread.

    Every observation is counted (no sampling): one bisect and two additions cost less than the
    clock read that measured the value, and ``_count`` keeps agreeing with the request counters.
    Same threading rule as :class:`LoopCounter`.
    """

    __slots__ = ("_bounds", "_children", "documentation", "labelnames", "name")

    def __init__(
        self, name: str, documentation: str, labelnames: Sequence[str], buckets: Sequence[float]
    ) -> None:
        bounds = tuple(sorted(float(b) for b in buckets))
        if not bounds or bounds[-1] != float("inf"):
            bounds += (float("inf"),)
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._bounds = bounds
        self._children: dict[tuple[str, ...], _LoopHistogramChild] = {}

    def labels(self, *values: str) -> _LoopHistogramChild:
        """The child for these label values (one per label name, in order)."""
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, got {values}")
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = _LoopHistogramChild(self._bounds)
        return child

    def family(self, *, with_samples: bool = True) -> HistogramMetricFamily:
        """The histogram's current samples (cumulative buckets, count, sum, created)."""
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        if with_samples:
            created = _created_samples()
            les = [floatToGoString(bound) for bound in self._bounds]  # type: ignore[no-untyped-call]
            for values, child in list(self._children.items()):
                total = child.sum  # read before the counts: a racing observe() may add to both
                counts, running = list(child.counts), 0
                buckets = []
                for le, count in zip(les, counts, strict=True):
                    running += count
                    buckets.append((le, running))
                family.add_metric(values, buckets, total)
                if created:
                    labels = dict(zip(self.labelnames, values, strict=True))
                    family.samples.append(Sample(f"{self.name}_created", labels, child.created))
        return family


class LoopMetricsCollector(Collector):
    """Exports :class:`LoopCounter` and :class:`LoopHistogram` families at scrape time."""

    def __init__(self, families: Sequence[LoopCounter | LoopHistogram]) -> None:
        self._families = tuple(families)

    def describe(self) -> list[Metric]:
        """Names and types only."""
        return [f.family(with_samples=False) for f in self._families]

    def collect(self) -> Iterator[Metric]:
        """Current values."""
        for f in self._families:
            yield f.family()


class OverlayCollector(Collector):
    """The Kademlia overlay's socket counters as Prometheus counters (read at scrape time)."""

    def __init__(self, stats: Callable[[], OverlayStats | None]) -> None:
        self._stats = stats

    def describe(self) -> list[Metric]:
        """Names only (so registering does not call ``stats`` before the overlay runs)."""
        return list(self._families(None))

    def collect(self) -> Iterator[Metric]:
        """Current values."""
        yield from self._families(self._stats())

    @staticmethod
    def _families(stats: OverlayStats | None) -> Iterator[Metric]:
        bad = CounterMetricFamily(
            "tmdht_overlay_bad_datagrams",
            "Kademlia-port datagrams dropped unread, by reason (auth: no valid cluster tag).",
            labels=["reason"],
        )
        received = CounterMetricFamily(
            "tmdht_overlay_datagrams_received", "Datagrams read from the Kademlia socket."
        )
        timeouts = CounterMetricFamily(
            "tmdht_overlay_rpc_timeouts", "Kademlia RPCs that got no answer in time."
        )
        bad_replies = CounterMetricFamily(
            "tmdht_overlay_bad_replies", "Kademlia answers that did not validate."
        )
        if stats is not None:
            sock = stats.socket
            for reason, value in (
                ("auth", sock.dropped_unauthenticated),
                ("replay", sock.dropped_replayed),
                ("malformed", sock.dropped_malformed),
                ("unknown_method", sock.dropped_unknown_method),
                ("unexpected_response", sock.unexpected_responses),
            ):
                bad.add_metric([reason], value)
            received.add_metric([], sock.datagrams_received)
            timeouts.add_metric([], sock.rpc_timeouts)
            bad_replies.add_metric([], stats.bad_replies)
        yield from (bad, received, timeouts, bad_replies)
