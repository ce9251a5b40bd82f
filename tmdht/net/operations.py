"""What goes into the request engine and what comes out: its configuration, the operations it
runs, their results and its events (see :mod:`tmdht.net.engine`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final, TypedDict

from tmdht import wire
from tmdht.errors import UsageError
from tmdht.net.address import Address
from tmdht.net.window import CONGESTION_WINDOW_INITIAL, CONGESTION_WINDOW_MAX

__all__ = [
    "MAX_TIMEOUT",
    "SILENT_LIMIT",
    "EngineConfig",
    "EngineSettings",
    "EngineStats",
    "Event",
    "Fetch",
    "GetResult",
    "HasQuery",
    "HasResult",
    "InfoQuery",
    "NodeFailed",
    "Operation",
    "OperationDone",
    "OperationResult",
    "PutOutcome",
    "RangeRead",
    "RecordRead",
    "RecordWrite",
    "Store",
]

MAX_TIMEOUT: Final = 2.0
"""Upper bound of an adaptive request timeout, in seconds."""
SILENT_LIMIT: Final = 3
"""Batches in a row a node lets its hedges win without answering before it is reported failed."""


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """How the engine sends requests; validated on construction (UsageError)."""

    max_datagram: int = 32768
    """Largest datagram sent (one value cluster-wide); sizes the batches."""
    timeout: float = 0.25
    """Seconds to wait for a node's first answer; the floor of its adaptive timeout."""
    max_timeout: float = MAX_TIMEOUT
    """Ceiling of the adaptive timeout, retries included (raised to ``timeout`` if lower)."""
    put_timeout: float | None = None
    """Floor of a PUT's adaptive timeout instead of ``timeout`` (None: ``timeout``). A node
    answers a PUT only once the group commit holding it is synced to disk, which a busy disk
    can delay by hundreds of ms; timing out sooner writes the pages again and halves the
    congestion window, which shrinks the nodes' next group commits (publish: more, costlier
    commits and fewer pages per second)."""
    attempts: int = 4
    """Times a request is sent before what it still asks for is given up."""
    alive_attempts: int = 8
    """Further attempts of a HAS, PUT or NODE_INFO request whose node answered other requests
    since it went out (alive but slow: a PUT has no other replica to fail over to)."""
    window: int = 16
    """Requests with bulky answers (GET, HAS) in flight per node; twice that client-wide."""
    hedge_after: float = 0.05
    """Seconds without an answer after which a GET's digests also go to the next replica (0:
    never). Only :class:`Fetch` operations with ``hedge=True`` hedge."""
    silent_limit: int = SILENT_LIMIT
    """Batches in a row a node may lose to its hedges without answering before it is failed."""
    avoid_for: float = 5.0
    """Seconds a failed node is asked last (unless reinstated)."""
    congestion_window: int = CONGESTION_WINDOW_INITIAL
    """Requests of every kind in flight client-wide at the start; the window then adapts
    (AIMD, :class:`~tmdht.net.window.CongestionWindow`) up to ``max_congestion_window``."""
    max_congestion_window: int = CONGESTION_WINDOW_MAX
    """The most requests in flight client-wide, however well the nodes answer."""

    def __post_init__(self) -> None:
        """Refuse values the engine cannot run with."""
        wire.check_max_datagram(self.max_datagram)
        if not self.timeout > 0:
            raise UsageError(f"timeout must be > 0 seconds, got {self.timeout}")
        if self.put_timeout is not None and not self.put_timeout > 0:
            raise UsageError(f"put_timeout must be > 0 seconds or None, got {self.put_timeout}")
        if self.attempts < 1 or self.window < 1 or self.silent_limit < 1:
            raise UsageError("attempts, window and silent_limit must be >= 1")
        if not 1 <= self.congestion_window <= self.max_congestion_window:
            raise UsageError(
                "congestion_window must be >= 1 and <= max_congestion_window, got "
                f"{self.congestion_window} and {self.max_congestion_window}"
            )
        if self.alive_attempts < 0:
            raise UsageError(f"alive_attempts must be >= 0, got {self.alive_attempts}")
        if self.hedge_after < 0 or self.avoid_for < 0:
            raise UsageError("hedge_after and avoid_for must be >= 0 seconds")


class EngineSettings(TypedDict, total=False):
    """:class:`EngineConfig`'s fields as keyword arguments (e.g. of a client's constructor)."""

    max_datagram: int
    timeout: float
    max_timeout: float
    put_timeout: float | None
    attempts: int
    alive_attempts: int
    window: int
    hedge_after: float
    silent_limit: int
    avoid_for: float
    congestion_window: int
    max_congestion_window: int


@dataclass(frozen=True, slots=True)
class Fetch:
    """GET: the pages of ``digests``, each from the first of its replicas that serves it."""

    digests: Sequence[bytes]
    """Distinct digests to fetch (not the zero page)."""
    rows: Sequence[list[int]]
    """Per digest, indices into ``nodes`` of its replicas, closest first (the engine reorders
    them as it fails over)."""
    nodes: Sequence[Address]
    """Data-plane addresses of the nodes the rows point at."""
    hedge: bool = True
    """Ask the next replica too when a node is slow (see ``EngineConfig.hedge_after``)."""


