"""A simulated network for the sans-IO request engine: scripted store nodes, a fake clock.

Nothing here sleeps or opens a socket. The engine's datagrams are decoded by the scripted node
they are addressed to; its answers (real wire datagrams, sealed with the cluster key) are
delivered after the delays the script chose. Time jumps from one delivery or engine deadline to
the next, so a test of timeouts, hedges and retries runs in microseconds and is deterministic.
"""

from __future__ import annotations

import heapq
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from tmdht import wire
from tmdht.auth import Authenticator, ClusterKey, KeyRing
from tmdht.net.address import Address
from tmdht.net.engine import RequestEngine
from tmdht.net.operations import (
    EngineConfig,
    Event,
    NodeFailed,
    Operation,
    OperationDone,
    OperationResult,
)
from tmdht.pages import PageDigest, digest_page

EPOCH = 1_700_000_000.0
"""Wall-clock time at fake time 0 (auth timestamps must look current)."""
KEY = ClusterKey(1, os.urandom(32))


def auth() -> Authenticator:
    return Authenticator.keyed(KeyRing(KEY))


def node_address(i: int) -> Address:
    return ("127.0.0.1", 2000 + i)


PAGES = {digest_page(p): p for p in (os.urandom(4096) for _ in range(40))}
DIGESTS = list(PAGES)

Script = Callable[["SimNet", Address, wire.Message], None]
"""A node: called with every request it receives; answers through ``net.reply``."""


@dataclass
class Received:
    """One request a node received."""

    at: float
    address: Address
    message: wire.Message


@dataclass
class SimNet:
    """An engine and scripted nodes on a fake clock."""

    nodes: dict[Address, Script]
    config: EngineConfig = field(default_factory=EngineConfig)
    delay: float = 0.001
    """Delay of every answer unless a script says otherwise (requests arrive at once)."""
    now: float = 0.0
    received: list[Received] = field(default_factory=list)
    failed: list[Address] = field(default_factory=list)
    results: dict[int, OperationResult] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.engine = RequestEngine(
            auth(), self.config, wall_clock=lambda: EPOCH + self.now, first_request_id=100
        )
        self._node_auth = {address: auth() for address in self.nodes}
        self._wire: list[tuple[float, int, bytes, Address]] = []
        self._seq = 0
        self.in_flight: dict[Address, int] = {}
        self.most_in_flight: dict[Address, int] = {}

    # -- what scripts use ------------------------------------------------------------------------

    def reply(
        self, source: Address, datagrams: Sequence[bytes], delay: float | None = None
    ) -> None:
        """Deliver ``datagrams`` from ``source`` to the engine after ``delay``."""
        for datagram in datagrams:
            self._seq += 1
            when = self.now + (self.delay if delay is None else delay)
            heapq.heappush(self._wire, (when, self._seq, datagram, source))

    def seal(self, address: Address, message: wire.Message) -> bytes:
        return wire.encode(
            message,
            max_datagram=wire.MAX_DATAGRAM,
            auth=self._node_auth[address],
            now=EPOCH + self.now,
        )

    def pages_answer(
        self,
        address: Address,
        request_id: int,
        pages: Sequence[tuple[bytes, bytes]],
        missing: Sequence[bytes] = (),
    ) -> list[bytes]:
        return wire.encode_pages_response(
            request_id,
            [(PageDigest(d), p) for d, p in pages],
            [PageDigest(d) for d in missing],
            max_datagram=self.config.max_datagram,
            auth=self._node_auth[address],
            now=EPOCH + self.now,
        )

    def part(
        self,
        address: Address,
        request_id: int,
        pages: Sequence[tuple[bytes, bytes]],
        missing: Sequence[bytes],
        part: int,
        parts: int,
    ) -> bytes:
        """One PAGES datagram, part ``part`` of ``parts``."""
        return self.seal(
            address,
            wire.Pages(
                request_id=request_id,
                pages=tuple((PageDigest(d), p) for d, p in pages),
                missing=tuple(PageDigest(d) for d in missing),
                part=part,
                parts=parts,
            ),
        )

    # -- driving the engine ----------------------------------------------------------------------

    def submit(self, operation: Operation) -> int:
        return self.engine.submit(operation, self.now)

    def run(self, *operations: int, limit: float = 60.0, steps: int = 100_000) -> None:
        """Move time on until every operation named is done (bounded by fake time and steps)."""
        for _ in range(steps):
            self._drain()
            if all(op in self.results for op in operations):
                return
            wake = [t for t in (self.engine.get_timer(),) if t is not None]
            if self._wire:
                wake.append(self._wire[0][0])
            assert wake, f"stuck at {self.now:.3f} s: nothing in flight, nothing scheduled"
            self.now = max(self.now, min(wake))
            assert self.now <= limit, f"not done within {limit} s of fake time"
            while self._wire and self._wire[0][0] <= self.now:
                _, _, datagram, source = heapq.heappop(self._wire)
                self.engine.receive_datagram(datagram, source, self.now)
            timer = self.engine.get_timer()
            if timer is not None and timer <= self.now:
                self.engine.handle_timer(self.now)
        raise AssertionError(f"not done after {steps} steps")

    def resolve(self, operation: Operation) -> OperationResult:
        op = self.submit(operation)
        self.run(op)
        return self.results[op]

    def _drain(self) -> None:
        for datagram, address in self.engine.datagrams_to_send(self.now):
            message = wire.decode(
                datagram,
                max_datagram=wire.MAX_DATAGRAM,
                auth=self._node_auth[address],
                now=EPOCH + self.now,
            )
            self.received.append(Received(self.now, address, message))
            self.nodes[address](self, address, message)
        self._count_in_flight()
        while (event := self.engine.next_event()) is not None:
            self._event(event)

    def _event(self, event: Event) -> None:
        if isinstance(event, OperationDone):
            self.results[event.operation] = event.result
        elif isinstance(event, NodeFailed):
            self.failed.append(event.address)

    def _count_in_flight(self) -> None:
        window = self.engine.window
        for address in self.nodes:
            now = window.in_flight(address)
            self.most_in_flight[address] = max(self.most_in_flight.get(address, 0), now)

    def asked(self, address: Address) -> list[wire.Message]:
        return [r.message for r in self.received if r.address == address]


