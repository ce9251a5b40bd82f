"""The migration proxies: QEMU's stream in, a dedup stream over TCP, QEMU's stream out.

The sender (source host) reads QEMU's outgoing migration stream on stdin — QEMU runs it as
``migrate "exec:tmdht qemu send ..."`` — and drives a sender core. The receiver (destination
host) listens for the sender, rebuilds QEMU's stream with a receiver core and writes it to
stdout — QEMU runs it as ``-incoming "exec:tmdht qemu receive ..."``. The cores come from
:mod:`tmdht.native`: the Rust module, or the pure-Python reference (``SenderRewriter`` and
``ReceiverRebuilder`` in :mod:`tmdht.migration_stream`).
Both proxies are thin skins over them, called once per chunk: the receiver on asyncio (it
resolves through the async client), the sender on a plain selector loop — it starts inside
QEMU's migration time, and asyncio alone took half of its start-up budget to import.

The receiver resolves template digests through the store cluster in windows ahead of the point
where it writes (``resolve_parallel`` batches of ``resolve_batch`` digests in flight), and asks
the sender for any digest the cluster cannot serve — including when every node is down: after a
batch fails outright the cluster is skipped for ``skip_cluster_for`` seconds and pages go
straight to the sender. Memory stays bounded by the sender's flow window.

Failure: any error (the other proxy gone, a bad record, a digest mismatch) ends the proxy with a
non-zero status. A dead sender makes the source QEMU's writes fail, so its migration fails and
the guest keeps running; a receiver that did not verify the stream never hands QEMU the device
state, so the destination never resumes.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import importlib.util
import json
import logging
import os
import selectors
import socket
import stat
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, TypeVar, cast

from tmdht import wire
from tmdht.catalog_file import read_template_digests
from tmdht.client.errors import MigrationFailed
from tmdht.client.tls import TlsConfig, TlsError, require_tls_or_loopback
from tmdht.errors import DecodeError, IntegrityError, TmdhtError
from tmdht.files import atomic_write
from tmdht.migration_stream import (
    Ack,
    Done,
    MigrationCounts,
    Need,
    ReverseDecoder,
    SenderRewriter,
    WaveBusy,
    encode,
)
from tmdht.native import (
    MigrationReceiver,
    MigrationSender,
    ReferenceReceiver,
    make_receiver,
    make_sender,
    tune_allocator,
)
from tmdht.wave import ClaimPolicy, ClaimWaits

if TYPE_CHECKING:
    import asyncio
    import ssl
    from wsgiref.simple_server import WSGIServer

    from prometheus_client import CollectorRegistry

    from tmdht.client.store import TemplateStoreClient
    from tmdht.client.tls_stream import TlsStream
    from tmdht.client.wave import WaveStoreClient
    from tmdht.net.credentials import ClusterAccess
    from tmdht.wave import WaveCredentials
else:
    def _lazy(name: str) -> ModuleType:
        """``name`` imported on first use: the sender (QEMU's exec: command, whose start-up
        counts in QEMU's migration time) runs without asyncio, the receiver with it."""
        if name in sys.modules:
            return sys.modules[name]
        spec = importlib.util.find_spec(name)
        assert spec is not None and spec.loader is not None
        spec.loader = importlib.util.LazyLoader(spec.loader)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        return module

    asyncio = _lazy("asyncio")

__all__ = [
    "MigrationFailed",
    "MigrationMetrics",
    "MigrationReport",
    "QemuPipeClosed",
    "ReceiverConfig",
    "SenderConfig",
    "run_receiver",
    "run_sender",
]

log = logging.getLogger("tmdht.migration")
_T = TypeVar("_T")
_R = TypeVar("_R")

CHUNK = 256 << 10
PIPE_SIZE = 1 << 20
"""Pipe buffer asked for on QEMU's side of each proxy (F_SETPIPE_SZ; the default 64 KiB made
QEMU and the proxy take turns in 16 pages)."""
WAVE_STORE_BATCH = 256
"""Learned pages a receiver in a wave collects before storing them (the rest at the end):
about 12 full WAVE_PUT datagrams per node of a 3-node cluster; the core keeps 8192 at most."""
RESOLVE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


# -- metrics and reports -----------------------------------------------------------------------


class MigrationMetrics:
    """Prometheus metrics of one proxy (the dashboard queries these names).

    The proxies make one only when metrics are asked for (``--metrics-port``, or a caller's
    registry): importing prometheus_client alone took longer than the sender's start-up budget.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        from prometheus_client import (  # noqa: PLC0415 - only when metrics are asked for
            CollectorRegistry,
            Counter,
            Gauge,
            Histogram,
        )

        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.pages = Counter("tmdht_migration_pages_total",
                             "Guest pages seen (PAGE records, re-sent pages included).", registry=r)
        self.template_pages = Counter("tmdht_migration_template_pages_total",
                                      "Pages sent as template digests.", registry=r)
        self.fallback_pages = Counter("tmdht_migration_fallback_pages_total",
                                      "Template pages the cluster could not serve, taken from "
                                      "the sender.", registry=r)
        self.qemu_bytes = Counter("tmdht_migration_qemu_bytes_total",
                                  "Bytes of QEMU migration stream.", registry=r)
        self.wan_bytes = Counter("tmdht_migration_wan_bytes_total",
                                 "Bytes on the sender-receiver connection (both directions).",
                                 registry=r)
        self.zero_pages = Counter("tmdht_migration_zero_pages_total",
                                  "ZERO records passed through.", registry=r)
        self.backref_pages = Counter("tmdht_migration_backref_pages_total",
                                     "Pages sent as back-references.", registry=r)
        self.full_pages = Counter("tmdht_migration_full_pages_total",
                                  "Pages sent whole.", registry=r)
        self.compressed_pages = Counter("tmdht_migration_compressed_pages_total",
                                        "Pages sent zstd-compressed.", registry=r)
        self.cluster_pages = Counter("tmdht_migration_cluster_pages_total",
                                     "Template pages resolved through the cluster.", registry=r)
        self.resolve_latency = Histogram("tmdht_migration_resolve_duration_seconds",
                                         "Time to resolve one batch of digests.",
                                         buckets=RESOLVE_BUCKETS, registry=r)
        self.duration = Gauge("tmdht_migration_duration_seconds",
                              "Duration of the last migration.", registry=r)
        self.migrations = Counter("tmdht_migrations_total", "Migrations by outcome.",
                                  ["outcome"], registry=r)
        self.wave_offers = Counter("tmdht_migration_wave_offers_total",
                                   "Pages offered by digest in a wave (OFFER records).",
                                   registry=r)
        self.wave_hits = Counter("tmdht_migration_wave_hits_total",
                                 "Offered pages found in the wave store and verified.",
                                 registry=r)
        self.wave_bodies = Counter("tmdht_migration_wave_bodies_total",
                                   "Offered pages whose body crossed the WAN after all.",
                                   registry=r)
        self.wave_stored = Counter("tmdht_migration_wave_stored_total",
                                   "Received pages stored into the wave store.", registry=r)
        self.wave_sent_whole = Counter(
            "tmdht_migration_wave_sent_whole_total",
            "Pages sent whole, not offered, while offers were seldom found in the wave store.",
            registry=r)
        self.wave_claimed = Counter(
            "tmdht_migration_wave_claimed_total",
            "Missed pages claimed in the wave store (and asked of the sender).", registry=r)
        self.wave_waited = Counter(
            "tmdht_migration_wave_waited_total",
            "Missed pages another receiver of the wave had claimed, waited for.", registry=r)
        self.wave_waited_found = Counter(
            "tmdht_migration_wave_waited_found_total",
            "Pages waited for and then found in the wave store.", registry=r)
        self._seen = MigrationCounts()

    def sync(self, counts: MigrationCounts) -> None:
        """Advance the counters to the totals ``counts``."""
        old = self._seen
        self.pages.inc(counts.pages - old.pages)
        self.template_pages.inc(counts.template_pages - old.template_pages)
        self.qemu_bytes.inc(counts.qemu_bytes - old.qemu_bytes)
        self.zero_pages.inc(counts.zero_pages - old.zero_pages)
        self.backref_pages.inc(counts.backref_pages - old.backref_pages)
        self.full_pages.inc(counts.full_pages - old.full_pages)
        self.compressed_pages.inc(counts.compressed_pages - old.compressed_pages)
        self._seen = counts


@dataclass
class MigrationReport:
    """What one proxy saw, printed and written as JSON at the end."""

    role: str
    ok: bool = False
    error: str | None = None
    counts: MigrationCounts = field(default_factory=MigrationCounts)
    wan_sent_bytes: int = 0
    wan_received_bytes: int = 0
    cluster_pages: int = 0
    fallback_pages: int = 0
    resolve_batches: int = 0
    resolve_seconds_total: float = 0.0
    resolve_seconds_max: float = 0.0
    duration_s: float = 0.0
    tls_peer: str | None = None
    """Subject of the peer's certificate when the connection ran TLS (None: plaintext)."""
    tcp_sent_bytes: int = 0
    """Bytes TCP delivered to the peer (TCP_INFO bytes_acked): TLS records and handshake
    included; 0 where the kernel does not say."""
    tcp_received_bytes: int = 0
    """Bytes TCP received from the peer (TCP_INFO bytes_received)."""
    cpu_s: float = 0.0
    """CPU seconds (user + system) of the proxy process when the report was made."""
    connect_s: float = 0.0
    """Sender: seconds from its start until it began reading QEMU's stream (catalog, TCP
    connect and, with TLS, the handshake and the receiver's TLS_READY)."""
    wave: str | None = None
    """The wave's id (None: no wave)."""
    wave_offers: int = 0
    """Pages offered by digest."""
    wave_hits: int = 0
    """Offered pages found in the wave store (receiver)."""
    wave_bodies: int = 0
    """Offered pages sent whole after NEED."""
    wave_window_full: int = 0
    """Pages sent whole because the offer window was full (sender)."""
    wave_sent_whole: int = 0
    """Pages sent whole, not offered, because recent offers were mostly not found (sender)."""
    wave_stored: int = 0
    """Received pages stored into the wave store (receiver)."""
    wave_store_timeouts: int = 0
    """Wave store requests that got no answer in time (receiver)."""
    wave_claimed: int = 0
    """Missed pages this receiver claimed and asked its sender for (receiver)."""
    wave_waited: int = 0
    """Missed pages another receiver had claimed, waited for (receiver)."""
    wave_waited_found: int = 0
    """... and then found in the wave store (the rest came from the sender after the wait)."""
    wave_busy_seen: int = 0
    """1 once other VMs of the wave were seen migrating at the same time (receiver: it said
    WAVE_BUSY; sender: it got it and offered every page from then on), else 0."""

    @property
    def wan_bytes(self) -> int:
        return self.wan_sent_bytes + self.wan_received_bytes

    def to_json(self) -> dict[str, object]:
        doc = asdict(self)
        doc["wan_bytes"] = self.wan_bytes
        doc["qemu_bytes"] = self.counts.qemu_bytes
        qemu_bytes = self.counts.qemu_bytes
        doc["wan_ratio"] = self.wan_bytes / qemu_bytes if qemu_bytes else None
        doc["resolve_seconds_mean"] = (self.resolve_seconds_total / self.resolve_batches
                                       if self.resolve_batches else None)
        return doc

    def summary(self) -> str:
        c = self.counts
        ratio = f"{self.wan_bytes / c.qemu_bytes:.3f}" if c.qemu_bytes else "-"
        mean = (f"{1000 * self.resolve_seconds_total / self.resolve_batches:.1f} ms"
                if self.resolve_batches else "-")
        outcome = "ok" if self.ok else f"FAILED ({self.error})"
        wave = ("" if self.wave is None else
                f"; wave {self.wave}: offers {self.wave_offers}, found in the wave store "
                f"{self.wave_hits}, bodies sent {self.wave_bodies}, sent whole (offer window "
                f"full) {self.wave_window_full}, sent whole (offers not found) "
                f"{self.wave_sent_whole}, stored {self.wave_stored}, others busy "
                f"{self.wave_busy_seen}"
                + ("" if self.role != "receive" else
                   f", claimed {self.wave_claimed}, waited for {self.wave_waited} (then found "
                   f"{self.wave_waited_found})"))
        return (f"tmdht qemu {self.role}: {outcome} in {self.duration_s:.2f} s;"
                f" pages {c.pages}, templates {c.template_pages}, zero {c.zero_pages}, "
                f"back-references {c.backref_pages}, full {c.full_pages}, "
                f"compressed {c.compressed_pages}, from cluster {self.cluster_pages}, "
                f"fallbacks {self.fallback_pages}; QEMU bytes {c.qemu_bytes}, WAN bytes "
                f"{self.wan_bytes} (ratio {ratio}); resolve batches {self.resolve_batches}, "
                f"mean {mean}, max {1000 * self.resolve_seconds_max:.1f} ms{wave}")


# -- configuration -----------------------------------------------------------------------------


@dataclass(frozen=True)
class SenderConfig:
    """Settings of ``tmdht qemu send``."""

    catalog: Path
    """Template catalog file."""
    to: tuple[str, int]
    """Receiver address."""
    compress: bool = False
    """zstd-compress pages that are neither templates nor repeats."""
    backref_window: int = 32768
    """Pages the receiver keeps for back-references."""
    flow_window: int = 64 << 20
    """QEMU bytes in flight ahead of the receiver's acknowledgements."""
    connect_timeout: float = 30.0
    """Seconds to reach the receiver."""
    done_timeout: float = 120.0
    """Seconds to wait for the receiver's verdict after QEMU's stream ended."""
    tls: TlsConfig | None = None
    """Mutual TLS 1.3 with the receiver (None: plaintext)."""
    insecure_plaintext: bool = False
    """Allow plaintext to a non-loopback receiver (refused otherwise)."""
    wave: WaveCredentials | None = None
    """Migrate in this wave: offer non-template pages by digest first (None: no wave, and the
    stream is exactly as without waves)."""
    offer_window: int = 64 << 20
    """Bytes of offered pages kept unacknowledged at most; beyond, pages go whole."""
    adaptive_offers: bool = True
    """Send pages whole while recent offers are mostly not found in the wave store (the
    first VM of a wave); False offers every non-template page."""
    offer_ahead: int = 4 << 20
    """Bytes of bodies the offers awaiting an answer may still need before the sender stops
    reading QEMU's stream (so QEMU does not stop the guest far ahead of what crossed)."""

    def __post_init__(self) -> None:
        """Secure by default: no plaintext off loopback unless asked for (UsageError)."""
        require_tls_or_loopback("--to", self.to, self.tls, self.insecure_plaintext)


@dataclass(frozen=True)
class ReceiverConfig:
    """Settings of ``tmdht qemu receive``."""

    listen: tuple[str, int]
    """Address to listen on for the sender (port 0: any free port)."""
    store: ClusterAccess | None
    """The cluster to resolve templates through (None: every template from the sender)."""
    expected_catalog_id: bytes | None = None
    """Refuse a sender that used another catalog."""
    ready_file: Path | None = None
    """Write ``READY host:port`` here (a file or a FIFO) once listening."""
    accept_timeout: float = 600.0
    """Seconds to wait for the sender."""
    resolve_batch: int = 512
    """Digests per resolve call."""
    resolve_parallel: int = 8
    """Resolve calls in flight."""
    resolve_timeout: float = 3.0
    """A resolve call slower than this sends its digests to the sender instead."""
    skip_cluster_for: float = 5.0
    """After a batch the cluster could not serve at all, ask the sender directly this long."""
    tls: TlsConfig | None = None
    """Mutual TLS 1.3 with the sender (None: plaintext)."""
    insecure_plaintext: bool = False
    """Allow plaintext on a non-loopback listening address (refused otherwise)."""
    handshake_timeout: float = 30.0
    """Seconds the sender has to complete the TLS handshake once connected."""
    wave: WaveCredentials | None = None
    """Receive in this wave: look offered pages up in the wave store and store full pages
    received there (None: no wave; a wave sender is refused)."""
    wave_ttl: float = 6 * 3600.0
    """Seconds the pages this receiver stores live in the wave store."""
    wave_parallel: int = 4
    """Wave store lookups in flight."""
    wave_claim_wait: float = 6.0
    """Seconds a missed page another receiver of the wave claimed (it is fetching it from its
    sender) is waited for at most before this receiver asks its own sender (0: no claims, every
    miss asks the sender at once; :class:`tmdht.wave.ClaimPolicy`)."""

    def __post_init__(self) -> None:
        """Secure by default: no plaintext off loopback unless asked for (UsageError)."""
        require_tls_or_loopback("--listen", self.listen, self.tls, self.insecure_plaintext)


# -- helpers -----------------------------------------------------------------------------------


class QemuPipeClosed(TmdhtError):
    """The destination QEMU closed its end of the migration pipe (it went away) mid-stream."""


class _PipeOut:
    """Asynchronous writes to a pipe or socket fd (stdout), blocking writes to a regular file."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._writer: asyncio.StreamWriter | None = None
        self.written = 0
        """Bytes handed to QEMU so far."""

    async def open(self) -> None:
        mode = os.fstat(self.fd).st_mode
        if stat.S_ISREG(mode):
            return
        _enlarge_pipe(self.fd)
        loop = asyncio.get_running_loop()
        pipe = os.fdopen(os.dup(self.fd), "wb", buffering=0)
        transport, protocol = await loop.connect_write_pipe(
            asyncio.streams.FlowControlMixin, pipe)
        self._writer = asyncio.StreamWriter(transport, protocol, None, loop)

    async def write(self, chunks: Sequence[bytes]) -> None:
        """Write ``chunks``; :class:`QemuPipeClosed` if QEMU closed the pipe."""
        if self._writer is None:
            data = b"".join(chunks)
            view = memoryview(data)
            while view:
                view = view[os.write(self.fd, view):]
            self.written += len(data)
            return
        # A closed pipe closes the transport: uvloop then raises RuntimeError on write, asyncio
        # drops the data and fails drain() with ConnectionResetError.
        try:
            if self._writer.transport.is_closing():
                raise ConnectionResetError("the pipe transport is closed")
            self._writer.writelines(chunks)
            await self._writer.drain()
        except (ConnectionError, RuntimeError):
            raise QemuPipeClosed(
                f"QEMU closed the migration pipe after {self.written:,} bytes of QEMU stream "
                "had been written to it: the destination QEMU went away"
            ) from None
        self.written += sum(len(c) for c in chunks)

    async def close(self) -> None:
        if self._writer is not None:
            with contextlib.suppress(OSError, ConnectionError):
                await self._writer.drain()
            self._writer.close()  # the pipe transport closes its fd once its buffer is empty
            self._writer = None
            await asyncio.sleep(0)
        with contextlib.suppress(OSError):
            os.close(self.fd)  # QEMU sees EOF on its channel


def _enlarge_pipe(fd: int) -> None:
    """Ask for a PIPE_SIZE buffer if ``fd`` is a pipe (best effort: the system may cap it)."""
    with contextlib.suppress(OSError):
        if stat.S_ISFIFO(os.fstat(fd).st_mode):
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)


def _tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


_TCP_INFO_SIZE = 232
_TCP_BYTES_ACKED = 120  # struct tcp_info: u64 tcpi_bytes_acked, then u64 tcpi_bytes_received


def _tcp_totals(sock: Any, report: MigrationReport) -> None:
    """Record the connection's bytes as TCP counted them (with TLS framing), best effort."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_SIZE)
        if len(info) >= _TCP_BYTES_ACKED + 16:
            report.tcp_sent_bytes = int.from_bytes(
                info[_TCP_BYTES_ACKED:_TCP_BYTES_ACKED + 8], sys.byteorder)
            report.tcp_received_bytes = int.from_bytes(
                info[_TCP_BYTES_ACKED + 8:_TCP_BYTES_ACKED + 16], sys.byteorder)


TLS_READY = Ack(0, 0)
"""With TLS the receiver's first record, sent once it accepted the sender's certificate: the
sender reads nothing of QEMU's stream before it (in TLS 1.3 the client's handshake completes
before the server has checked the client's certificate)."""


class _Wan:
    """The sender-receiver connection with byte counting."""

    def __init__(self, reader: asyncio.StreamReader | TlsStream,
                 writer: asyncio.StreamWriter | TlsStream, report: MigrationReport,
                 metrics: MigrationMetrics | None) -> None:
        self.reader = reader
        self.writer = writer
        self._report = report
        self._metrics = metrics

    def send(self, data: bytes) -> None:
        if data:
            self.writer.write(data)
            self._report.wan_sent_bytes += len(data)
            if self._metrics is not None:
                self._metrics.wan_bytes.inc(len(data))

    async def recv(self) -> bytes:
        data = await self.reader.read(CHUNK)
        self._report.wan_received_bytes += len(data)
        if self._metrics is not None:
            self._metrics.wan_bytes.inc(len(data))
        return data

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError, ConnectionError):
            await self.writer.wait_closed()


