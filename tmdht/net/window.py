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
"""

from __future__ import annotations

from typing import Final

from tmdht.net.address import Address

__all__ = ["SMALL_ANSWER_WINDOW_FACTOR", "RequestWindow", "RttEstimator"]

SMALL_ANSWER_WINDOW_FACTOR: Final = 4
"""Requests with small answers (PUT, NODE_INFO) in flight per node, in per-node windows."""


class RequestWindow:
    """Requests in flight per node and client-wide (see the module docstring).

    ``admits`` says whether a request to ``address`` may go now; ``opened`` and ``closed``
    account for it. A congestion controller (a client-wide bound adapting to timeouts and
    losses) replaces the fixed ``total`` here: ``closed(..., lost=True)`` is its signal.
    """

    __slots__ = ("_bulk", "_small", "per_node", "small_per_node", "total", "total_in_flight")

    def __init__(self, per_node: int, *, total: int | None = None) -> None:
        """``per_node`` bulky requests per node; ``total`` across nodes (default 2 x per_node)."""
        self.per_node = max(1, per_node)
        self.total = max(1, total if total is not None else 2 * self.per_node)
        self.small_per_node = SMALL_ANSWER_WINDOW_FACTOR * self.per_node
        self.total_in_flight = 0
        """Bulky requests in flight, all nodes together."""
        self._bulk: dict[Address, int] = {}
        self._small: dict[Address, int] = {}

    def admits(self, address: Address, *, small: bool) -> bool:
        """True if a request to ``address`` may be sent now."""
        if small:
            return self._small.get(address, 0) < self.small_per_node
        return self.total_in_flight < self.total and self._bulk.get(address, 0) < self.per_node

    def has_room(self) -> bool:
        """True while a bulky request to some node could still go (the client-wide bound)."""
        return self.total_in_flight < self.total

    def opened(self, address: Address, *, small: bool) -> None:
        """A request to ``address`` went out."""
        if small:
            self._small[address] = self._small.get(address, 0) + 1
        else:
            self._bulk[address] = self._bulk.get(address, 0) + 1
            self.total_in_flight += 1

    def closed(self, address: Address, *, small: bool, lost: bool = False) -> None:
        """A request to ``address`` ended (``lost``: it ended without an answer)."""
        counts = self._small if small else self._bulk
        left = counts[address] - 1
        if left:
            counts[address] = left
        else:
            del counts[address]
        if not small:
            self.total_in_flight -= 1

    def in_flight(self, address: Address) -> int:
        """Requests in flight to ``address``, both classes."""
        return self._bulk.get(address, 0) + self._small.get(address, 0)


class _Smoothed:
    """Smoothed round-trip time of one node (RFC 6298)."""

    __slots__ = ("rttvar", "srtt")

    def __init__(self, sample: float) -> None:
        self.srtt = sample
        self.rttvar = sample / 2

    def observe(self, sample: float) -> None:
        self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - sample)
        self.srtt = 0.875 * self.srtt + 0.125 * sample


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

    def timeout(self, address: Address, attempt: int = 0) -> float:
        """How long to wait for an answer from ``address`` to attempt ``attempt`` (0 first)."""
        rtt = self._nodes.get(address)
        base = (
            self.floor
            if rtt is None
            else min(self.ceiling, max(self.floor, rtt.srtt + 4 * rtt.rttvar))
        )
        return float(min(self.ceiling, base * 2.0**attempt))
