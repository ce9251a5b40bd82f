"""Prometheus metrics of a vnet agent, read from the switch's counters at scrape time.

Names: ``tmdht_vnet_`` prefix, ``_total`` counters. The switch (:class:`tmdht.vswitch.SwitchStats`)
and the directory keep plain numbers on the event loop; the collector turns them into samples
when Prometheus scrapes, so forwarding a frame costs no metric call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from tmdht.vnet.directory import DirectoryStats
    from tmdht.vswitch import SwitchStats

__all__ = ["AgentCounters", "VnetMetrics"]


@dataclass
class AgentCounters:
    """Counters of the agent's IO skin (the switch counts the rest)."""

    bad_datagrams: dict[str, int] = field(default_factory=dict)
    """Tunnel datagrams dropped before the switch saw them, by reason."""
    accountings: dict[str, int] = field(default_factory=dict)
    """Stops accounted, by how exactly (``exact``, ``socket_only``)."""
    key_reloads: dict[str, int] = field(default_factory=dict)
    """Cluster key file re-reads (SIGHUP), by outcome (``ok``, ``failed``)."""
    ports_closed: int = 0
    """Ports removed because their QEMU went away."""
    port_overflow: Callable[[], int] = lambda: 0
    """Frames dropped because a VM read slower than they came (its port's queue was full)."""


@dataclass
class _Sources:
    switch: Callable[[], SwitchStats | None]
    directory: Callable[[], DirectoryStats | None]
    agent: AgentCounters
    held: Callable[[], int]
    ports: Callable[[], dict[str, int]]
    ready: Callable[[], bool]


class _AgentCollector(Collector):
    def __init__(self, sources: _Sources) -> None:
        self._s = sources

    def describe(self) -> list[Metric]:
        return list(self._families(empty=True))

    def collect(self) -> Iterator[Metric]:
        yield from self._families(empty=False)

    def _families(self, *, empty: bool) -> Iterator[Metric]:
        s = self._s
        stats = None if empty else s.switch()
        frames = CounterMetricFamily("tmdht_vnet_frames", "Frames handled, by where they went.",
                                     labels=["direction"])
        dropped = CounterMetricFamily("tmdht_vnet_dropped_frames",
                                      "Frames dropped, by reason.", labels=["reason"])
        handovers = CounterMetricFamily("tmdht_vnet_handovers",
                                        "Migrations handed over from this agent, by outcome.",
                                        labels=["outcome"])
        handover_frames = CounterMetricFamily(
            "tmdht_vnet_handover_frames", "Frames of migrating VMs passed between agents.",
            labels=["direction"])
        retrans = CounterMetricFamily("tmdht_vnet_handover_retransmissions",
                                      "Handed-over frames sent again (not acknowledged in time).")
        skipped = CounterMetricFamily(
            "tmdht_vnet_handover_frames_lost",
            "Handed-over frames given up on (their source agent stopped sending them).")
        stranded = CounterMetricFamily(
            "tmdht_vnet_stranded_frames_recovered",
            "Frames written to a VM that it never received, recovered when it stopped.")
        fences = CounterMetricFamily("tmdht_vnet_fence_waits",
                                     "Frames that waited for earlier ones on a VM's old path, "
                                     "by outcome.", labels=["outcome"])
        held = GaugeMetricFamily("tmdht_vnet_held_frames",
                                 "Frames held for paused or migrating VMs (or kept for a "
                                 "handover that may still fail).")
        ports = GaugeMetricFamily("tmdht_vnet_ports", "Attached ports, by state.",
                                  labels=["state"])
        bad = CounterMetricFamily("tmdht_vnet_bad_datagrams",
                                  "Tunnel datagrams dropped unread, by reason.", labels=["reason"])
        accountings = CounterMetricFamily(
            "tmdht_vnet_stop_accountings", "VM stops accounted for, by exactness.",
            labels=["mode"])
        directory = CounterMetricFamily("tmdht_vnet_directory_requests",
                                        "MAC directory requests, by kind and result.",
                                        labels=["kind", "result"])
        redirects = CounterMetricFamily("tmdht_vnet_redirects",
                                        "LOCATION messages sent to agents using an old location.")
        reloads = CounterMetricFamily(
            "tmdht_cluster_key_reloads",
            "Cluster key file re-reads (SIGHUP), by outcome (ok, failed).", labels=["outcome"])
        ready = GaugeMetricFamily("tmdht_vnet_ready", "1 when the agent forwards frames.")
        if not empty:
            if stats is not None:
                for direction, value in (
                        ("from_ports", stats.frames_from_ports),
                        ("to_ports", stats.frames_to_ports),
                        ("sent", stats.frames_sent), ("received", stats.frames_received),
                        ("flooded", stats.flooded), ("forwarded", stats.forwarded),
                        ("held", stats.held), ("released", stats.released)):
                    frames.add_metric([direction], value)
                for reason, value in sorted(stats.dropped.items()):
                    dropped.add_metric([reason], value)
                dropped.add_metric(["port_queue_full"], s.agent.port_overflow())
                for outcome, value in (("started", stats.handovers_started),
                                       ("completed", stats.handovers_completed),
                                       ("aborted", stats.handovers_aborted)):
                    handovers.add_metric([outcome], value)
                handover_frames.add_metric(["sent"], stats.handover_frames_sent)
                handover_frames.add_metric(["received"], stats.handover_frames_received)
                retrans.add_metric([], stats.handover_retransmissions)
                skipped.add_metric([], stats.handover_frames_skipped)
                stranded.add_metric([], stats.stranded_recovered)
                fences.add_metric(["waited"], stats.fence_waits)
                fences.add_metric(["timed_out"], stats.fence_timeouts)
                redirects.add_metric([], stats.redirects)
            held.add_metric([], s.held())
            for state, count in sorted(s.ports().items()):
                ports.add_metric([state], count)
            for reason, value in sorted(s.agent.bad_datagrams.items()):
                bad.add_metric([reason], value)
            for mode, value in sorted(s.agent.accountings.items()):
                accountings.add_metric([mode], value)
            for outcome in ("ok", "failed"):
                reloads.add_metric([outcome], s.agent.key_reloads.get(outcome, 0))
            dstats = s.directory()
            if dstats is not None:
                directory.add_metric(["put", "ok"], dstats.puts - dstats.put_failures)
                directory.add_metric(["put", "failed"], dstats.put_failures)
                directory.add_metric(["put", "stale"], dstats.stale_puts)
                directory.add_metric(["get", "ok"], dstats.gets - dstats.get_failures)
                directory.add_metric(["get", "failed"], dstats.get_failures)
            ready.add_metric([], 1 if s.ready() else 0)
        yield from (frames, dropped, handovers, handover_frames, retrans, skipped, stranded,
                    fences, held, ports, bad, accountings, directory, redirects, reloads,
                    ready)


class VnetMetrics:
    """The agent's registry: its counters plus process metrics."""

    def __init__(self, *, switch: Callable[[], SwitchStats | None],
                 directory: Callable[[], DirectoryStats | None], agent: AgentCounters,
                 held: Callable[[], int], ports: Callable[[], dict[str, int]],
                 ready: Callable[[], bool], registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self.registry.register(_AgentCollector(_Sources(switch, directory, agent, held, ports,
                                                        ready)))
