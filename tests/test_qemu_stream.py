"""The QEMU stream parser: real layout, incremental feeding, strictness on bad bytes."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support.synthetic import page_pool, qemu_stream

from tmdht.errors import DecodeError, UnsupportedStreamError
from tmdht.pages import PAGE_SIZE
from tmdht.qemu_stream import (
    DeviceStateStart,
    Passthrough,
    QemuStreamParser,
    QemuStreamWriter,
    RamBlockInfo,
    RamFlag,
    RamMemSize,
    RamPage,
    RamZero,
    SectionHeader,
    SectionType,
)

POOL = page_pool(8, seed=1)
BLOCKS = [("pc.ram", 16 * PAGE_SIZE), ("/rom@etc/acpi/rsdp", PAGE_SIZE), ("vga.rom", 3 * PAGE_SIZE)]
ROUNDS = [
    [("pc.ram", i, POOL[i % 8] if i % 3 else None) for i in range(16)]
    + [("/rom@etc/acpi/rsdp", 0, POOL[5]), ("vga.rom", 1, POOL[6])],
    [("vga.rom", 2, POOL[7]), ("pc.ram", 4, POOL[0])],  # a re-sent (dirty) page
    [("pc.ram", 4, POOL[1]), ("pc.ram", 5, None)],  # later copies win
]


def parse_all(data: bytes, chunks: list[int] | None = None) -> list[object]:
    parser = QemuStreamParser()
    events: list[object] = []
    pos = 0
    for size in chunks or [len(data)]:
        parser.feed(data[pos : pos + size])
        pos += size
        events += list(parser.events())
    parser.feed(data[pos:])
    events += list(parser.events())
    parser.close()
    return events


def summary(events: list[object]) -> list[object]:
    """Comparable form: page payloads as bytes, passthrough joined."""
    out: list[object] = []
    tail = b""
    for e in events:
        if isinstance(e, RamPage):
            out.append(("page", e.block, e.offset, e.continued, bytes(e.data), e.stream_offset))
        elif isinstance(e, Passthrough):
            tail += bytes(e.data)
        else:
            out.append(e)
    return [*out, ("tail", tail)]


def test_layout_of_a_precopy_stream() -> None:
    data, _ = qemu_stream(BLOCKS, ROUNDS)
    events = parse_all(data)
    kinds = [e.kind for e in events if isinstance(e, SectionHeader)]
    assert kinds == [SectionType.START, SectionType.PART, SectionType.PART, SectionType.END]
    (mem,) = [e for e in events if isinstance(e, RamMemSize)]
    assert [(b.name, b.length) for b in mem.blocks] == BLOCKS
    pages = [e for e in events if isinstance(e, RamPage)]
    zeros = [e for e in events if isinstance(e, RamZero)]
    assert len(pages) + len(zeros) == sum(len(r) for r in ROUNDS)
    for p in pages:  # stream_offset points at the page bytes in the stream
        assert data[p.stream_offset : p.stream_offset + PAGE_SIZE] == bytes(p.data)
    start = next(e for e in events if isinstance(e, DeviceStateStart))
    tail = b"".join(bytes(e.data) for e in events if isinstance(e, Passthrough))
    assert data[start.stream_offset :] == tail  # device state handed out verbatim


def test_continue_carries_across_sections() -> None:
    # Round 2 starts with a CONTINUE record whose block (pc.ram) was named in round 1.
    data, _ = qemu_stream(
        [("pc.ram", 4 * PAGE_SIZE)], [[("pc.ram", 0, POOL[0])], [("pc.ram", 1, POOL[1])]]
    )
    pages = [e for e in parse_all(data) if isinstance(e, RamPage)]
    assert [p.continued for p in pages] == [False, True]
    assert [p.block for p in pages] == ["pc.ram", "pc.ram"]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 9000), min_size=1, max_size=30))
def test_any_chunking_gives_the_same_events(chunks: list[int]) -> None:
    data, _ = qemu_stream(BLOCKS, ROUNDS)
    assert summary(parse_all(data, chunks)) == summary(parse_all(data))


def test_truncated_inside_ram_is_an_error() -> None:
    data, _ = qemu_stream(BLOCKS, ROUNDS)
    start = next(e for e in parse_all(data) if isinstance(e, DeviceStateStart)).stream_offset
    for cut in (3, 20, 100, start // 2, start - 1):
        parser = QemuStreamParser()
        parser.feed(data[:cut])
        list(parser.events())
        with pytest.raises(DecodeError, match="truncated"):
            parser.close()


def test_unsupported_features_are_named() -> None:
    w = QemuStreamWriter()
    head = w.header() + w.section_start(1, "ram", 0, 4)
    head += w.mem_size([RamBlockInfo("pc.ram", PAGE_SIZE)])
    for flag in (RamFlag.XBZRLE, RamFlag.COMPRESS_PAGE, RamFlag.HOOK, RamFlag.MULTIFD_FLUSH):
        parser = QemuStreamParser()
        parser.feed(head + int(flag).to_bytes(8, "big"))
        with pytest.raises(UnsupportedStreamError):
            list(parser.events())
    parser = QemuStreamParser()
    parser.feed(w.header() + w.section_start(1, "block", 0, 1))
    with pytest.raises(UnsupportedStreamError, match="block"):
        list(parser.events())


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda w: w.page("nosuch", 0, POOL[0]), "unknown RAM block"),
        (
            lambda w: (PAGE_SIZE * 9 | RamFlag.PAGE | RamFlag.CONTINUE).to_bytes(8, "big"),
            "CONTINUE",
        ),
        (lambda w: w.page("pc.ram", PAGE_SIZE * 64, POOL[0]), "beyond block"),
        (lambda w: (RamFlag.PAGE | RamFlag.ZERO).to_bytes(8, "big"), "flags"),
    ],
)
def test_bad_records_are_rejected(mutate: object, message: str) -> None:
    w = QemuStreamWriter()
    data = (
        w.header()
        + w.section_start(1, "ram", 0, 4)
        + w.mem_size([RamBlockInfo("pc.ram", 4 * PAGE_SIZE)])
    )
    data += mutate(QemuStreamWriter())  # type: ignore[operator]
    parser = QemuStreamParser()
    parser.feed(data + bytes(PAGE_SIZE))
    with pytest.raises(DecodeError, match=message):
        list(parser.events())


def _decode_only_decode_error(data: bytes) -> None:
    parser = QemuStreamParser()
    try:
        parser.feed(data)
        for _ in parser.events():
            pass
        parser.close()
    except DecodeError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_raise_only_decode_error(noise: bytes) -> None:
    _decode_only_decode_error(b"QEVM\x00\x00\x00\x03" + noise)
    _decode_only_decode_error(noise)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**31), st.integers(1, 8))
def test_bit_flips_and_truncations_raise_only_decode_error(seed: int, flips: int) -> None:
    data, _ = qemu_stream(BLOCKS, ROUNDS)
    rng = random.Random(seed)
    mutated = bytearray(data[: rng.randrange(len(data) + 1)])
    for _ in range(flips):
        if mutated:
            mutated[rng.randrange(len(mutated))] ^= 1 << rng.randrange(8)
    _decode_only_decode_error(bytes(mutated))
