"""The receiver's core: the forward stream in, QEMU's incoming migration stream out.

Sans-IO: :mod:`tmdht.client.migration` feeds it what the sender sends, resolves the template
digests it asks for through the cluster, and writes what it releases to QEMU. See
:mod:`tmdht.migration.format` for the records and the stream digest it verifies.
"""

from __future__ import annotations

import contextlib
import mmap
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

import zstandard

from tmdht.errors import DecodeError, DigestMismatchError, LimitExceededError
from tmdht.migration.decoders import ForwardDecoder
from tmdht.migration.format import (
    FLAG_WAVE_BUSY,
    MAX_HELD,
    MAX_NEED,
    MAX_RAW,
    Ack,
    BackRef,
    CompressedPage,
    DeviceState,
    End,
    Fallback,
    ForwardRecord,
    FullPage,
    Hello,
    MigrationCounts,
    Need,
    Offer,
    RawBytes,
    StreamDigest,
    Template,
    WaveBusy,
    WaveHello,
    encode,
)
from tmdht.pages import PAGE_SIZE, ByteView, digest_page

__all__ = ["RebuildStats", "ReceiverRebuilder"]


class _Slot:
    """One page record waiting to be written."""

    __slots__ = ("digest", "index", "offered", "page", "prefix", "requested", "source")

    def __init__(
        self, index: int, prefix: bytes, digest: bytes | None, page: bytes | None, source: int
    ) -> None:
        self.index = index
        self.prefix = prefix
        self.digest = digest
        self.page = page
        self.source = source  # body index of a back-reference, else -1
        self.requested = False
        self.offered = False  # an OFFER (wave store), not a TEMPLATE (cluster)


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
    offers: int = 0
    """OFFER records (wave)."""
    wave_pages: int = 0
    """Offered pages found in the wave store (and verified)."""
    offer_bodies: int = 0
    """Offered pages the sender sent after NEED."""
    learned_dropped: int = 0
    """Full pages not stored into the wave store because the learning queue was full."""