# -- the sender --------------------------------------------------------------------------------


SEND_AHEAD = 4 << 20
"""Wire bytes the sender queues for the socket before it reads more of QEMU's stream."""


def run_sender(config: SenderConfig, *, stdin_fd: int = 0,
               metrics: MigrationMetrics | None = None,
               on_progress: Callable[[int, int], None] | None = None) -> MigrationReport:
    """Forward QEMU's stream on ``stdin_fd`` to the receiver; returns the report.

    Raises :class:`MigrationFailed` (with the report attached as ``report``) on any failure.
    ``metrics`` None: no Prometheus metrics (and no prometheus_client import).

    A selector loop over QEMU's pipe and the connection, without asyncio: the sender is QEMU's
    exec: command, and importing asyncio alone took half its start-up budget. The per-page work
    is one call per chunk into the sender core.
    """
    report = MigrationReport("send")
    started = time.monotonic()
    tune_allocator()
    rewriter = make_sender(read_template_digests(config.catalog), compress=config.compress,
                           backref_window=config.backref_window, flow_window=config.flow_window,
                           wave_tag=None if config.wave is None else config.wave.tag,
                           offer_window=config.offer_window,
                           adaptive_offers=config.adaptive_offers,
                           offer_ahead=config.offer_ahead)
    if config.wave is not None:
        report.wave = config.wave.wave_id
    if config.tls is not None:
        from tmdht.client.tls import check_files  # noqa: PLC0415

        check_files(config.tls, server=False)  # ConfigError before anything is sent
    sock: socket.socket | None = None
    decoder = ReverseDecoder(rewriter.hello.flags)  # WAVE_BUSY only if the hello offered it
    try:
        # The SYN travels while TLS's context is built (importing ssl, loading the certificates):
        # that work overlaps a round trip instead of preceding it.
        connecting = _Connecting(config.to, config.connect_timeout)
        try:
            context = None
            if config.tls is not None:
                from tmdht.client.tls import client_context  # noqa: PLC0415 - ssl with TLS only

                context = _local(client_context, config.tls)  # ConfigError: unusable files
            sock = connecting.finish()
        finally:
            connecting.close_unless_done()
        _tune(sock)
        if context is not None:
            sock = _tls_connect(config, context, sock, decoder, report)
        sock.setblocking(False)
        report.connect_s = time.monotonic() - started
        _pump_sender(config, rewriter, sock, stdin_fd, report, metrics, on_progress, decoder)
        report.ok = True
    except _LocalFailure as failure:
        raise failure.error from None  # the credentials: the command's input (exit 2)
    except (TmdhtError, OSError, ConnectionError, TimeoutError) as exc:
        report.error = _describe(exc)
        raise MigrationFailed(report.error, report) from exc
    finally:
        if sock is not None:
            _tcp_totals(sock, report)
            sock.close()
        report.counts = rewriter.counts
        wave = getattr(rewriter, "wave", None)
        if report.wave is not None and wave is not None:
            report.wave_offers = wave.offers
            report.wave_bodies = wave.bodies
            report.wave_window_full = wave.window_full
            report.wave_sent_whole = wave.whole
            report.wave_busy_seen = wave.busy_seen
        report.duration_s = time.monotonic() - started
        report.cpu_s = time.process_time()
        _finish_metrics(metrics, report)
    return report


