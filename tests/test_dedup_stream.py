"""The dedup stream codec: round trip, strictness, the memory digest proof."""

from __future__ import annotations

import contextlib
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support.synthetic import mixed_pages, page_pool

from tmdht.catalog import TemplateCatalog
from tmdht.dedup_stream import (
    DedupDecoder,
    DedupEncoder,
    FullPage,
    StreamEnd,
    StreamStart,
    TemplatePage,
    ZeroRun,
)
from tmdht.errors import CatalogMismatchError, DecodeError, DigestMismatchError
from tmdht.images import RamBlock
from tmdht.pages import PAGE_SIZE, ZERO_PAGE, digest_page

POOL = page_pool(30, seed=5)
CATALOG = TemplateCatalog.from_digests([digest_page(p) for p in POOL[:20]])


def encode(pages: list[bytes], blocks: tuple[RamBlock, ...] | None = None, batch: int = 7) -> bytes:
    blocks = blocks or (RamBlock("ram", len(pages) * PAGE_SIZE),)
    enc = DedupEncoder(CATALOG.catalog_id, blocks, CATALOG.contains)
    out = [enc.start()]
    for i in range(0, len(pages), batch):
        out.append(enc.encode_pages(pages[i : i + batch]))
    out.append(enc.finish())
    data = b"".join(out)
    assert enc.stats.stream_bytes == len(data)
    return data


def decode(data: bytes, chunk: int = 1 << 20, **kw: object) -> tuple[list[object], list[bytes]]:
    dec = DedupDecoder(**kw)  # type: ignore[arg-type]
    events: list[object] = []
    for i in range(0, len(data), chunk):
        dec.feed(data[i : i + chunk])
        events += list(dec.events())
    dec.close()
    pages: list[bytes] = []
    lookup = {digest_page(p): p for p in POOL}
    for e in events:
        if isinstance(e, FullPage):
            pages.append(bytes(e.data))
        elif isinstance(e, ZeroRun):
            pages += [ZERO_PAGE] * e.count
        elif isinstance(e, TemplatePage):
            pages.append(lookup[e.digest])
    return events, pages


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 10**6), st.integers(1, 120), st.integers(1, 5000), st.integers(1, 40))
def test_round_trip(seed: int, n: int, chunk: int, batch: int) -> None:
    pages = mixed_pages(n, POOL, seed)
    events, rebuilt = decode(encode(pages, batch=batch), chunk)
    assert rebuilt == pages
    assert isinstance(events[0], StreamStart) and isinstance(events[-1], StreamEnd)
    end = events[-1]
    assert end.template == sum(1 for p in pages if p in POOL[:20])
    assert end.zero == pages.count(ZERO_PAGE)
    assert end.full + end.zero + end.template == n


def test_templates_travel_as_digests() -> None:
    pages = [POOL[0]] * 100  # all templates: 33 bytes each instead of 4097
    data = encode(pages)
    assert len(data) < 100 * 40 + 200


def test_multi_block_layout_and_partial_pages() -> None:
    blocks = (RamBlock("pc.ram", 3 * PAGE_SIZE), RamBlock("rsdp", 100))
    pages = [POOL[0], ZERO_PAGE, POOL[25], ZERO_PAGE]
    events, rebuilt = decode(encode(pages, blocks))
    assert events[0].blocks == blocks
    assert rebuilt == pages


def test_catalog_mismatch_is_refused() -> None:
    data = encode([POOL[0]])
    with pytest.raises(CatalogMismatchError):
        decode(data, expected_catalog_id=bytes(32))


def test_truncation_is_detected_at_close() -> None:
    data = encode(mixed_pages(40, POOL, 1))
    for cut in (0, 5, 60, len(data) // 2, len(data) - 1):
        with pytest.raises(DecodeError, match="truncated"):
            decode(data[:cut])


def test_a_changed_page_fails_the_memory_digest() -> None:
    pages = [POOL[25], POOL[26], POOL[0]]
    data = bytearray(encode(pages))
    start = bytes(data).index(POOL[26][:64])
    data[start + 100] ^= 0x40  # a FULL page altered in transit
    with pytest.raises(DigestMismatchError):
        decode(bytes(data))


def test_bytes_after_end_are_an_error() -> None:
    with pytest.raises(DecodeError, match="after the end"):
        decode(encode([POOL[0]]) + b"\x01")


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**31), st.integers(1, 6))
def test_mutations_raise_only_decode_error(seed: int, flips: int) -> None:
    rng = random.Random(seed)
    data = bytearray(encode(mixed_pages(12, POOL, seed % 7)))
    data = data[: rng.randrange(len(data) + 1)]
    for _ in range(flips):
        if data:
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    with contextlib.suppress(DecodeError):
        decode(bytes(data), chunk=rng.randrange(1, 9000))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_raise_only_decode_error(noise: bytes) -> None:
    for data in (noise, b"TMDHTDS\x00\x01\x00" + bytes(32) + b"\x00\x01\x03ram" + noise):
        dec = DedupDecoder()
        try:
            dec.feed(data)
            list(dec.events())
            dec.close()
        except DecodeError:
            pass
