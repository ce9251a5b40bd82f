"""The sender's core: QEMU's outgoing migration stream in, the forward stream out.

Sans-IO: :mod:`tmdht.client.migration` feeds it what QEMU writes and sends what it returns. See
:mod:`tmdht.migration.format` for the records and the flow control it implements.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import zstandard

from tmdht.errors import DecodeError
from tmdht.migration.format import (
    FLAG_COMPRESS,
    FLAG_WAVE,
    FLAG_WAVE_BUSY,
    MAX_RAW,
    Ack,
    BackRef,
    CompressedPage,
    DeviceState,
    End,
    Fallback,
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
from tmdht.qemu_stream import (
    DeviceStateStart,
    QemuStreamParser,
    RamMemSize,
    RamPage,
    RamZero,
)

__all__ = ["OfferPolicy", "SenderRewriter", "WaveCounts"]


@dataclass(frozen=True)
class OfferPolicy:
    """When a sender in a wave offers a page by digest and when it sends it whole.

    Offering costs a round trip and a wave-store lookup before the body of a page the store
    lacks moves (and the first VM of a wave finds nothing); it saves the body of a page the
    store has. So the sender sends pages whole (as without a wave: the receiver still stores
    them for the wave) only while the store looks cold: fewer than ``min_hit_rate`` of all its
    settled offers so far *and* of its last ``history`` were found; it then still offers one
    page in ``probe_every``, to notice when offers are found again. Until ``min_outcomes``
    offers are settled every page is offered.

    Offers are settled when an ACK covers them, so what the sender learns lags what it sends
    by its send queue and an ACK interval (several MiB at 100 Mbit/s), and every switch back
    to offering sends that much of the wave's common pages whole. Hence the long horizons
    (bench/waves.py, 256 MiB guests sharing 96 MiB, VMs 2-4 / VM 1 WAN bytes): deciding on the
    last 16 offers 0.52-0.57x, on 2048 after 256 settled 0.53-0.54x, on all of them after 4096
    settled 0.44-0.50x (every page offered: 0.44x); VM 1, which offers its first 4096 pages
    and then one in 8, took 1.00-1.03x the time of a migration without a wave, every page
    offered 1.04-1.09x."""

    min_hit_rate: float = 0.05
    history: int = 8192
    min_outcomes: int = 4096
    probe_every: int = 8

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_hit_rate <= 1.0:
            raise ValueError("min_hit_rate is a share between 0 and 1")
        if self.history < 1 or not 1 <= self.min_outcomes <= self.history:
            raise ValueError("history >= min_outcomes >= 1")
        if self.probe_every < 1:
            raise ValueError("probe_every >= 1")


@dataclass
class WaveCounts:
    """What a sender did in a wave."""

    offers: int = 0
    """Pages offered by digest (OFFER records)."""
    bodies: int = 0
    """Offered pages the receiver asked for and got (FALLBACK records answering an OFFER)."""
    window_full: int = 0
    """Pages sent whole because the offer window was full."""
    whole: int = 0
    """Pages sent whole because recent offers were mostly not found (adaptive offering)."""
    hits: int = 0
    """Offered pages the receiver acknowledged without asking for them (found in the wave
    store)."""
    busy_seen: int = 0
    """WAVE_BUSY records received (0 or 1): other VMs of the wave migrate at the same time, so
    every page is offered from then on."""


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
        return MigrationCounts(
            self.qemu_bytes,
            self.pages,
            self.zero_pages,
            self.template_pages,
            self.backref_pages,
            self.full_pages,
            self.compressed_pages,
        )


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
        wave_tag: bytes | None = None,
        offer_window: int = 64 << 20,
        offer_policy: OfferPolicy | None = OfferPolicy(),
        offer_ahead: int = 4 << 20,
    ) -> None:
        """``offer_policy``: in a wave, when pages are offered or sent whole (None: every
        non-template page is offered). ``offer_ahead``: in a wave, :attr:`window_open` is
        False while the bodies the offers awaiting an answer are expected to need exceed this
        many bytes (see :attr:`offer_backlog`)."""
        flags = (FLAG_COMPRESS if compress else 0) | \
            (FLAG_WAVE | FLAG_WAVE_BUSY if wave_tag is not None else 0)
        self.hello = Hello(catalog_id, backref_window, flow_window, flags)
        self._wave_hello = b"" if wave_tag is None else encode(WaveHello(wave_tag))
        if offer_window < 0 or offer_ahead < 0:
            raise ValueError("the offer window and offer-ahead are at least 0 bytes")
        self._offer_ahead = offer_ahead
        self._offer_window = offer_window if wave_tag is not None else 0
        self._offered: dict[int, bytes] = {}  # OFFER body index -> page, until acked
        self._offered_order: deque[int] = deque()
        self._policy = offer_policy
        self._offer_all = False  # the receiver said WAVE_BUSY: offer every page
        self._outcomes: deque[bool] = deque()  # the last settled offers: found or not
        self._outcome_hits = 0
        self._settled_total = 0  # offers settled over the whole migration (found: wave.hits)
        self._since_probe = 0
        self.wave = WaveCounts()
        """Offers, bodies sent for them, pages sent whole with the offer window full."""
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
        """True while the sender may read more of QEMU's stream.

        In a wave also only while :attr:`offer_backlog` is within ``offer_ahead``: an offer is
        a few bytes on the wire, so without this bound QEMU's stream ran up to the flow window
        ahead of what had crossed, QEMU stopped the guest for its last round while the bodies
        of that backlog still had to cross, and the guest's pause (the destination loaded
        after the source stopped) grew from ~0.9 s to 3-4 s at 100 Mbit/s (bench/waves.py)."""
        return self.unacknowledged < self.hello.flow_window and \
            self.offer_backlog <= self._offer_ahead

    @property
    def offer_backlog(self) -> int:
        """Bytes of bodies the offers awaiting an answer are expected to need: their pages
        times the share of settled offers not found so far (all, before any settled)."""
        if not self._offered:
            return 0
        missed = self._settled_total - self.wave.hits
        share = missed / self._settled_total if self._settled_total else 1.0
        return int(len(self._offered) * PAGE_SIZE * share)

    @property
    def retained(self) -> int:
        """TEMPLATE pages kept for possible fallback."""
        return len(self._retained)

    def start(self) -> bytes:
        """The hello (and the WAVE record in a wave)."""
        return encode(self.hello) + self._wave_hello

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
            pages, bodies, digests, templates, strict=True
        ):
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
        if self._offer_window and self._should_offer():
            if (len(self._offered) + 1) * PAGE_SIZE <= self._offer_window:
                self.wave.offers += 1
                self._offered[index] = page
                self._offered_order.append(index)
                return encode(Offer(prefix, digest))
            self.wave.window_full += 1
        if self._compressor is not None:
            payload = self._compressor.compress(page)
            if len(payload) < PAGE_SIZE - 64:
                tally.compressed_pages += 1
                return encode(CompressedPage(prefix, payload))
        tally.full_pages += 1
        return encode(FullPage(prefix, page))

    def _should_offer(self) -> bool:
        """Offer this page (else send it whole, counted in :attr:`WaveCounts.whole`)?"""
        policy = self._policy
        if policy is None or self._offer_all or self._settled_total < policy.min_outcomes or \
                self.wave.hits >= policy.min_hit_rate * self._settled_total or \
                self._outcome_hits >= policy.min_hit_rate * len(self._outcomes):
            return True
        self._since_probe += 1
        if self._since_probe >= policy.probe_every:
            self._since_probe = 0
            return True
        self.wave.whole += 1
        return False

    def wave_busy(self, record: WaveBusy) -> None:
        """The receiver saw other VMs of the wave migrate now: offer every page from here on.

        While they migrate, a page this VM sends whole is not claimed in the wave store, so
        a VM close behind fetches it from its own sender too; offered, it is claimed or found
        (bench/waves.py, 4 VMs at once: 0.583x tmdht's bytes in 3 runs with this record,
        0.59-0.63x adaptive without it). It does not revert: the receiver cannot tell when
        the others are done (it sees their claims only while it misses pages), and offering
        costs a VM that finds nothing the bytes of OFFER records and some time, never
        pages."""
        del record
        if not self.hello.flags & FLAG_WAVE_BUSY:
            raise DecodeError("WAVE_BUSY to a sender whose hello did not have FLAG_WAVE_BUSY")
        self.wave.busy_seen += 1
        self._offer_all = True

    def _settled(self, found: bool) -> None:
        """An ACK covered an offer: found in the wave store (no NEED for it) or not."""
        self._settled_total += 1
        self.wave.hits += found
        if self._policy is None:
            return
        self._outcomes.append(found)
        self._outcome_hits += found
        if len(self._outcomes) > self._policy.history:
            self._outcome_hits -= self._outcomes.popleft()

    @property
    def offer_hit_rate(self) -> float | None:
        """Share of the recent settled offers found in the wave store (None: none settled, or
        no offer policy)."""
        return self._outcome_hits / len(self._outcomes) if self._outcomes else None

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
        # Offers are settled here, in stream order, found or not: a NEED comes back within a
        # round trip but a found page only with the next ACK, and settling NEEDs as they came
        # made a warm wave look cold for the first ACK interval, every time.
        while self._offered_order and self._offered_order[0] < self._acked_index:
            # Still kept: rebuilt without a NEED, the wave store had it; else its body went.
            self._settled(self._offered.pop(self._offered_order.popleft(), None) is not None)

    def fallback(self, need: Need) -> bytes:
        """FALLBACK records for the pages of TEMPLATE records the receiver could not resolve."""
        out = []
        for index in need.indices:
            page = self._retained.get(index)
            if page is None:
                page = self._offered.pop(index, None)
                if page is None:
                    raise DecodeError(f"NEED for body {index}, which is no kept template page"
                                      + (" or offered page" if self._offer_window else ""))
                self.wave.bodies += 1
            if self._compressor is not None:
                payload = self._compressor.compress(page)
                if len(payload) < PAGE_SIZE:
                    out.append(encode(Fallback(index, True, payload)))
                    continue
            out.append(encode(Fallback(index, False, page)))
        return b"".join(out)