class ReceiverRebuilder:
    """Turns the forward stream back into QEMU's stream.

    Feed wire bytes; take :meth:`wanted` template digests to resolve and :meth:`supply` their
    pages (or :meth:`unavailable`, which queues NEED records: :meth:`requests`); take the QEMU
    bytes that are ready from :meth:`output`, in order. Device state is held until END and the
    stream digest agree: :attr:`verified` is then True and :meth:`output` releases it.
    """

    def __init__(self, expected_catalog_id: bytes | None = None, *,
                 wave_tag: bytes | None = None, learn_limit: int = 8192) -> None:
        """``wave_tag``: this receiver's wave (:attr:`tmdht.wave.WaveCredentials.tag`): it then
        accepts OFFERs of that wave and collects the full pages it receives for the wave store
        (:meth:`learned`, at most ``learn_limit`` pages waiting; more are not stored)."""
        self._decoder = ForwardDecoder()
        self._wave_tag = wave_tag
        self._learn_limit = learn_limit if wave_tag is not None else 0
        self._learned: list[tuple[bytes, bytes]] = []
        self._to_offer: deque[_Slot] = deque()
        self._expected_catalog = expected_catalog_id
        self._queue: deque[object] = deque()  # bytes | _Slot | marks
        self._slots: dict[int, _Slot] = {}  # unfilled TEMPLATE slots by body index
        self._to_resolve: deque[_Slot] = deque()
        self._need: list[int] = []
        self._busy = b""  # the WAVE_BUSY record, until requests() sends it
        self._busy_said = False
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
                f"sender ran {self._queued_bytes} bytes ahead (flow window {hello.flow_window})"
            )

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
                digest = digest_page(data)
                self._slot(prefix, digest, data)
                self._learn(digest, data)
            case CompressedPage(prefix, payload):
                self.stats.compressed_pages += 1
                page = self._decompress(payload)
                digest = digest_page(page)
                self._slot(prefix, digest, page)
                self._learn(digest, page)
            case WaveHello(tag):
                if self._wave_tag is None:
                    raise DecodeError("the sender migrates in a wave: give this receiver --wave")
                if tag != self._wave_tag:
                    raise DecodeError("the sender migrates in another wave (or with another "
                                      "wave secret)")
            case Offer(prefix, digest):
                self.stats.offers += 1
                slot = self._slot(prefix, digest, None)
                slot.offered = True
                self._slots[slot.index] = slot
                self._to_offer.append(slot)
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
                if waiting.offered:
                    self.stats.offer_bodies += 1
                    assert waiting.digest is not None
                    self._learn(waiting.digest, page)
                else:
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

    def _slot(
        self, prefix: bytes, digest: bytes | None, page: bytes | None, source: int = -1
    ) -> _Slot:
        if self._in_device:
            raise DecodeError("page record after device state began")
        slot = _Slot(self._next_index, prefix, digest, page, source)
        self._next_index += 1
        self.stats.pages += 1
        self._queue.append(slot)
        self._queued_bytes += len(prefix) + PAGE_SIZE
        return slot

    def _learn(self, digest: bytes, page: bytes) -> None:
        if not self._learn_limit:
            return
        if len(self._learned) >= self._learn_limit:
            self.stats.learned_dropped += 1
            return
        self._learned.append((digest, page))

    @property
    def to_learn(self) -> int:
        """Full pages waiting for :meth:`learned`."""
        return len(self._learned)

    def learned(self) -> list[tuple[bytes, bytes]]:
        """(digest, page) of full pages received since the last call, for the wave store.
        Every page here was checked against its digest (hashed here, or a FALLBACK checked)."""
        out, self._learned = self._learned, []
        return out

    @property
    def to_offer(self) -> int:
        """Offered pages not yet looked up in the wave store."""
        return len(self._to_offer)

    def wanted_offers(self, limit: int) -> list[tuple[int, bytes]]:
        """Up to ``limit`` (body index, digest) of offered pages to look up, in order."""
        out: list[tuple[int, bytes]] = []
        while self._to_offer and len(out) < limit:
            slot = self._to_offer.popleft()
            if slot.page is None and not slot.requested:
                slot.requested = True
                assert slot.digest is not None
                out.append((slot.index, slot.digest))
        return out

    def supply_offered(self, index: int, page: bytes) -> None:
        """The page of an offered slot from the wave store, checked here against the digest
        the sender offered (DigestMismatchError if it is not that page: the caller asks the
        sender instead, see :meth:`unavailable`)."""
        slot = self._slots.get(index)
        if slot is None or not slot.offered:
            return
        if len(page) != PAGE_SIZE or digest_page(page) != slot.digest:
            raise DigestMismatchError(f"wave page of body {index} does not match its digest")
        self.stats.wave_pages += 1
        self._fill(slot, page)

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
        if slot is not None and not slot.offered:
            self.stats.cluster_pages += 1
            self._fill(slot, page)

    def unavailable(self, indices: Sequence[int]) -> None:
        """The cluster could not serve these slots: ask the sender (see :meth:`requests`)."""
        self._need.extend(i for i in indices if i in self._slots)

    def others_busy(self) -> bool:
        """Other VMs of the wave migrate now (a page missed here is claimed by another
        receiver): tell the sender once with WAVE_BUSY (sent by :meth:`requests`), if its hello
        has FLAG_WAVE_BUSY. Returns True if this call queued the record."""
        hello = self._decoder.hello
        if self._busy_said or hello is None or not hello.flags & FLAG_WAVE_BUSY:
            return False
        self._busy_said = True
        self._busy = encode(WaveBusy())
        return True

    def requests(self) -> bytes:
        """NEED records for the pages to take from the sender, and WAVE_BUSY once if
        :meth:`others_busy` said so (empty if none)."""
        need, self._need = self._need, []
        busy, self._busy = self._busy, b""
        return busy + b"".join(
            encode(Need(tuple(need[i : i + MAX_NEED]))) for i in range(0, len(need), MAX_NEED)
        )

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
        mine = (
            self.stats.qemu_bytes,
            self.stats.pages,
            self.stats.template_pages,
            self.stats.backref_pages,
            self.stats.full_pages,
            self.stats.compressed_pages,
        )
        theirs = (
            end.counts.qemu_bytes,
            end.counts.pages,
            end.counts.template_pages,
            end.counts.backref_pages,
            end.counts.full_pages,
            end.counts.compressed_pages,
        )
        if mine != theirs:
            raise DigestMismatchError(
                f"rebuilt stream totals {mine} differ from the sender's {theirs}"
            )
        if self._digest.digest() != end.digest:
            raise DigestMismatchError(
                "stream digest differs: the rebuilt stream is not what QEMU sent"
            )
        self.verified = True
