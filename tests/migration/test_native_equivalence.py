"""The native pipeline is the reference, byte for byte and error for error.

Both implementations are driven in lockstep through the same calls — on valid streams cut into
random chunks, and on random, truncated, bit-flipped and spliced input — and every call must
give the same result: the same bytes, the same counts, or the same exception class with the same
message. After the first error the objects are not used again (their state is then unspecified).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.cores import NATIVE, REFERENCE, native_available
from support.synthetic import page_pool, qemu_stream

from tmdht.catalog import TemplateCatalog
from tmdht.errors import DecodeError
from tmdht.migration_stream import (
    Ack,
    BackRef,
    CompressedPage,
    ForwardDecoder,
    FullPage,
    Need,
    ReverseDecoder,
    Template,
)
from tmdht.pages import PAGE_SIZE, digest_page

pytestmark = pytest.mark.skipif(
    not native_available(), reason="tmdht._native is not built (no Rust toolchain)"
)

POOL = page_pool(24, seed=31)
CATALOG = TemplateCatalog.from_digests([digest_page(p) for p in POOL[:12]])
PAGES = {digest_page(p): p for p in POOL}
BLOCK_NAMES = ["pc.ram", "vga.vram", "pc.bios", "a'b", "\x01x"]
EXAMPLES = settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def outcome(call: Callable[[], Any]) -> tuple[str, Any]:
    """("ok", result) or ("error", class name, message)."""
    try:
        return ("ok", call())
    except Exception as exc:  # noqa: BLE001 - comparing whatever each side raises
        return ("error", type(exc).__name__, str(exc))


class Lockstep:
    """Calls the same method on both objects and insists on the same outcome."""

    def __init__(self, reference: Any, native: Any) -> None:
        self.pair = (reference, native)
        self.failed = False

    def __call__(self, method: str, *args: Any) -> Any:
        assert not self.failed
        ref, nat = (outcome(lambda o=o: _normalize(getattr(o, method)(*args))) for o in self.pair)
        assert ref == nat, f"{method}{_short(args)}: reference {ref!r:.300} != native {nat!r:.300}"
        if ref[0] == "error":
            self.failed = True
            return None
        return ref[1]

    def same(self, attribute: str) -> Any:
        values = [getattr(o, attribute) for o in self.pair]
        assert values[0] == values[1], f"{attribute}: {values[0]!r} != {values[1]!r}"
        return values[0]


def _normalize(value: Any) -> Any:
    if isinstance(value, list) and all(isinstance(v, bytes) for v in value):
        return b"".join(value)  # output(): the same bytes, however they are split
    return value


def _short(args: tuple[Any, ...]) -> str:
    return (
        "("
        + ", ".join(f"<{len(a)} bytes>" if isinstance(a, bytes) else repr(a)[:40] for a in args)
        + ")"
    )


# -- inputs --------------------------------------------------------------------------------------


def make_stream(seed: int) -> bytes:
    """A valid precopy stream: 1-3 random blocks (some with odd names), 1-3 rounds of PAGE
    (pool, repeated, random) and ZERO records. Tests take the seed, not the bytes, so that
    hypothesis reports stay short."""
    rng = random.Random(seed)
    names = rng.sample(BLOCK_NAMES, rng.randint(1, 3))
    blocks = [(name, rng.randint(1, 40) * PAGE_SIZE) for name in names]
    rounds = []
    for _ in range(rng.randint(1, 3)):
        records = []
        for _ in range(rng.randint(0, 40)):
            name, length = rng.choice(blocks)
            x = rng.random()
            data = (
                None
                if x < 0.2
                else (POOL[rng.randrange(len(POOL))] if x < 0.8 else rng.randbytes(PAGE_SIZE))
            )
            records.append((name, rng.randrange(length // PAGE_SIZE), data))
        rounds.append(records)
    stream, _memory = qemu_stream(blocks, rounds)
    return stream


streams = st.integers(0, 2**32)


def mutate(rng: random.Random, data: bytes) -> bytes:
    """1-4 of: bit flip, random byte, truncation, insertion, deletion, an interesting integer."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        n = len(out)
        op = rng.randrange(6)
        if op == 0 and n:
            out[rng.randrange(n)] ^= 1 << rng.randrange(8)
        elif op == 1 and n:
            out[rng.randrange(n)] = rng.randrange(256)
        elif op == 2 and n:
            del out[rng.randrange(n) :]
        elif op == 3:
            at = rng.randrange(n + 1)
            out[at:at] = rng.randbytes(rng.choice((1, 4, 9, 64)))
        elif op == 4 and n:
            at = rng.randrange(n)
            del out[at : at + rng.choice((1, 8, 100, 4096))]
        elif op == 5 and n > 8:
            at = rng.randrange(n - 8)
            width = rng.choice((1, 2, 4, 8))
            value = rng.choice((0, 1, 0x7F, 0xFF, 0x1000, 0xFFFF, 1 << 31, (1 << 64) - 1))
            out[at : at + width] = (value & ((1 << (8 * width)) - 1)).to_bytes(width, "big")
    return bytes(out)