class _LocalFailure(Exception):
    """A start-up step that needs no peer failed while the connection was being made:
    :func:`run_sender` raises ``error`` as it was (not as a failed migration), as it did when
    the step ran before connecting."""

    def __init__(self, error: TmdhtError | OSError) -> None:
        super().__init__(str(error))
        self.error = error


def _local(step: Callable[[_T], _R], argument: _T) -> _R:
    try:
        return step(argument)
    except (TmdhtError, OSError) as exc:
        raise _LocalFailure(exc) from exc


class _Connecting:
    """A TCP connection to ``address`` whose handshake runs while the caller does other work:
    the connect starts in the constructor, :meth:`finish` waits for it (within ``timeout``
    seconds of the start) and returns the socket, blocking with that timeout; a first address
    that fails is followed by the others, one at a time, as :func:`socket.create_connection`
    does. MigrationFailed says why the receiver could not be reached."""

    def __init__(self, address: tuple[str, int], timeout: float) -> None:
        self._address = address
        self._timeout = timeout
        self._deadline = time.monotonic() + timeout
        self._sock: socket.socket | None = None
        self._error: OSError | None = None
        try:
            family, kind, proto, _, sockaddr = socket.getaddrinfo(
                address[0], address[1], type=socket.SOCK_STREAM)[0]
            sock = socket.socket(family, kind, proto)
        except OSError as exc:
            self._error = exc
            return
        sock.setblocking(False)
        code = sock.connect_ex(sockaddr)
        if code not in (0, errno.EINPROGRESS):
            sock.close()
            self._error = OSError(code, os.strerror(code))
            return
        self._sock = sock

    def finish(self) -> socket.socket:
        sock, self._sock = self._sock, None
        error = self._error
        if sock is not None:
            with selectors.DefaultSelector() as selector:
                selector.register(sock, selectors.EVENT_WRITE)
                ready = selector.select(max(0.0, self._deadline - time.monotonic()))
            code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) if ready else None
            if code == 0:
                sock.settimeout(self._timeout)
                return sock
            sock.close()
            error = TimeoutError() if code is None else OSError(code, os.strerror(code))
        remaining = self._deadline - time.monotonic()
        if not isinstance(error, TimeoutError | socket.gaierror) and remaining > 0:
            try:  # the other addresses (or the first again), as create_connection tries them
                sock = socket.create_connection(self._address, timeout=remaining)
                sock.settimeout(self._timeout)
                return sock
            except OSError as exc:
                error = exc
        reason = ("timed out" if isinstance(error, TimeoutError)
                  else (error.strerror if error is not None else None) or str(error))
        raise MigrationFailed(
            f"cannot reach the receiver at {self._address[0]}:{self._address[1]} ({reason})"
        ) from None

    def close_unless_done(self) -> None:
        """Close the connection if :meth:`finish` did not take it (the start-up failed)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _tls_connect(config: SenderConfig, context: ssl.SSLContext, sock: socket.socket,
                 decoder: ReverseDecoder, report: MigrationReport) -> socket.socket:
    """The TLS handshake (within the connect timeout), the pins, and the receiver's TLS_READY;
    raises TlsError (the socket closed) before a byte of QEMU's stream is read."""
    import ssl  # noqa: PLC0415 - only with TLS

    from tmdht.client.tls import check_peer, describe_tls_error  # noqa: PLC0415

    assert config.tls is not None
    try:
        tls = context.wrap_socket(sock, server_hostname=config.tls.hostname or config.to[0])
    except (ssl.SSLError, OSError) as exc:
        sock.close()
        raise TlsError(describe_tls_error(exc, "the receiver")) from exc
    try:
        report.tls_peer = check_peer(tls.getpeercert(), config.tls, "receiver")
        while True:
            try:
                data = tls.recv(CHUNK)
            except ssl.SSLError as exc:
                raise TlsError(describe_tls_error(exc, "the receiver")) from exc
            if not data:
                raise TlsError("the receiver closed the connection after the TLS handshake "
                               "(it may have refused our certificate: see its log)")
            report.wan_received_bytes += len(data)
            decoder.feed(data)
            first = next(iter(decoder.records()), None)
            if first is None:
                continue
            if isinstance(first, Done):
                raise TlsError(f"the receiver refused the connection: {first.message}")
            if first != TLS_READY:
                raise DecodeError(f"the receiver's first record is {first}, not TLS_READY")
            return tls
    except BaseException:
        tls.close()
        raise


