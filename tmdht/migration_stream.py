"""The live-migration wire format between the sender and the receiver proxy, and the two
sans-IO cores that rewrite a QEMU migration stream into it and back.

This module owns the format. Nothing here touches a socket, a pipe or a clock: the proxies in
:mod:`tmdht.client.migration` feed bytes in and write what comes out.

Forward stream (sender → receiver), after a hello::

    hello      magic "TMDHTMIG" | u8 version (1) | u8 flags | catalog id (32)
               | be32 back-reference window (pages) | be64 flow window (QEMU bytes)

    0x01 RAW        be32 n, n bytes of the QEMU stream, verbatim (1 <= n <= MAX_RAW)
    0x02 PAGE       page prefix, 4096 bytes
    0x03 ZPAGE      page prefix, be16 n, n bytes: the page, zstd-compressed (n < 4096)
    0x04 TEMPLATE   page prefix, 32-byte digest: a template page, resolved through the cluster
    0x05 BACKREF    page prefix, be32 body index: the page of an earlier body record
    0x06 DEVICE     be32 n, n bytes of device state, verbatim (held until END is verified)
    0x07 FALLBACK   be32 body index, u8 encoding (0 raw, 1 zstd), be16 n, n bytes: the page
                    of a TEMPLATE record the receiver could not resolve (answers NEED)
    0x7f END        be64 QEMU bytes, be64 page records, be64 zero records, be64 template,
                    be64 back-references, be64 full, be64 compressed, 32-byte stream digest

Reverse stream (receiver → sender), no hello::

    0x11 NEED       be16 n (1 <= n <= MAX_NEED), n * be32 body index
    0x12 ACK        be32 body index, be64 QEMU bytes: every body record below the index is
                    rebuilt and this many QEMU bytes are written (or held)
    0x13 DONE       u8 status (0 verified, 1 failed), be16 n, n bytes UTF-8 message

The *page prefix* is QEMU's own RAM record header, as QEMU wrote it: be64 ``offset | flags``
with the PAGE flag, followed (unless CONTINUE is set) by u8 length and the block idstr. Every
PAGE, ZPAGE, TEMPLATE and BACKREF record takes the next *body index* (0, 1, …), which
back-references, FALLBACK, NEED and ACK name. The receiver keeps the last ``backref window``
bodies; the sender never names an older one.

Flow control: the sender keeps every TEMPLATE page until an ACK covers it (so it can answer
NEED without the cluster) and stops reading QEMU while more than ``flow window`` QEMU bytes are
unacknowledged, so the receiver's memory stays bounded however long a page takes to resolve.

The *stream digest* (BLAKE3-256) runs over the QEMU stream as the sender read it, with each
page's 4096 bytes replaced by the page's digest. The receiver computes it over what it rebuilt
(hashing pages that came in full, taking digests of pages resolved by digest — the client checked
them) and releases the device state, without which QEMU cannot resume, only when they agree.
"""

from __future__ import annotations

import contextlib
import mmap
import struct
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Final

import zstandard
from blake3 import blake3

from tmdht.errors import DecodeError, DigestMismatchError, LimitExceededError
from tmdht.pages import DIGEST_SIZE, PAGE_SIZE, ByteView, digest_page
from tmdht.qemu_stream import (
    DeviceStateStart,
    QemuStreamParser,
    RamFlag,
    RamMemSize,
    RamPage,
    RamZero,
)

__all__ = [
    "MAX_BACKREF_WINDOW",
    "MAX_FLOW_WINDOW",
    "MAX_NEED",
    "MAX_RAW",
    "MIGRATION_MAGIC",
    "Ack",
    "BackRef",
    "CompressedPage",
    "DeviceState",
    "Done",
    "End",
    "Fallback",
    "ForwardDecoder",
    "ForwardRecord",
    "FullPage",
    "Hello",
    "MigrationCounts",
    "Need",
    "RawBytes",
    "ReceiverRebuilder",
    "RecordType",
    "ReverseDecoder",
    "ReverseRecord",
    "SenderRewriter",
    "StreamDigest",
    "Template",
    "encode",
]

MIGRATION_MAGIC: Final = b"TMDHTMIG"
MIGRATION_VERSION: Final = 1
MAX_RAW: Final = 1 << 20
"""Largest RAW or DEVICE record payload."""
MAX_NEED: Final = 4096
"""Most body indices in one NEED record."""
MAX_BACKREF_WINDOW: Final = 1 << 18
"""Largest back-reference window a receiver accepts (1 GiB of pages)."""
MAX_FLOW_WINDOW: Final = 1 << 30
"""Largest flow window a receiver accepts (QEMU bytes in flight)."""
MAX_HELD: Final = 256 << 20
"""Most device-state bytes a receiver holds until END."""
MAX_MESSAGE: Final = 4096
MAX_INDEX: Final = (1 << 32) - 1
FLAG_COMPRESS: Final = 0x01
"""Hello flag: residual pages may come zstd-compressed."""

_HELLO = struct.Struct(">8sBB32sIQ")
_BE16 = struct.Struct(">H")
_BE32 = struct.Struct(">I")
_BE64 = struct.Struct(">Q")
_END = struct.Struct(">QQQQQQQ32s")
_ACK = struct.Struct(">IQ")
_FALLBACK = struct.Struct(">IBH")
_PAGE_FLAG_MASK: Final = PAGE_SIZE - 1
_PAGE: Final = int(RamFlag.PAGE)  # plain ints: IntFlag arithmetic costs microseconds per page
_CONTINUE: Final = int(RamFlag.CONTINUE)


