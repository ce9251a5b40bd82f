"""The store node service: what ``tmdht node run`` runs.

:class:`StoreNode` owns, and starts in this order: the page store (LMDB), the data-plane server,
the metrics/health HTTP server, the Kademlia overlay (advertising the data and metrics ports),
the replication job. Once ready it writes its bound addresses to ``status_file`` (if
configured): with port 0 that is how a supervisor or a test learns them.

The HTTP server starts before the overlay so the metrics port can be advertised; /readyz says
503 until everything runs.

Shutdown (SIGTERM/SIGINT, or :meth:`stop`): stop taking requests, let queued writes commit and be
answered (bounded), stop the replication job and the overlay, close the socket, the HTTP server
and LMDB. Signal handlers are restored afterwards.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any, TypedDict

from tmdht import __version__, wire
from tmdht.aio.dataplane import DataPlaneClient
from tmdht.aio.http import HealthServer
from tmdht.aio.overlay import Overlay
from tmdht.aio.service import reload_cluster_keys, stop_on_signals, use_cluster_keys
from tmdht.aio.system import (
    OPEN_FILES_WANTED,
    buffer_grants,
    notify_supervisor,
    raise_open_files_limit,
    read_sysctl,
)
from tmdht.aio.tasks import TaskSet
from tmdht.config import NodeConfig
from tmdht.errors import OverlayError, TmdhtError
from tmdht.files import atomic_write
from tmdht.net.credentials import CLUSTER_KEY_ENV, ClusterCredentials
from tmdht.net.membership import Member, MembershipEventKind
from tmdht.net.operations import EngineStats
from tmdht.net.overlay import OverlayConfig
from tmdht.node.dataplane import DataPlaneServer
from tmdht.node.groupcommit import CommitPacing
from tmdht.node.metrics import NodeMetrics
from tmdht.node.replication import Replicator
from tmdht.node.storage import PageStore
from tmdht.node.wavestore import WaveStore
from tmdht.ratelimit import RateLimitConfig
from tmdht.records import RecordStore

__all__ = ["DRAIN_TIMEOUT", "NodeStatus", "StoreNode"]

log = logging.getLogger("tmdht.node")

DRAIN_TIMEOUT = 10.0
PEER_CACHE_FILE = "peers.json"
"""The members a node knew, in its data directory: how it rejoins when its seeds are down."""


class NodeStatus(TypedDict):
    """Where a running node listens and who it is: its status file, its READY line."""

    node_id: str
    """160-bit node id, hex."""
    pid: int
    kademlia: tuple[str, int]
    """(host, port) of its Kademlia socket."""
    data: tuple[str, int]
    """(host, port) of its data plane."""
    metrics: tuple[str, int]
    """(host, port) of its /metrics, /healthz and /readyz."""
    version: str


class StoreNode:
    """One store node. ``async with StoreNode(config) as node:`` or :meth:`run`."""

    def __init__(
        self,
        config: NodeConfig,
        *,
        env: Mapping[str, str] | None = None,
        on_ready: Callable[[NodeStatus], None] | None = None,
    ) -> None:
        """``on_ready(status)`` is called once every part runs (e.g. to print a READY line)."""
        self.config = config
        self._on_ready = on_ready
        self.metrics = NodeMetrics()
        self.credentials = ClusterCredentials.load(
            key_file=config.cluster_key_file,
            env=os.environ if env is None else env,
            insecure_open=config.insecure_open,
            how=f"--cluster-key-file FILE (cluster_key_file in the config file) or "
            f"${CLUSTER_KEY_ENV}; for local development only, --insecure-open "
            "(insecure_open = true)",
        )
        self.auth = self.credentials.authenticator()
        self.store: PageStore | None = None
        self.waves: WaveStore | None = None
        self.dataplane: DataPlaneServer | None = None
        self.overlay: Overlay | None = None
        self.client: DataPlaneClient | None = None
        self.replicator: Replicator | None = None
        self.http: HealthServer | None = None
        self._tasks = TaskSet(log, on_failure=self._task_failed)
        self._rules_warned: set[tuple[int | None, int | None]] = set()
        self._ready = False
        self._stopped = asyncio.Event()
        self._started_at = time.time()

    # -- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> StoreNode:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Start every part; on failure, stop what was started and re-raise."""
        cfg = self.config
        keys = self.credentials.keys
        if not keys:
            log.warning("RUNNING OPEN: cluster traffic is NOT authenticated (insecure_open = true)")
        elif len(keys) > 1:
            log.info(
                "key rotation: sending with key id %d, also accepting key ids %s",
                keys[0].key_id,
                ", ".join(str(k.key_id) for k in keys[1:]),
            )
        try:
            cfg.data_dir.mkdir(parents=True, exist_ok=True)
            self.store = PageStore.open(cfg.data_dir / "pages", capacity_bytes=cfg.capacity)
            if cfg.wave_capacity:
                self.waves = WaveStore.open(cfg.data_dir / "waves",
                                            capacity_bytes=cfg.wave_capacity,
                                            max_ttl=cfg.wave_max_ttl)
            self.dataplane = await DataPlaneServer.start(
                cfg.host,
                cfg.data_port,
                store=self.store,
                auth=self.auth,
                max_datagram=cfg.max_datagram,
                metrics=self.metrics,
                node_info=self._node_info,
                on_stored=self._stored,
                rate_limit=RateLimitConfig(rate=cfg.rate_limit, burst=cfg.rate_limit_burst),
                records=RecordStore(),
                waves=self.waves,
                commit_pacing=CommitPacing(max_delay=cfg.commit_delay),
            )
            self.http = HealthServer(
                cfg.host, cfg.metrics_port, self.metrics.registry, self._health
            )
            self.http.start()
            self.overlay = await Overlay.start(
                OverlayConfig(
                    data_port=self.dataplane.address[1],
                    data_dir=cfg.data_dir,
                    host=cfg.host,
                    port=cfg.kademlia_port,
                    seeds=cfg.seeds,
                    advertised_host=cfg.advertise_host
                    or ("" if cfg.host in ("0.0.0.0", "::") else cfg.host),
                    metrics_port=self.http.port,
                    rpc_timeout=cfg.rpc_timeout,
                    refresh_interval=cfg.refresh_interval,
                    cluster_key=self.credentials.overlay_key,
                    accepted_cluster_keys=self.credentials.accepted_overlay_keys,
                    require_stamped=cfg.require_stamped,
                    domain=cfg.failure_domain(socket.gethostname()),
                    virtual_ids=cfg.virtual_ids,
                    replicas=cfg.replicas,
                    peer_cache=cfg.data_dir / PEER_CACHE_FILE,
                )
            )
            self.client = await DataPlaneClient.open(
                self.auth, host=cfg.host, max_datagram=cfg.max_datagram
            )
            self.replicator = Replicator(
                store=self.store,
                client=self.client,
                self_id=self.overlay.node_id,
                members=self._members,
                replicas=cfg.replicas,
                virtual_ids=cfg.virtual_ids,
                rate=cfg.replication_rate,
                interval=cfg.replication_interval,
                grace=cfg.surplus_grace,
                metrics=self.metrics,
                on_unanswered=self._suspect,
                anti_entropy=cfg.anti_entropy,
                max_datagram=cfg.max_datagram,
            )
            self._check_socket_buffers()
            self._spawn(self.replicator.run(), "replication")
            self._spawn(self._watch_membership(), "membership")
            self.metrics.info.labels(self.overlay.node_id.hex(), __version__).set(1)
            self._bind_gauges()
            self._ready = True
            self.metrics.ready.set(1)
            self._write_status()
            if self._on_ready is not None:
                self._on_ready(self.status())
            log.info(
                "node %s ready: kademlia %s:%d, data %s:%d, metrics %s:%d, %d pages",
                self.overlay.node_id.hex()[:16],
                cfg.host,
                self.overlay.port,
                *self.dataplane.address,
                cfg.host,
                self.http.port,
                self.store.page_count,
            )
        except BaseException:
            await self.stop()
            raise

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        """Start an owned background task; a crash is logged and stops the node."""
        self._tasks.spawn(coro, f"tmdht-{name}")

    def _task_failed(self, name: str, exc: BaseException) -> None:
        self._stopped.set()

    async def stop(self) -> None:
        """Graceful shutdown (idempotent)."""
        self._ready = False
        self.metrics.ready.set(0)
        if self.dataplane is not None:
            await self.dataplane.drain(DRAIN_TIMEOUT)
        await self._tasks.cancel_all()
        if self.overlay is not None:
            await self.overlay.stop()
            self.overlay = None
        if self.client is not None:
            await self.client.close()
            self.client = None
        if self.dataplane is not None:
            self.dataplane.close()
            self.dataplane = None
        if self.http is not None:
            self.http.close()
            self.http = None
        if self.store is not None:
            self.store.close()
            self.store = None
        if self.waves is not None:
            self.waves.close()
            self.waves = None
        self._stopped.set()

    async def run(self) -> None:
        """Start, serve until SIGTERM/SIGINT (or a fatal error), then stop gracefully.

        As a service process it also raises its open-files limit (warning when the hard limit
        is lower than it wants) and tells systemd (``Type=notify``) when it is ready and when it
        stops.
        """
        soft, hard = raise_open_files_limit()
        if soft < OPEN_FILES_WANTED:
            log.warning(
                "open files limit is %d (hard limit %d), below the %d a node asks for: raise "
                "the hard limit (systemd LimitNOFILE=, docker run --ulimit nofile=, dockerd "
                "--default-ulimit) if the node runs out of file descriptors",
                soft,
                hard,
                OPEN_FILES_WANTED,
            )
        with stop_on_signals(self._stopped, reload=self.reload_keys):
            try:
                await self.start()
                notify_supervisor(f"READY=1\nSTATUS={self._status_line()}")
                await self._stopped.wait()
                log.info("shutting down")
                notify_supervisor("STOPPING=1\nSTATUS=draining and closing the page store")
            finally:
                await self.stop()

    def reload_keys(self) -> bool:
        """Re-read the cluster key file (SIGHUP, ``systemctl reload``) and use its keys from now
        on, on both planes: a rotation step without a restart. A file that cannot be read or
        parsed changes nothing: the node keeps its keys, logs why and returns False."""
        credentials = reload_cluster_keys(
            self.credentials, self.config.cluster_key_file,
            lambda new: use_cluster_keys(self.auth, self.overlay, new), log)
        self.metrics.key_reloads.labels("failed" if credentials is None else "ok").inc()
        if credentials is None:
            return False
        self.credentials = credentials
        return True

    def _check_socket_buffers(self) -> None:
        """Export every UDP socket's granted and requested buffers; warn about short ones."""
        assert self.dataplane is not None and self.client is not None
        assert self.overlay is not None
        sockets = {
            "kademlia": self.overlay.socket_buffers,
            "data": self.dataplane.buffers,
            "replication": self.client.buffers,
        }
        grants = [
            grant
            for name, buffers in sockets.items()
            for grant in buffer_grants(name, buffers.requested, (buffers.receive, buffers.send))
        ]
        for grant in grants:
            self.metrics.socket_buffer.labels(grant.socket, grant.direction).set(grant.granted)
            self.metrics.socket_buffer_requested.labels(grant.socket, grant.direction).set(
                grant.requested
            )
        short = [f"{g.socket} {g.direction} {g.granted} < {g.requested}" for g in grants if g.short]
        if short:
            log.warning(
                "socket buffers smaller than asked (%s; net.core.rmem_max=%s, wmem_max=%s): "
                "bursts beyond them are dropped; raise the sysctls on the host "
                "(deploy/systemd/90-tmdht.conf)",
                ", ".join(short),
                read_sysctl("net.core.rmem_max"),
                read_sysctl("net.core.wmem_max"),
            )

    def _status_line(self) -> str:
        assert self.overlay is not None and self.store is not None
        return (
            f"serving as {self.overlay.node_id.hex()[:16]}, {self.store.page_count} pages, "
            f"{len(self.overlay.members())} members"
        )

    # -- views -------------------------------------------------------------------------------

    @property
    def node_id(self) -> bytes:
        """This node's 160-bit id."""
        if self.overlay is None:
            raise TmdhtError("node is not running")
        return bytes(self.overlay.node_id)

    def _stored(self, digests: Sequence[bytes]) -> None:
        if self.replicator is not None:
            self.replicator.pages_added(digests)

    async def _suspect(self, node_id: bytes) -> None:
        """A replica did not answer the data plane: probe it until it answers or is dead."""
        overlay = self.overlay
        if overlay is None:
            return
        for _ in range(overlay.config.max_failures):
            try:
                await overlay.probe(node_id)
                return
            except OverlayError:  # RpcTimeoutError, UnknownPeerError: try again / give up
                continue

    def _members(self) -> list[Member]:
        return [] if self.overlay is None else self.overlay.members()

    async def _watch_membership(self) -> None:
        assert self.overlay is not None and self.replicator is not None
        subscription = self.overlay.subscribe(replay=False)
        for member in self._members():
            self._check_rule(member)
        try:
            async for event in subscription:
                if event.kind in (MembershipEventKind.JOINED, MembershipEventKind.LEFT):
                    log.info("member %s %s", event.member.node_id.hex()[:16], event.kind.value)
                    self.replicator.membership_changed()
                if event.kind is not MembershipEventKind.LEFT:
                    self._check_rule(event.member)
        finally:
            subscription.close()

    def _check_rule(self, member: Member) -> None:
        """Warn (once per rule seen) when a peer advertises another V or R than this node: the
        two place pages differently (clients follow what most members advertise)."""
        cfg = self.config
        theirs = (member.virtual_ids, member.replicas)
        same_v = member.virtual_ids in (None, cfg.virtual_ids)
        if theirs in self._rules_warned or (same_v and member.replicas in (None, cfg.replicas)):
            return
        self._rules_warned.add(theirs)
        log.warning(
            "member %s advertises V=%s R=%s but this node runs V=%d R=%d: pages are placed "
            "differently (set the same virtual_ids and replicas on every node)",
            member.node_id.hex()[:16], member.virtual_ids, member.replicas,
            cfg.virtual_ids, cfg.replicas,
        )  # fmt: skip

    def _bind_gauges(self) -> None:
        """Gauges read at scrape time from the parts that know them."""
        m = self.metrics

        def of_store(read: Callable[[PageStore], float]) -> Callable[[], float]:
            return lambda: read(self.store) if self.store is not None else 0.0

        def of_overlay(read: Callable[[Overlay], float]) -> Callable[[], float]:
            return lambda: read(self.overlay) if self.overlay is not None else 0.0

        m.pages_stored.set_function(of_store(lambda s: s.page_count))

        def of_replication(read: Callable[[EngineStats], float]) -> Callable[[], float]:
            return lambda: read(self.client.stats) if self.client is not None else 0.0

        traffic = m.replication_traffic
        traffic.labels("sent", "datagrams").set_function(
            of_replication(lambda s: s.datagrams_sent))
        traffic.labels("sent", "bytes").set_function(of_replication(lambda s: s.bytes_sent))
        traffic.labels("received", "datagrams").set_function(
            of_replication(lambda s: s.datagrams_received))
        traffic.labels("received", "bytes").set_function(
            of_replication(lambda s: s.bytes_received))
        m.bytes_stored.set_function(of_store(lambda s: s.bytes_stored))
        m.capacity.set_function(of_store(lambda s: s.capacity_bytes))
        m.disk.set_function(of_store(lambda s: s.disk_bytes()))
        m.peers.set_function(of_overlay(lambda o: max(0, o.stats().members - 1)))
        m.watch_overlay(lambda: self.overlay.stats() if self.overlay is not None else None)
        m.routing_table.set_function(of_overlay(lambda o: o.stats().routing_contacts))

    def _health(self) -> tuple[bool, dict[str, object]]:
        details: dict[str, object] = {"uptime_seconds": round(time.time() - self._started_at, 1)}
        if self.overlay is not None:
            details["node_id"] = self.overlay.node_id.hex()
            details["members"] = len(self.overlay.members())
        if self.store is not None:
            details["pages"] = self.store.page_count
        return self._ready, details

    def _node_info(self, request_id: int) -> wire.NodeInfo:
        assert self.store is not None and self.dataplane is not None and self.overlay is not None
        host = self.config.public_host
        return wire.NodeInfo(
            request_id=request_id,
            node_id=self.overlay.node_id,
            data_address=(host, self.dataplane.address[1]),
            kademlia_port=self.overlay.port,
            metrics_port=self.http.port if self.http else 0,
            version=__version__,
            pages_stored=self.store.page_count,
            bytes_stored=self.store.bytes_stored,
            capacity_bytes=self.store.capacity_bytes,
            flags=wire.NodeFlags(0) if self._ready else wire.NodeFlags.DRAINING,
        )

    def status(self) -> NodeStatus:
        """Bound addresses and identity, as written to the status file."""
        assert self.overlay is not None and self.dataplane is not None and self.http is not None
        host = self.config.public_host
        return NodeStatus(
            node_id=self.overlay.node_id.hex(),
            pid=os.getpid(),
            kademlia=(host, self.overlay.port),
            data=(host, self.dataplane.address[1]),
            metrics=(host, self.http.port),
            version=__version__,
        )

    def _write_status(self) -> None:
        path = self.config.status_file
        if path is None:
            return
        atomic_write(path, json.dumps(self.status()) + "\n", durable=False)