def chunks(rng: random.Random, data: bytes) -> list[bytes]:
    out, at = [], 0
    while at < len(data):
        size = rng.choice((1, 7, 100, 999, 4096, 5000, 70_000, 300_000))
        out.append(data[at : at + size])
        at += size
    return out


# -- the sender ----------------------------------------------------------------------------------


def senders(**options: Any) -> Lockstep:
    return Lockstep(REFERENCE.sender(CATALOG, **options), NATIVE.sender(CATALOG, **options))


def drive_sender(both: Lockstep, stream: bytes, rng: random.Random, *, bad_answers: bool) -> bytes:
    """Feed ``stream`` in random pieces, answering with ACKs now and then (valid ones, or with
    ``bad_answers`` also ones beyond what was sent); returns the wire bytes."""
    wire = [both("start")]
    for piece in chunks(rng, stream):
        out = both("feed", piece)
        if both.failed:
            return b"".join(wire)
        wire.append(out)
        counts = both.same("counts")
        both.same("ram_bytes")
        if rng.random() < 0.3:
            index = rng.randrange(counts.pages + (2 if bad_answers else 1))
            qemu_bytes = rng.randrange(counts.qemu_bytes + (2 if bad_answers else 1))
            both("acknowledge", Ack(index, qemu_bytes))
            if both.failed:
                return b"".join(wire)
            for attribute in ("retained", "window_open", "unacknowledged"):
                both.same(attribute)
    end = both("finish")
    return b"".join(wire) + (end or b"")


def template_indices(wire: bytes) -> list[int]:
    decoder = ForwardDecoder()
    decoder.feed(wire)
    indices, body = [], 0
    for record in decoder.records():
        if isinstance(record, FullPage | CompressedPage | Template | BackRef):
            if isinstance(record, Template):
                indices.append(body)
            body += 1
    return indices


@EXAMPLES
@given(streams, st.integers(0, 2**32), st.booleans(), st.sampled_from([1, 3, 16, 32768]))
def test_sender_writes_the_same_records(
    stream_seed: int, seed: int, compress: bool, window: int
) -> None:
    stream = make_stream(stream_seed)
    rng = random.Random(seed)
    both = senders(compress=compress, backref_window=window, flow_window=1 << 30)
    wire = drive_sender(both, stream, rng, bad_answers=False)
    assert not both.failed
    kept = template_indices(wire)
    assert both.same("retained") <= len(kept)
    for start in range(0, len(kept), 5):  # NEED what is still kept, as a receiver would
        both(
            "fallback",
            Need(
                tuple(i for i in kept[start : start + 5] if rng.random() < 0.9 or i == kept[start])
            ),
        )
        if both.failed:  # an index acknowledged meanwhile: the same error on both sides
            return


@EXAMPLES
@given(streams, st.integers(0, 2**32), st.booleans())
def test_sender_fails_the_same_way_on_damaged_streams(
    stream_seed: int, seed: int, compress: bool
) -> None:
    stream = make_stream(stream_seed)
    rng = random.Random(seed)
    both = senders(compress=compress, backref_window=8)
    drive_sender(both, mutate(rng, stream), rng, bad_answers=True)
    if not both.failed:
        both("fallback", Need((rng.randrange(100),)))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=3000), st.integers(1, 3000), st.booleans())
def test_sender_fails_the_same_way_on_random_bytes(data: bytes, chunk: int, header: bool) -> None:
    both = senders()
    data = (b"QEVM\x00\x00\x00\x03" if header else b"") + data
    for i in range(0, len(data), chunk):
        both("feed", data[i : i + chunk])
        if both.failed:
            return
    both("finish")


def test_sender_spells_unsupported_ram_flags_like_the_reference() -> None:
    stream = qemu_stream([("pc.ram", 4 * PAGE_SIZE)], [[("pc.ram", 0, POOL[0])]])[0]
    at = stream.index(POOL[0]) - 8 - 1 - len("pc.ram")  # the PAGE record's header
    flags = int.from_bytes(stream[at : at + 8], "big") | 0x40 | 0x400
    both = senders()
    both("feed", stream[:at] + flags.to_bytes(8, "big") + stream[at + 8 :])
    assert both.failed