def _pump_sender(config: SenderConfig, rewriter: MigrationSender, sock: socket.socket, fd: int,
                 report: MigrationReport, metrics: MigrationMetrics | None,
                 on_progress: Callable[[int, int], None] | None,
                 decoder: ReverseDecoder) -> None:
    """Read QEMU while the flow window is open and the socket keeps up; answer ACK and NEED;
    return once the receiver's verdict is in (MigrationFailed if it refused the stream)."""
    _enlarge_pipe(fd)
    out = bytearray()
    blocked: tuple[type[BaseException], ...] = (BlockingIOError,)
    pending: Callable[[], int] = lambda: 0  # noqa: E731
    if config.tls is not None:
        import ssl  # noqa: PLC0415 - only with TLS

        # A TLS socket may want to write while reading (and read while writing); records it
        # decrypted wait in the SSL object, not in the kernel, so drain pending() too.
        blocked = (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError)
        pending = sock.pending  # type: ignore[attr-defined]
    verdict: Done | None = None
    deadline: float | None = None  # for the verdict, once QEMU's stream ended

    def queue(data: bytes) -> None:
        if data:
            out.extend(data)
            report.wan_sent_bytes += len(data)
            if metrics is not None:
                metrics.wan_bytes.inc(len(data))

    def read_qemu() -> None:
        nonlocal deadline
        data = os.read(fd, CHUNK)
        if not data:
            queue(rewriter.finish())
            deadline = time.monotonic() + config.done_timeout
            return
        queue(rewriter.feed(data))
        if metrics is not None:
            metrics.sync(rewriter.counts)
        if on_progress is not None:
            on_progress(rewriter.counts.qemu_bytes, rewriter.ram_bytes)

    queue(rewriter.start())
    regular_file = stat.S_ISREG(os.fstat(fd).st_mode)  # always readable; epoll refuses files
    with selectors.DefaultSelector() as selector:
        selector.register(sock, selectors.EVENT_READ)
        reading_qemu = False
        while True:
            if out:
                with contextlib.suppress(*blocked):
                    del out[: sock.send(out)]
            if verdict is not None and not out:
                break
            want_qemu = deadline is None and rewriter.window_open and len(out) < SEND_AHEAD
            poll = False
            if regular_file:
                if want_qemu:
                    read_qemu()
                poll = want_qemu and deadline is None
                want_qemu = False
            if want_qemu != reading_qemu:
                if want_qemu:
                    selector.register(fd, selectors.EVENT_READ)
                else:
                    selector.unregister(fd)
                reading_qemu = want_qemu
            selector.modify(sock, (selectors.EVENT_READ if verdict is None else 0)
                            | (selectors.EVENT_WRITE if out else 0))
            timeout = 0.0 if poll else None
            if deadline is not None:
                timeout = deadline - time.monotonic()
                if timeout <= 0:
                    raise TimeoutError("no verdict from the receiver")
            for key, mask in selector.select(timeout):
                if key.fileobj is not sock:
                    read_qemu()
                    continue
                more = bool(mask & selectors.EVENT_READ)
                while more and verdict is None:
                    try:
                        data = sock.recv(CHUNK)
                    except blocked:
                        break
                    if not data:
                        raise MigrationFailed(
                            "the receiver closed the connection" if report.wan_received_bytes
                            else "the receiver closed the connection before answering (a "
                            "receiver with --tls-creds does that to a plaintext sender)")
                    report.wan_received_bytes += len(data)
                    if metrics is not None:
                        metrics.wan_bytes.inc(len(data))
                    decoder.feed(data)
                    for record in decoder.records():
                        if isinstance(record, Ack):
                            rewriter.acknowledge(record)
                        elif isinstance(record, Need):
                            queue(rewriter.fallback(record))
                        elif isinstance(record, WaveBusy):  # only after FLAG_WAVE_BUSY: a wave
                            cast("SenderRewriter", rewriter).wave_busy(record)
                        else:
                            verdict = record
                            break
                    more = pending() > 0
    assert verdict is not None
    if not verdict.ok:
        raise MigrationFailed(f"the receiver refused the stream: {verdict.message}")
    if deadline is None:
        raise MigrationFailed("the receiver ended the migration before QEMU's stream did")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, ConnectionError):  # "[Errno 104] Connection reset by peer" says little
        return (f"the connection to the other proxy was lost ({exc.strerror or exc}): it failed "
                "or was stopped, its own error says why")
    return str(exc) or type(exc).__name__


