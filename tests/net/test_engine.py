"""The sans-IO request engine against scripted nodes on a fake clock: no sockets, no sleeps.

Every test is deterministic: time moves only from one datagram delivery or engine deadline to
the next (tests/support/simnet.py). The UDP skin and real node processes are tested in
tests/aio, tests/client and tests/node.
"""

from __future__ import annotations

import random

import pytest
from support.simnet import DIGESTS, PAGES, Script, SimNet, node_address, serving, silent

from tmdht import wire
from tmdht.errors import TmdhtError, UsageError
from tmdht.net.address import Address
from tmdht.net.operations import (
    EngineConfig,
    Fetch,
    GetResult,
    HasQuery,
    HasResult,
    InfoQuery,
    PutOutcome,
    RecordRead,
    RecordWrite,
    Store,
)
from tmdht.records import RecordStatus, RecordStore

FAST = EngineConfig(timeout=0.05, attempts=3, window=4, hedge_after=0.01)


def net_of(nodes: dict[int, Script], config: EngineConfig = FAST, **kw: object) -> SimNet:
    return SimNet({node_address(i): script for i, script in nodes.items()}, config, **kw)  # type: ignore[arg-type]


def fetch(net: SimNet, digests: list[bytes], order: list[int], *, hedge: bool = True) -> GetResult:
    nodes = [node_address(i) for i in order]
    result = net.resolve(Fetch(digests, [list(range(len(order))) for _ in digests], nodes, hedge))
    assert isinstance(result, GetResult)
    return result


def gets(net: SimNet, i: int) -> list[tuple[bytes, ...]]:
    return [m.digests for m in net.asked(node_address(i)) if isinstance(m, wire.GetPages)]


# -- GET ------------------------------------------------------------------------------------------


def test_pages_come_back_verified_in_batches_within_the_window() -> None:
    net = net_of(
        {1: serving(), 2: serving()}, EngineConfig(window=2, max_datagram=wire.MIN_DATAGRAM)
    )
    batch = net.engine.get_batch
    result = fetch(net, DIGESTS, [1, 2])
    assert result.pages == PAGES and not result.unresolved
    assert all(len(ds) <= batch for ds in gets(net, 1)) and len(gets(net, 1)) > 2
    assert not gets(net, 2)  # the closest replica only
    assert net.most_in_flight[node_address(1)] <= 2
    assert not net.engine._pending and net.engine.window.total_in_flight == 0


def test_a_corrupt_or_missing_page_fails_over_to_the_next_replica() -> None:
    bad, absent = DIGESTS[0], DIGESTS[1]
    net = net_of({1: serving(held=set(DIGESTS) - {absent}, corrupt={bad}), 2: serving()})
    result = fetch(net, DIGESTS[:10], [1, 2])
    assert result.pages == {d: PAGES[d] for d in DIGESTS[:10]} and not result.unresolved
    assert net.engine.stats.verification_failures == 1
    assert net.engine.stats.failovers == 2
    assert {d for ds in gets(net, 2) for d in ds} == {bad, absent}


def test_digests_no_replica_holds_are_named_exactly_with_the_reason() -> None:
    gone, bad = set(DIGESTS[:3]), DIGESTS[3]
    held = set(DIGESTS) - gone
    net = net_of({1: serving(held), 2: serving(held, corrupt={bad}), 3: silent})
    result = fetch(net, DIGESTS[:12], [1, 2])
    assert result.missing == gone and result.corrupt == set()
    assert result.pages == {d: PAGES[d] for d in DIGESTS[3:12]}
    single = fetch(net_of({2: serving(held, corrupt={bad})}), [bad, DIGESTS[0]], [2])
    assert single.corrupt == {bad} and single.missing == {DIGESTS[0]}


def test_a_silent_node_is_hedged_then_reported_failed() -> None:
    net = net_of({1: silent, 2: serving()})
    for start in range(0, 9, 3):
        result = fetch(net, DIGESTS[start : start + 3], [1, 2])
        assert result.pages == {d: PAGES[d] for d in DIGESTS[start : start + 3]}
    assert net.engine.stats.hedges >= 3
    assert net.failed == [node_address(1)]  # silent while its hedges won 3 times in a row
    assert net.engine.avoided(node_address(1))
    net.engine.reinstate(node_address(1))
    assert not net.engine.avoided(node_address(1))