class RecordType(IntEnum):
    """Record type bytes, both directions."""

    RAW = 0x01
    PAGE = 0x02
    ZPAGE = 0x03
    TEMPLATE = 0x04
    BACKREF = 0x05
    DEVICE = 0x06
    FALLBACK = 0x07
    END = 0x7F
    NEED = 0x11
    ACK = 0x12
    DONE = 0x13


# -- records -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hello:
    """The first bytes of the forward stream."""

    catalog_id: bytes
    """Id of the catalog the sender replaced pages against (32 bytes)."""
    backref_window: int
    """Bodies the receiver must keep for back-references (1 … MAX_BACKREF_WINDOW)."""
    flow_window: int
    """QEMU bytes the sender sends ahead of the receiver's ACKs (1 … MAX_FLOW_WINDOW)."""
    flags: int = 0
    """FLAG_COMPRESS if residual pages may be compressed."""


@dataclass(frozen=True, slots=True)
class RawBytes:
    """QEMU stream bytes passed on verbatim (everything but page bodies, before device state)."""

    data: bytes
    """1 … MAX_RAW bytes."""


@dataclass(frozen=True, slots=True)
class DeviceState:
    """Device-state bytes (after RAM), passed on verbatim once the stream is verified."""

    data: bytes
    """1 … MAX_RAW bytes."""


@dataclass(frozen=True, slots=True)
class FullPage:
    """A PAGE record sent as it is."""

    prefix: bytes
    """QEMU's record header (be64 offset|flags, optional idstr)."""
    data: bytes
    """The 4096 bytes."""


@dataclass(frozen=True, slots=True)
class CompressedPage:
    """A PAGE record whose body is zstd-compressed."""

    prefix: bytes
    """QEMU's record header."""
    payload: bytes
    """One zstd frame of the page, shorter than a page."""


@dataclass(frozen=True, slots=True)
class Template:
    """A PAGE record whose body is a template, named by its digest."""

    prefix: bytes
    """QEMU's record header."""
    digest: bytes
    """BLAKE3-256 of the page."""


@dataclass(frozen=True, slots=True)
class BackRef:
    """A PAGE record whose body is that of an earlier body record."""

    prefix: bytes
    """QEMU's record header."""
    index: int
    """Body index of the earlier record."""


@dataclass(frozen=True, slots=True)
class Fallback:
    """The page of a TEMPLATE record, from the sender (answers NEED)."""

    index: int
    """Body index of the TEMPLATE record."""
    compressed: bool
    """The payload is a zstd frame."""
    payload: bytes
    """The page (or its zstd frame)."""


@dataclass(frozen=True, slots=True)
class MigrationCounts:
    """Totals of one migration, as the sender counted them."""

    qemu_bytes: int = 0
    """Bytes of QEMU stream."""
    pages: int = 0
    """PAGE records (guest pages sent by QEMU, re-sent pages included)."""
    zero_pages: int = 0
    """ZERO records."""
    template_pages: int = 0
    """Pages replaced by their digest."""
    backref_pages: int = 0
    """Pages replaced by a back-reference."""
    full_pages: int = 0
    """Pages sent whole."""
    compressed_pages: int = 0
    """Pages sent zstd-compressed."""


@dataclass(frozen=True, slots=True)
class End:
    """The last forward record but for late FALLBACKs."""

    counts: MigrationCounts
    """The sender's totals."""
    digest: bytes
    """The stream digest (32 bytes)."""


@dataclass(frozen=True, slots=True)
class Need:
    """The receiver asks the sender for the pages of these TEMPLATE records."""

    indices: tuple[int, ...]
    """Body indices (1 … MAX_NEED of them)."""


@dataclass(frozen=True, slots=True)
class Ack:
    """The receiver's progress."""

    index: int
    """Every body record below this index is rebuilt."""
    qemu_bytes: int
    """QEMU bytes written to QEMU or held."""


@dataclass(frozen=True, slots=True)
class Done:
    """The receiver's verdict after END."""

    ok: bool
    """The stream digest matched and QEMU got the whole stream."""
    message: str = ""
    """Why not, for logs."""


ForwardRecord = (
    RawBytes | DeviceState | FullPage | CompressedPage | Template | BackRef | Fallback | End
)
ReverseRecord = Need | Ack | Done


def _check_prefix(prefix: bytes) -> None:
    """A page prefix must be a PAGE record header; raises DecodeError (or ValueError to encode)."""
    if len(prefix) < 8:
        raise DecodeError("page prefix shorter than 8 bytes")
    flags = int.from_bytes(prefix[:8], "big") & _PAGE_FLAG_MASK
    if flags & ~(_PAGE | _CONTINUE) or not flags & _PAGE:
        raise DecodeError(f"page prefix with flags {flags:#x}")
    if flags & _CONTINUE:
        expected = 8
    elif len(prefix) > 8 and prefix[8] > 0:
        expected = 9 + prefix[8]
    else:
        raise DecodeError("page prefix without CONTINUE names no block")
    if len(prefix) != expected:
        raise DecodeError("page prefix length does not match its idstr")