def _finish_metrics(metrics: MigrationMetrics | None, report: MigrationReport) -> None:
    if metrics is None:
        return
    metrics.sync(report.counts)
    metrics.duration.set(report.duration_s)
    metrics.migrations.labels("completed" if report.ok else "failed").inc()
    if report.wave is not None:
        metrics.wave_offers.inc(report.wave_offers)
        metrics.wave_hits.inc(report.wave_hits)
        metrics.wave_bodies.inc(report.wave_bodies)
        metrics.wave_stored.inc(report.wave_stored)
        metrics.wave_sent_whole.inc(report.wave_sent_whole)
        metrics.wave_claimed.inc(report.wave_claimed)
        metrics.wave_waited.inc(report.wave_waited)
        metrics.wave_waited_found.inc(report.wave_waited_found)


# -- the receiver ------------------------------------------------------------------------------


async def run_receiver(config: ReceiverConfig, *, stdout_fd: int = 1,
                       metrics: MigrationMetrics | None = None,
                       on_listening: Callable[[tuple[str, int]], None] | None = None,
                       on_progress: Callable[[int], None] | None = None,
                       on_verified: Callable[[MigrationReport], None] | None = None,
                       ) -> MigrationReport:
    """Accept one sender, rebuild QEMU's stream onto ``stdout_fd``; returns the report.

    Raises :class:`MigrationFailed` on any failure; the device state is then never written.
    """
    from tmdht.client.store import TemplateStoreClient  # noqa: PLC0415 - heavy, receiver only

    report = MigrationReport("receive")
    tune_allocator()
    context = None
    if config.tls is not None:
        from tmdht.client.tls import server_context  # noqa: PLC0415

        context = server_context(config.tls)  # ConfigError: unusable credentials
    rebuilder = make_receiver(config.expected_catalog_id,
                              wave_tag=None if config.wave is None else config.wave.tag)
    if config.wave is not None:
        report.wave = config.wave.wave_id
    waves: WaveStoreClient | None = None
    listener = socket.create_server(config.listen, reuse_port=False)
    listener.setblocking(False)
    bound = listener.getsockname()[:2]
    address = (str(bound[0]), int(bound[1]))
    if on_listening is not None:
        on_listening(address)
    if config.ready_file is not None:
        with open(config.ready_file, "w", encoding="utf-8") as ready:
            ready.write(f"READY {address[0]}:{address[1]}\n")
    store: TemplateStoreClient | None = None
    store_task: asyncio.Task[None] | None = None
    out = _PipeOut(stdout_fd)
    wan: _Wan | None = None
    conn: socket.socket | None = None
    probe: socket.socket | None = None  # a second fd of the connection, for TCP_INFO at the end
    started = time.monotonic()
    tasks: set[asyncio.Task[Any]] = set()
    try:
        if config.store is not None:
            store = TemplateStoreClient.connect(
                config.store, registry=None if metrics is None else metrics.registry)
            store_task = asyncio.create_task(store.start())
        loop = asyncio.get_running_loop()
        try:
            accepted, peer = await asyncio.wait_for(loop.sock_accept(listener),
                                                    config.accept_timeout)
        finally:
            listener.close()
        conn = accepted
        started = time.monotonic()
        _tune(accepted)
        probe = accepted.dup()
        log.info("sender connected from %s", peer)
        wan = await _open_wan(config, context, accepted, report, metrics)
        await out.open()
        if store is not None and store_task is not None:
            try:
                await store_task
            except (TmdhtError, OSError) as exc:
                log.warning("store cluster unavailable (%s): every template page comes from "
                            "the sender", exc)
                with contextlib.suppress(TmdhtError, OSError):
                    await store.close()
                store = None
            store_task = None
        if store is not None and config.wave is not None:
            from tmdht.client.wave import open_wave_client  # noqa: PLC0415

            waves = await open_wave_client(store, config.wave, ttl=config.wave_ttl)
        def verified() -> None:
            _fill_receiver_report(report, rebuilder, started)
            report.ok = True
            if on_verified is not None:
                on_verified(report)

        await _receive(config, rebuilder, wan, out, store, report, metrics, tasks, on_progress,
                       verified, waves)
    except (TmdhtError, OSError, ConnectionError, TimeoutError) as exc:
        report.error = _describe(exc)
        if (report.tls_peer is not None and not report.wan_received_bytes
                and isinstance(exc, DecodeError)):
            report.error = ("the sender closed the connection right after the TLS handshake "
                            "(it may have refused our certificate: see its log)")
        if wan is not None and isinstance(exc, IntegrityError):
            with contextlib.suppress(OSError, ConnectionError, ValueError):
                wan.send(encode(Done(False, report.error[:1000])))
                await asyncio.wait_for(wan.writer.drain(), 5)
        raise MigrationFailed(report.error, report) from exc
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if store_task is not None:
            store_task.cancel()
            await asyncio.gather(store_task, return_exceptions=True)
        if waves is not None:
            report.wave_store_timeouts = waves.stats.timeouts
            report.wave_stored = waves.stats.stored
            report.wave_claimed = waves.stats.claimed
            waves.close()
        if store is not None:
            with contextlib.suppress(TmdhtError, OSError):
                await store.close()
        if wan is not None:
            await wan.close()
        if conn is not None:
            conn.close()  # a no-op if the transport closed it
        if probe is not None:
            _tcp_totals(probe, report)
            probe.close()
        await out.close()
        _fill_receiver_report(report, rebuilder, started)
        if metrics is not None:
            metrics.fallback_pages.inc(report.fallback_pages)
            metrics.cluster_pages.inc(report.cluster_pages)
        _finish_metrics(metrics, report)
    return report


