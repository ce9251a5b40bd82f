"""The migration wire format and the sans-IO rewriter/rebuilder, on synthetic QEMU streams.

The rewriter/rebuilder tests run on both implementations (the pure-Python reference and the
native module): the ``cores`` fixture below is parametrized over them.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.cores import CORES, REFERENCE, Cores
from support.synthetic import page_pool, qemu_stream

from tmdht.catalog import TemplateCatalog
from tmdht.errors import DecodeError, DigestMismatchError
from tmdht.migration_stream import (
    MAX_NEED,
    Ack,
    BackRef,
    CompressedPage,
    DeviceState,
    Done,
    End,
    Fallback,
    ForwardDecoder,
    FullPage,
    Hello,
    MigrationCounts,
    Need,
    RawBytes,
    ReverseDecoder,
    Template,
    encode,
)
from tmdht.pages import PAGE_SIZE, digest_page

POOL = page_pool(24, seed=9)
CATALOG = TemplateCatalog.from_digests([digest_page(p) for p in POOL[:12]])
BLOCKS = [("pc.ram", 64 * PAGE_SIZE), ("vga.vram", 8 * PAGE_SIZE), ("pc.bios", 3 * PAGE_SIZE)]
HELLO = Hello(CATALOG.catalog_id, 16, 1 << 20, 0)
_cores = [REFERENCE]  # the implementation the current test runs on (set by the fixture)


@pytest.fixture(scope="module", params=CORES, autouse=True)
def cores(request: pytest.FixtureRequest) -> Iterator[Cores]:
    """Every test of this module runs on each implementation (module scope: hypothesis tests
    may not take function-scoped fixtures)."""
    _cores[0] = request.param
    yield request.param
    _cores[0] = REFERENCE


def new_sender(**options: object) -> Any:
    return _cores[0].sender(CATALOG, **options)


def new_receiver(expected_catalog_id: bytes | None = None) -> Any:
    return _cores[0].receiver(expected_catalog_id)


# -- records -----------------------------------------------------------------------------------

prefixes = st.one_of(
    st.integers(0, (1 << 40) - 1).map(lambda o: ((o << 12) | 0x28).to_bytes(8, "big")),
    st.tuples(st.integers(0, (1 << 40) - 1), st.binary(min_size=1, max_size=255)).map(
        lambda t: ((t[0] << 12) | 0x08).to_bytes(8, "big") + bytes((len(t[1]),)) + t[1]
    ),
)
digests = st.binary(min_size=32, max_size=32)
indices = st.integers(0, (1 << 32) - 1)
forward_records = st.one_of(
    st.binary(min_size=1, max_size=3000).map(RawBytes),
    st.binary(min_size=1, max_size=3000).map(DeviceState),
    st.builds(FullPage, prefixes, st.binary(min_size=PAGE_SIZE, max_size=PAGE_SIZE)),
    st.builds(CompressedPage, prefixes, st.binary(min_size=1, max_size=PAGE_SIZE - 1)),
    st.builds(Template, prefixes, digests),
    st.builds(BackRef, prefixes, indices),
    st.builds(Fallback, indices, st.just(True), st.binary(min_size=1, max_size=PAGE_SIZE)),
    st.builds(Fallback, indices, st.just(False), st.binary(min_size=PAGE_SIZE, max_size=PAGE_SIZE)),
)
counts = st.builds(MigrationCounts, *[st.integers(0, (1 << 64) - 1)] * 7)
reverse_records = st.one_of(
    st.lists(indices, min_size=1, max_size=MAX_NEED).map(lambda xs: Need(tuple(xs))),
    st.builds(Ack, indices, st.integers(0, (1 << 64) - 1)),
    st.builds(Done, st.booleans(), st.text(max_size=200)),
)


def decode_forward(data: bytes, chunk: int) -> tuple[Hello | None, list[object]]:
    decoder = ForwardDecoder()
    out: list[object] = []
    for i in range(0, len(data), chunk):
        decoder.feed(data[i : i + chunk])
        out += list(decoder.records())
    decoder.close()
    return decoder.hello, out


@settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(forward_records, max_size=8), counts, digests, st.integers(1, 5000))
def test_forward_records_round_trip(
    records: list[object], totals: MigrationCounts, digest: bytes, chunk: int
) -> None:
    end = End(totals, digest)
    data = encode(HELLO) + b"".join(encode(r) for r in records) + encode(end)  # type: ignore[arg-type]
    hello, decoded = decode_forward(data, chunk)
    assert hello == HELLO
    assert decoded == [*records, end]


@settings(max_examples=60, deadline=None)
@given(st.lists(reverse_records, max_size=6), st.integers(1, 100))
def test_reverse_records_round_trip(records: list[object], chunk: int) -> None:
    data = b"".join(encode(r) for r in records)  # type: ignore[arg-type]
    decoder = ReverseDecoder()
    out: list[object] = []
    for i in range(0, len(data), chunk):
        decoder.feed(data[i : i + chunk])
        out += list(decoder.records())
    decoder.close()
    assert out == records


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_random_bytes_only_raise_decode_error(data: bytes) -> None:
    for prefix in (b"", encode(HELLO)):
        decoder = ForwardDecoder()
        try:
            decoder.feed(prefix + data)
            list(decoder.records())
            decoder.close()
        except DecodeError:
            pass
        rebuilder = new_receiver()
        try:
            rebuilder.feed(prefix + data)
            rebuilder.output()
            rebuilder.close()
        except DecodeError:
            pass
    reverse = ReverseDecoder()
    try:
        reverse.feed(data)
        list(reverse.records())
        reverse.close()
    except DecodeError:
        pass


def test_truncated_stream_raises_decode_error_on_close() -> None:
    data = encode(HELLO) + encode(Template((0x28).to_bytes(8, "big"), bytes(32)))
    for cut in range(1, len(data)):
        decoder = ForwardDecoder()
        decoder.feed(data[:cut])
        list(decoder.records())
        with pytest.raises(DecodeError):
            decoder.close()


@pytest.mark.parametrize(
    "bad",
    [
        Template(b"\x00" * 7, bytes(32)),  # short prefix
        Template((0x18).to_bytes(8, "big"), bytes(32)),  # not a PAGE header
        Template((0x08).to_bytes(8, "big") + b"\x00", bytes(32)),  # empty idstr
        Template((0x08).to_bytes(8, "big") + b"\x05ab", bytes(32)),  # idstr length lies
        CompressedPage((0x28).to_bytes(8, "big"), bytes(PAGE_SIZE)),
        Fallback(1, False, b"short"),
        Need(()),
        RawBytes(b""),
    ],
)
def test_encode_refuses_records_outside_the_format(bad: object) -> None:
    with pytest.raises(ValueError):
        encode(bad)  # type: ignore[arg-type]


def test_limits_are_checked_when_decoding() -> None:
    with pytest.raises(DecodeError):
        list(_fed(ForwardDecoder(), encode(HELLO) + b"\x01" + (2 << 20).to_bytes(4, "big")))
    with pytest.raises(DecodeError):
        list(_fed(ForwardDecoder(), b"TMDHTMIX" + bytes(60)))
    with pytest.raises(DecodeError):
        list(_fed(ReverseDecoder(), b"\x11" + (MAX_NEED + 1).to_bytes(2, "big")))
    with pytest.raises(DecodeError):  # nothing but FALLBACK after END
        list(
            _fed(
                ForwardDecoder(),
                encode(HELLO) + encode(End(MigrationCounts(), bytes(32))) + encode(RawBytes(b"x")),
            )
        )


def _fed(decoder: ForwardDecoder | ReverseDecoder, data: bytes) -> list[object]:
    decoder.feed(data)
    return list(decoder.records())


# -- rewriter and rebuilder --------------------------------------------------------------------


def synthetic(seed: int, rounds: int = 3) -> bytes:
    rng = random.Random(seed)
    plan = []
    for _ in range(rounds):
        records = []
        for _ in range(rng.randrange(5, 60)):
            name, length = rng.choice(BLOCKS)
            index = rng.randrange(length // PAGE_SIZE)
            x = rng.random()
            data = (
                None
                if x < 0.2
                else (POOL[rng.randrange(len(POOL))] if x < 0.8 else rng.randbytes(PAGE_SIZE))
            )
            records.append((name, index, data))
        plan.append(records)
    stream, _memory = qemu_stream(BLOCKS, plan)
    return stream


def send(
    stream: bytes, *, chunk: int, compress: bool = False, backref_window: int = 16
) -> tuple[Any, bytes]:
    sender = new_sender(compress=compress, backref_window=backref_window, flow_window=1 << 30)
    out = [sender.start()]
    for i in range(0, len(stream), chunk):
        out.append(sender.feed(stream[i : i + chunk]))
    out.append(sender.finish())
    return sender, b"".join(out)


def receive(
    wire: bytes, *, chunk: int, lose: frozenset[bytes] = frozenset(), sender: Any = None
) -> tuple[Any, bytes]:
    """Feed the wire in chunks, resolving from POOL but for ``lose``; those pages are asked of
    ``sender`` (its FALLBACK records arrive after the whole stream, at a record boundary)."""
    pages = {digest_page(p): p for p in POOL}
    rebuilder = new_receiver(CATALOG.catalog_id)
    out: list[bytes] = []
    needs: list[bytes] = []
    for i in range(0, len(wire), chunk):
        rebuilder.feed(wire[i : i + chunk])
        wanted = rebuilder.wanted(1000)
        rebuilder.unavailable([i for i, d in wanted if d in lose])
        for index, digest in wanted:
            if digest not in lose:
                rebuilder.supply(index, pages[digest])
        out += rebuilder.output()
        needs.append(rebuilder.requests())
    reverse = ReverseDecoder()
    reverse.feed(b"".join(needs))
    for record in reverse.records():
        assert isinstance(record, Need) and sender is not None
        rebuilder.feed(sender.fallback(record))
    out += rebuilder.output()
    return rebuilder, b"".join(out)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.integers(300, 9000), st.integers(100, 9000), st.booleans())
def test_rebuilt_stream_is_exactly_what_qemu_sent(
    seed: int, chunk_in: int, chunk_wire: int, compress: bool
) -> None:
    stream = synthetic(seed)
    sender, wire = send(stream, chunk=chunk_in, compress=compress)
    rebuilder, out = receive(wire, chunk=chunk_wire)
    assert out == stream
    assert rebuilder.verified
    counts = sender.counts
    assert counts.qemu_bytes == len(stream)
    assert counts.pages == (
        counts.template_pages + counts.backref_pages + counts.full_pages + counts.compressed_pages
    )
    assert rebuilder.stats.end == counts


def test_templates_repeats_and_zero_pages_shrink_the_stream() -> None:
    stream = synthetic(7, rounds=4)
    sender, wire = send(stream, chunk=4096)
    counts = sender.counts
    assert counts.template_pages > 0 and counts.backref_pages > 0 and counts.zero_pages > 0
    assert len(wire) < len(stream) - (counts.template_pages + counts.backref_pages) * 4000
    _, compressed = send(stream, chunk=4096, compress=True)
    assert len(compressed) <= len(wire)


def test_lost_templates_come_from_the_sender() -> None:
    stream = synthetic(11, rounds=3)
    lose = frozenset(digest_page(p) for p in POOL[:6])
    sender, wire = send(stream, chunk=1000)
    rebuilder, out = receive(wire, chunk=777, lose=lose, sender=sender)
    assert out == stream
    assert rebuilder.stats.fallback_pages > 0
    assert (
        rebuilder.stats.cluster_pages + rebuilder.stats.fallback_pages
        == sender.counts.template_pages
    )


def test_a_wrong_page_withholds_the_device_state() -> None:
    stream = synthetic(3, rounds=2)
    _sender, wire = send(stream, chunk=len(stream))
    device_at = wire.index(b"\x06", wire.rindex(b"\x7e\x00\x00\x00\x02"))
    bad_page = next(p for p in POOL[12:] if p in stream)
    at = wire.index(bad_page)
    assert at < device_at
    tampered = wire[:at] + bytes([wire[at] ^ 1]) + wire[at + 1 :]
    rebuilder = new_receiver(CATALOG.catalog_id)
    pages = {digest_page(p): p for p in POOL}
    rebuilder.feed(tampered)
    for index, digest in rebuilder.wanted(10_000):
        rebuilder.supply(index, pages[digest])
    with pytest.raises(DigestMismatchError):
        rebuilder.output()
    assert not rebuilder.verified


def test_device_state_is_held_until_end() -> None:
    stream = synthetic(5, rounds=1)
    _sender, wire = send(stream, chunk=len(stream))
    end_at = len(wire) - (1 + 7 * 8 + 32)
    _, before_end = receive(wire[:end_at], chunk=len(wire))
    eof_at = stream.rindex(b"\x7e\x00\x00\x00\x02") + 5  # after END(ram)'s footer
    assert before_end == stream[:eof_at]


def test_flow_window_and_acknowledgements() -> None:
    stream = synthetic(2, rounds=2)
    sender = new_sender(flow_window=4096)
    sender.start()
    sender.feed(stream[:50_000])
    assert not sender.window_open
    held = sender.retained
    assert held > 0
    sender.acknowledge(Ack(sender.counts.pages, sender.counts.qemu_bytes))
    assert sender.window_open and sender.retained == 0
    with pytest.raises(DecodeError):
        sender.fallback(Need((0,)))
    with pytest.raises(DecodeError):
        sender.acknowledge(Ack(10**6, 0))


def test_sender_refuses_a_truncated_qemu_stream() -> None:
    stream = synthetic(4, rounds=2)
    sender = new_sender()
    sender.start()
    sender.feed(stream[: len(stream) // 2])
    with pytest.raises(DecodeError):
        sender.finish()


def test_receiver_refuses_another_catalog() -> None:
    _sender, wire = send(synthetic(1, rounds=1), chunk=10_000)
    rebuilder = new_receiver(bytes(32))
    with pytest.raises(DecodeError, match="catalog"):
        rebuilder.feed(wire)
