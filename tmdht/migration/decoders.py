"""Incremental decoders of the live-migration stream (:mod:`tmdht.migration.format`).

Both read from a :class:`tmdht._feed.FeedBuffer`, like the other stream decoders: a record whose
bytes are not all there yet rewinds to its start and waits for the next :meth:`feed`. Bad bytes
raise :class:`~tmdht.errors.DecodeError` and nothing else.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from typing import Final

from tmdht._feed import FeedBuffer, NeedMore
from tmdht.errors import DecodeError, LimitExceededError
from tmdht.migration.format import (
    ACK_LAYOUT,
    BE16,
    BE32,
    END_LAYOUT,
    FALLBACK_LAYOUT,
    FLAG_WAVE,
    FLAG_WAVE_BUSY,
    HELLO_LAYOUT,
    MAX_BACKREF_WINDOW,
    MAX_FLOW_WINDOW,
    MAX_MESSAGE,
    MAX_NEED,
    MAX_RAW,
    MIGRATION_MAGIC,
    MIGRATION_VERSION,
    Ack,
    BackRef,
    CompressedPage,
    DeviceState,
    Done,
    End,
    Fallback,
    ForwardRecord,
    FullPage,
    Hello,
    MigrationCounts,
    Need,
    Offer,
    RawBytes,
    RecordType,
    ReverseRecord,
    Template,
    WaveBusy,
    WaveHello,
    check_prefix,
)
from tmdht.pages import DIGEST_SIZE, PAGE_SIZE, ByteView
from tmdht.qemu_stream import RamFlag

__all__ = ["ForwardDecoder", "ReverseDecoder"]

_CONTINUE: Final = int(RamFlag.CONTINUE)

_Handler = Callable[[], object]


class _Decoder:
    """Shared buffering: feed bytes, iterate records through a type-byte table."""

    def __init__(self) -> None:
        self._in = FeedBuffer()
        self._closed = False

    @property
    def buffered(self) -> int:
        """Bytes fed but not yet decoded."""
        return self._in.remaining

    def feed(self, data: ByteView) -> None:
        """Add bytes."""
        if self._closed:
            raise DecodeError("data after the stream was closed")
        self._in.feed(data)

    def close(self) -> None:
        """Say the input ended; raises DecodeError if it ended inside a record."""
        self._closed = True
        if self.buffered:
            raise DecodeError(f"stream ends inside a record ({self.buffered} bytes left)")

    def _take(self, n: int) -> bytes:
        return bytes(self._in.take(n))

    def _records(self, table: dict[int, _Handler]) -> Iterator[object]:
        buf = self._in
        while buf.remaining:
            at = buf.pos
            kind = buf.u8()
            handler = table.get(kind)
            if handler is None:
                raise DecodeError(f"unknown record type {kind:#04x}")
            try:
                record = handler()
            except NeedMore:
                buf.pos = at
                return
            except (struct.error, UnicodeDecodeError, ValueError) as exc:
                raise DecodeError(f"malformed {RecordType(kind).name} record: {exc}") from None
            yield record


class ForwardDecoder(_Decoder):
    """Decodes the sender's stream: first :meth:`hello`, then :meth:`records`."""

    def __init__(self) -> None:
        super().__init__()
        self.hello: Hello | None = None
        self._end_seen = False
        self._wave_seen = False
        self._table: dict[int, _Handler] = {
            RecordType.RAW: lambda: self._verbatim(RawBytes),
            RecordType.DEVICE: lambda: self._verbatim(DeviceState),
            RecordType.PAGE: self._page,
            RecordType.ZPAGE: self._zpage,
            RecordType.TEMPLATE: self._template,
            RecordType.BACKREF: self._backref,
            RecordType.FALLBACK: self._fallback,
            RecordType.END: self._end,
            RecordType.WAVE: self._wave,
            RecordType.OFFER: self._offer,
        }

    def close(self) -> None:
        """Say the input ended; raises DecodeError unless it ended after END."""
        super().close()
        if not self._end_seen:
            raise DecodeError("the stream ended before its END record")

    def records(self) -> Iterator[ForwardRecord]:
        """Decode what was fed (the hello first: it becomes :attr:`hello`)."""
        if self.hello is None and not self._hello():
            return
        wave = bool(self.hello.flags & FLAG_WAVE)  # type: ignore[union-attr]
        for record in self._records(self._table):
            if wave and not self._wave_seen and not isinstance(record, WaveHello):
                raise DecodeError("a wave stream's first record is not WAVE")
            if self._end_seen and not isinstance(record, Fallback):
                raise DecodeError(f"{type(record).__name__} record after END")
            if isinstance(record, End):
                self._end_seen = True
            yield record  # type: ignore[misc]

    def _hello(self) -> bool:
        buf = self._in
        if buf.remaining < HELLO_LAYOUT.size:
            if bytes(buf.view[buf.pos : buf.pos + 8]) != MIGRATION_MAGIC[: buf.remaining]:
                raise DecodeError("not a tmdht migration stream (bad magic)")
            return False
        magic, version, flags, catalog_id, backref, flow = HELLO_LAYOUT.unpack(
            buf.take(HELLO_LAYOUT.size)
        )
        if magic != MIGRATION_MAGIC:
            raise DecodeError("not a tmdht migration stream (bad magic)")
        if version != MIGRATION_VERSION:
            raise DecodeError(f"migration stream version {version} (only 1 is known)")
        if not 0 < backref <= MAX_BACKREF_WINDOW:
            raise LimitExceededError(f"back-reference window of {backref} pages")
        if not 0 < flow <= MAX_FLOW_WINDOW:
            raise LimitExceededError(f"flow window of {flow} bytes")
        if flags & FLAG_WAVE_BUSY and not flags & FLAG_WAVE:
            raise DecodeError("hello with the wave-busy flag but not the wave flag")
        self.hello = Hello(catalog_id, backref, flow, flags)
        return True

    def _verbatim(self, kind: type[RawBytes] | type[DeviceState]) -> object:
        (n,) = BE32.unpack(self._in.take(4))
        if not 0 < n <= MAX_RAW:
            raise LimitExceededError(f"verbatim record of {n} bytes")
        return kind(self._take(n))

    def _prefix(self) -> bytes:
        """QEMU's page header: be64 offset|flags, then (unless CONTINUE) u8 length and idstr."""
        buf = self._in
        start = buf.pos
        head = buf.take(8)
        if not head[7] & _CONTINUE:
            buf.take(buf.u8())
        prefix = bytes(buf.view[start : buf.pos])
        check_prefix(prefix)
        return prefix

    def _page(self) -> object:
        prefix = self._prefix()
        return FullPage(prefix, self._take(PAGE_SIZE))

    def _zpage(self) -> object:
        prefix = self._prefix()
        (n,) = BE16.unpack(self._in.take(2))
        if not 0 < n < PAGE_SIZE:
            raise LimitExceededError(f"compressed page of {n} bytes")
        return CompressedPage(prefix, self._take(n))

    def _template(self) -> object:
        prefix = self._prefix()
        return Template(prefix, self._take(DIGEST_SIZE))

    def _wave(self) -> object:
        assert self.hello is not None
        if not self.hello.flags & FLAG_WAVE:  # as in a stream without waves (the native core)
            raise DecodeError(f"unknown record type {RecordType.WAVE:#04x}")
        if self._wave_seen:
            raise DecodeError("a second WAVE record")
        record = WaveHello(self._take(DIGEST_SIZE))
        self._wave_seen = True
        return record

    def _offer(self) -> object:
        assert self.hello is not None
        if not self.hello.flags & FLAG_WAVE:
            raise DecodeError(f"unknown record type {RecordType.OFFER:#04x}")
        if not self._wave_seen:
            raise DecodeError("OFFER record before the WAVE record")
        prefix = self._prefix()
        return Offer(prefix, self._take(DIGEST_SIZE))

    def _backref(self) -> object:
        prefix = self._prefix()
        (index,) = BE32.unpack(self._in.take(4))
        return BackRef(prefix, index)

    def _fallback(self) -> object:
        index, encoding, n = FALLBACK_LAYOUT.unpack(self._in.take(FALLBACK_LAYOUT.size))
        if encoding > 1:
            raise DecodeError(f"fallback encoding {encoding}")
        if not 0 < n <= PAGE_SIZE or (encoding == 0 and n != PAGE_SIZE):
            raise LimitExceededError(f"fallback payload of {n} bytes")
        return Fallback(index, bool(encoding), self._take(n))

    def _end(self) -> object:
        *counts, digest = END_LAYOUT.unpack(self._in.take(END_LAYOUT.size))
        return End(MigrationCounts(*counts), digest)