def _prefix_length(buf: bytes | bytearray, at: int) -> int | None:
    """Length of the page prefix starting at ``at``, or None if the buffer ends inside it."""
    if at + 8 > len(buf):
        return None
    if buf[at + 7] & _CONTINUE:
        return 8
    if at + 9 > len(buf):
        return None
    return 9 + buf[at + 8]


def encode(record: Hello | ForwardRecord | ReverseRecord) -> bytes:
    """The bytes of one record. Raises ValueError for a record that breaks the format's limits."""
    try:
        return _encode(record)
    except (struct.error, DecodeError) as exc:
        raise ValueError(f"cannot encode {type(record).__name__}: {exc}") from None


def _encode(record: Hello | ForwardRecord | ReverseRecord) -> bytes:
    match record:
        case Hello(catalog_id, backref, flow, flags):
            if len(catalog_id) != DIGEST_SIZE or not 0 < backref <= MAX_BACKREF_WINDOW \
                    or not 0 < flow <= MAX_FLOW_WINDOW:
                raise DecodeError("hello out of range")
            return _HELLO.pack(MIGRATION_MAGIC, MIGRATION_VERSION, flags, catalog_id, backref,
                               flow)
        case RawBytes(data) | DeviceState(data):
            if not 0 < len(data) <= MAX_RAW:
                raise DecodeError(f"{len(data)} verbatim bytes")
            kind = RecordType.RAW if isinstance(record, RawBytes) else RecordType.DEVICE
            return bytes((kind,)) + _BE32.pack(len(data)) + data
        case FullPage(prefix, data):
            _check_prefix(prefix)
            if len(data) != PAGE_SIZE:
                raise DecodeError("a page is 4096 bytes")
            return b"\x02" + prefix + data
        case CompressedPage(prefix, payload):
            _check_prefix(prefix)
            if not 0 < len(payload) < PAGE_SIZE:
                raise DecodeError("a compressed page is 1 … 4095 bytes")
            return b"\x03" + prefix + _BE16.pack(len(payload)) + payload
        case Template(prefix, digest):
            _check_prefix(prefix)
            if len(digest) != DIGEST_SIZE:
                raise DecodeError("a digest is 32 bytes")
            return b"\x04" + prefix + digest
        case BackRef(prefix, index):
            _check_prefix(prefix)
            return b"\x05" + prefix + _BE32.pack(index)
        case Fallback(index, compressed, payload):
            if not 0 < len(payload) <= PAGE_SIZE or (not compressed and len(payload) != PAGE_SIZE):
                raise DecodeError("fallback payload size")
            return b"\x07" + _FALLBACK.pack(index, int(compressed), len(payload)) + payload
        case End(counts, digest):
            if len(digest) != DIGEST_SIZE:
                raise DecodeError("a digest is 32 bytes")
            c = counts
            return b"\x7f" + _END.pack(c.qemu_bytes, c.pages, c.zero_pages, c.template_pages,
                                       c.backref_pages, c.full_pages, c.compressed_pages, digest)
        case Need(indices):
            if not 0 < len(indices) <= MAX_NEED:
                raise DecodeError(f"NEED of {len(indices)} pages")
            return b"\x11" + _BE16.pack(len(indices)) + struct.pack(f">{len(indices)}I", *indices)
        case Ack(index, qemu_bytes):
            return b"\x12" + _ACK.pack(index, qemu_bytes)
        case Done(ok, message):
            text = message.encode("utf-8")
            if len(text) > MAX_MESSAGE:
                raise DecodeError("DONE message too long")
            return b"\x13" + bytes((0 if ok else 1,)) + _BE16.pack(len(text)) + text
    raise ValueError(f"not a record: {record!r}")


# -- decoding ----------------------------------------------------------------------------------


class _NeedMore(Exception):
    """Internal: the buffer ends inside a record."""


class _Decoder:
    """Shared buffering: feed bytes, iterate records; bad bytes raise DecodeError."""

    _max_buffer: int = MAX_RAW + 64

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0
        self._closed = False

    @property
    def buffered(self) -> int:
        """Bytes fed but not yet decoded."""
        return len(self._buf) - self._pos

    def feed(self, data: ByteView) -> None:
        """Add bytes."""
        if self._closed:
            raise DecodeError("data after the stream was closed")
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    def close(self) -> None:
        """Say the input ended; raises DecodeError if it ended inside a record."""
        self._closed = True
        if self.buffered:
            raise DecodeError(f"stream ends inside a record ({self.buffered} bytes left)")

    def _take(self, at: int, n: int) -> bytes:
        if at + n > len(self._buf):
            raise _NeedMore
        return bytes(self._buf[at : at + n])

    def _records(self, table: dict[int, Callable[[int], tuple[object, int]]]) -> Iterator[object]:
        while self._pos < len(self._buf):
            kind = self._buf[self._pos]
            handler = table.get(kind)
            if handler is None:
                raise DecodeError(f"unknown record type {kind:#04x}")
            try:
                record, end = handler(self._pos + 1)
            except _NeedMore:
                return
            except (struct.error, UnicodeDecodeError, ValueError) as exc:
                raise DecodeError(f"malformed {RecordType(kind).name} record: {exc}") from None
            self._pos = end
            yield record