async def _first_byte(conn: socket.socket, timeout: float) -> int | None:
    """The first byte the sender sent, left in the socket (None: it closed without one)."""
    loop = asyncio.get_running_loop()
    readable: asyncio.Future[None] = loop.create_future()
    fd = conn.fileno()

    def wake() -> None:
        if not readable.done():
            readable.set_result(None)

    loop.add_reader(fd, wake)
    try:
        await asyncio.wait_for(readable, timeout)
    finally:
        loop.remove_reader(fd)
    data = conn.recv(1, socket.MSG_PEEK)
    return data[0] if data else None


async def _refuse_plaintext(conn: socket.socket) -> None:
    """Tell a plaintext sender in its own protocol that TLS is required, and keep reading (and
    dropping) what it sends until it closes (bounded): closing with unread bytes would reset
    the connection and lose the message."""
    loop = asyncio.get_running_loop()
    with contextlib.suppress(OSError, TimeoutError):
        await asyncio.wait_for(loop.sock_sendall(conn, encode(Done(False, _REQUIRES_TLS))), 5)
        conn.shutdown(socket.SHUT_WR)
        async with asyncio.timeout(5):
            for _ in range(100_000):
                if not await loop.sock_recv(conn, CHUNK):
                    break


_TLS_HANDSHAKE = 0x16
"""First byte of a TLS connection (a handshake record); a plaintext sender's is ``T``."""
_REQUIRES_TLS = "this receiver requires TLS: run the sender with --tls-creds"


