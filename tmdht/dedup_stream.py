"""The dedup stream: a memory image with template pages replaced by their digests.

This module owns the format. Encoder and decoder are sans-IO: the encoder turns pages into bytes,
the decoder is fed bytes and hands out events.

Header::

    magic "TMDHTDS\\0" | u8 version (1) | u8 flags (0) | catalog id (32)
    | u16 block count | per block: u8 name length, name (UTF-8), be64 length

Records, one per page in image order (position is implicit)::

    0x01 FULL      4096 bytes of page
    0x02 ZERO_RUN  be32 n: the next n pages are all zero (n >= 1)
    0x03 TEMPLATE  32-byte digest of a template page
    0x7f END       be64 pages, be64 full, be64 zero, be64 template, 32-byte memory digest

The *memory digest* is BLAKE3-256 over the page digests of every non-zero page in order, with
each ZERO_RUN record contributing the zero page's digest followed by its be64 length (constant
work per record: a few bytes claiming terabytes of zeros cannot make the receiver hash for
minutes). The decoder recomputes it (hashing FULL pages, taking TEMPLATE
digests as given — whoever resolves them checks each page against its digest) and raises
:class:`DigestMismatchError` at END if it differs: the receiver proves it rebuilt exactly what the
sender saw. Bytes after END are an error.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Final

from blake3 import blake3

from tmdht._feed import FeedBuffer, NeedMore
from tmdht.errors import (
    CatalogMismatchError,
    DecodeError,
    DigestMismatchError,
    LimitExceededError,
    UnknownFormatError,
)
from tmdht.images import RamBlock
from tmdht.pages import DIGEST_SIZE, PAGE_SIZE, ZERO_DIGEST, PageDigest, is_zero_page

__all__ = [
    "STREAM_MAGIC",
    "DedupDecoder",
    "DedupEncoder",
    "EncodeStats",
    "FullPage",
    "MemoryDigest",
    "RecordType",
    "StreamEnd",
    "StreamEvent",
    "StreamStart",
    "TemplatePage",
    "ZeroRun",
]

STREAM_MAGIC: Final = b"TMDHTDS\x00"
STREAM_VERSION: Final = 1
MAX_BLOCKS: Final = 1024
MAX_BLOCK_BYTES: Final = 1 << 44
MAX_PAGES: Final = 1 << 32
_PREFIX = struct.Struct(">8sBB32sH")
_BLOCK_LEN = struct.Struct(">Q")
_BE32 = struct.Struct(">I")
_END = struct.Struct(">QQQQ32s")
_BE64 = struct.Struct(">Q")


class RecordType(IntEnum):
    """Record type bytes."""

    FULL = 0x01
    ZERO_RUN = 0x02
    TEMPLATE = 0x03
    END = 0x7F


@dataclass(frozen=True, slots=True)
class StreamStart:
    """The header: which catalog, which memory layout."""

    catalog_id: bytes
    """Id of the catalog the stream was encoded against."""
    blocks: tuple[RamBlock, ...]
    """Memory layout."""

    @property
    def page_count(self) -> int:
        """Pages in the image."""
        return sum(b.page_count for b in self.blocks)


@dataclass(frozen=True, slots=True)
class FullPage:
    """A page sent in full."""

    index: int
    """Global page index."""
    data: memoryview
    """The page (a view into the fed buffer)."""


@dataclass(frozen=True, slots=True)
class ZeroRun:
    """A run of zero pages."""

    index: int
    """Index of the first zero page."""
    count: int
    """Number of zero pages."""


@dataclass(frozen=True, slots=True)
class TemplatePage:
    """A template page, sent as its digest."""

    index: int
    """Global page index."""
    digest: PageDigest
    """BLAKE3-256 of the page."""


@dataclass(frozen=True, slots=True)
class StreamEnd:
    """The end record; its totals and memory digest were checked."""

    pages: int
    """Pages in the image."""
    full: int
    """Pages sent in full."""
    zero: int
    """Zero pages."""
    template: int
    """Template pages."""
    memory_digest: bytes
    """BLAKE3 over all page digests."""


StreamEvent = StreamStart | FullPage | ZeroRun | TemplatePage | StreamEnd


class MemoryDigest:
    """BLAKE3 over the page digests in order, a run of zero pages as (zero digest, length)."""

    def __init__(self) -> None:
        self._hasher = blake3()

    def page(self, digest: bytes) -> None:
        """Add one page by its digest."""
        self._hasher.update(digest)

    def zeros(self, count: int) -> None:
        """Add one ZERO_RUN record of ``count`` pages (call once per record, as encoded)."""
        self._hasher.update(ZERO_DIGEST + _BE64.pack(count))

    def digest(self) -> bytes:
        """The digest so far."""
        return self._hasher.digest()


def _encode_header(catalog_id: bytes, blocks: Sequence[RamBlock]) -> bytes:
    if len(catalog_id) != DIGEST_SIZE:
        raise ValueError("catalog id is 32 bytes")
    if not 0 < len(blocks) <= MAX_BLOCKS:
        raise LimitExceededError(f"{len(blocks)} memory blocks")
    parts = [_PREFIX.pack(STREAM_MAGIC, STREAM_VERSION, 0, catalog_id, len(blocks))]
    for block in blocks:
        name = block.name.encode()
        if len(name) > 255 or not 0 < block.length <= MAX_BLOCK_BYTES:
            raise LimitExceededError(f"block {block.name!r} of {block.length} bytes")
        parts += [bytes((len(name),)), name, _BLOCK_LEN.pack(block.length)]
    return b"".join(parts)


@dataclass(frozen=True, slots=True)
class EncodeStats:
    """What an encoder produced."""

    pages: int
    """Pages encoded."""
    full: int
    """Pages sent in full."""
    zero: int
    """Zero pages."""
    template: int
    """Pages sent as digests."""
    stream_bytes: int
    """Bytes of stream produced."""


class DedupEncoder:
    """Turns the pages of an image into a dedup stream.

    ``is_template(digest)`` decides which pages travel as digests (a catalog's ``contains``).
    """

    def __init__(
        self,
        catalog_id: bytes,
        blocks: Sequence[RamBlock],
        is_template: Callable[[bytes], bool],
    ) -> None:
        self._header = _encode_header(catalog_id, blocks)
        self._contains = is_template
        self._expected = sum(b.page_count for b in blocks)
        self._memory = MemoryDigest()
        self._zero_run = 0
        self._pages = self._full = self._zero = self._template = 0
        self._bytes = 0
        self._started = False
        self._finished = False

    def _out(self, data: bytes) -> bytes:
        self._bytes += len(data)
        return data

    def start(self) -> bytes:
        """The header bytes; call once, first."""
        if self._started:
            raise ValueError("start() called twice")
        self._started = True
        return self._out(self._header)

    def encode_pages(self, pages: Sequence[memoryview | bytes]) -> bytes:
        """Records for the next pages (a zero run may stay pending until later pages)."""
        if not self._started or self._finished:
            raise ValueError("encode_pages() outside start()..finish()")
        if self._pages + len(pages) > self._expected:
            raise ValueError("more pages than the image layout holds")
        out: list[bytes] = []
        memory = self._memory
        contains = self._contains
        for page in pages:
            if is_zero_page(page):
                self._zero_run += 1
                continue
            if self._zero_run:
                out.append(self._flush_zeros())
            digest = blake3(page).digest()
            memory.page(digest)
            if contains(digest):
                out.append(b"\x03" + digest)
                self._template += 1
            else:
                out.append(b"\x01" + bytes(page))
                self._full += 1
        self._pages += len(pages)
        return self._out(b"".join(out))

    def _flush_zeros(self) -> bytes:
        run, self._zero_run = self._zero_run, 0
        self._zero += run
        records = []
        for done in range(0, run, 0xFFFFFFFF):
            count = min(0xFFFFFFFF, run - done)
            self._memory.zeros(count)  # per record, exactly as the decoder will see them
            records.append(b"\x02" + _BE32.pack(count))
        return b"".join(records)

    def finish(self) -> bytes:
        """Pending zero run and the END record."""
        if self._pages != self._expected:
            raise ValueError(f"{self._pages} pages encoded, the layout has {self._expected}")
        self._finished = True
        tail = self._flush_zeros() if self._zero_run else b""
        end = b"\x7f" + _END.pack(
            self._pages, self._full, self._zero, self._template, self._memory.digest()
        )
        return self._out(tail + end)

    @property
    def stats(self) -> EncodeStats:
        """Counts so far."""
        return EncodeStats(self._pages, self._full, self._zero, self._template, self._bytes)


class DedupDecoder:
    """Incremental decoder; raises only DecodeError (DigestMismatchError: wrong memory digest)."""

    def __init__(self, *, expected_catalog_id: bytes | None = None, verify: bool = True) -> None:
        """``verify=False`` skips hashing FULL pages and the memory digest check (a quick scan)."""
        self._expected_catalog = expected_catalog_id
        self._verify = verify
        self._in = FeedBuffer()
        self._start: StreamStart | None = None
        self._index = 0
        self._total = 0
        self._full = self._zero = self._template = 0
        self._memory = MemoryDigest()
        self._ended = False

    @property
    def start(self) -> StreamStart | None:
        """The header, once decoded."""
        return self._start

    @property
    def ended(self) -> bool:
        """True once END was decoded and checked."""
        return self._ended

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Add bytes."""
        if self._ended and memoryview(data).nbytes:
            raise DecodeError("bytes after the end of the dedup stream")
        self._in.feed(data)

    def close(self) -> None:
        """The input ended; raise DecodeError if the stream did not."""
        if not self._ended:
            where = "in the header" if self._start is None else f"at page {self._index}"
            raise DecodeError(f"dedup stream truncated {where}")

    def events(self) -> Iterator[StreamEvent]:
        """Everything decodable from the bytes fed so far."""
        while not self._ended:
            at = self._in.pos
            try:
                event = self._header() if self._start is None else self._record()
            except NeedMore:
                self._in.pos = at
                return
            yield event
        if self._in.remaining:
            raise DecodeError("bytes after the end of the dedup stream")

    def _take(self, n: int) -> memoryview:
        return self._in.take(n)

    def _header(self) -> StreamStart:
        head = self._take(8)
        if bytes(head) != STREAM_MAGIC:
            raise UnknownFormatError("not a tmdht dedup stream")
        self._in.pos -= 8
        _, version, flags, catalog_id, n_blocks = _PREFIX.unpack(self._take(_PREFIX.size))
        if version != STREAM_VERSION:
            raise DecodeError(f"dedup stream version {version} is not supported (only 1)")
        if flags:
            raise DecodeError(f"unknown dedup stream flags {flags:#x}")
        if not 0 < n_blocks <= MAX_BLOCKS:
            raise LimitExceededError(f"{n_blocks} memory blocks")
        blocks = []
        for _ in range(n_blocks):
            name_len = self._take(1)[0]
            try:
                name = bytes(self._take(name_len)).decode()
            except UnicodeDecodeError:
                raise DecodeError("block name is not UTF-8") from None
            (length,) = _BLOCK_LEN.unpack(self._take(8))
            if not 0 < length <= MAX_BLOCK_BYTES:
                raise LimitExceededError(f"block {name!r} of {length} bytes")
            blocks.append(RamBlock(name, length))
        start = StreamStart(bytes(catalog_id), tuple(blocks))
        if start.page_count > MAX_PAGES:
            raise LimitExceededError(f"{start.page_count} pages")
        if self._expected_catalog is not None and start.catalog_id != self._expected_catalog:
            raise CatalogMismatchError(
                f"stream was encoded against catalog {start.catalog_id.hex()[:16]}, "
                f"not {self._expected_catalog.hex()[:16]}"
            )
        self._start = start
        self._total = start.page_count
        return start

    def _record(self) -> StreamEvent:
        kind = self._take(1)[0]
        index = self._index
        if kind == RecordType.END:
            return self._end()
        if index >= self._total:
            raise DecodeError(f"record {kind:#04x} after the last page (expected END)")
        if kind == RecordType.FULL:
            data = self._take(PAGE_SIZE)
            if self._verify:
                self._memory.page(blake3(data).digest())
            self._full += 1
            self._index += 1
            return FullPage(index, data)
        if kind == RecordType.TEMPLATE:
            digest = PageDigest(bytes(self._take(DIGEST_SIZE)))
            if digest == ZERO_DIGEST:
                raise DecodeError(f"page {index}: the zero page sent as a template")
            self._memory.page(digest)
            self._template += 1
            self._index += 1
            return TemplatePage(index, digest)
        if kind == RecordType.ZERO_RUN:
            (count,) = _BE32.unpack(self._take(4))
            if not 0 < count <= self._total - index:
                raise DecodeError(f"zero run of {count} pages at page {index}")
            self._memory.zeros(count)
            self._zero += count
            self._index += count
            return ZeroRun(index, count)
        raise DecodeError(f"unknown record type {kind:#04x} at page {index}")

    def _end(self) -> StreamEnd:
        pages, full, zero, template, digest = _END.unpack(self._take(_END.size))
        if self._index != self._total:
            raise DecodeError(f"END after {self._index} of {self._total} pages")
        if (pages, full, zero, template) != (self._total, self._full, self._zero, self._template):
            raise DecodeError("END totals do not match the records")
        if self._verify and digest != self._memory.digest():
            raise DigestMismatchError(
                "memory digest mismatch: the rebuilt memory is not the sender's"
            )
        self._ended = True
        return StreamEnd(pages, full, zero, template, digest)