class ForwardDecoder(_Decoder):
    """Decodes the sender's stream: first :meth:`hello`, then :meth:`records`."""

    def __init__(self) -> None:
        super().__init__()
        self.hello: Hello | None = None
        self._end_seen = False
        self._table: dict[int, Callable[[int], tuple[object, int]]] = {
            RecordType.RAW: lambda at: self._verbatim(at, RawBytes),
            RecordType.DEVICE: lambda at: self._verbatim(at, DeviceState),
            RecordType.PAGE: self._page,
            RecordType.ZPAGE: self._zpage,
            RecordType.TEMPLATE: self._template,
            RecordType.BACKREF: self._backref,
            RecordType.FALLBACK: self._fallback,
            RecordType.END: self._end,
        }

    def close(self) -> None:
        """Say the input ended; raises DecodeError unless it ended after END."""
        super().close()
        if not self._end_seen:
            raise DecodeError("the stream ended before its END record")

    def records(self) -> Iterator[ForwardRecord]:
        """Decode what was fed (the hello first: it becomes :attr:`hello`)."""
        if self.hello is None:
            if self.buffered < _HELLO.size:
                if bytes(self._buf[self._pos : self._pos + 8]) != MIGRATION_MAGIC[: self.buffered]:
                    raise DecodeError("not a tmdht migration stream (bad magic)")
                return
            magic, version, flags, catalog_id, backref, flow = _HELLO.unpack_from(
                self._buf, self._pos)
            if magic != MIGRATION_MAGIC:
                raise DecodeError("not a tmdht migration stream (bad magic)")
            if version != MIGRATION_VERSION:
                raise DecodeError(f"migration stream version {version} (only 1 is known)")
            if not 0 < backref <= MAX_BACKREF_WINDOW:
                raise LimitExceededError(f"back-reference window of {backref} pages")
            if not 0 < flow <= MAX_FLOW_WINDOW:
                raise LimitExceededError(f"flow window of {flow} bytes")
            self.hello = Hello(catalog_id, backref, flow, flags)
            self._pos += _HELLO.size
        for record in self._records(self._table):
            if self._end_seen and not isinstance(record, Fallback):
                raise DecodeError(f"{type(record).__name__} record after END")
            if isinstance(record, End):
                self._end_seen = True
            yield record  # type: ignore[misc]

    def _verbatim(self, at: int, kind: type[RawBytes] | type[DeviceState]) -> tuple[object, int]:
        (n,) = _BE32.unpack(self._take(at, 4))
        if not 0 < n <= MAX_RAW:
            raise LimitExceededError(f"verbatim record of {n} bytes")
        return kind(self._take(at + 4, n)), at + 4 + n

    def _prefix(self, at: int) -> tuple[bytes, int]:
        n = _prefix_length(self._buf, at)
        if n is None:
            raise _NeedMore
        prefix = self._take(at, n)
        _check_prefix(prefix)
        return prefix, at + n

    def _page(self, at: int) -> tuple[object, int]:
        prefix, at = self._prefix(at)
        return FullPage(prefix, self._take(at, PAGE_SIZE)), at + PAGE_SIZE

    def _zpage(self, at: int) -> tuple[object, int]:
        prefix, at = self._prefix(at)
        (n,) = _BE16.unpack(self._take(at, 2))
        if not 0 < n < PAGE_SIZE:
            raise LimitExceededError(f"compressed page of {n} bytes")
        return CompressedPage(prefix, self._take(at + 2, n)), at + 2 + n

    def _template(self, at: int) -> tuple[object, int]:
        prefix, at = self._prefix(at)
        return Template(prefix, self._take(at, DIGEST_SIZE)), at + DIGEST_SIZE

    def _backref(self, at: int) -> tuple[object, int]:
        prefix, at = self._prefix(at)
        (index,) = _BE32.unpack(self._take(at, 4))
        return BackRef(prefix, index), at + 4

    def _fallback(self, at: int) -> tuple[object, int]:
        index, encoding, n = _FALLBACK.unpack(self._take(at, _FALLBACK.size))
        if encoding > 1:
            raise DecodeError(f"fallback encoding {encoding}")
        if not 0 < n <= PAGE_SIZE or (encoding == 0 and n != PAGE_SIZE):
            raise LimitExceededError(f"fallback payload of {n} bytes")
        at += _FALLBACK.size
        return Fallback(index, bool(encoding), self._take(at, n)), at + n

    def _end(self, at: int) -> tuple[object, int]:
        *counts, digest = _END.unpack(self._take(at, _END.size))
        return End(MigrationCounts(*counts), digest), at + _END.size


