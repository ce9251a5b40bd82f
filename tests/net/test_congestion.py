"""The engine's congestion window (AIMD over every request in flight) on a fake clock.

The 32-node publish failure of issue 16: PUT windows were per node, so the work in flight grew
with the ring until nodes timed out and pages failed. Here a scripted node serves requests one
after another (a queue with a service time), as a loaded node process does.
"""

from __future__ import annotations

import os

import pytest
from support.simnet import SimNet, node_address, serving, silent

from tmdht import wire
from tmdht.errors import UsageError
from tmdht.net.address import Address
from tmdht.net.operations import EngineConfig, HasQuery, PutOutcome, Store
from tmdht.net.window import CongestionWindow, RequestWindow
from tmdht.pages import digest_page

SMALL = wire.MIN_DATAGRAM
SERVICE = 0.02


def many_pages(count: int) -> list[tuple[bytes, bytes]]:
    pages = [os.urandom(4096) for _ in range(count)]
    return [(digest_page(p), p) for p in pages]


def queueing(service: float) -> object:
    """A node that answers its requests one after another, ``service`` seconds each."""
    inner = serving(held=set())
    busy_until = [0.0]

    def node(net: SimNet, address: Address, message: wire.Message) -> None:
        start = max(net.now, busy_until[0])
        busy_until[0] = start + service
        saved = net.delay
        net.delay = busy_until[0] - net.now
        try:
            inner(net, address, message)
        finally:
            net.delay = saved

    return node


def test_the_window_grows_by_answers_and_halves_once_per_loss_episode() -> None:
    window = CongestionWindow(8, floor=2, limit=64)
    for _ in range(8):
        window.answered()
    assert window.allowed == 16  # slow start: one more per answer
    assert window.lost(sent_at=1.0, now=2.0)
    assert window.allowed == 8 and window.threshold == 8
    assert not window.lost(sent_at=1.5, now=2.1)  # sent before the decrease: same episode
    assert window.allowed == 8
    for _ in range(9):
        window.answered()
    assert window.allowed == 9  # above the threshold: one more per window of answers
    assert window.lost(sent_at=2.5, now=3.0)
    for _ in range(10):
        window.lost(sent_at=10.0 + _, now=10.0 + _)
    assert window.allowed == 2  # never below the floor
    for _ in range(10_000):
        window.answered()
    assert window.allowed == 64  # nor above the limit


def test_the_request_window_admits_no_more_than_the_congestion_window() -> None:
    window = RequestWindow(16, congestion=CongestionWindow(3, floor=1, limit=3))
    for i in range(3):
        assert window.admits(node_address(i), small=True)
        window.opened(node_address(i), small=True)
    assert not window.admits(node_address(9), small=True)
    assert not window.admits(node_address(9), small=False)
    window.closed(node_address(0), small=True)
    assert window.admits(node_address(9), small=False)


def test_engine_config_refuses_a_congestion_window_above_its_limit() -> None:
    with pytest.raises(UsageError):
        EngineConfig(congestion_window=10, max_congestion_window=5)


def test_puts_to_many_nodes_are_bounded_client_wide() -> None:
    """32 nodes: the requests in flight stay within the congestion window, not 32 x a per-node
    window."""
    config = EngineConfig(max_datagram=SMALL, congestion_window=8, max_congestion_window=8)
    net = SimNet({node_address(i): serving(held=set()) for i in range(32)}, config, delay=0.01)
    pages = many_pages(32 * 12)
    ops = [net.submit(Store(node_address(i), pages[i * 12 : (i + 1) * 12])) for i in range(32)]
    net.run(*ops)
    assert net.most_total_in_flight == 8
    for op in ops:
        result = net.results[op]
        assert isinstance(result, PutOutcome) and not result.unanswered
        assert all(s == wire.PutStatus.STORED for s in result.status.values())


def publish_to_queueing_nodes(
    config: EngineConfig, fixed: CongestionWindow | None = None
) -> tuple[SimNet, int]:
    """Every node serves one request per SERVICE seconds; 150 pages to each of 8 nodes."""
    net = SimNet({node_address(i): queueing(SERVICE) for i in range(8)}, config)  # type: ignore[dict-item]
    if fixed is not None:
        net.engine.window.congestion = fixed
    pages = many_pages(8 * 150)
    ops = [net.submit(Store(node_address(i), pages[i * 150 : (i + 1) * 150])) for i in range(8)]
    net.run(*ops, limit=600.0, steps=1_000_000)
    unanswered = 0
    for op in ops:
        result = net.results[op]
        assert isinstance(result, PutOutcome)
        unanswered += len(result.unanswered)
    return net, unanswered