# -- scripted nodes ------------------------------------------------------------------------------


def serving(
    held: set[bytes] | None = None,
    corrupt: frozenset[bytes] | set[bytes] = frozenset(),
    stored: dict[bytes, bytes] | None = None,
) -> Script:
    """A healthy node holding ``held`` (default: every page in PAGES, plus what is PUT)."""
    store = stored if stored is not None else dict(PAGES if held is None else {})
    if held is not None:
        store.update({d: PAGES[d] for d in held})

    def node(net: SimNet, address: Address, message: wire.Message) -> None:
        rid = message.request_id
        if isinstance(message, wire.GetPages):
            have = [d for d in message.digests if d in store]
            pages = [(d, bytes(4096) if d in corrupt else store[d]) for d in have]
            missing = [d for d in message.digests if d not in store]
            net.reply(address, net.pages_answer(address, rid, pages, missing))
        elif isinstance(message, wire.Has):
            held_bits = [d in store for d in message.digests]
            net.reply(
                address,
                wire.encode_have_response(
                    rid, held_bits, max_datagram=net.config.max_datagram,
                    auth=net._node_auth[address], now=EPOCH + net.now,
                ),
            )  # fmt: skip
        elif isinstance(message, wire.PutPages):
            results = []
            for digest, page in message.pages:
                if digest_page(page) != digest:
                    results.append((digest, wire.PutStatus.REJECTED_DIGEST))
                elif digest in store:
                    results.append((digest, wire.PutStatus.PRESENT))
                else:
                    store[digest] = bytes(page)
                    results.append((digest, wire.PutStatus.STORED))
            net.reply(
                address,
                wire.encode_put_response(
                    rid, results, max_datagram=net.config.max_datagram,
                    auth=net._node_auth[address], now=EPOCH + net.now,
                ),
            )  # fmt: skip
        elif isinstance(message, wire.NodeInfoRequest):
            info = wire.NodeInfo(
                request_id=rid, node_id=bytes(20), data_address=address, kademlia_port=1,
                metrics_port=0, version="sim", pages_stored=len(store),
                bytes_stored=4096 * len(store), capacity_bytes=1 << 30, flags=wire.NodeFlags(0),
            )  # fmt: skip
            net.reply(address, [net.seal(address, info)])

    return node


def silent(net: SimNet, address: Address, message: wire.Message) -> None:
    """A node that never answers (down, or partitioned away)."""
