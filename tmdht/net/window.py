"""How many requests may be in flight, and how long to wait for each: the engine's flow control.

:class:`RequestWindow` is the one object that decides when a request may go out, for every kind
of request a client (or a node's replication job) sends. :class:`RttEstimator` turns answers
into per-node timeouts. Both are sans-IO; times are parameters.

Why two classes of request: every node answers into the one socket of the client, so the
requests whose answers are bulky (GET: up to
:data:`~tmdht.net.engine.RESPONSE_DATAGRAMS_PER_REQUEST` datagrams of pages; HAS) are bounded
per node *and* client-wide, so a window's worth of answers fits the socket's receive buffer.
Requests whose answers are a few bytes (PUT, NODE_INFO) need no share of that buffer; they are
bounded per node only, by a larger window: a node commits the PUTs that arrive together in one
transaction and fsync, so more in flight means larger group commits (publish, 4 nodes, R=3:
4.5k -> 9.0k pages/s at 4x).

On top of both, one **congestion window** bounds every request in flight client-wide, whatever
its kind, and adapts the way TCP's congestion control does (AIMD, RFC 5681): it starts at
``initial`` requests, grows by one per answered request (slow start) up to the threshold of the
last loss, by one per window's worth of answers above it, holds while answers come late
(:meth:`RttEstimator.late`: the nodes queue what more would add), and halves when a request is
lost -- its answer came with parts missing, or it timed out while a request sent after it to the
same node was answered -- at most once per round trip (a loss of a request sent before the last
decrease is the same congestion episode). So the work in flight no longer grows with the number
of nodes: a ring of 32 nodes gets the same client-wide budget as a ring of 4, and overloaded or
slow nodes slow a client down instead of timing its requests out.

A node that loses requests or answers later than its timeouts also gets a congestion window of
its own (the same AIMD, starting from what was in flight to it), so one slow node cannot take
the whole client-wide window and drown in its own retries while the others idle; it is dropped
once it has grown back to the node's fixed windows.
"""

from __future__ import annotations

from typing import Final

from tmdht.net.address import Address

__all__ = [
    "CONGESTION_WINDOW_INITIAL",
    "CONGESTION_WINDOW_MAX",
    "CONGESTION_WINDOW_MIN",
    "SMALL_ANSWER_WINDOW_FACTOR",
    "CongestionWindow",
    "RequestWindow",
    "RttEstimator",
]

SMALL_ANSWER_WINDOW_FACTOR: Final = 4
"""Requests with small answers (PUT, NODE_INFO) in flight per node, in per-node windows."""
CONGESTION_WINDOW_INITIAL: Final = 64
"""Requests in flight client-wide before the first answer or loss (slow start begins here)."""
CONGESTION_WINDOW_MIN: Final = 2
"""The congestion window never shrinks below this (a client always makes progress)."""
CONGESTION_WINDOW_MAX: Final = 1024
"""Nor grows beyond this."""


class CongestionWindow:
    """AIMD over the requests in flight client-wide (see the module docstring); sans-IO."""

    __slots__ = ("_decreased_at", "decreases", "floor", "limit", "size", "threshold")

    def __init__(
        self,
        initial: int = CONGESTION_WINDOW_INITIAL,
        *,
        floor: int = CONGESTION_WINDOW_MIN,
        limit: int = CONGESTION_WINDOW_MAX,
    ) -> None:
        self.floor = max(1, floor)
        self.limit = max(self.floor, limit)
        self.size = float(min(self.limit, max(self.floor, initial)))
        """Requests that may be in flight now (fractional: additive increase adds 1/size)."""
        self.threshold = float(self.limit)
        """Slow-start threshold: half the window at the last loss."""
        self.decreases = 0
        """Times the window was halved (congestion episodes)."""
        self._decreased_at = float("-inf")

    @property
    def allowed(self) -> int:
        """Whole requests the window admits."""
        return int(self.size)

    def answered(self, *, grow: bool = True) -> None:
        """A request got its first answer: grow (by 1 in slow start, else by 1/size), unless
        ``grow`` is False (its answer came late: the window holds, see :class:`RequestWindow`)."""
        if not grow:
            return
        if self.size < self.threshold:
            self.size = min(self.limit, self.size + 1.0)
        else:
            self.size = min(self.limit, self.size + 1.0 / self.size)

    def lost(self, sent_at: float, now: float) -> bool:
        """A request sent at ``sent_at`` timed out or lost parts of its answer at ``now``: halve
        the window, unless it was sent before the last decrease (same episode). True if it
        shrank."""
        if sent_at < self._decreased_at:
            return False
        self.threshold = max(float(self.floor), self.size / 2)
        self.size = self.threshold
        self._decreased_at = now
        self.decreases += 1
        return True