class ReverseDecoder(_Decoder):
    """Decodes the receiver's NEED, ACK and DONE records."""

    def __init__(self) -> None:
        super().__init__()
        self._table: dict[int, Callable[[int], tuple[object, int]]] = {
            RecordType.NEED: self._need,
            RecordType.ACK: self._ack,
            RecordType.DONE: self._done,
        }

    def records(self) -> Iterator[ReverseRecord]:
        """Decode what was fed."""
        yield from self._records(self._table)  # type: ignore[misc]

    def _need(self, at: int) -> tuple[object, int]:
        (n,) = _BE16.unpack(self._take(at, 2))
        if not 0 < n <= MAX_NEED:
            raise LimitExceededError(f"NEED of {n} pages")
        raw = self._take(at + 2, 4 * n)
        return Need(struct.unpack(f">{n}I", raw)), at + 2 + 4 * n

    def _ack(self, at: int) -> tuple[object, int]:
        index, qemu_bytes = _ACK.unpack(self._take(at, _ACK.size))
        return Ack(index, qemu_bytes), at + _ACK.size

    def _done(self, at: int) -> tuple[object, int]:
        status = self._take(at, 1)[0]
        if status > 1:
            raise DecodeError(f"DONE status {status}")
        (n,) = _BE16.unpack(self._take(at + 1, 2))
        if n > MAX_MESSAGE:
            raise LimitExceededError(f"DONE message of {n} bytes")
        text = self._take(at + 3, n).decode("utf-8")
        return Done(status == 0, text), at + 3 + n


# -- the stream digest -------------------------------------------------------------------------


class StreamDigest:
    """BLAKE3 over the QEMU stream with every page body replaced by its digest."""

    def __init__(self) -> None:
        self._hasher = blake3()

    def verbatim(self, data: ByteView) -> None:
        """Add bytes that travel as they are."""
        self._hasher.update(data)

    def page(self, prefix: bytes, digest: bytes) -> None:
        """Add one page record: its header and the digest of its body."""
        self._hasher.update(prefix)
        self._hasher.update(digest)

    def digest(self) -> bytes:
        """The digest so far."""
        return self._hasher.digest()


# -- the sender --------------------------------------------------------------------------------


def _split(kind: type[RawBytes] | type[DeviceState], data: bytes) -> list[bytes]:
    return [encode(kind(data[i : i + MAX_RAW])) for i in range(0, len(data), MAX_RAW)]


@dataclass
class _Tally:
    qemu_bytes: int = 0
    pages: int = 0
    zero_pages: int = 0
    template_pages: int = 0
    backref_pages: int = 0
    full_pages: int = 0
    compressed_pages: int = 0

    def freeze(self) -> MigrationCounts:
        return MigrationCounts(self.qemu_bytes, self.pages, self.zero_pages, self.template_pages,
                               self.backref_pages, self.full_pages, self.compressed_pages)


