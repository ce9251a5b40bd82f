"""The live-migration wire format between the sender and the receiver proxy: its records,
their encoding, its limits and the stream digest. The decoders are in
:mod:`tmdht.migration.decoders`, the two cores that use the format in
:mod:`tmdht.migration.sender` and :mod:`tmdht.migration.receiver`.

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
    0x08 WAVE       32-byte wave tag (:attr:`tmdht.wave.WaveCredentials.tag`): only with
                    FLAG_WAVE, the first record after the hello, exactly once
    0x09 OFFER      page prefix, 32-byte digest: a page the receiver may have in its wave
                    store; it answers NEED for the body (a FALLBACK) if not (only with
                    FLAG_WAVE)
    0x7f END        be64 QEMU bytes, be64 page records, be64 zero records, be64 template,
                    be64 back-references, be64 full, be64 compressed, 32-byte stream digest

Reverse stream (receiver → sender), no hello::

    0x11 NEED       be16 n (1 <= n <= MAX_NEED), n * be32 body index
    0x12 ACK        be32 body index, be64 QEMU bytes: every body record below the index is
                    rebuilt and this many QEMU bytes are written (or held)
    0x13 DONE       u8 status (0 verified, 1 failed), be16 n, n bytes UTF-8 message
    0x14 WAVE_BUSY  (no payload) other VMs of the wave migrate now: only if the hello has
                    FLAG_WAVE_BUSY, at most once

Waves (only when the hello has FLAG_WAVE; without it no WAVE or OFFER record is valid and the
stream is exactly the one above): an OFFER takes a body index like a TEMPLATE, the sender keeps
its page until an ACK covers it, and the receiver looks the page up in the wave store of the
destination cluster (by the wave key of its digest, :mod:`tmdht.wave`), checks what it got
against the digest, and asks for the body with NEED when the store lacks it. The sender keeps at
most ``offer window`` bytes of offered pages unacknowledged (its own setting, not on the wire);
with the window full it sends pages whole instead of offering them, so a slow wave store costs
bytes, never a stall. Which pages it offers at all is its own choice too (its offer policy:
pages go whole while offers are seldom found); the receiver stores every non-template page it
receives, whole or as a body, offered or not. The END counts are unchanged: an offered page
counts in ``pages`` only.

A sender in a wave also sets FLAG_WAVE_BUSY (only with FLAG_WAVE): it understands WAVE_BUSY, which
the receiver sends once when it first sees other VMs of the wave migrate at the same time (a page
it missed is claimed by another receiver). The sender then offers every non-template page (its
offer policy no longer sends pages whole), so a VM running ahead of the others does not send
whole the pages a VM close behind fetches too. A receiver sends WAVE_BUSY only to a hello with
that flag; a sender without it (or a stream without waves) never gets one.

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

import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Final

from blake3 import blake3

from tmdht.errors import DecodeError
from tmdht.pages import DIGEST_SIZE, PAGE_SIZE, ByteView
from tmdht.qemu_stream import RamFlag

__all__ = [
    "FLAG_COMPRESS",
    "FLAG_WAVE",
    "FLAG_WAVE_BUSY",
    "MAX_BACKREF_WINDOW",
    "MAX_FLOW_WINDOW",
    "MAX_HELD",
    "MAX_INDEX",
    "MAX_MESSAGE",
    "MAX_NEED",
    "MAX_RAW",
    "MIGRATION_MAGIC",
    "MIGRATION_VERSION",
    "Ack",
    "BackRef",
    "CompressedPage",
    "DeviceState",
    "Done",
    "End",
    "Fallback",
    "ForwardRecord",
    "FullPage",
    "Hello",
    "MigrationCounts",
    "Need",
    "Offer",
    "RawBytes",
    "RecordType",
    "ReverseRecord",
    "StreamDigest",
    "Template",
    "WaveBusy",
    "WaveHello",
    "check_prefix",
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
"""Longest DONE message (UTF-8 bytes)."""
MAX_INDEX: Final = (1 << 32) - 1
"""Largest body index (a be32)."""
FLAG_COMPRESS: Final = 0x01
"""Hello flag: residual pages may come zstd-compressed."""
FLAG_WAVE: Final = 0x02
"""Hello flag: the sender migrates in a wave (a WAVE record follows; OFFER records may)."""
FLAG_WAVE_BUSY: Final = 0x04
"""Hello flag, only with FLAG_WAVE: the sender understands WAVE_BUSY on the reverse stream."""
KNOWN_FLAGS: Final = FLAG_COMPRESS | FLAG_WAVE | FLAG_WAVE_BUSY

HELLO_LAYOUT = struct.Struct(">8sBB32sIQ")
BE16 = struct.Struct(">H")
BE32 = struct.Struct(">I")
END_LAYOUT = struct.Struct(">QQQQQQQ32s")
ACK_LAYOUT = struct.Struct(">IQ")
FALLBACK_LAYOUT = struct.Struct(">IBH")
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
    WAVE = 0x08
    OFFER = 0x09
    END = 0x7F
    NEED = 0x11
    ACK = 0x12
    DONE = 0x13
    WAVE_BUSY = 0x14


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
class WaveHello:
    """The wave the sender migrates in (after a hello with FLAG_WAVE)."""

    tag: bytes
    """The wave's tag (32 bytes): the receiver compares it with its own wave's."""


@dataclass(frozen=True, slots=True)
class Offer:
    """A PAGE record whose body may be in the receiver's wave store, named by its digest."""

    prefix: bytes
    """QEMU's record header."""
    digest: bytes
    """BLAKE3-256 of the page."""


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