class RequestWindow:
    """Requests in flight per node and client-wide (see the module docstring).

    ``admits`` says whether a request to ``address`` may go now; ``opened`` and ``closed``
    account for it; ``answered`` and ``lost`` drive the :class:`CongestionWindow` that bounds
    all of them together.
    """

    __slots__ = (
        "_bulk",
        "_nodes",
        "_small",
        "all_in_flight",
        "congestion",
        "per_node",
        "small_per_node",
        "total",
        "total_in_flight",
    )

    def __init__(
        self, per_node: int, *, total: int | None = None, congestion: CongestionWindow | None = None
    ) -> None:
        """``per_node`` bulky requests per node; ``total`` across nodes (default 2 x per_node);
        ``congestion`` bounds every request together (default: a fresh AIMD window)."""
        self.per_node = max(1, per_node)
        self.total = max(1, total if total is not None else 2 * self.per_node)
        self.small_per_node = SMALL_ANSWER_WINDOW_FACTOR * self.per_node
        self.congestion = congestion if congestion is not None else CongestionWindow()
        self.total_in_flight = 0
        """Bulky requests in flight, all nodes together."""
        self.all_in_flight = 0
        """Requests of every kind in flight, all nodes together (what the congestion window
        bounds)."""
        self._bulk: dict[Address, int] = {}
        self._small: dict[Address, int] = {}
        self._nodes: dict[Address, CongestionWindow] = {}  # nodes that lost requests

    def admits(self, address: Address, *, small: bool) -> bool:
        """True if a request to ``address`` may be sent now."""
        if self.all_in_flight >= self.congestion.allowed:
            return False
        if self._nodes:
            node = self._nodes.get(address)
            if node is not None and self.in_flight(address) >= node.allowed:
                return False
        if small:
            return self._small.get(address, 0) < self.small_per_node
        return self.total_in_flight < self.total and self._bulk.get(address, 0) < self.per_node

    def has_room(self, *, small: bool = False) -> bool:
        """True while a request of that class to some node could still go (the client-wide
        bounds)."""
        if self.all_in_flight >= self.congestion.allowed:
            return False
        return small or self.total_in_flight < self.total

    def opened(self, address: Address, *, small: bool) -> None:
        """A request to ``address`` went out."""
        self.all_in_flight += 1
        if small:
            self._small[address] = self._small.get(address, 0) + 1
        else:
            self._bulk[address] = self._bulk.get(address, 0) + 1
            self.total_in_flight += 1

    def closed(self, address: Address, *, small: bool, lost: bool = False) -> None:
        """A request to ``address`` ended (``lost``: it ended without an answer; the loss itself
        was signalled by :meth:`lost` at its timeouts)."""
        counts = self._small if small else self._bulk
        left = counts[address] - 1
        if left:
            counts[address] = left
        else:
            del counts[address]
        self.all_in_flight -= 1
        if not small:
            self.total_in_flight -= 1

    def answered(self, address: Address, *, grow: bool = True) -> None:
        """A request to ``address`` got the first datagram of its answer: the windows grow,
        unless ``grow`` is False -- the answer took so long that more in flight would only
        queue at the nodes (see :meth:`RttEstimator.late`)."""
        self.congestion.answered(grow=grow)
        if self._nodes:
            node = self._nodes.get(address)
            if node is not None:
                node.answered(grow=grow)
                if node.allowed >= node.limit:
                    del self._nodes[address]  # recovered: the fixed windows bound it again

    def lost(self, address: Address, sent_at: float, now: float, *, shared: bool = True) -> bool:
        """A request to ``address`` sent at ``sent_at`` timed out or lost parts of its answer:
        the node's window halves and, if ``shared``, the client-wide one (each once per
        episode); True if the client-wide one shrank. Not ``shared``: the node said nothing at
        all meanwhile -- it is down or drowning, which its own window and the engine's failure
        detection handle; the other nodes' requests are not slowed for it."""
        node = self._nodes.get(address)
        if node is None:
            limit = self.small_per_node + self.per_node
            node = self._nodes[address] = CongestionWindow(
                max(1, self.in_flight(address)), floor=1, limit=limit
            )
        node.lost(sent_at, now)
        return shared and self.congestion.lost(sent_at, now)

    def node_window(self, address: Address) -> int | None:
        """The congestion window of a node that lost requests (None: only the fixed ones)."""
        node = self._nodes.get(address)
        return None if node is None else node.allowed

    def in_flight(self, address: Address) -> int:
        """Requests in flight to ``address``, both classes."""
        return self._bulk.get(address, 0) + self._small.get(address, 0)