class SenderRewriter:
    """Turns QEMU's migration stream into the forward stream.

    ``feed(qemu_bytes)`` returns wire bytes (whole records); :meth:`finish` the END record once
    QEMU's stream ended. :meth:`acknowledge` and :meth:`fallback` answer the receiver.
    ``is_template`` decides membership of many digests at once (a catalog's ``contains_many``).
    """

    def __init__(
        self,
        catalog_id: bytes,
        is_template: Callable[[Sequence[bytes]], Sequence[bool]],
        *,
        compress: bool = False,
        backref_window: int = 32768,
        flow_window: int = 64 << 20,
    ) -> None:
        self.hello = Hello(catalog_id, backref_window, flow_window,
                           FLAG_COMPRESS if compress else 0)
        encode(self.hello)  # validates
        self._is_template = is_template
        self._compressor = zstandard.ZstdCompressor(level=3) if compress else None
        self._parser = QemuStreamParser()
        self._pending = bytearray()
        self._pending_base = 0  # stream offset of self._pending[0]
        self._device = False
        self._digest = StreamDigest()
        self._tally = _Tally()
        self._next_index = 0
        self._recent: dict[bytes, int] = {}  # digest -> latest body index holding it
        self._recent_order: deque[tuple[int, bytes]] = deque()
        self._retained: dict[int, bytes] = {}  # TEMPLATE body index -> page, until acked
        self._retained_order: deque[int] = deque()
        self._acked_index = 0
        self._acked_bytes = 0
        self._finished = False
        self.ram_bytes = 0
        """Total RAM announced by QEMU (0 until its MEM_SIZE record)."""

    # -- state -----------------------------------------------------------------------------

    @property
    def counts(self) -> MigrationCounts:
        """Totals so far."""
        return self._tally.freeze()

    @property
    def unacknowledged(self) -> int:
        """QEMU bytes sent but not yet acknowledged."""
        return self._tally.qemu_bytes - self._acked_bytes

    @property
    def window_open(self) -> bool:
        """True while the sender may read more of QEMU's stream."""
        return self.unacknowledged < self.hello.flow_window

    @property
    def retained(self) -> int:
        """TEMPLATE pages kept for possible fallback."""
        return len(self._retained)

    def start(self) -> bytes:
        """The hello."""
        return encode(self.hello)

    # -- the QEMU stream -------------------------------------------------------------------

    def feed(self, data: ByteView) -> bytes:
        """Wire bytes for the next piece of QEMU's stream (DecodeError if it is malformed)."""
        if self._finished:
            raise DecodeError("QEMU bytes after the end")
        self._parser.feed(data)
        self._pending += data
        self._tally.qemu_bytes += memoryview(data).nbytes
        # Walk the events: a page record spans [end of the previous event, its body's end).
        pages: list[tuple[int, int]] = []  # (header start, body start), absolute offsets
        device_at = -1
        previous = self._parser.position
        for event in self._parser.events():
            if isinstance(event, RamPage):
                pages.append((previous, event.stream_offset))
            elif isinstance(event, RamZero):
                self._tally.zero_pages += 1
            elif isinstance(event, RamMemSize):
                self.ram_bytes = event.total
            elif isinstance(event, DeviceStateStart):
                device_at = event.stream_offset
            previous = self._parser.position
        end = self._parser.position
        out = self._encode(pages, device_at, end)
        del self._pending[: end - self._pending_base]
        self._pending_base = end
        return out

    def _view(self, start: int, end: int) -> bytes:
        return bytes(self._pending[start - self._pending_base : end - self._pending_base])

    def _encode(self, pages: list[tuple[int, int]], device_at: int, end: int) -> bytes:
        """Records for [start of pending, end): verbatim runs between the pages."""
        bodies = [self._view(body, body + PAGE_SIZE) for _, body in pages]
        digests = [digest_page(p) for p in bodies]
        templates = self._is_template(digests) if digests else []
        out: list[bytes] = []
        mark = self._pending_base

        def verbatim(upto: int) -> None:
            nonlocal mark
            if upto > mark:
                data = self._view(mark, upto)
                self._digest.verbatim(data)
                out.extend(_split(DeviceState if self._device else RawBytes, data))
                mark = upto

        for (header, body), page, digest, template in zip(
                pages, bodies, digests, templates, strict=True):
            verbatim(header)
            out.append(self._page(self._view(header, body), page, digest, bool(template)))
            mark = body + PAGE_SIZE
        if device_at >= 0:
            verbatim(device_at)
            self._device = True
        verbatim(end)
        return b"".join(out)

    def _page(self, prefix: bytes, page: bytes, digest: bytes, template: bool) -> bytes:
        tally = self._tally
        tally.pages += 1
        index = self._next_index
        self._next_index += 1
        self._digest.page(prefix, digest)
        earlier = self._recent.get(digest)
        self._remember(index, digest)
        if earlier is not None:
            tally.backref_pages += 1
            return encode(BackRef(prefix, earlier))
        if template:
            tally.template_pages += 1
            self._retained[index] = page
            self._retained_order.append(index)
            return encode(Template(prefix, digest))
        if self._compressor is not None:
            payload = self._compressor.compress(page)
            if len(payload) < PAGE_SIZE - 64:
                tally.compressed_pages += 1
                return encode(CompressedPage(prefix, payload))
        tally.full_pages += 1
        return encode(FullPage(prefix, page))

    def _remember(self, index: int, digest: bytes) -> None:
        self._recent[digest] = index
        self._recent_order.append((index, digest))
        window = self.hello.backref_window
        while self._recent_order and self._recent_order[0][0] <= index - window:
            old, old_digest = self._recent_order.popleft()
            if self._recent.get(old_digest) == old:
                del self._recent[old_digest]

    def finish(self) -> bytes:
        """QEMU's stream ended: the END record (DecodeError if it ended too early)."""
        self._parser.close()
        self._finished = True
        return encode(End(self._tally.freeze(), self._digest.digest()))

    # -- the receiver's messages -----------------------------------------------------------

    def acknowledge(self, ack: Ack) -> None:
        """Drop kept pages the receiver rebuilt; open the flow window."""
        if ack.index > self._next_index or ack.qemu_bytes > self._tally.qemu_bytes:
            raise DecodeError("ACK beyond what was sent")
        self._acked_index = max(self._acked_index, ack.index)
        self._acked_bytes = max(self._acked_bytes, ack.qemu_bytes)
        while self._retained_order and self._retained_order[0] < self._acked_index:
            self._retained.pop(self._retained_order.popleft(), None)

    def fallback(self, need: Need) -> bytes:
        """FALLBACK records for the pages of TEMPLATE records the receiver could not resolve."""
        out = []
        for index in need.indices:
            page = self._retained.get(index)
            if page is None:
                raise DecodeError(f"NEED for body {index}, which is no kept template page")
            if self._compressor is not None:
                payload = self._compressor.compress(page)
                if len(payload) < PAGE_SIZE:
                    out.append(encode(Fallback(index, True, payload)))
                    continue
            out.append(encode(Fallback(index, False, page)))
        return b"".join(out)


# -- the receiver ------------------------------------------------------------------------------


class _Slot:
    """One page record waiting to be written."""

    __slots__ = ("digest", "index", "page", "prefix", "requested", "source")

    def __init__(self, index: int, prefix: bytes, digest: bytes | None, page: bytes | None,
                 source: int) -> None:
        self.index = index
        self.prefix = prefix
        self.digest = digest
        self.page = page
        self.source = source  # body index of a back-reference, else -1
        self.requested = False


_DEVICE_MARK: Final = object()
_END_MARK: Final = object()


@dataclass
class RebuildStats:
    """What a receiver did."""

    pages: int = 0
    template_pages: int = 0
    backref_pages: int = 0
    full_pages: int = 0
    compressed_pages: int = 0
    cluster_pages: int = 0
    """Template pages resolved through the cluster."""
    fallback_pages: int = 0
    """Template pages the sender sent after NEED."""
    qemu_bytes: int = 0
    """Bytes written (or held) for QEMU."""
    end: MigrationCounts = field(default_factory=MigrationCounts)
    """The sender's totals (from END)."""


