"""Prometheus metrics of a store node, in a registry of its own (several nodes may share a
process in tests), plus process metrics. Names follow Prometheus conventions: ``tmdht_`` prefix,
``_total`` for counters, ``_bytes`` and ``_seconds`` units."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from tmdht.node.overlay import OverlayStats

__all__ = ["NodeMetrics", "OverlayCollector"]

LATENCY_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
)  # fmt: skip


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
        self.requests = Counter(
            "tmdht_requests_total",
            "Data-plane requests served, by message type.",
            ["type"],
            registry=r,
        )
        self.request_pages = Counter(
            "tmdht_request_pages_total",
            "Pages (or digests) handled in data-plane requests, by message type.",
            ["type"],
            registry=r,
        )
        self.pages_served = Counter(
            "tmdht_pages_served_total", "Pages sent to clients.", registry=r
        )
        self.misses = Counter(
            "tmdht_misses_total", "Pages asked for that this node lacks.", registry=r
        )
        self.puts = Counter(
            "tmdht_put_pages_total", "Pages offered by PUT, by result.", ["result"], registry=r
        )
        self.rejected = Counter(
            "tmdht_put_rejected_total", "Pages refused by PUT, by reason.", ["reason"], registry=r
        )
        self.bad_datagrams = Counter(
            "tmdht_bad_datagrams_total",
            "Datagrams dropped unread, by reason.",
            ["reason"],
            registry=r,
        )
        self.errors_sent = Counter(
            "tmdht_error_responses_total", "ERROR responses sent, by code.", ["code"], registry=r
        )
        self.latency = Histogram(
            "tmdht_request_duration_seconds",
            "Time from a request's arrival to its last response datagram, by message type.",
            ["type"],
            buckets=LATENCY_BUCKETS,
            registry=r,
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
        self.sweeps = Counter(
            "tmdht_replication_sweeps_total", "Completed replication sweeps.", registry=r
        )
        self.sweep_seconds = Gauge(
            "tmdht_replication_last_sweep_seconds",
            "Duration of the last full replication sweep.",
            registry=r,
        )
        self.ready = Gauge("tmdht_ready", "1 when the node serves requests.", registry=r)

    def watch_overlay(self, stats: Callable[[], OverlayStats | None]) -> None:
        """Export the overlay's datagram counters, read from ``stats()`` at scrape time."""
        self.registry.register(OverlayCollector(stats))


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
                ("malformed", sock.dropped_malformed),
                ("unknown_method", sock.dropped_unknown_method),
                ("unexpected_response", sock.unexpected_responses),
            ):
                bad.add_metric([reason], value)
            received.add_metric([], sock.datagrams_received)
            timeouts.add_metric([], sock.rpc_timeouts)
            bad_replies.add_metric([], stats.bad_replies)
        yield from (bad, received, timeouts, bad_replies)