# -- the receiver --------------------------------------------------------------------------------


def receivers(expected: bytes | None = CATALOG.catalog_id) -> Lockstep:
    return Lockstep(REFERENCE.receiver(expected), NATIVE.receiver(expected))


def drive_receiver(
    both: Lockstep, wire: bytes, rng: random.Random, sender: Any = None, lose: float = 0.0
) -> bytes:
    """Feed ``wire`` in random pieces, resolving or losing template pages at random moments
    (lost ones come from ``sender`` as FALLBACK records), and collect the output."""
    out = []
    pending: list[tuple[int, bytes]] = []
    needs: list[bytes] = []
    pieces = chunks(rng, wire)
    for step in range(len(pieces) + 400):
        if step < len(pieces):
            both("feed", pieces[step])
            if both.failed:
                return b"".join(out)
        elif (
            not pending
            and not any(needs)
            and not both.same("waiting")
            and not both.same("queued_bytes")
        ):
            break
        batch = both("wanted", rng.choice((1, 5, 1000)))
        pending += batch
        rng.shuffle(pending)
        keep = rng.randrange(len(pending) + 1)
        for index, digest in pending[keep:]:
            page = PAGES.get(digest)  # a damaged digest names no page: the cluster lacks it
            if page is None or rng.random() < lose:
                both("unavailable", [index])
            else:
                both("supply", index, page)
        pending = pending[:keep]
        needs.append(both("requests"))
        if step >= len(pieces):  # FALLBACKs come between records: after the stream here
            for need in needs:
                if need and sender is not None:
                    decoder = ReverseDecoder()
                    decoder.feed(need)
                    for record in decoder.records():
                        try:
                            answer = sender.fallback(record)
                        except DecodeError:  # damaged input named no template of the sender's
                            continue
                        both("feed", answer)
                        if both.failed:
                            return b"".join(out)
            needs = []
        data = both("output")
        if both.failed:
            return b"".join(out)
        out.append(data)
        both("ack", rng.choice((1, 4096, 1 << 20)))
        for attribute in ("stats", "queued_bytes", "end_seen", "waiting", "verified", "hello"):
            both.same(attribute)
    return b"".join(out)


def valid_wire(stream: bytes, seed: int, compress: bool, window: int) -> tuple[bytes, Any]:
    sender = REFERENCE.sender(
        CATALOG, compress=compress, backref_window=window, flow_window=1 << 30
    )
    rng = random.Random(seed)
    wire = [sender.start(), *(sender.feed(p) for p in chunks(rng, stream)), sender.finish()]
    return b"".join(wire), sender


@EXAMPLES
@given(
    streams,
    st.integers(0, 2**32),
    st.booleans(),
    st.sampled_from([1, 4, 32768]),
    st.sampled_from([0.0, 0.3, 1.0]),
)
def test_receiver_rebuilds_the_same_stream(
    stream_seed: int, seed: int, compress: bool, window: int, lose: float
) -> None:
    stream = make_stream(stream_seed)
    wire, sender = valid_wire(stream, seed, compress, window)
    both = receivers()
    out = drive_receiver(both, wire, random.Random(seed + 1), sender, lose)
    assert not both.failed
    assert out == stream
    assert both.same("verified")


@EXAMPLES
@given(streams, st.integers(0, 2**32), st.booleans())
def test_receiver_fails_the_same_way_on_damaged_streams(
    stream_seed: int, seed: int, compress: bool
) -> None:
    stream = make_stream(stream_seed)
    wire, sender = valid_wire(stream, seed, compress, 4)
    rng = random.Random(seed)
    both = receivers(rng.choice((CATALOG.catalog_id, None)))
    drive_receiver(both, mutate(rng, wire), rng, sender, 0.3)
    if not both.failed:
        both("close")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=3000), st.integers(0, 2**32), st.booleans())
def test_receiver_fails_the_same_way_on_random_bytes(data: bytes, seed: int, hello: bool) -> None:
    wire, _ = valid_wire(qemu_stream([("pc.ram", PAGE_SIZE)], [[]])[0], 0, False, 4)
    both = receivers(None)
    drive_receiver(both, (wire[:54] if hello else b"") + data, random.Random(seed))
    if not both.failed:
        both("close")


def test_receiver_flow_window_overrun_fails_the_same_way() -> None:
    rng = random.Random(5)
    stream = qemu_stream(
        [("pc.ram", 320 * PAGE_SIZE)],
        [[("pc.ram", i, rng.randbytes(PAGE_SIZE)) for i in range(320)]],
    )[0]
    sender = REFERENCE.sender(CATALOG, flow_window=4096)
    wire = sender.start() + sender.feed(stream) + sender.finish()
    both = receivers()
    both("feed", wire)
    assert both.failed  # "sender ran N bytes ahead (flow window 4096)", identically


