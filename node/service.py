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
import signal
import time
from collections.abc import Callable, Sequence
from typing import Any

from tmdht import __version__, wire
from tmdht.auth import Authenticator, ClusterKey, keyring_from, parse_cluster_keys
from tmdht.client.dataplane import DataPlaneClient
from tmdht.config import NodeConfig
from tmdht.errors import ConfigError, TmdhtError
from tmdht.node.dataplane import DataPlaneServer
from tmdht.node.http import HealthServer
from tmdht.node.metrics import NodeMetrics
from tmdht.node.overlay import MembershipEventKind, Overlay, OverlayConfig, OverlayError
from tmdht.node.replication import Replicator, Target
from tmdht.node.storage import PageStore
from tmdht.ratelimit import RateLimitConfig
from tmdht.records import RecordStore

__all__ = ["CLUSTER_KEY_ENV", "StoreNode", "load_cluster_key", "load_cluster_keys"]

log = logging.getLogger("tmdht.node")

CLUSTER_KEY_ENV = "TMDHT_CLUSTER_KEY"
DRAIN_TIMEOUT = 10.0


def load_cluster_keys(
    config: NodeConfig, env: dict[str, str] | None = None
) -> list[ClusterKey] | None:
    """The cluster keys from ``cluster_key_file`` or $TMDHT_CLUSTER_KEY; None only if open.

    The first key is the one the node sends with; every key listed is accepted (a rotation, see
    :func:`tmdht.auth.parse_cluster_keys`). Raises ConfigError when there is no key and the node
    was not told to run open.
    """
    env = dict(os.environ) if env is None else env
    if config.cluster_key_file is not None:
        try:
            text = config.cluster_key_file.read_text()
        except OSError as exc:
            raise ConfigError(
                f"cluster key file {config.cluster_key_file}: {exc.strerror}"
            ) from None
        try:
            return parse_cluster_keys(text)
        except ConfigError as exc:
            raise ConfigError(f"cluster key file {config.cluster_key_file}: {exc}") from None
    if env.get(CLUSTER_KEY_ENV):
        try:
            return parse_cluster_keys(env[CLUSTER_KEY_ENV])
        except ConfigError as exc:
            raise ConfigError(f"${CLUSTER_KEY_ENV}: {exc}") from None
    if config.insecure_open:
        return None
    raise ConfigError(
        "no cluster key: set cluster_key_file or $TMDHT_CLUSTER_KEY "
        "(or insecure_open = true for local development only)"
    )


def load_cluster_key(config: NodeConfig, env: dict[str, str] | None = None) -> bytes | None:
    """The secret of the key the node sends with (see :func:`load_cluster_keys`)."""
    keys = load_cluster_keys(config, env)
    return None if keys is None else keys[0].secret