def test_overloaded_nodes_slow_puts_down_instead_of_failing_them() -> None:
    """Nodes that queue 20 ms per request, timeouts from 50 ms: no page goes unanswered, and
    the adaptive window sends a fraction of the duplicate retries a window as large as the old
    per-node PUT windows (nothing client-wide, nothing adapting) does."""
    base = {"max_datagram": SMALL, "timeout": 0.05, "max_timeout": 0.4, "attempts": 4}
    fixed, lost_fixed = publish_to_queueing_nodes(
        EngineConfig(**base),  # type: ignore[arg-type]
        CongestionWindow(1024, floor=1024, limit=1024),
    )
    adaptive, lost_adaptive = publish_to_queueing_nodes(EngineConfig(**base))  # type: ignore[arg-type]
    assert lost_adaptive == 0 and lost_fixed == 0  # slow nodes are waited for (alive_attempts)
    assert adaptive.engine.stats.window_decreases >= 1
    assert adaptive.engine.stats.retries * 4 < fixed.engine.stats.retries
    assert adaptive.most_total_in_flight < 128


def test_a_slow_node_gets_a_smaller_window_of_its_own() -> None:
    """One node queues, the others answer at once: the slow node's requests are bounded by its
    own congestion window, the others keep theirs."""
    nodes = {node_address(i): serving(held=set()) for i in range(4)}
    nodes[node_address(0)] = queueing(SERVICE)  # type: ignore[assignment]
    config = EngineConfig(max_datagram=SMALL, timeout=0.05, max_timeout=0.4)
    net = SimNet(nodes, config, delay=0.001)
    pages = many_pages(4 * 100)
    ops = [net.submit(Store(node_address(i), pages[i * 100 : (i + 1) * 100])) for i in range(4)]
    net.run(*ops, limit=600.0, steps=1_000_000)
    window = net.engine.window
    assert all(not net.results[op].unanswered for op in ops)  # type: ignore[union-attr]
    assert net.engine.stats.timeouts > 0
    slow = window.node_window(node_address(0))
    assert slow is not None and slow < window.small_per_node
    assert all(window.node_window(node_address(i)) is None for i in (1, 2, 3))


def test_a_silent_node_still_fails_after_its_attempts() -> None:
    """Patience is for nodes that answer: a node that says nothing fails its PUT as before."""
    config = EngineConfig(max_datagram=SMALL, timeout=0.05, attempts=3)
    net = SimNet({node_address(0): silent}, config)
    pages = many_pages(3)
    result = net.resolve(Store(node_address(0), pages))
    assert isinstance(result, PutOutcome) and result.unanswered == {d for d, _ in pages}
    assert len(net.asked(node_address(0))) == 3 * 3  # three requests, three attempts each


def test_a_silent_node_shrinks_its_own_window_not_everyone_elses() -> None:
    """A node that says nothing (down) is not congestion: its timeouts shrink its window, and
    requests to the nodes that answer keep the client-wide window."""
    nodes = {node_address(i): serving(held=set()) for i in range(3)}
    nodes[node_address(0)] = silent
    config = EngineConfig(max_datagram=SMALL, timeout=0.05, attempts=2)
    net = SimNet(nodes, config, delay=0.001)
    pages = many_pages(3 * 20)
    ops = [net.submit(Store(node_address(i), pages[i * 20 : (i + 1) * 20])) for i in range(3)]
    net.run(*ops, limit=600.0, steps=1_000_000)
    window = net.engine.window
    assert net.engine.stats.timeouts > 0
    assert window.congestion.decreases == 0
    assert window.node_window(node_address(0)) is not None
    assert not net.results[ops[1]].unanswered and not net.results[ops[2]].unanswered  # type: ignore[union-attr]


def test_a_put_waits_at_least_its_own_timeout_floor() -> None:
    """``put_timeout`` is the floor of a PUT's timeout (a node answers a PUT after its group
    commit's fsync); other requests keep ``timeout``."""
    config = EngineConfig(max_datagram=SMALL, timeout=0.05, put_timeout=0.3, attempts=2)
    net = SimNet({node_address(0): silent}, config)
    pages = many_pages(1)
    put = net.resolve(Store(node_address(0), pages))
    assert isinstance(put, PutOutcome) and put.unanswered == {pages[0][0]}
    assert net.now == pytest.approx(0.3 + 0.6)  # two attempts, the second doubled
    net = SimNet({node_address(0): silent}, config)
    net.resolve(HasQuery(node_address(0), [pages[0][0]]))
    assert net.now == pytest.approx(0.05 + 0.1)
    with pytest.raises(UsageError):
        EngineConfig(put_timeout=0)