class _Smoothed:
    """Smoothed round-trip time of one node (RFC 6298), and the least seen."""

    __slots__ = ("least", "rttvar", "srtt")

    def __init__(self, sample: float) -> None:
        self.srtt = sample
        self.rttvar = sample / 2
        self.least = sample

    def observe(self, sample: float) -> None:
        self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - sample)
        self.srtt = 0.875 * self.srtt + 0.125 * sample
        self.least = min(self.least, sample)


class RttEstimator:
    """Per-node adaptive timeouts: smoothed RTT plus four deviations, within [floor, ceiling],
    doubled for each retry (a loaded node is not declared dead early)."""

    __slots__ = ("_nodes", "ceiling", "floor")

    def __init__(self, floor: float, ceiling: float) -> None:
        self.floor = floor
        self.ceiling = max(floor, ceiling)
        self._nodes: dict[Address, _Smoothed] = {}

    def observe(self, address: Address, seconds: float) -> None:
        """One round-trip time to ``address`` (request sent to first answer datagram)."""
        rtt = self._nodes.get(address)
        if rtt is None:
            self._nodes[address] = _Smoothed(max(0.0, seconds))
        else:
            rtt.observe(max(0.0, seconds))

    def late(self, address: Address, sample: float, *, floor: float | None = None) -> bool:
        """True if an answer that took ``sample`` seconds came late: beyond half the request's
        timeout floor (``floor``, else the estimator's) and beyond twice the least round trip
        seen to ``address``. Such a round trip is mostly queueing at the node -- the window
        grew past what the nodes get through -- so the engine's windows stop growing there
        (delay-based, as TCP Vegas or LEDBAT: a lost request halves them, a late one holds them),
        before the queue reaches the timeouts and every timed-out request is sent again."""
        rtt = self._nodes.get(address)
        least = 0.0 if rtt is None else rtt.least
        return sample > max(0.5 * (self.floor if floor is None else floor), 2.0 * least)

    def timeout(self, address: Address, attempt: int = 0, *, floor: float | None = None) -> float:
        """How long to wait for an answer from ``address`` to attempt ``attempt`` (0 first);
        ``floor`` replaces the estimator's floor for this request (e.g. a PUT's)."""
        rtt = self._nodes.get(address)
        low = self.floor if floor is None else floor
        base = low if rtt is None else min(self.ceiling, max(low, rtt.srtt + 4 * rtt.rttvar))
        return float(min(self.ceiling, base * 2.0**attempt))