class ReceiverRebuilder:
    """Turns the forward stream back into QEMU's stream.

    Feed wire bytes; take :meth:`wanted` template digests to resolve and :meth:`supply` their
    pages (or :meth:`unavailable`, which queues NEED records: :meth:`requests`); take the QEMU
    bytes that are ready from :meth:`output`, in order. Device state is held until END and the
    stream digest agree: :attr:`verified` is then True and :meth:`output` releases it.
    """

    def __init__(self, expected_catalog_id: bytes | None = None) -> None:
        self._decoder = ForwardDecoder()
        self._expected_catalog = expected_catalog_id
        self._queue: deque[object] = deque()  # bytes | _Slot | marks
        self._slots: dict[int, _Slot] = {}  # unfilled TEMPLATE slots by body index
        self._to_resolve: deque[_Slot] = deque()
        self._need: list[int] = []
        self._next_index = 0
        self._written_index = 0
        self._queued_bytes = 0
        self._ring: mmap.mmap | None = None
        self._ring_digests: list[bytes | None] = []
        self._ring_index: list[int] = []
        self._digest = StreamDigest()
        self._held: list[bytes] = []
        self._held_bytes = 0
        self._in_device = False
        self._end: End | None = None
        self._decompressor = zstandard.ZstdDecompressor()
        self._last_ack = (0, 0)
        self._device_started = False
        self.verified = False
        """END arrived and everything before it matched."""
        self.stats = RebuildStats()

    @property
    def hello(self) -> Hello | None:
        """The sender's hello, once it arrived."""
        return self._decoder.hello

    @property
    def queued_bytes(self) -> int:
        """QEMU bytes decoded but not yet written (bounded by the sender's flow window)."""
        return self._queued_bytes

    @property
    def end_seen(self) -> bool:
        """END arrived."""
        return self._end is not None

    @property
    def waiting(self) -> int:
        """Template pages decoded but not yet filled."""
        return len(self._slots)

    def feed(self, data: ByteView) -> None:
        """Decode wire bytes (DecodeError if they break the format or the flow window)."""
        self._decoder.feed(data)
        for record in self._decoder.records():
            self._record(record)
        hello = self._decoder.hello
        if hello is not None and self._queued_bytes > hello.flow_window + MAX_RAW + 2 * PAGE_SIZE:
            raise LimitExceededError(
                f"sender ran {self._queued_bytes} bytes ahead (flow window {hello.flow_window})")

    def close(self) -> None:
        """The connection ended (DecodeError if inside a record)."""
        self._decoder.close()

    def _start(self, hello: Hello) -> None:
        if self._expected_catalog is not None and hello.catalog_id != self._expected_catalog:
            raise DecodeError("the sender used another catalog")
        # Anonymous memory, zero pages mapped on first touch: a bytearray of the default window
        # (32k pages, 128 MiB) was zero-filled up front, ~10% of a receiver's CPU on loopback.
        self._ring = mmap.mmap(-1, hello.backref_window * PAGE_SIZE)
        # ... and faulted in 2 MiB at a time where the kernel has transparent huge pages: one
        # fault per 4 KiB page was still ~10% of a receiver's CPU.
        with contextlib.suppress(AttributeError, OSError):
            self._ring.madvise(mmap.MADV_HUGEPAGE)
        self._ring_digests = [None] * hello.backref_window
        self._ring_index = [-1] * hello.backref_window

    def _record(self, record: ForwardRecord) -> None:
        if self._ring is None:
            assert self._decoder.hello is not None
            self._start(self._decoder.hello)
        match record:
            case RawBytes(data):
                if self._in_device:
                    raise DecodeError("RAW record after device state began")
                self._queue.append(data)
                self._queued_bytes += len(data)
            case DeviceState(data):
                if not self._in_device:
                    self._in_device = True
                    self._queue.append(_DEVICE_MARK)
                self._queue.append(data)
                self._queued_bytes += len(data)
            case FullPage(prefix, data):
                self.stats.full_pages += 1
                self._slot(prefix, digest_page(data), data)
            case CompressedPage(prefix, payload):
                self.stats.compressed_pages += 1
                page = self._decompress(payload)
                self._slot(prefix, digest_page(page), page)
            case Template(prefix, digest):
                self.stats.template_pages += 1
                slot = self._slot(prefix, digest, None)
                self._slots[slot.index] = slot
                self._to_resolve.append(slot)
            case BackRef(prefix, index):
                self.stats.backref_pages += 1
                window = len(self._ring_index)
                if not self._next_index - window <= index < self._next_index:
                    raise DecodeError(f"back-reference to body {index} outside the window")
                self._slot(prefix, None, None, source=index)
            case Fallback(index, compressed, payload):
                waiting = self._slots.get(index)
                if waiting is None:
                    raise DecodeError(f"FALLBACK for body {index}, which waits for nothing")
                page = self._decompress(payload) if compressed else payload
                if digest_page(page) != waiting.digest:
                    raise DigestMismatchError(f"fallback page of body {index} does not match")
                self.stats.fallback_pages += 1
                self._fill(waiting, page)
            case End():
                if self._in_device is False:
                    raise DecodeError("END before any device state")
                self._end = record
                self.stats.end = record.counts
                self._queue.append(_END_MARK)

    def _decompress(self, payload: bytes) -> bytes:
        try:  # the frame must declare one page: decompress() allocates what the header claims
            declared = zstandard.frame_content_size(payload)
        except zstandard.ZstdError as exc:
            raise DecodeError(f"bad compressed page: {exc}") from None
        if declared != PAGE_SIZE:
            raise DecodeError(f"compressed page declares {declared} bytes")
        try:
            page = self._decompressor.decompress(payload, max_output_size=PAGE_SIZE)
        except zstandard.ZstdError as exc:
            raise DecodeError(f"bad compressed page: {exc}") from None
        if len(page) != PAGE_SIZE:
            raise DecodeError(f"compressed page decodes to {len(page)} bytes")
        return page

    def _slot(self, prefix: bytes, digest: bytes | None, page: bytes | None,
              source: int = -1) -> _Slot:
        if self._in_device:
            raise DecodeError("page record after device state began")
        slot = _Slot(self._next_index, prefix, digest, page, source)
        self._next_index += 1
        self.stats.pages += 1
        self._queue.append(slot)
        self._queued_bytes += len(prefix) + PAGE_SIZE
        return slot

    def _fill(self, slot: _Slot, page: bytes) -> None:
        slot.page = page
        del self._slots[slot.index]

    # -- resolution ------------------------------------------------------------------------

    def wanted(self, limit: int) -> list[tuple[int, bytes]]:
        """Up to ``limit`` (body index, digest) of template pages not yet asked for, in order."""
        out: list[tuple[int, bytes]] = []
        while self._to_resolve and len(out) < limit:
            slot = self._to_resolve.popleft()
            if slot.page is None and not slot.requested:
                slot.requested = True
                assert slot.digest is not None
                out.append((slot.index, slot.digest))
        return out

    def supply(self, index: int, page: bytes) -> None:
        """The page of a template slot, already checked against its digest (by the client)."""
        slot = self._slots.get(index)
        if slot is not None:
            self.stats.cluster_pages += 1
            self._fill(slot, page)

    def unavailable(self, indices: Sequence[int]) -> None:
        """The cluster could not serve these slots: ask the sender (see :meth:`requests`)."""
        self._need.extend(i for i in indices if i in self._slots)

    def requests(self) -> bytes:
        """NEED records for the pages to take from the sender (empty if none)."""
        need, self._need = self._need, []
        return b"".join(encode(Need(tuple(need[i : i + MAX_NEED])))
                        for i in range(0, len(need), MAX_NEED))

    def ack(self, every: int = 1 << 20) -> bytes:
        """An ACK record if at least ``every`` QEMU bytes were written since the last one, or
        everything decoded is written; else empty."""
        state = (self._written_index, self.stats.qemu_bytes)
        if state == self._last_ack:
            return b""
        if state[1] - self._last_ack[1] < every and self._queue:
            return b""
        self._last_ack = state
        return encode(Ack(*state))

    # -- output ----------------------------------------------------------------------------

    def output(self) -> list[bytes]:
        """QEMU bytes ready to write, in order (DigestMismatchError at a bad END)."""
        out: list[bytes] = []
        queue = self._queue
        ring = self._ring
        while queue:
            item = queue[0]
            if isinstance(item, bytes):
                queue.popleft()
                self._queued_bytes -= len(item)
                self._digest.verbatim(item)
                self.stats.qemu_bytes += len(item)
                if self._device_started:
                    self._held.append(item)
                    self._held_bytes += len(item)
                    if self._held_bytes > MAX_HELD:
                        raise LimitExceededError(f"{self._held_bytes} bytes of device state")
                else:
                    out.append(item)
                continue
            if item is _DEVICE_MARK:
                queue.popleft()
                self._device_started = True
                continue
            if item is _END_MARK:
                queue.popleft()
                self._verify()
                out.extend(self._held)
                self._held = []
                continue
            assert isinstance(item, _Slot) and ring is not None
            if item.source >= 0:
                window = len(self._ring_index)
                at = item.source % window
                if self._ring_index[at] != item.source:  # pragma: no cover - guarded at decode
                    raise DecodeError(f"back-reference to body {item.source}, overwritten")
                item.digest = self._ring_digests[at]
                item.page = bytes(ring[at * PAGE_SIZE : (at + 1) * PAGE_SIZE])
            if item.page is None:
                break
            queue.popleft()
            assert item.digest is not None
            window = len(self._ring_index)
            at = item.index % window
            ring[at * PAGE_SIZE : (at + 1) * PAGE_SIZE] = item.page
            self._ring_digests[at] = item.digest
            self._ring_index[at] = item.index
            self._digest.page(item.prefix, item.digest)
            size = len(item.prefix) + PAGE_SIZE
            self._queued_bytes -= size
            self.stats.qemu_bytes += size
            self._written_index = item.index + 1
            out.append(item.prefix)
            out.append(item.page)
        return out

    def _verify(self) -> None:
        assert self._end is not None
        end = self._end
        mine = (self.stats.qemu_bytes, self.stats.pages, self.stats.template_pages,
                self.stats.backref_pages, self.stats.full_pages, self.stats.compressed_pages)
        theirs = (end.counts.qemu_bytes, end.counts.pages, end.counts.template_pages,
                  end.counts.backref_pages, end.counts.full_pages, end.counts.compressed_pages)
        if mine != theirs:
            raise DigestMismatchError(f"rebuilt stream totals {mine} differ from the sender's "
                                      f"{theirs}")
        if self._digest.digest() != end.digest:
            raise DigestMismatchError("stream digest differs: the rebuilt stream is not what "
                                      "QEMU sent")
        self.verified = True