class StoreNode:
    """One store node. ``async with StoreNode(config) as node:`` or :meth:`run`."""

    def __init__(
        self,
        config: NodeConfig,
        *,
        env: dict[str, str] | None = None,
        on_ready: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        """``on_ready(status)`` is called once every part runs (e.g. to print a READY line)."""
        self.config = config
        self._on_ready = on_ready
        self.metrics = NodeMetrics()
        self._keys = load_cluster_keys(config, env)
        self._key = None if self._keys is None else self._keys[0].secret
        self.auth = (
            Authenticator.open_mode()
            if self._keys is None
            else Authenticator.keyed(keyring_from(self._keys))
        )
        self.store: PageStore | None = None
        self.dataplane: DataPlaneServer | None = None
        self.overlay: Overlay | None = None
        self.client: DataPlaneClient | None = None
        self.replicator: Replicator | None = None
        self.http: HealthServer | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
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
        if self._keys is None:
            log.warning("RUNNING OPEN: cluster traffic is NOT authenticated (insecure_open = true)")
        elif len(self._keys) > 1:
            log.info(
                "key rotation: sending with key id %d, also accepting key ids %s",
                self._keys[0].key_id,
                ", ".join(str(k.key_id) for k in self._keys[1:]),
            )
        try:
            cfg.data_dir.mkdir(parents=True, exist_ok=True)
            self.store = PageStore.open(cfg.data_dir / "pages", capacity_bytes=cfg.capacity)
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
                    cluster_key=self._key,
                    accepted_cluster_keys=tuple(k.secret for k in (self._keys or [])[1:]),
                )
            )
            self.client = await DataPlaneClient.open(
                self.auth, host=cfg.host, max_datagram=cfg.max_datagram
            )
            self.replicator = Replicator(
                store=self.store,
                client=self.client,
                self_id=self.overlay.node_id,
                members=self._targets,
                replicas=cfg.replicas,
                rate=cfg.replication_rate,
                interval=cfg.replication_interval,
                grace=cfg.surplus_grace,
                metrics=self.metrics,
                on_unanswered=self._suspect,
            )
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

    def _spawn(self, coro: Any, name: str) -> None:
        """Start an owned background task; a crash is logged and stops the node."""
        task = asyncio.create_task(coro, name=f"tmdht-{name}")
        self._tasks.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self._tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.error(
                    "background task %s failed: %r", name, t.exception(), exc_info=t.exception()
                )
                self._stopped.set()

        task.add_done_callback(done)

    async def stop(self) -> None:
        """Graceful shutdown (idempotent)."""
        self._ready = False
        self.metrics.ready.set(0)
        if self.dataplane is not None:
            await self.dataplane.drain(DRAIN_TIMEOUT)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
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
        self._stopped.set()

    async def run(self) -> None:
        """Start, serve until SIGTERM/SIGINT (or a fatal error), then stop gracefully."""
        loop = asyncio.get_running_loop()
        signals = (signal.SIGTERM, signal.SIGINT)
        previous = {s: signal.getsignal(s) for s in signals}
        for s in signals:
            loop.add_signal_handler(s, self._stopped.set)
        try:
            await self.start()
            await self._stopped.wait()
            log.info("shutting down")
        finally:
            for s in signals:
                loop.remove_signal_handler(s)
                signal.signal(s, previous[s])
            await self.stop()

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

    def _targets(self) -> list[Target]:
        if self.overlay is None:
            return []
        return [Target(m.node_id, m.data_address) for m in self.overlay.members()]

    async def _watch_membership(self) -> None:
        assert self.overlay is not None and self.replicator is not None
        subscription = self.overlay.subscribe(replay=False)
        try:
            async for event in subscription:
                if event.kind in (MembershipEventKind.JOINED, MembershipEventKind.LEFT):
                    log.info("member %s %s", event.member.node_id.hex()[:16], event.kind.value)
                    self.replicator.membership_changed()
        finally:
            subscription.close()

    def _bind_gauges(self) -> None:
        """Gauges read at scrape time from the parts that know them."""
        m = self.metrics

        def of_store(read: Callable[[PageStore], float]) -> Callable[[], float]:
            return lambda: read(self.store) if self.store is not None else 0.0

        def of_overlay(read: Callable[[Overlay], float]) -> Callable[[], float]:
            return lambda: read(self.overlay) if self.overlay is not None else 0.0

        m.pages_stored.set_function(of_store(lambda s: s.page_count))
        m.bytes_stored.set_function(of_store(lambda s: s.bytes_stored))
        m.capacity.set_function(of_store(lambda s: s.capacity_bytes))
        m.disk.set_function(of_store(lambda s: s.disk_bytes()))
        m.peers.set_function(of_overlay(lambda o: max(0, o.stats().members - 1)))
        m.watch_overlay(lambda: self.overlay.stats() if self.overlay is not None else None)
        m.routing_table.set_function(of_overlay(lambda o: o.stats().routing_contacts))

    def _health(self) -> tuple[bool, dict[str, Any]]:
        details: dict[str, Any] = {"uptime_seconds": round(time.time() - self._started_at, 1)}
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

    def status(self) -> dict[str, Any]:
        """Bound addresses and identity, as written to the status file."""
        assert self.overlay is not None and self.dataplane is not None and self.http is not None
        host = self.config.public_host
        return {
            "node_id": self.overlay.node_id.hex(),
            "pid": os.getpid(),
            "kademlia": [host, self.overlay.port],
            "data": [host, self.dataplane.address[1]],
            "metrics": [host, self.http.port],
            "version": __version__,
        }

    def _write_status(self) -> None:
        path = self.config.status_file
        if path is None:
            return
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self.status()) + "\n")
        tmp.replace(path)