class ReverseDecoder(_Decoder):
    """Decodes the receiver's NEED, ACK and DONE records (and WAVE_BUSY, once, if the sender's
    hello had FLAG_WAVE_BUSY)."""

    def __init__(self, hello_flags: int = 0) -> None:
        """``hello_flags``: the flags of the hello the sender sent (what it understands)."""
        super().__init__()
        self._wave_busy = bool(hello_flags & FLAG_WAVE_BUSY)
        self._wave_busy_seen = False
        self._table: dict[int, _Handler] = {
            RecordType.NEED: self._need,
            RecordType.ACK: self._ack,
            RecordType.DONE: self._done,
            RecordType.WAVE_BUSY: self._busy,
        }

    def records(self) -> Iterator[ReverseRecord]:
        """Decode what was fed."""
        yield from self._records(self._table)  # type: ignore[misc]

    def _need(self) -> object:
        (n,) = BE16.unpack(self._in.take(2))
        if not 0 < n <= MAX_NEED:
            raise LimitExceededError(f"NEED of {n} pages")
        return Need(struct.unpack(f">{n}I", self._in.take(4 * n)))

    def _busy(self) -> object:
        if not self._wave_busy:  # as before the record existed (the native cores never send it)
            raise DecodeError(f"unknown record type {RecordType.WAVE_BUSY:#04x}")
        if self._wave_busy_seen:
            raise DecodeError("a second WAVE_BUSY record")
        self._wave_busy_seen = True
        return WaveBusy()

    def _ack(self) -> object:
        index, qemu_bytes = ACK_LAYOUT.unpack(self._in.take(ACK_LAYOUT.size))
        return Ack(index, qemu_bytes)

    def _done(self) -> object:
        status = self._in.u8()
        if status > 1:
            raise DecodeError(f"DONE status {status}")
        (n,) = BE16.unpack(self._in.take(2))
        if n > MAX_MESSAGE:
            raise LimitExceededError(f"DONE message of {n} bytes")
        return Done(status == 0, self._take(n).decode("utf-8"))