@dataclass(frozen=True, slots=True)
class WaveBusy:
    """The receiver saw other VMs of the wave migrate at the same time (after a hello with
    FLAG_WAVE_BUSY, at most once)."""


ForwardRecord = (
    RawBytes | DeviceState | FullPage | CompressedPage | Template | BackRef | Fallback | End
    | WaveHello | Offer
)
ReverseRecord = Need | Ack | Done | WaveBusy


def check_prefix(prefix: bytes) -> None:
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


def encode(record: Hello | ForwardRecord | ReverseRecord) -> bytes:
    """The bytes of one record. Raises ValueError for a record that breaks the format's limits."""
    try:
        return _encode(record)
    except (struct.error, DecodeError) as exc:
        raise ValueError(f"cannot encode {type(record).__name__}: {exc}") from None


def _encode(record: Hello | ForwardRecord | ReverseRecord) -> bytes:
    match record:
        case Hello(catalog_id, backref, flow, flags):
            if flags & FLAG_WAVE_BUSY and not flags & FLAG_WAVE:
                raise DecodeError("FLAG_WAVE_BUSY without FLAG_WAVE")
            if (
                len(catalog_id) != DIGEST_SIZE
                or not 0 < backref <= MAX_BACKREF_WINDOW
                or not 0 < flow <= MAX_FLOW_WINDOW
            ):
                raise DecodeError("hello out of range")
            return HELLO_LAYOUT.pack(
                MIGRATION_MAGIC, MIGRATION_VERSION, flags, catalog_id, backref, flow
            )
        case RawBytes(data) | DeviceState(data):
            if not 0 < len(data) <= MAX_RAW:
                raise DecodeError(f"{len(data)} verbatim bytes")
            kind = RecordType.RAW if isinstance(record, RawBytes) else RecordType.DEVICE
            return bytes((kind,)) + BE32.pack(len(data)) + data
        case FullPage(prefix, data):
            check_prefix(prefix)
            if len(data) != PAGE_SIZE:
                raise DecodeError("a page is 4096 bytes")
            return b"\x02" + prefix + data
        case CompressedPage(prefix, payload):
            check_prefix(prefix)
            if not 0 < len(payload) < PAGE_SIZE:
                raise DecodeError("a compressed page is 1 … 4095 bytes")
            return b"\x03" + prefix + BE16.pack(len(payload)) + payload
        case Template(prefix, digest):
            check_prefix(prefix)
            if len(digest) != DIGEST_SIZE:
                raise DecodeError("a digest is 32 bytes")
            return b"\x04" + prefix + digest
        case WaveHello(tag):
            if len(tag) != DIGEST_SIZE:
                raise DecodeError("a wave tag is 32 bytes")
            return b"\x08" + tag
        case Offer(prefix, digest):
            check_prefix(prefix)
            if len(digest) != DIGEST_SIZE:
                raise DecodeError("a digest is 32 bytes")
            return b"\x09" + prefix + digest
        case BackRef(prefix, index):
            check_prefix(prefix)
            return b"\x05" + prefix + BE32.pack(index)
        case Fallback(index, compressed, payload):
            if not 0 < len(payload) <= PAGE_SIZE or (not compressed and len(payload) != PAGE_SIZE):
                raise DecodeError("fallback payload size")
            return b"\x07" + FALLBACK_LAYOUT.pack(index, int(compressed), len(payload)) + payload
        case End(counts, digest):
            if len(digest) != DIGEST_SIZE:
                raise DecodeError("a digest is 32 bytes")
            c = counts
            return b"\x7f" + END_LAYOUT.pack(
                c.qemu_bytes,
                c.pages,
                c.zero_pages,
                c.template_pages,
                c.backref_pages,
                c.full_pages,
                c.compressed_pages,
                digest,
            )
        case Need(indices):
            if not 0 < len(indices) <= MAX_NEED:
                raise DecodeError(f"NEED of {len(indices)} pages")
            return b"\x11" + BE16.pack(len(indices)) + struct.pack(f">{len(indices)}I", *indices)
        case Ack(index, qemu_bytes):
            return b"\x12" + ACK_LAYOUT.pack(index, qemu_bytes)
        case Done(ok, message):
            text = message.encode("utf-8")
            if len(text) > MAX_MESSAGE:
                raise DecodeError("DONE message too long")
            return b"\x13" + bytes((0 if ok else 1,)) + BE16.pack(len(text)) + text
        case WaveBusy():
            return b"\x14"
    raise ValueError(f"not a record: {record!r}")


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