@dataclass(frozen=True, slots=True)
class HasQuery:
    """HAS: which of ``digests`` does the node at ``address`` hold?"""

    address: Address
    digests: Sequence[bytes]


@dataclass(frozen=True, slots=True)
class Store:
    """PUT: store ``pages`` (digest, page) on the node at ``address``; it verifies each."""

    address: Address
    pages: Sequence[tuple[bytes, bytes]]


@dataclass(frozen=True, slots=True)
class InfoQuery:
    """NODE_INFO: who is the node at ``address``?"""

    address: Address


@dataclass(frozen=True, slots=True)
class RecordWrite:
    """RECORD_PUT: keep ``entry`` under ``key`` on the node at ``address`` (soft state with a
    lease; a lower version than the node holds is refused, see :mod:`tmdht.records`)."""

    address: Address
    key: bytes
    entry: wire.RecordEntry
    """Entry id, version, lease (``ttl_ms``) and value."""


@dataclass(frozen=True, slots=True)
class RecordRead:
    """RECORD_GET: the live entries under ``key`` on the node at ``address``."""

    address: Address
    key: bytes


@dataclass(frozen=True, slots=True)
class RangeRead:
    """RANGE_HASH: counts and XOR hashes of groups of buckets on the node at ``address``
    (anti-entropy, :mod:`tmdht.rangehash`); answered by one RANGE_HASHES datagram."""

    address: Address
    bucket_bits: int
    group_bits: int
    first: int
    groups: int
    mask: bytes


Operation = Fetch | HasQuery | Store | InfoQuery | RecordWrite | RecordRead | RangeRead


@dataclass
class GetResult:
    """What a GET operation got."""

    pages: dict[bytes, bytes] = field(default_factory=dict)
    """Pages received and verified."""
    missing: set[bytes] = field(default_factory=set)
    """Unresolved: the last replica asked said it does not hold them."""
    corrupt: set[bytes] = field(default_factory=set)
    """Unresolved: the last replica asked served a page that failed verification."""
    unanswered: set[bytes] = field(default_factory=set)
    """Unresolved: the last replica asked never answered for them (it may be down)."""

    @property
    def unresolved(self) -> set[bytes]:
        """Every digest no replica served (missing, corrupt or unanswered)."""
        return self.missing | self.corrupt | self.unanswered


@dataclass
class HasResult:
    """What one node answered to a HAS."""

    held: set[bytes] = field(default_factory=set)
    lacking: set[bytes] = field(default_factory=set)
    unanswered: set[bytes] = field(default_factory=set)


@dataclass
class PutOutcome:
    """What one node answered to a PUT."""

    status: dict[bytes, wire.PutStatus] = field(default_factory=dict)
    unanswered: set[bytes] = field(default_factory=set)


OperationResult = (
    GetResult
    | HasResult
    | PutOutcome
    | wire.NodeInfo
    | wire.RecordPutResult
    | wire.Records
    | wire.RangeHashes
    | None
)


@dataclass(frozen=True, slots=True)
class OperationDone:
    """An operation ended; ``result`` is its :class:`GetResult`, :class:`HasResult`,
    :class:`PutOutcome`, or the NODE_INFO, RECORD_PUT or RECORD_GET answer (None if the node did
    not answer)."""

    operation: int
    """The id :meth:`RequestEngine.submit` returned."""
    result: OperationResult


@dataclass(frozen=True, slots=True)
class NodeFailed:
    """A node did not answer (see the module docstring); it is avoided for a while."""

    address: Address


Event = OperationDone | NodeFailed


@dataclass
class EngineStats:
    """Counters of one engine (the library's Prometheus metrics read them)."""

    requests: int = 0
    """Requests sent, retries included."""
    datagrams_sent: int = 0
    datagrams_received: int = 0
    bytes_sent: int = 0
    """Bytes of the datagrams sent (UDP payloads)."""
    bytes_received: int = 0
    """Bytes of the datagrams received (UDP payloads)."""
    retries: int = 0
    """Requests re-sent after lost datagrams or a timeout."""
    timeouts: int = 0
    bad_datagrams: int = 0
    """Datagrams that did not decode or authenticate; dropped."""
    unexpected: int = 0
    """Datagrams answering no request in flight (late, or from a stranger); dropped."""
    verification_failures: int = 0
    """Pages that did not match their digest."""
    pages_received: int = 0
    batches: int = 0
    """GET requests sent (retries not counted)."""
    hedges: int = 0
    """GET batches hedged to a further replica."""
    failovers: int = 0
    """Digests asked of a further replica after a miss or failure."""
    window_decreases: int = 0
    """Times the congestion window halved (timeouts or lost parts: congestion episodes)."""