async def _open_wan(config: ReceiverConfig, context: ssl.SSLContext | None,
                    conn: socket.socket, report: MigrationReport,
                    metrics: MigrationMetrics | None) -> _Wan:
    """The connection as streams: plaintext, or TLS once the handshake and the pins passed and
    TLS_READY is sent. A sender of the other kind fails here with a one-line reason, and a
    plaintext sender is told so in its own protocol."""
    first = await _first_byte(conn, config.handshake_timeout)
    if context is None:
        if first == _TLS_HANDSHAKE:
            raise TlsError("the sender started a TLS handshake, but this receiver runs without "
                           "TLS: give it --tls-creds too")
        reader, writer = await asyncio.open_connection(sock=conn)
        return _Wan(reader, writer, report, metrics)
    if first != _TLS_HANDSHAKE:
        await _refuse_plaintext(conn)
        raise TlsError("the sender did not start a TLS handshake (a plaintext sender? it "
                       "needs --tls-creds too)")
    import ssl  # noqa: PLC0415 - only with TLS

    from tmdht.client.tls import check_peer, describe_tls_error  # noqa: PLC0415
    from tmdht.client.tls_stream import TlsStream  # noqa: PLC0415

    assert config.tls is not None
    try:
        stream = await TlsStream.accept(conn, context, config.handshake_timeout, CHUNK)
    except (ssl.SSLError, OSError, TimeoutError) as exc:
        raise TlsError(describe_tls_error(exc, "the sender")) from exc
    wan = _Wan(stream, stream, report, metrics)
    try:
        report.tls_peer = check_peer(stream.getpeercert(), config.tls, "sender")
    except TlsError as exc:
        with contextlib.suppress(OSError, ConnectionError):
            wan.send(encode(Done(False, str(exc))))
            await asyncio.wait_for(wan.writer.drain(), 5)
        await wan.close()
        raise
    log.info("TLS with the sender %s", report.tls_peer)
    wan.send(encode(TLS_READY))
    return wan


def _fill_receiver_report(report: MigrationReport, rebuilder: MigrationReceiver,
                          started: float) -> None:
    stats = rebuilder.stats
    report.counts = stats.end if rebuilder.end_seen else MigrationCounts(
        qemu_bytes=stats.qemu_bytes, pages=stats.pages, template_pages=stats.template_pages,
        backref_pages=stats.backref_pages, full_pages=stats.full_pages,
        compressed_pages=stats.compressed_pages)
    report.cluster_pages = stats.cluster_pages
    report.fallback_pages = stats.fallback_pages
    if report.wave is not None:
        report.wave_offers = getattr(stats, "offers", 0)
        report.wave_hits = getattr(stats, "wave_pages", 0)
        report.wave_bodies = getattr(stats, "offer_bodies", 0)
    report.duration_s = time.monotonic() - started
    report.cpu_s = time.process_time()