def test_compressed_page_declaring_a_huge_size_is_a_decode_error() -> None:
    """A zstd frame header claiming 1 TiB: the reference used to try to allocate it."""
    sender = REFERENCE.sender(CATALOG, compress=True, backref_window=4)
    stream = qemu_stream([("pc.ram", PAGE_SIZE)], [[("pc.ram", 0, bytes(4095) + b"\x01")]])[0]
    wire = bytearray(sender.start() + sender.feed(stream) + sender.finish())
    at = wire.index(b"\x28\xb5\x2f\xfd")  # the ZPAGE's frame, after its be16 length
    end = at + int.from_bytes(wire[at - 2 : at], "big")
    huge = b"\x28\xb5\x2f\xfd\xe0" + (1 << 40).to_bytes(8, "little") + bytes(8)
    wire[at - 2 : end] = len(huge).to_bytes(2, "big") + huge
    both = receivers()
    both("feed", bytes(wire))
    assert both.failed
    failure = outcome(lambda: REFERENCE.receiver().feed(bytes(wire)))
    assert failure == ("error", "DecodeError", f"compressed page declares {1 << 40} bytes")


def run_pipeline(
    cores: Any, stream: bytes, rng: random.Random, *, window: int, flow: int, lose: float
) -> tuple[bytes, Any]:
    """Sender and receiver of one implementation joined as the proxies join them: QEMU bytes
    only while the flow window is open, ACKs back, lost templates fetched with NEED/FALLBACK
    (delivered between the sender's records), resolves answered late and out of order."""
    sender = cores.sender(CATALOG, backref_window=window, flow_window=flow)
    receiver = cores.receiver(CATALOG.catalog_id)
    receiver.feed(sender.start())
    out: list[bytes] = []
    at = 0
    pending: list[tuple[int, bytes]] = []
    for _ in range(200_000):
        if at < len(stream) and sender.window_open:
            size = rng.choice((1000, 4096, 65536, 262144))
            receiver.feed(sender.feed(stream[at : at + size]))
            at += size
            if at >= len(stream):
                receiver.feed(sender.finish())
        pending += receiver.wanted(rng.choice((8, 64, 512)))
        rng.shuffle(pending)
        keep = rng.randrange(len(pending) + 1) if at < len(stream) else 0
        for index, digest in pending[keep:]:
            if rng.random() < lose:
                receiver.unavailable([index])
            else:
                receiver.supply(index, PAGES[digest])
        pending = pending[:keep]
        decoder = ReverseDecoder()
        decoder.feed(receiver.requests())
        for record in decoder.records():
            receiver.feed(sender.fallback(record))
        out += receiver.output()
        ack = receiver.ack(rng.choice((4096, 1 << 20)))
        if ack:
            decoder = ReverseDecoder()
            decoder.feed(ack)
            for record in decoder.records():
                sender.acknowledge(record)
        if receiver.verified:
            return b"".join(out), receiver
    raise AssertionError("the pipeline did not finish")


@pytest.mark.parametrize("cores", [REFERENCE, NATIVE], ids=["reference", "native"])
@pytest.mark.parametrize(
    ("window", "flow", "lose"), [(64, 1 << 20, 0.3), (4, 300_000, 0.0), (1000, 4 << 20, 0.7)]
)
def test_flow_controlled_pipeline_is_exact_past_many_windows(
    cores: Any, window: int, flow: int, lose: float
) -> None:
    """Thousands of pages through a small window and flow window: the native receiver's slab
    (window + flow lag slots) wraps around many times; every byte must come out right."""
    rng = random.Random(window)
    blocks = [("pc.ram", 1024 * PAGE_SIZE), ("vga.vram", 64 * PAGE_SIZE)]
    rounds = []
    for _ in range(4):  # dirty pages re-sent in later rounds, as a running guest's are
        records = []
        for _ in range(1500):
            name, length = rng.choice(blocks)
            x = rng.random()
            data = (
                None
                if x < 0.15
                else (POOL[rng.randrange(len(POOL))] if x < 0.7 else rng.randbytes(PAGE_SIZE))
            )
            records.append((name, rng.randrange(length // PAGE_SIZE), data))
        rounds.append(records)
    stream = qemu_stream(blocks, rounds)[0]
    out, receiver = run_pipeline(cores, stream, rng, window=window, flow=flow, lose=lose)
    assert out == stream
    assert receiver.stats.pages > 5000