def test_hedging_waits_hedge_after_and_a_fetch_may_refuse_it() -> None:
    net = net_of({1: silent, 2: serving()})
    fetch(net, DIGESTS[:2], [1, 2])
    second = [r for r in net.received if r.address == node_address(2)]
    assert second and second[0].at == pytest.approx(0.01)  # hedge_after, not the timeout
    net = net_of({1: silent, 2: serving()})
    result = fetch(net, DIGESTS[:2], [1, 2], hedge=False)
    assert result.pages.keys() == set(DIGESTS[:2])
    second = [r for r in net.received if r.address == node_address(2)]
    assert second[0].at >= 0.05 + 0.1 + 0.2 - 1e-9  # after every attempt to node 1 timed out


def test_a_lost_part_is_asked_again_for_exactly_its_digests() -> None:
    def lossy(net: SimNet, address: Address, message: wire.Message) -> None:
        assert isinstance(message, wire.GetPages)
        ds = message.digests
        if len(net.asked(address)) == 1:  # first answer: part 0 of 2 arrives, part 1 is lost
            half = ds[: len(ds) // 2]
            net.reply(
                address,
                [net.part(address, message.request_id, [(d, PAGES[d]) for d in half], (), 0, 2)],
            )
        else:
            net.reply(
                address, net.pages_answer(address, message.request_id, [(d, PAGES[d]) for d in ds])
            )

    net = net_of({1: lossy})
    result = fetch(net, DIGESTS[:8], [1])
    assert result.pages == {d: PAGES[d] for d in DIGESTS[:8]}
    assert gets(net, 1) == [tuple(DIGESTS[:8]), tuple(DIGESTS[4:8])]
    assert net.received[1].at == pytest.approx(0.01)  # at hedge_after, not the timeout
    assert net.engine.stats.retries == 1


def test_a_part_missing_from_the_whole_answer_is_asked_again_at_once() -> None:
    def forgetful(net: SimNet, address: Address, message: wire.Message) -> None:
        assert isinstance(message, wire.GetPages)
        ds = message.digests
        if len(net.asked(address)) == 1:  # the whole answer (1 part) names only half of them
            ds = ds[: len(ds) // 2]
        net.reply(
            address, net.pages_answer(address, message.request_id, [(d, PAGES[d]) for d in ds])
        )

    net = net_of({1: forgetful})
    result = fetch(net, DIGESTS[:8], [1])
    assert result.pages == {d: PAGES[d] for d in DIGESTS[:8]}
    assert gets(net, 1) == [tuple(DIGESTS[:8]), tuple(DIGESTS[4:8])]
    assert net.received[1].at == pytest.approx(0.001)  # one round trip, no timer
    assert net.engine.stats.retries == 1 and net.engine.stats.timeouts == 0


def test_a_dead_last_replica_makes_its_digests_unanswered_after_retries() -> None:
    net = net_of({1: silent})
    result = fetch(net, DIGESTS[:5], [1])
    assert not result.pages and result.unanswered == set(DIGESTS[:5])
    assert net.engine.stats.retries == 2 and net.failed == [node_address(1)]
    # attempts at 0, 0.05 and 0.15 (timeout doubled per retry), given up at 0.35
    assert [r.at for r in net.received] == pytest.approx([0.0, 0.05, 0.15])
    assert net.now == pytest.approx(0.35)


@pytest.mark.parametrize("avoided_first", [True, False])
def test_an_avoided_replica_is_asked_last(avoided_first: bool) -> None:
    net = net_of({1: serving(), 2: serving()})
    if avoided_first:
        net.engine._node_failed(node_address(1))
    fetch(net, DIGESTS[:4], [1, 2])
    assert net.received[0].address == node_address(2 if avoided_first else 1)


def test_a_failed_node_is_asked_first_again_after_avoid_for() -> None:
    net = net_of({1: serving(), 2: serving()}, EngineConfig(timeout=0.05, avoid_for=1.0))
    net.engine.avoid(node_address(1), net.now)
    fetch(net, DIGESTS[:2], [1, 2])
    assert net.received[-1].address == node_address(2)
    net.now += 1.5
    fetch(net, DIGESTS[2:4], [1, 2])
    assert net.received[-1].address == node_address(1)
    assert not net.engine.avoided(node_address(1))


def test_timeouts_adapt_to_the_round_trip_time() -> None:
    net = net_of({1: serving()}, delay=0.005)
    fetch(net, DIGESTS[:2], [1])
    assert net.engine.timeout_for(node_address(1)) == pytest.approx(0.05)  # floor
    slow = net_of({1: serving()}, EngineConfig(timeout=0.3), delay=0.2)
    fetch(slow, DIGESTS[:2], [1], hedge=False)
    assert slow.engine.timeout_for(node_address(1)) == pytest.approx(0.2 + 4 * 0.1)
    assert slow.engine.timeout_for(node_address(1), attempt=5) == FAST.max_timeout


def chaotic(
    rng: random.Random, held: set[bytes], corrupt: set[bytes], lost_first: set[int]
) -> Script:
    """Answers in parts of 3 pages, each after a random delay (reordering); the first answer to a
    request loses one of its parts with probability 0.3 (a retry is answered whole)."""

    def node(net: SimNet, address: Address, message: wire.Message) -> None:
        assert isinstance(message, wire.GetPages)
        rid, digests = message.request_id, message.digests
        have = [d for d in digests if d in held]
        pages = [(d, bytes(4096) if d in corrupt else PAGES[d]) for d in have]
        missing = [d for d in digests if d not in held]
        chunks = [pages[i : i + 3] for i in range(0, len(pages), 3)] or [[]]
        lose = None
        if rid not in lost_first and rng.random() < 0.3 and len(chunks) > 1:
            lost_first.add(rid)
            lose = rng.randrange(len(chunks))
        for part, chunk in enumerate(chunks):
            if part != lose:
                gone = missing if part == len(chunks) - 1 else []
                datagram = net.part(address, rid, chunk, gone, part, len(chunks))
                net.reply(address, [datagram], delay=rng.random() * 0.004)

    return node


@pytest.mark.parametrize("seed", range(16))
def test_randomised_faults_resolve_exactly_what_some_replica_can_serve(seed: int) -> None:
    """Nodes that hold random subsets, corrupt some pages, reorder and lose parts of answers, one
    of them silent: every digest comes back verified if some replica in its row holds it intact,
    and is reported unresolved otherwise; nothing is left in flight."""
    rng = random.Random(seed)
    nodes: dict[int, Script] = {}
    good: dict[int, set[bytes]] = {}
    lost: set[int] = set()
    mute = rng.randrange(4)
    for i in range(4):
        held = {d for d in DIGESTS if rng.random() < 0.7}
        corrupt = {d for d in held if rng.random() < 0.1}
        good[i] = set() if i == mute else held - corrupt
        nodes[i] = silent if i == mute else chaotic(rng, held, corrupt, lost)
    net = net_of(
        nodes,
        EngineConfig(
            timeout=0.05, attempts=3, window=2, hedge_after=0.01, max_datagram=wire.MIN_DATAGRAM
        ),
    )
    rows = [rng.sample(range(4), 3) for _ in DIGESTS]
    op = net.submit(Fetch(DIGESTS, [list(r) for r in rows], [node_address(i) for i in range(4)]))
    net.run(op)
    result = net.results[op]
    assert isinstance(result, GetResult)
    servable = {d for d, row in zip(DIGESTS, rows, strict=True) if any(d in good[i] for i in row)}
    assert result.pages == {d: PAGES[d] for d in servable}
    assert result.unresolved == set(DIGESTS) - servable
    assert not net.engine._pending and net.engine.window.total_in_flight == 0
    assert net.engine.in_flight == 0 and net.engine.get_timer() is None


def test_a_cancelled_fetch_frees_its_window_slots() -> None:
    net = net_of(
        {1: silent, 2: serving()},
        EngineConfig(timeout=0.05, window=1, max_datagram=wire.MIN_DATAGRAM),
    )
    op = net.submit(Fetch(DIGESTS[:6], [[0] for _ in range(6)], [node_address(1)]))
    net._drain()
    assert net.engine.window.total_in_flight == 1
    net.engine.cancel(op, net.now)
    assert net.engine.window.total_in_flight == 0 and not net.engine._pending
    assert fetch(net, DIGESTS[:4], [2]).pages.keys() == set(DIGESTS[:4])  # still works
    assert op not in net.results  # no event for a cancelled operation


def test_closing_ends_every_operation_in_flight_or_queued() -> None:
    """Requests in flight end and requests still queued are never sent: every operation gets
    its event, what it had not got unanswered."""
    net = net_of({1: silent}, EngineConfig(timeout=0.05, window=1, max_datagram=wire.MIN_DATAGRAM))
    first = net.submit(Fetch(DIGESTS[:4], [[0]] * 4, [node_address(1)]))  # 2 requests, 1 slot
    second = net.submit(Fetch(DIGESTS[4:6], [[0]] * 2, [node_address(1)]))
    has = net.submit(HasQuery(node_address(1), DIGESTS[:3]))
    net._drain()
    sent = len(net.received)
    net.engine.close(net.now)
    net._drain()
    assert len(net.received) == sent  # nothing was sent after the close
    assert net.results[first] == GetResult(unanswered=set(DIGESTS[:4]))
    assert net.results[second] == GetResult(unanswered=set(DIGESTS[4:6]))
    assert net.results[has] == HasResult(unanswered=set(DIGESTS[:3]))
    with pytest.raises(TmdhtError):
        net.submit(InfoQuery(node_address(1)))


# -- HAS, PUT, NODE_INFO --------------------------------------------------------------------------


def test_has_answers_held_and_lacking_in_batches() -> None:
    held = set(DIGESTS[::2])
    net = net_of({1: serving(held)}, EngineConfig(max_datagram=wire.MIN_DATAGRAM))
    result = net.resolve(HasQuery(node_address(1), DIGESTS + DIGESTS[:3]))  # duplicates once
    assert result == HasResult(held=held, lacking=set(DIGESTS) - held)
    assert len(net.received) == -(-len(DIGESTS) // net.engine.has_batch)


def test_put_stores_and_retries_what_no_answer_mentioned() -> None:
    stored: dict[bytes, bytes] = {}
    real = serving(stored=stored)
    dropped = []

    def first_answer_lost(net: SimNet, address: Address, message: wire.Message) -> None:
        if not dropped:
            dropped.append(message)
            return
        real(net, address, message)

    net = net_of({1: first_answer_lost})
    pages = [(d, PAGES[d]) for d in DIGESTS[:5]]
    result = net.resolve(Store(node_address(1), pages))
    assert result == PutOutcome(status=dict.fromkeys(DIGESTS[:5], wire.PutStatus.STORED))
    assert stored == dict(pages) and net.engine.stats.retries == 1


def test_node_info_answers_or_reports_none() -> None:
    net = net_of({1: serving(), 2: silent})
    info = net.resolve(InfoQuery(node_address(1)))
    assert isinstance(info, wire.NodeInfo) and info.version == "sim"
    assert net.resolve(InfoQuery(node_address(2))) is None
    assert net.failed == [node_address(2)]


def test_records_are_written_and_read_with_retries() -> None:
    """RECORD_PUT and RECORD_GET go through the engine like NODE_INFO: one answer each, the
    request re-sent when the answer is lost, None from a silent node."""
    store = RecordStore()
    lost: list[wire.Message] = []

    def records_node(net: SimNet, address: Address, message: wire.Message) -> None:
        if not lost:  # the first answer is lost
            lost.append(message)
            return
        if isinstance(message, wire.RecordPut):
            status, version = store.put(message.key, message.entry_id, message.version,
                                        message.ttl_ms / 1000, message.value, net.now)
            answer: wire.Message = wire.RecordPutResult(
                request_id=message.request_id, status=status, version=version)
        else:
            assert isinstance(message, wire.RecordGet)
            entries = tuple(wire.RecordEntry(e.entry_id, e.version, int(e.ttl * 1000), e.value)
                            for e in store.get(message.key, net.now))
            answer = wire.Records(request_id=message.request_id, entries=entries)
        net.reply(address, [net.seal(address, answer)])

    net = net_of({1: records_node, 2: silent})
    key = bytes(range(32))
    entry = wire.RecordEntry(7, 3, 5000, b"here")
    written = net.resolve(RecordWrite(node_address(1), key, entry))
    assert isinstance(written, wire.RecordPutResult)
    assert (written.status, written.version) == (RecordStatus.STORED, 3)
    assert net.engine.stats.retries == 1
    stale = net.resolve(RecordWrite(node_address(1), key, wire.RecordEntry(7, 2, 5000, b"old")))
    assert isinstance(stale, wire.RecordPutResult) and stale.status is RecordStatus.STALE
    read = net.resolve(RecordRead(node_address(1), key))
    assert isinstance(read, wire.Records)
    assert [(e.entry_id, e.version, e.value) for e in read.entries] == [(7, 3, b"here")]
    assert net.resolve(RecordRead(node_address(2), key)) is None


def test_an_error_answer_fails_over_at_once() -> None:
    def refusing(net: SimNet, address: Address, message: wire.Message) -> None:
        error = wire.Error(
            request_id=message.request_id, code=wire.ErrorCode.INTERNAL, message="disk"
        )
        net.reply(address, [net.seal(address, error)])

    net = net_of({1: refusing, 2: serving()})
    result = fetch(net, DIGESTS[:3], [1, 2], hedge=False)
    assert result.pages.keys() == set(DIGESTS[:3])
    assert net.now < 0.01  # no timeout was waited for
    put = net.resolve(Store(node_address(1), [(DIGESTS[0], PAGES[DIGESTS[0]])]))
    assert put == PutOutcome(unanswered={DIGESTS[0]})


def test_one_client_wide_window_bounds_every_kind_of_request() -> None:
    """GET and HAS share the per-node and the client-wide window; PUTs have a larger per-node
    window of their own (small answers); all of them queue and drain in order."""
    config = EngineConfig(window=2, max_datagram=wire.MIN_DATAGRAM)
    net = net_of({i: serving() for i in range(3)}, config, delay=0.01)
    ops = [
        net.submit(
            Fetch(
                DIGESTS, [[i % 3] for i in range(len(DIGESTS))], [node_address(i) for i in range(3)]
            )
        ),
        net.submit(HasQuery(node_address(0), DIGESTS)),
        net.submit(Store(node_address(1), [(d, PAGES[d]) for d in DIGESTS])),
    ]
    net._drain()
    window = net.engine.window
    assert window.total_in_flight == 4  # 2 x per-node window, across nodes
    assert window.in_flight(node_address(1)) <= 2 + 8  # GETs + PUTs (4 x window)
    net.run(*ops)
    assert max(net.most_in_flight.values()) <= 2 + 8
    assert all(window.in_flight(node_address(i)) == 0 for i in range(3))


def test_bad_and_stray_datagrams_are_dropped_and_counted() -> None:
    net = net_of({1: serving()})
    net.engine.receive_datagram(b"junk", node_address(1), 0.0)
    stranger = wire.encode(
        wire.Pages(request_id=12345, pages=(), missing=()),
        max_datagram=wire.MAX_DATAGRAM, auth=net._node_auth[node_address(1)], now=1.7e9,
    )  # fmt: skip
    net.engine.receive_datagram(stranger, node_address(1), 0.0)
    assert net.engine.stats.bad_datagrams == 1 and net.engine.stats.unexpected == 1


def test_the_config_is_validated() -> None:
    with pytest.raises(UsageError):
        EngineConfig(max_datagram=100)
    with pytest.raises(UsageError):
        EngineConfig(attempts=0)
    with pytest.raises(UsageError):
        EngineConfig(timeout=0)


def test_the_puts_of_one_input_are_sealed_in_one_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every PUT a submit (or an answer) lets go is encoded in one encode_put_requests call, and
    the bytes it sends are counted."""
    import tmdht.net.engine as engine_module

    calls: list[int] = []
    real = engine_module.encode_put_requests

    def counting(requests: list[object], **kwargs: object) -> list[bytes]:
        calls.append(len(requests))
        return real(requests, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(engine_module, "encode_put_requests", counting)
    net = net_of({1: serving(stored={})})
    per = net.engine.put_batch
    pages = [(d, PAGES[d]) for d in DIGESTS[: 3 * per]]
    net.submit(Store(node_address(1), pages))
    assert calls == [3]  # three requests, one call
    sent = net.engine.datagrams_to_send(net.now)
    assert net.engine.stats.bytes_sent == sum(len(data) for data, _ in sent)
    assert [len(data) for data, _ in sent] == [wire.DATAGRAM_OVERHEAD + 2 + per * (32 + 4096)] * 3