async def _receive(config: ReceiverConfig, rebuilder: MigrationReceiver, wan: _Wan,
                   out: _PipeOut, store: TemplateStoreClient | None, report: MigrationReport,
                   metrics: MigrationMetrics | None, tasks: set[asyncio.Task[Any]],
                   on_progress: Callable[[int], None] | None,
                   on_verified: Callable[[], None],
                   waves: WaveStoreClient | None = None) -> None:
    """The receiver's loop: decode, resolve ahead, write in order, acknowledge; in a wave also
    look offered pages up in the wave store and store the full pages received there."""
    kick = asyncio.Event()
    skip_cluster_until = 0.0
    resolving: set[asyncio.Task[None]] = set()
    offering: set[asyncio.Task[None]] = set()
    storing: set[asyncio.Task[None]] = set()
    wave_core = cast("ReferenceReceiver", rebuilder) if config.wave is not None else None

    claims = ClaimPolicy(wait=config.wave_claim_wait)
    claiming = waves is not None and claims.enabled
    waits = ClaimWaits(claims)
    waits_kick = asyncio.Event()
    others_busy = False  # another receiver of the wave claimed a page: VMs migrate at once

    def ack_every() -> int:
        every = rebuilder.hello.flow_window // 4 if rebuilder.hello else 1 << 20
        if wave_core is not None:
            every = min(every, 1 << 20)  # offered pages wait at the sender for ACKs
        return max(1, every)

    def supply_found(batch: list[tuple[int, bytes]], found: dict[bytes, bytes]
                     ) -> tuple[list[tuple[int, bytes]], list[int]]:
        """Fill the slots found (checked against their digests); returns the ones not found
        and the ones found wrong (to ask the sender for)."""
        assert wave_core is not None
        missing: list[tuple[int, bytes]] = []
        wrong: list[int] = []
        for index, digest in batch:
            page = found.get(digest)
            if page is None:
                missing.append((index, digest))
                continue
            try:
                wave_core.supply_offered(index, page)
            except IntegrityError:  # a wrong page in the store: the sender's copy instead
                wrong.append(index)
        return missing, wrong

    async def claim(batch: list[tuple[int, bytes]]) -> tuple[list[int], list[int]]:
        """Claim missed pages: returns (to ask the sender for, still claimed by another)."""
        nonlocal others_busy
        assert waves is not None and wave_core is not None
        statuses = await waves.claim([d for _, d in batch], claims.claim_ttl)
        if not others_busy and wire.WaveClaimStatus.PENDING in statuses:
            others_busy = True
            report.wave_busy_seen = 1
            wave_core.others_busy()  # WAVE_BUSY to the sender with the next requests()
        held: list[tuple[int, bytes]] = []
        pending: list[int] = []
        need: list[int] = []
        for item, status in zip(batch, statuses, strict=True):
            if status is wire.WaveClaimStatus.HELD:
                held.append(item)
            elif status is wire.WaveClaimStatus.PENDING:
                pending.append(item[0])
            else:
                need.append(item[0])
        if held:  # stored since the first look: take it (gone again: as good as pending)
            missing, wrong = supply_found(held, await waves.fetch([d for _, d in held]))
            pending += [i for i, _ in missing]
            need += wrong
        return need, pending

    async def look_up(batch: list[tuple[int, bytes]]) -> None:
        assert wave_core is not None
        if waves is None:
            wave_core.unavailable([i for i, _ in batch])
            return
        lost, wrong = supply_found(batch, await waves.fetch([d for _, d in batch]))
        if wrong:
            wave_core.unavailable(wrong)
        if not lost:
            return
        if not claiming:
            wave_core.unavailable([i for i, _ in lost])
            return
        need, pending = await claim(lost)
        now = time.monotonic()
        digests = dict(lost)
        for index in pending:
            if waits.add(index, digests[index], now):
                report.wave_waited += 1
            else:
                need.append(index)
        if need:
            wave_core.unavailable(need)
        if pending:
            waits_kick.set()

    async def wait_for_claims() -> None:
        """Re-ask about pages other receivers claimed until found, claimed here, or the bound
        (then the sender is asked); bounded by ClaimWaits."""
        assert wave_core is not None
        while True:
            ask, expired = waits.take_due(time.monotonic(), config.resolve_batch)
            if expired:
                wave_core.unavailable(expired)
                kick.set()
            if ask:
                need, pending = await claim(ask)
                still = set(pending)
                waits.again(pending, time.monotonic())
                waits.forget([i for i, _ in ask if i not in still])
                report.wave_waited_found += len(ask) - len(need) - len(pending)
                if need:
                    wave_core.unavailable(need)
                kick.set()
                continue
            due = waits.next_due()
            waits_kick.clear()
            if due is None:
                await waits_kick.wait()
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(waits_kick.wait(), max(0.0, due - time.monotonic()))

    async def learn(pages: list[tuple[bytes, bytes]]) -> None:
        assert waves is not None
        await waves.store(pages)  # counted in waves.stats

    def offer_done(task: asyncio.Task[None]) -> None:
        offering.discard(task)
        storing.discard(task)
        tasks.discard(task)
        kick.set()

    async def pump_wan() -> None:
        try:
            while True:
                data = await wan.recv()
                if not data:
                    rebuilder.close()
                    return
                rebuilder.feed(data)
                kick.set()
        finally:
            kick.set()

    async def resolve(indices: list[int], digests: bytes) -> None:
        nonlocal skip_cluster_until
        if store is None or time.monotonic() < skip_cluster_until:
            rebuilder.unavailable(indices)
            return
        keys = [digests[i : i + 32] for i in range(0, len(digests), 32)]
        began = time.perf_counter()
        try:
            found, _missing = await asyncio.wait_for(store.resolve(keys), config.resolve_timeout)
        except (TmdhtError, OSError, TimeoutError) as exc:
            log.warning("resolve of %d digests failed (%s): asking the sender", len(keys), exc)
            found = {}
        elapsed = time.perf_counter() - began
        if metrics is not None:
            metrics.resolve_latency.observe(elapsed)
        report.resolve_batches += 1
        report.resolve_seconds_total += elapsed
        report.resolve_seconds_max = max(report.resolve_seconds_max, elapsed)
        got: list[int] = []
        pages: list[bytes] = []
        lost: list[int] = []
        for index, key in zip(indices, keys, strict=True):
            page = found.get(key)
            if page is None:
                lost.append(index)
            else:
                got.append(index)
                pages.append(page)
        if got:
            rebuilder.supply_batch(got, pages)
        if lost:
            rebuilder.unavailable(lost)
            if len(lost) == len(indices):
                skip_cluster_until = time.monotonic() + config.skip_cluster_for

    def resolved(task: asyncio.Task[None]) -> None:
        resolving.discard(task)
        tasks.discard(task)
        kick.set()

    reader = asyncio.create_task(pump_wan())
    tasks.add(reader)
    waiter: asyncio.Task[None] | None = None
    if claiming:
        waiter = asyncio.create_task(wait_for_claims())
        tasks.add(waiter)
        waiter.add_done_callback(lambda _: kick.set())
    while True:
        if reader.done() and reader.exception() is not None:
            raise reader.exception()  # type: ignore[misc]
        if waiter is not None and waiter.done():
            raise waiter.exception() or DecodeError("the claim waiter stopped")
        if wave_core is not None:
            while len(offering) < config.wave_parallel:
                if offering and not reader.done() and wave_core.to_offer < config.resolve_batch:
                    break
                batch = wave_core.wanted_offers(config.resolve_batch)
                if not batch:
                    break
                task = asyncio.create_task(look_up(batch))
                offering.add(task)
                tasks.add(task)
                task.add_done_callback(offer_done)
            # Learned pages go to the wave store in batches: a WAVE_PUT of a page or two costs
            # a node ~3x the CPU per page of a full one (decode, transaction, answer).
            # ... but while other VMs of the wave migrate at once (a claim of theirs was seen),
            # as soon as no store is in flight (so they batch themselves while one is): they
            # may be waiting for the pages claimed here, or about to miss the ones sent whole.
            if waves is not None and len(storing) < 4 and (
                    wave_core.to_learn >= WAVE_STORE_BATCH or reader.done()
                    or (others_busy and wave_core.to_learn and not storing)):
                learned = wave_core.learned()
                if learned:
                    task = asyncio.create_task(learn(learned))
                    storing.add(task)
                    tasks.add(task)
                    task.add_done_callback(offer_done)
        while len(resolving) < config.resolve_parallel:
            # Full batches only while others are in flight (their answers wake this loop);
            # a partial one when nothing is, or once the stream is complete.
            if resolving and not reader.done() and rebuilder.to_resolve < config.resolve_batch:
                break
            indices, digests = rebuilder.wanted_batch(config.resolve_batch)
            if not indices:
                break
            task = asyncio.create_task(resolve(indices, digests))
            resolving.add(task)
            tasks.add(task)
            task.add_done_callback(resolved)
        chunks = rebuilder.output()  # DigestMismatchError here: the device state stays held
        if rebuilder.verified:
            on_verified()  # before QEMU gets the device state and may resume
        wan.send(rebuilder.requests())
        if chunks:
            await out.write(chunks)
            if on_progress is not None:
                on_progress(rebuilder.stats.qemu_bytes)
        if rebuilder.verified:
            await out.close()  # QEMU has the whole stream
            wan.send(encode(Ack(rebuilder.stats.pages, rebuilder.stats.qemu_bytes)))
            wan.send(encode(Done(True, "")))
            await wan.writer.drain()
            if wave_core is not None and waves is not None:
                await _finish_learning(wave_core, waves, storing, report)
            return
        wan.send(rebuilder.ack(every=ack_every()))
        if reader.done():
            if reader.exception() is not None:
                raise reader.exception()  # type: ignore[misc]
            if not chunks and not resolving and not offering and not waits:
                raise DecodeError("the sender's stream ended before END" if not
                                  rebuilder.end_seen else "the stream ended with pages missing")
        if chunks:
            continue  # more may be ready now (and the reader may have fed meanwhile)
        kick.clear()
        await kick.wait()


async def _finish_learning(core: ReferenceReceiver, waves: WaveStoreClient,
                           storing: set[asyncio.Task[None]], report: MigrationReport,
                           timeout: float = 30.0) -> None:
    """After QEMU has the stream: store what is left to learn (bounded in time), so the wave's
    next VM finds it."""
    deadline = time.monotonic() + timeout
    if storing:
        await asyncio.wait(set(storing), timeout=timeout)
    for _ in range(1000):
        learned = core.learned()
        if not learned or time.monotonic() > deadline:
            break
        try:
            await asyncio.wait_for(waves.store(learned), max(0.1, deadline - time.monotonic()))
        except TimeoutError:
            break


def write_report(report: MigrationReport, path: Path | None) -> None:
    """Print the summary on stderr and write the JSON report if asked."""
    sys.stderr.write(report.summary() + "\n")
    sys.stderr.flush()
    save_report(report, path)


def save_report(report: MigrationReport, path: Path | None) -> None:
    """Write the JSON report (atomically: readers never see half of it)."""
    if path is not None:
        atomic_write(path, json.dumps(report.to_json(), indent=2) + "\n", durable=False)


def serve_metrics(
    port: int, metrics: MigrationMetrics, host: str = "127.0.0.1"
) -> WSGIServer | None:
    """Serve /metrics on ``port`` (0: any) from a thread; returns the server (call shutdown())."""
    from prometheus_client import start_http_server  # noqa: PLC0415

    result = start_http_server(port, addr=host, registry=metrics.registry)
    return result[0] if isinstance(result, tuple) else None
