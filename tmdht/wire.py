"""The data-plane wire format: every datagram between clients and store nodes (sans-IO).

This module owns the format: it turns messages into datagrams and datagrams into messages and
does no IO. Time (for the auth timestamp) is a parameter. Requests are idempotent; a response that
does not fit one datagram is split into *parts*, each self-contained, so a client that lost a
part re-asks for exactly the digests it did not hear about.

Datagram layout, version 2 (big-endian; ``n`` is the body length, ``k`` the pages in the bulk)::

    | offset | size   | field       | meaning                                                   |
    |--------|--------|-------------|-----------------------------------------------------------|
    | 0      | 1      | version     | 2                                                         |
    | 1      | 1      | type        | :class:`MessageType`; decoded through a table             |
    | 2      | 2      | flags       | reserved: 0, anything else is refused                     |
    | 4      | 8      | request id  | u64 chosen by the requester, echoed by response parts     |
    | 12     | 2      | part        | index of this part, 0..parts-1 (0 for requests)           |
    | 14     | 2      | parts       | number of parts of the response, >= 1 (1 for requests)    |
    | 16     | 4      | body length | n; locates the auth block                                 |
    | 20     | n      | body        | per type, below                                           |
    | 20+n   | 1      | key id      | auth block, owned by :mod:`tmdht.auth`; 0 in open mode    |
    | 21+n   | 1      | auth flags  | bit 0: open mode (unauthenticated)                        |
    | 22+n   | 8      | timestamp   | sender wall clock, ms since the Unix epoch                |
    | 30+n   | 8      | nonce       | unique per datagram of a sender (replay detection)        |
    | 38+n   | 16     | tag         | keyed BLAKE3 of bytes 0..38+n (all zero in open mode)     |
    | 54+n   | 4096 k | bulk        | page bytes (PAGES, PUT_PAGES), *not* covered by the tag   |

Every datagram therefore carries 54 bytes of overhead (:data:`DATAGRAM_OVERHEAD`).

Why the bulk is outside the tag: a page is already bound to its BLAKE3 digest, and every
receiver checks that binding (the client before it uses a page, the node before it stores one).
The digests travel in the body, under the tag, in the order of the pages in the bulk; so a
forged or altered page is caught by its digest check instead of the tag check, and neither side
pays a keyed BLAKE3 over 60 KiB per datagram. A receiver that skipped the digest check would
accept forged pages: :class:`Pages` and :class:`PutPages` pages are *unverified* until checked.

Bodies and bulks (``u16`` counts; a digest is 32 bytes, a page 4096 bytes)::

    | type                  | body                                               | bulk      |
    |-----------------------|----------------------------------------------------|-----------|
    | 1 GET_PAGES           | count u16 (>= 1), count x digest                   |           |
    | 2 PAGES               | pages u16, missing u16, pages x digest,            | pages x   |
    |                       | missing x digest                                   | page      |
    | 3 PUT_PAGES           | count u16 (>= 1), count x digest                   | count x   |
    |                       |                                                    | page      |
    | 4 PUT_RESULT          | count u16, count x (digest, status u8              |           |
    |                       | :class:`PutStatus`)                                |           |
    | 5 HAS                 | count u16 (>= 1), count x digest                   |           |
    | 6 HAVE                | first u16, count u16, ceil(count/8) bytes bitmap   |           |
    | 7 NODE_INFO_REQUEST   | empty                                              |           |
    | 8 NODE_INFO           | node id 20s, data port u16, kademlia port u16,     |           |
    |                       | metrics port u16, flags u32, pages u64, bytes u64, |           |
    |                       | capacity u64, host length u8, host (ASCII),        |           |
    |                       | version length u8, version (UTF-8)                 |           |
    | 9 ERROR               | code u16 :class:`ErrorCode`, length u16,           |           |
    |                       | message (UTF-8)                                    |           |
    | 11 RECORD_PUT         | key 32s, entry id u64, version u64, ttl ms u32,    |           |
    |                       | value length u8, value                             |           |
    | 12 RECORD_PUT_RESULT  | status u8 :class:`RecordStatus`, version u64       |           |
    | 13 RECORD_GET         | key 32s                                            |           |
    | 14 RECORDS            | count u16, count x (entry id u64, version u64,     |           |
    |                       | ttl ms u32, value length u8, value)                |           |
    | 15 WAVE_GET           | count u16 (>= 1), count x wave key                 |           |
    | 16 WAVE_PAGES         | as PAGES, with wave keys for digests               | pages x   |
    |                       |                                                    | page      |
    | 17 WAVE_PUT           | ttl s u32 (>= 1), count u16 (>= 1), count x wave   | count x   |
    |                       | key                                                | page      |
    |                       | (answered by PUT_RESULT: STORED, PRESENT when      |           |
    |                       | refreshed, REJECTED_FULL)                          |           |
    | 19 RANGE_HASH         | bucket bits u8, group bits u8, first u32, groups   |           |
    |                       | u16, ceil((groups << group bits) / 8) bytes mask   |           |
    | 20 RANGE_HASHES       | bucket bits u8, group bits u8, first u32, groups   |           |
    |                       | u16, groups x (count u32, xor 32s)                 |           |
    | 21 WAVE_CLAIM         | claim ms u32 (>= 1), count u16 (>= 1), count x     |           |
    |                       | wave key                                           |           |
    | 22 WAVE_CLAIMS        | count u16, count x status u8                       |           |
    |                       | :class:`WaveClaimStatus`, in the request's order   |           |

RANGE_HASH asks a node for the page counts and XOR hashes of ``groups`` aligned groups of
``2 ** group_bits`` buckets from bucket ``first``, over the buckets flagged in the mask (bit
``i``: bucket ``first + i``, least significant first, unused bits zero); buckets are the first
``bucket_bits`` (1..:data:`MAX_BUCKET_BITS`) bits of a digest (:mod:`tmdht.rangehash`, the
anti-entropy of the replication job). RANGE_HASHES answers in one datagram, one (count, hash)
per group; the requester sizes its query so that answer fits (:func:`max_range_groups`).

Records (types 11..14) are the small versioned soft-state entries of :mod:`tmdht.records` (the
virtual network's MAC directory): a value is at most :data:`tmdht.records.MAX_VALUE_BYTES`, a
lease at most :data:`tmdht.records.MAX_TTL` seconds, a RECORDS answer holds at most
:data:`tmdht.records.MAX_ENTRIES_PER_KEY` entries (it always fits :data:`MIN_DATAGRAM`).

Wave pages (types 15..17, :mod:`tmdht.wave`) are named by wave keys, not digests: neither the
node nor this module can check them; the migration receiver checks each against the digest the
sender offered. Their answers use a type of their own (WAVE_PAGES), so a wave answer is never
taken for template pages. WAVE_CLAIM (types 21, 22) marks wave pages *in flight*: VMs of a wave
migrated at once walk the same pages at the same time, so the first receiver that misses a page
claims it (the node keeps the claim in memory for at most ``claim ms``, capped by the node) and
fetches it from its sender, and the others, told PENDING, wait for it to be stored instead of
fetching it too. WAVE_CLAIMS answers one status byte per key, in one datagram (it is 32 times
shorter than the request).

A bulk is exactly as long as its body's page count says; types without a bulk have none (bytes
after the auth block are refused). In a HAVE bitmap, entry ``i`` (the request's digest
``first + i``) is bit ``i % 8`` (least significant first) of byte ``i // 8``; unused bits of the
last byte must be zero. Every encoding is canonical: a datagram that decodes re-encodes to the
same bytes, the auth block aside.

Limits: a datagram is at most ``max_datagram`` bytes, which callers choose between
:data:`MIN_DATAGRAM` (one page with its digest always fits) and :data:`MAX_DATAGRAM` (65507, UDP
over IPv4); :func:`max_digests_per_request` and :func:`max_pages_per_datagram` size batches.
Every count is a u16 and must match the body length exactly; strings are capped
(:data:`MAX_HOST_BYTES`, :data:`MAX_VERSION_BYTES`, :data:`MAX_ERROR_MESSAGE_BYTES`).

Decoding verifies the auth block first (bad bytes are dropped before any state is created; the
header's body length only locates the block, and a length pointing past the datagram is an
AuthenticationError), then the header, then dispatches the body through a table. It raises only
:class:`tmdht.errors.DecodeError` subclasses: :class:`MessageDecodeError` when an authentic
datagram with a readable header has a bad body, carrying the request id and an
:class:`ErrorCode` so a node can answer with :class:`Error`; plain DecodeError / LimitExceededError
/ AuthenticationError / ReplayError otherwise (drop and count). Digests of received pages are not
checked here: the receiver must check them (:func:`tmdht.pages.check_page`).

Senders that serve pages from memory they must not copy (the node, from LMDB) use
:func:`encode_pages_buffers`: each datagram as a list of buffers (the sealed header, body and
auth block, then the page views) for a scatter-gather send.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import IntEnum, IntFlag
from itertools import chain
from typing import Any, Final, NamedTuple, TypeAlias, TypeVar, cast

from tmdht.auth import AUTH_OVERHEAD, Authenticator
from tmdht.errors import (
    DecodeError,
    EncodeError,
    InvalidMessageError,
    LimitExceededError,
    MessageDecodeError,
    MessageTooLargeError,
    UsageError,
)
from tmdht.pages import DIGEST_SIZE, PAGE_SIZE, ByteView, PageDigest
from tmdht.records import KEY_SIZE as RECORD_KEY_SIZE
from tmdht.records import MAX_ENTRIES_PER_KEY, MAX_TTL, MAX_VALUE_BYTES, RecordStatus

__all__ = [
    "DATAGRAM_OVERHEAD",
    "HEADER_SIZE",
    "MAX_BUCKET_BITS",
    "MAX_DATAGRAM",
    "MAX_ERROR_MESSAGE_BYTES",
    "MAX_HOST_BYTES",
    "MAX_VERSION_BYTES",
    "MIN_DATAGRAM",
    "NODE_ID_SIZE",
    "PROTOCOL_VERSION",
    "EncodeError",
    "Error",
    "ErrorCode",
    "GetPages",
    "Has",
    "Have",
    "InvalidMessageError",
    "Message",
    "MessageDecodeError",
    "MessageTooLargeError",
    "MessageType",
    "NodeFlags",
    "NodeInfo",
    "NodeInfoRequest",
    "Pages",
    "PutPages",
    "PutResult",
    "PutStatus",
    "RangeHashQuery",
    "RangeHashes",
    "RecordEntry",
    "RecordGet",
    "RecordPut",
    "RecordPutResult",
    "Records",
    "Request",
    "Response",
    "WaveClaim",
    "WaveClaimStatus",
    "WaveClaims",
    "WaveGet",
    "WavePages",
    "WavePut",
    "check_max_datagram",
    "decode",
    "encode",
    "encode_have_response",
    "encode_pages_buffers",
    "encode_pages_response",
    "encode_put_response",
    "max_digests_per_request",
    "max_pages_per_datagram",
    "max_range_groups",
    "max_range_mask_bytes",
    "put_pages_decoded",
    "put_result_decoded",
]

PROTOCOL_VERSION: Final = 2
"""The version byte every datagram of this format starts with (2: page bytes after the tag)."""

_HEADER: Final = struct.Struct(">BBHQHHI")
HEADER_SIZE: Final = _HEADER.size
"""Bytes of the fixed header (20)."""
DATAGRAM_OVERHEAD: Final = HEADER_SIZE + AUTH_OVERHEAD
"""Header plus auth block: bytes of every datagram that are not body (54)."""

_U16: Final = struct.Struct(">H")
_U32: Final = struct.Struct(">I")
_BODY_LENGTH_AT: Final = 16  # offset of the header's body length
_U16X2: Final = struct.Struct(">HH")
_NODE_INFO: Final = struct.Struct(">20sHHHIQQQ")
_ERROR_HEAD: Final = _U16X2

_PAGE_ENTRY: Final = DIGEST_SIZE + PAGE_SIZE  # a page in the bulk plus its digest in the body
_RESULT_ENTRY: Final = DIGEST_SIZE + 1  # one (digest, status) pair in a body
_U16_MAX: Final = 0xFFFF
_U32_MAX: Final = 0xFFFF_FFFF
_U64_MAX: Final = (1 << 64) - 1

MIN_DATAGRAM: Final = DATAGRAM_OVERHEAD + _U16X2.size + _PAGE_ENTRY
"""Smallest allowed ``max_datagram`` (4186): a PAGES datagram with one page fits."""
MAX_DATAGRAM: Final = 65507
"""Largest allowed ``max_datagram``: the largest UDP payload over IPv4."""
NODE_ID_SIZE: Final = 20
"""Bytes in a node id (the kademlia package's 160-bit id space)."""
MAX_HOST_BYTES: Final = 253
"""Longest host name (DNS limit) or address literal in NODE_INFO."""
MAX_VERSION_BYTES: Final = 64
"""Longest software version string in NODE_INFO, in UTF-8 bytes."""
MAX_ERROR_MESSAGE_BYTES: Final = 512
"""Longest ERROR message, in UTF-8 bytes (see :meth:`Error.capped`)."""


class MessageType(IntEnum):
    """The type byte of a datagram. Requests are odd, their responses the next even number."""

    GET_PAGES = 1
    PAGES = 2
    PUT_PAGES = 3
    PUT_RESULT = 4
    HAS = 5
    HAVE = 6
    NODE_INFO_REQUEST = 7
    NODE_INFO = 8
    ERROR = 9
    RECORD_PUT = 11
    RECORD_PUT_RESULT = 12
    RECORD_GET = 13
    RECORDS = 14
    WAVE_GET = 15
    WAVE_PAGES = 16
    WAVE_PUT = 17
    RANGE_HASH = 19
    RANGE_HASHES = 20
    WAVE_CLAIM = 21
    WAVE_CLAIMS = 22


class PutStatus(IntEnum):
    """What a node did with one page of a PUT_PAGES request."""

    STORED = 1
    """Stored now."""
    PRESENT = 2
    """Was already stored (puts are idempotent)."""
    REJECTED_DIGEST = 3
    """The page's BLAKE3 digest is not the digest sent with it."""
    REJECTED_FULL = 4
    """The node is at capacity; nothing was stored."""
    REJECTED_ZERO = 5
    """The all-zero page is never stored (it travels as a ZERO record)."""


class WaveClaimStatus(IntEnum):
    """What a node answers for one wave key of a WAVE_CLAIM."""

    CLAIMED = 1
    """The page is neither stored nor claimed: the requester now holds the claim (or the node
    keeps no more claims): it takes the page from elsewhere (its sender) and stores it."""
    PENDING = 2
    """Another requester's claim is live: the page should be stored soon."""
    HELD = 3
    """The page is stored: WAVE_GET it."""


class ErrorCode(IntEnum):
    """Why a node answered a request with ERROR instead of its response."""

    MALFORMED = 1
    """The request decoded as far as its header but its body is invalid."""
    TOO_LARGE = 2
    """The request asks for more than this node serves in one request."""
    UNKNOWN_TYPE = 3
    """The message type is unknown or is not a request."""
    OVERLOADED = 4
    """The node sheds load; retry later or ask another replica."""
    UNAVAILABLE = 5
    """The node cannot serve now (starting, draining, storage failure); ask another replica."""
    INTERNAL = 6
    """A bug in the node; the message says more."""


class NodeFlags(IntFlag):
    """State bits in NODE_INFO. Unknown bits are kept, not refused: newer nodes may add some."""

    DRAINING = 1
    """The node is leaving: read from it while it lasts, write elsewhere."""


_NO_FLAGS: Final = NodeFlags(0)


# --- messages ------------------------------------------------------------------------------------


def _check_request_id(request_id: int) -> None:
    if not 0 <= request_id <= _U64_MAX:
        raise InvalidMessageError(f"request id {request_id} is not a u64")


def _check_part(part: int, parts: int) -> None:
    if not 1 <= parts <= _U16_MAX or not 0 <= part < parts:
        raise InvalidMessageError(f"part {part} of {parts} is not 0 <= part < parts <= 65535")


def _check_count(count: int, what: str, *, at_least: int = 0) -> None:
    if not at_least <= count <= _U16_MAX:
        raise InvalidMessageError(f"{count} {what}: the format carries {at_least}..{_U16_MAX}")


def _check_lengths(items: Sequence[ByteView], size: int, what: str) -> None:
    """Every item is ``size`` bytes (a C-speed check: one set over the lengths)."""
    if items and set(map(len, items)) != {size}:
        bad = next(len(item) for item in items if len(item) != size)
        raise InvalidMessageError(f"a {what} is {size} bytes, got one of {bad}")


def _check_text(text: str, limit: int, what: str, *, ascii_only: bool = False) -> None:
    try:
        raw = text.encode("ascii" if ascii_only else "utf-8")
    except UnicodeEncodeError:
        encoding = "ASCII" if ascii_only else "UTF-8"
        raise InvalidMessageError(f"{what} {text!r} is not {encoding}") from None
    if len(raw) > limit:
        raise InvalidMessageError(f"{what} is {len(raw)} bytes, the limit is {limit}")


@dataclass(frozen=True, slots=True, kw_only=True)
class GetPages:
    """Request: send me these pages (or tell me which you do not have)."""

    request_id: int
    """u64 chosen by the requester; every part of the response echoes it."""
    digests: tuple[PageDigest, ...]
    """The digests wanted, 1..:func:`max_digests_per_request` of them."""

    def __post_init__(self) -> None:
        _check_request_id(self.request_id)
        object.__setattr__(self, "digests", tuple(self.digests))
        _check_count(len(self.digests), "digests", at_least=1)
        _check_lengths(self.digests, DIGEST_SIZE, "digest")


@dataclass(frozen=True, slots=True, kw_only=True)
class Pages:
    """Response part to GET_PAGES: some pages found and some digests known missing."""

    request_id: int
    """The request's id."""
    pages: tuple[tuple[PageDigest, bytes], ...]
    """(digest, 4096-byte page) pairs in this part. The receiver verifies each digest."""
    missing: tuple[PageDigest, ...] = ()
    """Requested digests this node does not hold (reported in exactly one part)."""
    part: int = 0
    """Index of this part, 0..parts-1."""
    parts: int = 1
    """Number of parts of the response; a digest absent from every received part was lost."""

    def __post_init__(self) -> None:
        _check_request_id(self.request_id)
        _check_part(self.part, self.parts)
        object.__setattr__(self, "pages", tuple(self.pages))
        object.__setattr__(self, "missing", tuple(self.missing))
        _check_count(len(self.pages), "pages")
        _check_count(len(self.missing), "missing digests")
        _check_lengths([digest for digest, _ in self.pages], DIGEST_SIZE, "digest")
        _check_lengths([page for _, page in self.pages], PAGE_SIZE, "page")
        _check_lengths(self.missing, DIGEST_SIZE, "digest")


@dataclass(frozen=True, slots=True, kw_only=True)
class PutPages:
    """Request: store these pages (idempotent)."""

    request_id: int
    """u64 chosen by the requester."""
    pages: tuple[tuple[PageDigest, bytes], ...]
    """(digest, 4096-byte page) pairs, 1..:func:`max_pages_per_datagram`. The node verifies."""

    def __post_init__(self) -> None:
        _check_request_id(self.request_id)
        object.__setattr__(self, "pages", tuple(self.pages))
        _check_count(len(self.pages), "pages", at_least=1)
        _check_lengths([digest for digest, _ in self.pages], DIGEST_SIZE, "digest")
        _check_lengths([page for _, page in self.pages], PAGE_SIZE, "page")


@dataclass(frozen=True, slots=True, kw_only=True)
class PutResult:
    """Response part to PUT_PAGES: what happened to each page."""

    request_id: int
    """The request's id."""
    results: tuple[tuple[PageDigest, PutStatus], ...]
    """(digest, status) for the pages reported in this part."""
    part: int = 0
    """Index of this part, 0..parts-1."""
    parts: int = 1
    """Number of parts of the response."""

    def __post_init__(self) -> None:
        _check_request_id(self.request_id)
        _check_part(self.part, self.parts)
        object.__setattr__(self, "results", tuple(self.results))
        _check_count(len(self.results), "results")
        _check_lengths([digest for digest, _ in self.results], DIGEST_SIZE, "digest")
        for _, status in self.results:  # a PutStatus member is valid without a hash lookup
            if type(status) is not PutStatus and status not in _PUT_STATUS_BY_VALUE:
                raise InvalidMessageError(f"unknown put status {status!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class Has:
    """Request: which of these pages do you hold? (no page data moves)"""

    request_id: int
    """u64 chosen by the requester."""
    digests: tuple[PageDigest, ...]
    """The digests asked about, 1..:func:`max_digests_per_request` of them."""

    def __post_init__(self) -> None:
        _check_request_id(self.request_id)
        object.__setattr__(self, "digests", tuple(self.digests))
        _check_count(len(self.digests), "digests", at_least=1)
        _check_lengths(self.digests, DIGEST_SIZE, "digest")


@dataclass(frozen=True, slots=True, kw_only=True)
class Have:
    """Response part to HAS: one flag per requested digest, aligned to the request."""

    request_id: int
    """The request's id."""
    held: tuple[bool, ...]
    """``held[i]`` is True if the node holds the request's digest number ``first + i``."""
    first: int = 0
    """Index in the request of the digest ``held[0]`` answers."""
    part: int = 0
    """Index of this part, 0..parts-1."""
    parts: int = 1
    """Number of parts of the response."""

    def __post_init__(self) -> None:
        _check_request_id(self.request_id)
        _check_part(self.part, self.parts)
        object.__setattr__(self, "held", tuple(self.held))
        if self.first < 0 or self.first + len(self.held) > _U16_MAX:
            raise InvalidMessageError(
                f"entries {self.first}..{self.first + len(self.held)} exceed a request's "
                f"{_U16_MAX} digests"
            )


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeInfoRequest:
    """Request: describe yourself (addresses, version, load)."""

    request_id: int
    """u64 chosen by the requester."""

    def __post_init__(self) -> None:
        _check_request_id(self.request_id)


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeInfo:
    """Response to NODE_INFO_REQUEST (always one datagram)."""

    request_id: int
    """The request's id."""
    node_id: bytes
    """The node's 20-byte Kademlia id."""
    data_address: tuple[str, int]
    """(host, port) of the node's data plane; host is a name or address literal, ASCII."""
    kademlia_port: int
    """UDP port of the node's Kademlia (control plane) endpoint, 1..65535, same host."""
    metrics_port: int
    """TCP port of the Prometheus endpoint, 0 if not exposed."""
    version: str
    """Software version string, at most :data:`MAX_VERSION_BYTES` UTF-8 bytes."""
    pages_stored: int
    """Pages the node holds."""
    bytes_stored: int
    """Bytes the node's page store occupies."""
    capacity_bytes: int
    """Bytes the node may use for pages."""
    flags: NodeFlags = _NO_FLAGS
    """State bits (e.g. draining)."""

    def __post_init__(self) -> None:
        _check_request_id(self.request_id)
        if len(self.node_id) != NODE_ID_SIZE:
            raise InvalidMessageError(f"a node id is {NODE_ID_SIZE} bytes, got {len(self.node_id)}")
        if len(self.data_address) != 2:
            raise InvalidMessageError(f"a data address is (host, port), got {self.data_address!r}")
        host, port = self.data_address
        if not host:
            raise InvalidMessageError("the data host is empty")
        _check_text(host, MAX_HOST_BYTES, "data host", ascii_only=True)
        for name, value, low in (
            ("data port", port, 1),
            ("kademlia port", self.kademlia_port, 1),
            ("metrics port", self.metrics_port, 0),
        ):
            if not low <= value <= _U16_MAX:
                raise InvalidMessageError(f"{name} {value} is not in {low}..{_U16_MAX}")
        _check_text(self.version, MAX_VERSION_BYTES, "version")
        for name, value in (
            ("pages stored", self.pages_stored),
            ("bytes stored", self.bytes_stored),
            ("capacity bytes", self.capacity_bytes),
        ):
            if not 0 <= value <= _U64_MAX:
                raise InvalidMessageError(f"{name} {value} is not a u64")
        if not 0 <= self.flags <= _U32_MAX:
            raise InvalidMessageError(f"node flags {self.flags} are not a u32")


@dataclass(frozen=True, slots=True, kw_only=True)
class Error:
    """Response: the request was not served (always one datagram)."""

    request_id: int
    """The request's id."""
    code: ErrorCode
    """Why, for programs."""
    message: str = ""
    """Why, for people; at most :data:`MAX_ERROR_MESSAGE_BYTES` UTF-8 bytes."""

    def __post_init__(self) -> None:
        _check_request_id(self.request_id)
        if self.code not in _ERROR_CODE_BY_VALUE:
            raise InvalidMessageError(f"unknown error code {self.code!r}")
        _check_text(self.message, MAX_ERROR_MESSAGE_BYTES, "error message")

    @classmethod
    def capped(cls, *, request_id: int, code: ErrorCode, message: str) -> Error:
        """An Error whose message is cut (at a character boundary) to fit the limit."""
        raw = message.encode("utf-8", "replace")[:MAX_ERROR_MESSAGE_BYTES]
        return cls(request_id=request_id, code=code, message=raw.decode("utf-8", "ignore"))


def _check_record_key(key: bytes) -> None:
    if not isinstance(key, bytes) or len(key) != RECORD_KEY_SIZE:
        raise InvalidMessageError(f"a record key is {RECORD_KEY_SIZE} bytes")


def _check_record_fields(entry_id: int, version: int, ttl_ms: int, value: bytes) -> None:
    for name, number in (("entry id", entry_id), ("version", version)):
        if not 0 <= number <= _U64_MAX:
            raise InvalidMessageError(f"{name} {number} is not a u64")
    if not 0 <= ttl_ms <= int(MAX_TTL * 1000):
        raise InvalidMessageError(f"a record ttl is 0..{int(MAX_TTL * 1000)} ms, got {ttl_ms}")
    if not isinstance(value, bytes) or len(value) > MAX_VALUE_BYTES:
        raise InvalidMessageError(f"a record value is bytes, at most {MAX_VALUE_BYTES}")


@dataclass(frozen=True, slots=True, kw_only=True)
class RecordPut:
    """Request: keep this entry under ``key`` (higher versions win; see :mod:`tmdht.records`)."""

    request_id: int
    key: bytes
    """32 bytes naming the record (placed like a page: on the R nodes closest to it)."""
    entry_id: int
    """u64 naming the entry under the key."""
    version: int
    """u64; a lower version than the node holds is refused."""
    ttl_ms: int
    """Lease in milliseconds (1..MAX_TTL s)."""
    value: bytes
    """At most :data:`tmdht.records.MAX_VALUE_BYTES` bytes."""

    def __post_init__(self) -> None:
        _check_request_id(self.request_id)
        _check_record_key(self.key)
        _check_record_fields(self.entry_id, self.version, self.ttl_ms, self.value)
        if self.ttl_ms < 1:
            raise InvalidMessageError("a put's ttl is at least 1 ms")


@dataclass(frozen=True, slots=True, kw_only=True)
class RecordPutResult:
    """Response to RECORD_PUT."""

    request_id: int
    status: RecordStatus
    version: int
    """The version the node holds after the put (0 if FULL)."""

    def __post_init__(self) -> None:
        _check_request_id(self.request_id)
        if self.status not in _RECORD_STATUS_BY_VALUE:
            raise InvalidMessageError(f"unknown record status {self.status!r}")
        if not 0 <= self.version <= _U64_MAX:
            raise InvalidMessageError(f"version {self.version} is not a u64")


@dataclass(frozen=True, slots=True, kw_only=True)
class RecordGet:
    """Request: the live entries under ``key``."""

    request_id: int
    key: bytes

    def __post_init__(self) -> None:
        _check_request_id(self.request_id)
        _check_record_key(self.key)


@dataclass(frozen=True, slots=True)
class RecordEntry:
    """One entry of a RECORDS answer."""

    entry_id: int
    version: int
    ttl_ms: int
    """Lease left, in milliseconds."""
    value: bytes

    def __post_init__(self) -> None:
        _check_record_fields(self.entry_id, self.version, self.ttl_ms, self.value)


@dataclass(frozen=True, slots=True, kw_only=True)
class Records:
    """Response to RECORD_GET (always one datagram)."""

    request_id: int
    entries: tuple[RecordEntry, ...]

    def __post_init__(self) -> None:
        _check_request_id(self.request_id)
        object.__setattr__(self, "entries", tuple(self.entries))
        if len(self.entries) > MAX_ENTRIES_PER_KEY:
            raise InvalidMessageError(
                f"{len(self.entries)} entries, a key holds at most {MAX_ENTRIES_PER_KEY}")
        if not all(isinstance(e, RecordEntry) for e in self.entries):
            raise InvalidMessageError("entries must be RecordEntry")


@dataclass(frozen=True, slots=True, kw_only=True)
class WaveGet:
    """Request: the wave pages of these wave keys (see :mod:`tmdht.wave`)."""

    request_id: int
    keys: tuple[bytes, ...]
    """1..:func:`max_digests_per_request` wave keys."""

    def __post_init__(self) -> None:
        _check_request_id(self.request_id)
        object.__setattr__(self, "keys", tuple(self.keys))
        _check_count(len(self.keys), "wave keys", at_least=1)
        _check_lengths(self.keys, DIGEST_SIZE, "wave key")


@dataclass(frozen=True, slots=True, kw_only=True)
class WavePages:
    """Response part to WAVE_GET: pages found (unverifiable here) and keys not held."""

    request_id: int
    pages: tuple[tuple[bytes, bytes], ...]
    """(wave key, page) pairs; the migration receiver checks each page against its digest."""
    missing: tuple[bytes, ...] = ()
    part: int = 0
    parts: int = 1

    def __post_init__(self) -> None:
        _check_request_id(self.request_id)
        _check_part(self.part, self.parts)
        object.__setattr__(self, "pages", tuple(self.pages))
        object.__setattr__(self, "missing", tuple(self.missing))
        _check_count(len(self.pages), "pages")
        _check_count(len(self.missing), "missing keys")
        _check_lengths([key for key, _ in self.pages], DIGEST_SIZE, "wave key")
        _check_lengths([page for _, page in self.pages], PAGE_SIZE, "page")
        _check_lengths(self.missing, DIGEST_SIZE, "wave key")


@dataclass(frozen=True, slots=True, kw_only=True)
class WavePut:
    """Request: keep these wave pages for ``ttl`` seconds (answered by PUT_RESULT)."""

    request_id: int
    ttl: int
    """Seconds, 1..2**32-1 (the node caps it at its ``wave_max_ttl``)."""
    pages: tuple[tuple[bytes, bytes], ...]
    """(wave key, page) pairs, 1..:func:`max_pages_per_datagram`."""

    def __post_init__(self) -> None:
        _check_request_id(self.request_id)
        if not 0 < self.ttl <= _U32_MAX:
            raise InvalidMessageError(f"a wave ttl is 1..{_U32_MAX} s, got {self.ttl}")
        object.__setattr__(self, "pages", tuple(self.pages))
        _check_count(len(self.pages), "pages", at_least=1)
        _check_lengths([key for key, _ in self.pages], DIGEST_SIZE, "wave key")
        _check_lengths([page for _, page in self.pages], PAGE_SIZE, "page")


@dataclass(frozen=True, slots=True, kw_only=True)
class WaveClaim:
    """Request: the status of these wave keys, claiming each that is neither stored nor claimed
    (answered by WAVE_CLAIMS)."""

    request_id: int
    claim_ms: int
    """How long a claim made here lasts, 1..2**32-1 ms (the node caps it)."""
    keys: tuple[bytes, ...]
    """1..:func:`max_digests_per_request` wave keys (minus one: the claim time takes 4 bytes)."""

    def __post_init__(self) -> None:
        _check_request_id(self.request_id)
        if not 0 < self.claim_ms <= _U32_MAX:
            raise InvalidMessageError(f"a claim lasts 1..{_U32_MAX} ms, got {self.claim_ms}")
        object.__setattr__(self, "keys", tuple(self.keys))
        _check_count(len(self.keys), "wave keys", at_least=1)
        _check_lengths(self.keys, DIGEST_SIZE, "wave key")


@dataclass(frozen=True, slots=True, kw_only=True)
class WaveClaims:
    """Response to WAVE_CLAIM (one datagram): one status per key, in the request's order."""

    request_id: int
    statuses: tuple[WaveClaimStatus, ...]

    def __post_init__(self) -> None:
        _check_request_id(self.request_id)
        object.__setattr__(self, "statuses", tuple(self.statuses))
        _check_count(len(self.statuses), "statuses")
        if not all(isinstance(s, WaveClaimStatus) for s in self.statuses):
            raise InvalidMessageError("statuses must be WaveClaimStatus")


MAX_BUCKET_BITS: Final = 24
"""Most bucket bits a RANGE_HASH may name (the mask of a whole 2**24 key space would not fit a
datagram anyway; the limit keeps decoded numbers small)."""
_RANGE_HEAD: Final = struct.Struct(">BBIH")
_RANGE_ENTRY: Final = struct.Struct(">I32s")


def _check_range(bucket_bits: int, group_bits: int, first: int, groups: int) -> None:
    if not 1 <= bucket_bits <= MAX_BUCKET_BITS:
        raise InvalidMessageError(f"bucket bits {bucket_bits} not in 1..{MAX_BUCKET_BITS}")
    if not 0 <= group_bits <= bucket_bits:
        raise InvalidMessageError(f"group bits {group_bits} not in 0..{bucket_bits}")
    _check_count(groups, "groups", at_least=1)
    if first < 0 or first % (1 << group_bits) or first + (groups << group_bits) > 1 << bucket_bits:
        raise InvalidMessageError(
            f"groups {first}+{groups}<<{group_bits} are not aligned inside {bucket_bits} bits"
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class RangeHashQuery:
    """Request: page counts and XOR hashes of groups of buckets (anti-entropy)."""

    request_id: int
    bucket_bits: int
    """Bits of a digest that name its bucket; a node with another bucket size refuses."""
    group_bits: int
    """Each group is ``2 ** group_bits`` consecutive buckets."""
    first: int
    """The first bucket, a multiple of the group size."""
    groups: int
    """Groups asked, 1..65535."""
    mask: bytes
    """One bit per bucket of the range (``groups << group_bits``), least significant first:
    only flagged buckets count. Unused bits of the last byte are zero."""

    def __post_init__(self) -> None:
        _check_request_id(self.request_id)
        _check_range(self.bucket_bits, self.group_bits, self.first, self.groups)
        bits = self.groups << self.group_bits
        if len(self.mask) != (bits + 7) // 8:
            raise InvalidMessageError(f"a mask of {bits} bits is {(bits + 7) // 8} bytes")
        if bits % 8 and self.mask[-1] >> (bits % 8):
            raise InvalidMessageError("unused bits of a RANGE_HASH mask are not zero")


@dataclass(frozen=True, slots=True, kw_only=True)
class RangeHashes:
    """Response to RANGE_HASH (always one datagram): (count, XOR) per group asked."""

    request_id: int
    bucket_bits: int
    group_bits: int
    first: int
    entries: tuple[tuple[int, bytes], ...]
    """Per group: pages held in its flagged buckets (u32) and the XOR of their digests."""

    def __post_init__(self) -> None:
        _check_request_id(self.request_id)
        object.__setattr__(self, "entries", tuple(self.entries))
        _check_range(self.bucket_bits, self.group_bits, self.first, len(self.entries))
        for count, xor in self.entries:
            if not 0 <= count <= _U32_MAX:
                raise InvalidMessageError(f"count {count} is not a u32")
            if len(xor) != DIGEST_SIZE:
                raise InvalidMessageError(f"a range hash is {DIGEST_SIZE} bytes")


Request: TypeAlias = (
    GetPages
    | PutPages
    | Has
    | NodeInfoRequest
    | RecordPut
    | RecordGet
    | WaveGet
    | WavePut
    | WaveClaim
    | RangeHashQuery
)
"""A message a client sends to a node."""
Response: TypeAlias = (
    Pages
    | PutResult
    | Have
    | NodeInfo
    | Error
    | RecordPutResult
    | Records
    | WavePages
    | WaveClaims
    | RangeHashes
)
"""A message a node sends back."""
Message: TypeAlias = Request | Response
"""Any data-plane message."""

_PUT_STATUS_BY_VALUE: Final[dict[int, PutStatus]] = {int(s): s for s in PutStatus}
_ERROR_CODE_BY_VALUE: Final[dict[int, ErrorCode]] = {int(c): c for c in ErrorCode}
_RECORD_STATUS_BY_VALUE: Final[dict[int, RecordStatus]] = {int(s): s for s in RecordStatus}
_CLAIM_STATUS_BY_VALUE: Final[dict[int, WaveClaimStatus]] = {int(s): s for s in WaveClaimStatus}
_RECORD_PUT: Final = struct.Struct(f">{RECORD_KEY_SIZE}sQQIB")
_RECORD_PUT_RESULT: Final = struct.Struct(">BQ")
_RECORD_ENTRY: Final = struct.Struct(">QQIB")

# --- encoding ------------------------------------------------------------------------------------

class _Body(NamedTuple):
    """An encoded body: chunks to join, its length (computed, not summed: messages are valid),
    and the bulk (page buffers sent after the auth block, in order)."""

    chunks: list[bytes]
    length: int
    bulk: Sequence[ByteView] = ()


def _encode_digest_list(digests: tuple[PageDigest, ...]) -> _Body:
    return _Body([_U16.pack(len(digests)), *digests], _U16.size + len(digests) * DIGEST_SIZE)


def _encode_get_pages(msg: GetPages) -> _Body:
    return _encode_digest_list(msg.digests)


def _encode_has(msg: Has) -> _Body:
    return _encode_digest_list(msg.digests)


def _pages_body(
    digests: Sequence[PageDigest], pages: Sequence[ByteView], missing: Sequence[PageDigest]
) -> _Body:
    """A PAGES body and bulk (shared by :func:`encode` and :func:`encode_pages_buffers`)."""
    chunks = [_U16X2.pack(len(digests), len(missing)), *digests, *missing]
    return _Body(chunks, _U16X2.size + (len(digests) + len(missing)) * DIGEST_SIZE, pages)


def _encode_pages(msg: Pages) -> _Body:
    return _pages_body([d for d, _ in msg.pages], [p for _, p in msg.pages], msg.missing)


def _encode_put_pages(msg: PutPages) -> _Body:
    chunks = [_U16.pack(len(msg.pages)), *(digest for digest, _ in msg.pages)]
    return _Body(chunks, _U16.size + len(msg.pages) * DIGEST_SIZE, [p for _, p in msg.pages])


def _encode_put_result(msg: PutResult) -> _Body:
    chunks = [_U16.pack(len(msg.results))]
    chunks += chain.from_iterable((digest, _STATUS_BYTE[status]) for digest, status in msg.results)
    return _Body(chunks, _U16.size + len(msg.results) * _RESULT_ENTRY)


_BIT_CHARS: Final = bytes.maketrans(b"\x00\x01", b"01")


def _encode_have(msg: Have) -> _Body:
    count = len(msg.held)
    size = (count + 7) // 8
    if count:
        # held[i] becomes bit i of a little-endian integer: bit i % 8 of byte i // 8. The flags
        # become b"0"/b"1" digits, most significant first, parsed by int() in C.
        try:
            digits = bytes(msg.held)[::-1].translate(_BIT_CHARS)
            bitmap = int(digits, 2).to_bytes(size, "little")
        except ValueError:
            raise InvalidMessageError("HAVE flags must be booleans") from None
    else:
        bitmap = b""
    return _Body([_U16X2.pack(msg.first, count), bitmap], _U16X2.size + size)


def _encode_node_info_request(msg: NodeInfoRequest) -> _Body:
    return _Body([], 0)


def _encode_node_info(msg: NodeInfo) -> _Body:
    host, data_port = msg.data_address
    raw_host = host.encode("ascii")
    raw_version = msg.version.encode("utf-8")
    fixed = _NODE_INFO.pack(
        msg.node_id,
        data_port,
        msg.kademlia_port,
        msg.metrics_port,
        msg.flags,
        msg.pages_stored,
        msg.bytes_stored,
        msg.capacity_bytes,
    )
    chunks = [fixed, bytes((len(raw_host),)), raw_host, bytes((len(raw_version),)), raw_version]
    return _Body(chunks, _NODE_INFO.size + 2 + len(raw_host) + len(raw_version))


def _encode_error(msg: Error) -> _Body:
    raw = msg.message.encode("utf-8")
    return _Body([_ERROR_HEAD.pack(msg.code, len(raw)), raw], _ERROR_HEAD.size + len(raw))


def _encode_record_put(msg: RecordPut) -> _Body:
    head = _RECORD_PUT.pack(msg.key, msg.entry_id, msg.version, msg.ttl_ms, len(msg.value))
    return _Body([head, msg.value], len(head) + len(msg.value))


def _encode_record_put_result(msg: RecordPutResult) -> _Body:
    return _Body([_RECORD_PUT_RESULT.pack(msg.status, msg.version)], _RECORD_PUT_RESULT.size)


def _encode_record_get(msg: RecordGet) -> _Body:
    return _Body([msg.key], RECORD_KEY_SIZE)


def _encode_records(msg: Records) -> _Body:
    chunks = [_U16.pack(len(msg.entries))]
    for e in msg.entries:
        chunks += [_RECORD_ENTRY.pack(e.entry_id, e.version, e.ttl_ms, len(e.value)), e.value]
    return _Body(chunks, sum(map(len, chunks)))


def _encode_range_hash(msg: RangeHashQuery) -> _Body:
    head = _RANGE_HEAD.pack(msg.bucket_bits, msg.group_bits, msg.first, msg.groups)
    return _Body([head, msg.mask], len(head) + len(msg.mask))


def _encode_range_hashes(msg: RangeHashes) -> _Body:
    head = _RANGE_HEAD.pack(msg.bucket_bits, msg.group_bits, msg.first, len(msg.entries))
    chunks = [head, *(_RANGE_ENTRY.pack(count, xor) for count, xor in msg.entries)]
    return _Body(chunks, len(head) + len(msg.entries) * _RANGE_ENTRY.size)


_STATUS_BYTE: Final[dict[int, bytes]] = {int(s): bytes((s,)) for s in PutStatus}


def _encode_wave_get(msg: WaveGet) -> _Body:
    return _encode_digest_list(cast(tuple[PageDigest, ...], msg.keys))


def _encode_wave_pages(msg: WavePages) -> _Body:
    keys = cast(list[PageDigest], [k for k, _ in msg.pages])
    return _pages_body(keys, [p for _, p in msg.pages], cast(tuple[PageDigest, ...], msg.missing))


def _encode_wave_put(msg: WavePut) -> _Body:
    chunks = [_U32.pack(msg.ttl), _U16.pack(len(msg.pages)), *(key for key, _ in msg.pages)]
    return _Body(chunks, _U32.size + _U16.size + len(msg.pages) * DIGEST_SIZE,
                 [p for _, p in msg.pages])


def _encode_wave_claim(msg: WaveClaim) -> _Body:
    chunks = [_U32.pack(msg.claim_ms), _U16.pack(len(msg.keys)), *msg.keys]
    return _Body(chunks, _U32.size + _U16.size + len(msg.keys) * DIGEST_SIZE)


def _encode_wave_claims(msg: WaveClaims) -> _Body:
    chunks = [_U16.pack(len(msg.statuses)), bytes(msg.statuses)]
    return _Body(chunks, _U16.size + len(msg.statuses))


# Message class -> (type byte, body encoder). Typed loosely: each encoder takes its own class.
_ENCODERS: Final[dict[type, tuple[MessageType, Callable[[Any], _Body]]]] = {
    GetPages: (MessageType.GET_PAGES, _encode_get_pages),
    Pages: (MessageType.PAGES, _encode_pages),
    PutPages: (MessageType.PUT_PAGES, _encode_put_pages),
    PutResult: (MessageType.PUT_RESULT, _encode_put_result),
    Has: (MessageType.HAS, _encode_has),
    Have: (MessageType.HAVE, _encode_have),
    NodeInfoRequest: (MessageType.NODE_INFO_REQUEST, _encode_node_info_request),
    NodeInfo: (MessageType.NODE_INFO, _encode_node_info),
    Error: (MessageType.ERROR, _encode_error),
    RecordPut: (MessageType.RECORD_PUT, _encode_record_put),
    RecordPutResult: (MessageType.RECORD_PUT_RESULT, _encode_record_put_result),
    RecordGet: (MessageType.RECORD_GET, _encode_record_get),
    Records: (MessageType.RECORDS, _encode_records),
    WaveGet: (MessageType.WAVE_GET, _encode_wave_get),
    WavePages: (MessageType.WAVE_PAGES, _encode_wave_pages),
    WavePut: (MessageType.WAVE_PUT, _encode_wave_put),
    WaveClaim: (MessageType.WAVE_CLAIM, _encode_wave_claim),
    WaveClaims: (MessageType.WAVE_CLAIMS, _encode_wave_claims),
    RangeHashQuery: (MessageType.RANGE_HASH, _encode_range_hash),
    RangeHashes: (MessageType.RANGE_HASHES, _encode_range_hashes),
}


def check_max_datagram(max_datagram: int) -> None:
    """Raise UsageError unless ``MIN_DATAGRAM <= max_datagram <= MAX_DATAGRAM``."""
    if not MIN_DATAGRAM <= max_datagram <= MAX_DATAGRAM:
        raise UsageError(
            f"max_datagram must be in {MIN_DATAGRAM}..{MAX_DATAGRAM} (one page must fit), "
            f"got {max_datagram}"
        )


def _seal(
    message_type: MessageType,
    request_id: int,
    part: int,
    parts: int,
    body: _Body,
    *,
    max_datagram: int,
    auth: Authenticator,
    now: float,
) -> list[ByteView]:
    """One datagram as buffers: header, body and auth block in one bytes, then the bulk."""
    size = DATAGRAM_OVERHEAD + body.length + len(body.bulk) * PAGE_SIZE
    if size > max_datagram:
        raise MessageTooLargeError(
            f"{message_type.name} of {size} bytes exceeds max_datagram {max_datagram}"
        )
    header = _HEADER.pack(PROTOCOL_VERSION, message_type, 0, request_id, part, parts, body.length)
    return [auth.seal(b"".join([header, *body.chunks]), now), *body.bulk]


def encode(msg: Message, *, max_datagram: int, auth: Authenticator, now: float) -> bytes:
    """Encode one message as one sealed datagram of at most ``max_datagram`` bytes.

    ``now`` is wall-clock seconds (the auth timestamp). Raises MessageTooLargeError if it does
    not fit (use the ``encode_*_response`` helpers to split responses), UsageError on bad
    arguments.
    """
    check_max_datagram(max_datagram)
    entry = _ENCODERS.get(type(msg))
    if entry is None:
        raise EncodeError(f"not a wire message: {type(msg).__name__}")
    message_type, encode_body = entry
    part, parts = ((msg.part, msg.parts) if isinstance(msg, Pages | PutResult | Have | WavePages)
                   else (0, 1))
    buffers = _seal(
        message_type,
        msg.request_id,
        part,
        parts,
        encode_body(msg),
        max_datagram=max_datagram,
        auth=auth,
        now=now,
    )
    return b"".join(buffers)  # one bytes when there is no bulk: returned as is, not copied


def max_digests_per_request(max_datagram: int) -> int:
    """Most digests one GET_PAGES or HAS datagram carries (2045 at 65507 bytes)."""
    check_max_datagram(max_datagram)
    return min(_U16_MAX, (max_datagram - DATAGRAM_OVERHEAD - _U16.size) // DIGEST_SIZE)


def max_pages_per_datagram(max_datagram: int) -> int:
    """Most pages one PUT_PAGES or PAGES datagram carries (15 at 65507 bytes, 1 at minimum)."""
    check_max_datagram(max_datagram)
    return (max_datagram - DATAGRAM_OVERHEAD - _U16X2.size) // _PAGE_ENTRY


def max_range_mask_bytes(max_datagram: int) -> int:
    """Most mask bytes one RANGE_HASH datagram carries."""
    check_max_datagram(max_datagram)
    return max_datagram - DATAGRAM_OVERHEAD - _RANGE_HEAD.size


def max_range_groups(max_datagram: int) -> int:
    """Most groups one RANGE_HASHES datagram answers (905 at 32768 bytes)."""
    check_max_datagram(max_datagram)
    return min(_U16_MAX, (max_datagram - DATAGRAM_OVERHEAD - _RANGE_HEAD.size) // _RANGE_ENTRY.size)


def _check_response_parts(parts: int, what: str) -> None:
    if parts > _U16_MAX:
        raise MessageTooLargeError(f"{what} needs {parts} parts, the format carries {_U16_MAX}")


def encode_pages_buffers(
    request_id: int,
    pages: Sequence[tuple[PageDigest, ByteView]],
    missing: Sequence[PageDigest],
    *,
    max_datagram: int,
    auth: Authenticator,
    now: float,
    message_type: MessageType = MessageType.PAGES,
) -> list[list[ByteView]]:
    """Encode a GET_PAGES answer as few PAGES datagrams as possible, each as a list of buffers
    (or, with ``message_type`` WAVE_PAGES, a WAVE_GET answer: the same body, wave keys for
    digests).

    Each datagram is ``[head, page, page, ...]``: ``head`` (bytes) holds the header, the body and
    the auth block; the pages are the caller's buffers, not copied, so a sender can pass them
    to ``socket.sendmsg`` while they are valid (e.g. views into a read transaction).

    Pages fill the parts first; missing digests fill the room left in the last page part, then
    parts of their own. Order is kept; every page and missing digest appears in exactly one part.
    An empty answer is one empty part. Raises InvalidMessageError for a digest that is not 32
    bytes or a page that is not 4096 bytes, UsageError on bad arguments.
    """
    check_max_datagram(max_datagram)
    _check_request_id(request_id)
    if message_type not in (MessageType.PAGES, MessageType.WAVE_PAGES):
        raise UsageError(f"{message_type!r} is not a pages answer")
    digests = [digest for digest, _ in pages]
    views = [page for _, page in pages]
    _check_lengths(digests, DIGEST_SIZE, "digest")
    _check_lengths(views, PAGE_SIZE, "page")
    _check_lengths(missing, DIGEST_SIZE, "digest")
    budget = max_datagram - DATAGRAM_OVERHEAD - _U16X2.size
    pages_per_part = budget // _PAGE_ENTRY
    plan: list[tuple[int, int, int, int]] = []
    page_at = missing_at = 0
    while True:
        page_end = min(len(pages), page_at + pages_per_part)
        room = budget - (page_end - page_at) * _PAGE_ENTRY
        missing_end = min(len(missing), missing_at + room // DIGEST_SIZE)
        plan.append((page_at, page_end, missing_at, missing_end))
        page_at, missing_at = page_end, missing_end
        if page_at == len(pages) and missing_at == len(missing):
            break
    _check_response_parts(len(plan), f"{message_type.name} response")
    return [
        _seal(
            message_type,
            request_id,
            index,
            len(plan),
            _pages_body(digests[p0:p1], views[p0:p1], missing[m0:m1]),
            max_datagram=max_datagram,
            auth=auth,
            now=now,
        )
        for index, (p0, p1, m0, m1) in enumerate(plan)
    ]


def encode_pages_response(
    request_id: int,
    pages: Sequence[tuple[PageDigest, ByteView]],
    missing: Sequence[PageDigest],
    *,
    max_datagram: int,
    auth: Authenticator,
    now: float,
    message_type: MessageType = MessageType.PAGES,
) -> list[bytes]:
    """:func:`encode_pages_buffers`, each datagram joined into one bytes."""
    parts = encode_pages_buffers(
        request_id, pages, missing, max_datagram=max_datagram, auth=auth, now=now,
        message_type=message_type,
    )
    return [b"".join(buffers) for buffers in parts]


def encode_put_response(
    request_id: int,
    results: Sequence[tuple[PageDigest, PutStatus]],
    *,
    max_datagram: int,
    auth: Authenticator,
    now: float,
) -> list[bytes]:
    """Encode a PUT_PAGES answer as PUT_RESULT datagrams (one in practice), order kept."""
    check_max_datagram(max_datagram)
    per_part = (max_datagram - DATAGRAM_OVERHEAD - _U16.size) // _RESULT_ENTRY
    starts = range(0, max(len(results), 1), per_part)
    _check_response_parts(len(starts), "PUT_RESULT response")
    return [
        encode(
            PutResult(
                request_id=request_id,
                results=tuple(results[start : start + per_part]),
                part=index,
                parts=len(starts),
            ),
            max_datagram=max_datagram,
            auth=auth,
            now=now,
        )
        for index, start in enumerate(starts)
    ]


def encode_have_response(
    request_id: int,
    held: Sequence[bool],
    *,
    max_datagram: int,
    auth: Authenticator,
    now: float,
) -> list[bytes]:
    """Encode a HAS answer as HAVE datagrams, ``held`` aligned to the request's digests.

    A bitmap is 256 times smaller than the digests it answers, so a request that fitted a
    datagram is always answered in one; parts exist for symmetry and larger inputs.
    """
    check_max_datagram(max_datagram)
    per_part = (max_datagram - DATAGRAM_OVERHEAD - _U16X2.size) * 8
    starts = range(0, max(len(held), 1), per_part)
    _check_response_parts(len(starts), "HAVE response")
    return [
        encode(
            Have(
                request_id=request_id,
                held=tuple(held[start : start + per_part]),
                first=start,
                part=index,
                parts=len(starts),
            ),
            max_datagram=max_datagram,
            auth=auth,
            now=now,
        )
        for index, start in enumerate(starts)
    ]


# --- decoding ------------------------------------------------------------------------------------


class _BodyError(Exception):
    """Internal: a body is malformed. decode() turns it into MessageDecodeError."""

    def __init__(self, reason: str, code: ErrorCode = ErrorCode.MALFORMED) -> None:
        super().__init__(reason)
        self.code = code


class _Head(NamedTuple):
    """Header fields a body decoder needs, and where the bulk starts (it ends with the data)."""

    request_id: int
    part: int
    parts: int
    bulk: int


# A body decoder gets (datagram, body start, body end, header fields).
_BodyDecoder: TypeAlias = Callable[[bytes, int, int, _Head], Message]


def _read_counts(data: bytes, start: int, end: int, counts: struct.Struct) -> tuple[Any, ...]:
    if end - start < counts.size:
        raise _BodyError(f"body of {end - start} bytes is too short for its counts")
    return counts.unpack_from(data, start)


def _expect_length(actual: int, expected: int) -> None:
    if actual != expected:
        raise _BodyError(f"body is {actual} bytes, its counts need {expected}")


# Slicing bytes costs ~100 ns per object; one precompiled Struct unpacks a run of digests (or
# page pairs) in C at a fraction of that. Runs of 64 digests, plus a tail Struct per remainder.
_DIGEST_RUN_LENGTH: Final = 64
_DIGEST_RUN: Final = struct.Struct(f"{DIGEST_SIZE}s" * _DIGEST_RUN_LENGTH)
_DIGEST_TAILS: Final = tuple(
    struct.Struct(f"{DIGEST_SIZE}s" * count) for count in range(_DIGEST_RUN_LENGTH)
)

_M = TypeVar("_M", GetPages, Has, Pages, PutPages, PutResult)


def _unchecked(cls: type[_M], **fields: object) -> _M:
    """Build a hot-path message without ``__post_init__``.

    Only for values the decoder already proved valid (digest and page lengths come from the
    Struct formats, counts from u16 fields, parts from decode()); the tests check that every
    decoded message passes its own validation.
    """
    msg = object.__new__(cls)
    for name, value in fields.items():
        object.__setattr__(msg, name, value)
    return msg


def put_result_decoded(
    request_id: int, results: tuple[tuple[PageDigest, PutStatus], ...], part: int, parts: int
) -> PutResult:
    """A PutResult from a decoder that made the checks :func:`decode` makes (the client's
    native burst decoder, :func:`tmdht.net.burst.decode_burst`): built without
    ``__post_init__``, as :func:`decode` builds it."""
    return _unchecked(PutResult, request_id=request_id, results=results, part=part, parts=parts)


def put_pages_decoded(
    request_id: int, pages: tuple[tuple[PageDigest, bytes], ...]
) -> PutPages:
    """A PutPages from a decoder that made the checks :func:`decode` makes (the node's native
    PUT_PAGES decoder, :func:`tmdht.net.burst.decode_request`): built without
    ``__post_init__``, as :func:`decode` builds it."""
    return _unchecked(PutPages, request_id=request_id, pages=pages)


def _split_digests(data: bytes, start: int, count: int) -> tuple[PageDigest, ...]:
    """``count`` consecutive digests from ``data[start:]`` (length already checked)."""
    if count < _DIGEST_RUN_LENGTH:  # one Struct call; responses and small requests
        return _DIGEST_TAILS[count].unpack_from(data, start)
    runs, tail = divmod(count, _DIGEST_RUN_LENGTH)
    tail_at = start + runs * _DIGEST_RUN.size
    digests = list(chain.from_iterable(_DIGEST_RUN.iter_unpack(memoryview(data)[start:tail_at])))
    digests += _DIGEST_TAILS[tail].unpack_from(data, tail_at)
    return tuple(digests)


def _pair_with_bulk(
    data: bytes, digests: Sequence[PageDigest], head: _Head
) -> tuple[tuple[PageDigest, bytes], ...]:
    """Pair ``digests`` with the pages of the bulk, which must hold exactly one page each."""
    bulk = head.bulk
    if len(data) - bulk != len(digests) * PAGE_SIZE:
        raise _BodyError(
            f"bulk is {len(data) - bulk} bytes, the body's {len(digests)} pages need "
            f"{len(digests) * PAGE_SIZE}"
        )
    starts = range(bulk, len(data), PAGE_SIZE)
    return tuple(zip(digests, [data[at : at + PAGE_SIZE] for at in starts], strict=True))


def _read_digest_list(data: bytes, start: int, end: int) -> tuple[PageDigest, ...]:
    (count,) = _read_counts(data, start, end, _U16)
    start += _U16.size
    _expect_length(end - start, count * DIGEST_SIZE)
    if not count:
        raise _BodyError("a request names at least one digest")
    return _split_digests(data, start, count)


def _decode_get_pages(data: bytes, start: int, end: int, head: _Head) -> Message:
    digests = _read_digest_list(data, start, end)
    return _unchecked(GetPages, request_id=head.request_id, digests=digests)


def _decode_has(data: bytes, start: int, end: int, head: _Head) -> Message:
    return _unchecked(Has, request_id=head.request_id, digests=_read_digest_list(data, start, end))


def _decode_pages(data: bytes, start: int, end: int, head: _Head) -> Message:
    n_pages, n_missing = _read_counts(data, start, end, _U16X2)
    start += _U16X2.size
    _expect_length(end - start, (n_pages + n_missing) * DIGEST_SIZE)
    digests = _split_digests(data, start, n_pages + n_missing)
    return _unchecked(
        Pages,
        request_id=head.request_id,
        pages=_pair_with_bulk(data, digests[:n_pages], head),
        missing=digests[n_pages:],
        part=head.part,
        parts=head.parts,
    )


def _decode_put_pages(data: bytes, start: int, end: int, head: _Head) -> Message:
    (count,) = _read_counts(data, start, end, _U16)
    start += _U16.size
    _expect_length(end - start, count * DIGEST_SIZE)
    if not count:
        raise _BodyError("PUT_PAGES carries at least one page")
    pages = _pair_with_bulk(data, _split_digests(data, start, count), head)
    return _unchecked(PutPages, request_id=head.request_id, pages=pages)


def _decode_put_result(data: bytes, start: int, end: int, head: _Head) -> Message:
    (count,) = _read_counts(data, start, end, _U16)
    start += _U16.size
    _expect_length(end - start, count * _RESULT_ENTRY)
    values = data[start + DIGEST_SIZE : end : _RESULT_ENTRY]  # the status byte of each entry
    statuses = [_PUT_STATUS_BY_VALUE.get(value) for value in values]
    if None in statuses:
        raise _BodyError(f"unknown put status {values[statuses.index(None)]}")
    digests = [data[at : at + DIGEST_SIZE] for at in range(start, end, _RESULT_ENTRY)]
    return _unchecked(  # lengths from the format, statuses from the table, parts from decode()
        PutResult,
        request_id=head.request_id,
        results=tuple(zip(cast(list[PageDigest], digests), statuses, strict=True)),
        part=head.part,
        parts=head.parts,
    )


# Byte value -> its 8 bits as bools, least significant first.
_BITS: Final = tuple(tuple(bool(value >> bit & 1) for bit in range(8)) for value in range(256))


def _decode_have(data: bytes, start: int, end: int, head: _Head) -> Message:
    first, count = _read_counts(data, start, end, _U16X2)
    start += _U16X2.size
    _expect_length(end - start, (count + 7) // 8)
    if count % 8 and data[end - 1] >> (count % 8):
        raise _BodyError("unused bits of a HAVE bitmap are not zero")
    held = tuple(chain.from_iterable([_BITS[value] for value in data[start:end]]))
    return Have(
        request_id=head.request_id, held=held[:count], first=first, part=head.part, parts=head.parts
    )


def _decode_node_info_request(data: bytes, start: int, end: int, head: _Head) -> Message:
    _expect_length(end - start, 0)
    return NodeInfoRequest(request_id=head.request_id)


def _read_short_string(data: bytes, at: int, end: int) -> tuple[bytes, int]:
    """A u8 length then that many bytes; returns (bytes, offset after)."""
    if at >= end:
        raise _BodyError("body ends before a string length")
    length = data[at]
    at += 1
    if end - at < length:
        raise _BodyError(f"string of {length} bytes runs past the body")
    return data[at : at + length], at + length


def _decode_node_info(data: bytes, start: int, end: int, head: _Head) -> Message:
    (node_id, data_port, kademlia_port, metrics_port, flags, pages, size, capacity) = _read_counts(
        data, start, end, _NODE_INFO
    )
    raw_host, at = _read_short_string(data, start + _NODE_INFO.size, end)
    raw_version, at = _read_short_string(data, at, end)
    _expect_length(end - start, at - start)
    return NodeInfo(
        request_id=head.request_id,
        node_id=node_id,
        data_address=(raw_host.decode("ascii"), data_port),
        kademlia_port=kademlia_port,
        metrics_port=metrics_port,
        version=raw_version.decode("utf-8"),
        pages_stored=pages,
        bytes_stored=size,
        capacity_bytes=capacity,
        flags=NodeFlags(flags),
    )


def _decode_error(data: bytes, start: int, end: int, head: _Head) -> Message:
    code_value, length = _read_counts(data, start, end, _ERROR_HEAD)
    start += _ERROR_HEAD.size
    _expect_length(end - start, length)
    code = _ERROR_CODE_BY_VALUE.get(code_value)
    if code is None:
        raise _BodyError(f"unknown error code {code_value}")
    return Error(request_id=head.request_id, code=code, message=data[start:end].decode("utf-8"))


def _decode_record_put(data: bytes, start: int, end: int, head: _Head) -> Message:
    key, entry_id, version, ttl_ms, length = _read_counts(data, start, end, _RECORD_PUT)
    _expect_length(end - start, _RECORD_PUT.size + length)
    value = data[start + _RECORD_PUT.size : end]
    return RecordPut(request_id=head.request_id, key=key, entry_id=entry_id, version=version,
                     ttl_ms=ttl_ms, value=value)


def _decode_record_put_result(data: bytes, start: int, end: int, head: _Head) -> Message:
    status, version = _read_counts(data, start, end, _RECORD_PUT_RESULT)
    _expect_length(end - start, _RECORD_PUT_RESULT.size)
    if status not in _RECORD_STATUS_BY_VALUE:
        raise _BodyError(f"unknown record status {status}")
    return RecordPutResult(request_id=head.request_id, status=_RECORD_STATUS_BY_VALUE[status],
                           version=version)


def _decode_record_get(data: bytes, start: int, end: int, head: _Head) -> Message:
    _expect_length(end - start, RECORD_KEY_SIZE)
    return RecordGet(request_id=head.request_id, key=data[start:end])


def _decode_records(data: bytes, start: int, end: int, head: _Head) -> Message:
    (count,) = _read_counts(data, start, end, _U16)
    if count > MAX_ENTRIES_PER_KEY:
        raise _BodyError(f"{count} entries, a key holds at most {MAX_ENTRIES_PER_KEY}")
    at = start + _U16.size
    entries = []
    for _ in range(count):
        entry_id, version, ttl_ms, length = _read_counts(data, at, end, _RECORD_ENTRY)
        at += _RECORD_ENTRY.size
        if end - at < length:
            raise _BodyError(f"a value of {length} bytes runs past the body")
        entries.append(RecordEntry(entry_id, version, ttl_ms, data[at : at + length]))
        at += length
    _expect_length(end - start, at - start)
    return Records(request_id=head.request_id, entries=tuple(entries))


def _decode_wave_get(data: bytes, start: int, end: int, head: _Head) -> Message:
    return WaveGet(request_id=head.request_id, keys=_read_digest_list(data, start, end))


def _decode_wave_pages(data: bytes, start: int, end: int, head: _Head) -> Message:
    pages = cast(Pages, _decode_pages(data, start, end, head))
    return WavePages(request_id=head.request_id, pages=pages.pages, missing=pages.missing,
                     part=head.part, parts=head.parts)


def _decode_wave_put(data: bytes, start: int, end: int, head: _Head) -> Message:
    (ttl,) = _read_counts(data, start, end, _U32)
    put = cast(PutPages, _decode_put_pages(data, start + _U32.size, end, head))
    return WavePut(request_id=head.request_id, ttl=ttl, pages=put.pages)


def _decode_wave_claim(data: bytes, start: int, end: int, head: _Head) -> Message:
    (claim_ms,) = _read_counts(data, start, end, _U32)
    if not claim_ms:
        raise _BodyError("a claim lasts at least 1 ms")
    keys = _read_digest_list(data, start + _U32.size, end)
    return WaveClaim(request_id=head.request_id, claim_ms=claim_ms, keys=keys)


def _decode_wave_claims(data: bytes, start: int, end: int, head: _Head) -> Message:
    (count,) = _read_counts(data, start, end, _U16)
    _expect_length(end - start, _U16.size + count)
    statuses = [_CLAIM_STATUS_BY_VALUE.get(value) for value in data[start + _U16.size : end]]
    if None in statuses:
        raise _BodyError(f"unknown claim status {data[start + _U16.size + statuses.index(None)]}")
    return WaveClaims(request_id=head.request_id,
                      statuses=cast(tuple[WaveClaimStatus, ...], tuple(statuses)))


def _read_range_head(data: bytes, start: int, end: int) -> tuple[int, int, int, int]:
    bucket_bits, group_bits, first, groups = _read_counts(data, start, end, _RANGE_HEAD)
    if not 1 <= bucket_bits <= MAX_BUCKET_BITS or group_bits > bucket_bits or not groups:
        raise _BodyError(f"bad range: {bucket_bits} bucket bits, {group_bits} group bits, "
                         f"{groups} groups")
    return bucket_bits, group_bits, first, groups


def _decode_range_hash(data: bytes, start: int, end: int, head: _Head) -> Message:
    bucket_bits, group_bits, first, groups = _read_range_head(data, start, end)
    bits = groups << group_bits
    _expect_length(end - start, _RANGE_HEAD.size + (bits + 7) // 8)
    return RangeHashQuery(request_id=head.request_id, bucket_bits=bucket_bits,
                          group_bits=group_bits, first=first, groups=groups,
                          mask=data[start + _RANGE_HEAD.size : end])


def _decode_range_hashes(data: bytes, start: int, end: int, head: _Head) -> Message:
    bucket_bits, group_bits, first, groups = _read_range_head(data, start, end)
    at = start + _RANGE_HEAD.size
    _expect_length(end - at, groups * _RANGE_ENTRY.size)
    entries = tuple(_RANGE_ENTRY.iter_unpack(data[at:end]))
    return RangeHashes(request_id=head.request_id, bucket_bits=bucket_bits,
                       group_bits=group_bits, first=first, entries=entries)


# Type byte -> (body decoder, single datagram: part must be 0 of 1, carries a bulk).
_DECODERS: Final[dict[int, tuple[_BodyDecoder, bool, bool]]] = {
    MessageType.GET_PAGES: (_decode_get_pages, True, False),
    MessageType.PAGES: (_decode_pages, False, True),
    MessageType.PUT_PAGES: (_decode_put_pages, True, True),
    MessageType.PUT_RESULT: (_decode_put_result, False, False),
    MessageType.HAS: (_decode_has, True, False),
    MessageType.HAVE: (_decode_have, False, False),
    MessageType.NODE_INFO_REQUEST: (_decode_node_info_request, True, False),
    MessageType.NODE_INFO: (_decode_node_info, True, False),
    MessageType.ERROR: (_decode_error, True, False),
    MessageType.RECORD_PUT: (_decode_record_put, True, False),
    MessageType.RECORD_PUT_RESULT: (_decode_record_put_result, True, False),
    MessageType.RECORD_GET: (_decode_record_get, True, False),
    MessageType.RECORDS: (_decode_records, True, False),
    MessageType.WAVE_GET: (_decode_wave_get, True, False),
    MessageType.WAVE_PAGES: (_decode_wave_pages, False, True),
    MessageType.WAVE_PUT: (_decode_wave_put, True, True),
    MessageType.WAVE_CLAIM: (_decode_wave_claim, True, False),
    MessageType.WAVE_CLAIMS: (_decode_wave_claims, True, False),
    MessageType.RANGE_HASH: (_decode_range_hash, True, False),
    MessageType.RANGE_HASHES: (_decode_range_hashes, True, False),
}


def decode(data: ByteView, *, max_datagram: int, auth: Authenticator, now: float) -> Message:
    """Verify and decode one datagram. Raises only DecodeError subclasses on bad bytes.

    ``now`` is wall-clock seconds (checked against the datagram's timestamp when the
    authenticator has a replay window). Order: size limit, authentication (no state is created
    for unauthentic bytes), header, body, bulk. ``max_datagram`` out of range is a UsageError.
    Pages of PAGES and PUT_PAGES are *not* verified against their digests here (the bulk is
    not under the tag): the receiver must check them before trusting them.
    """
    check_max_datagram(max_datagram)
    if not isinstance(data, bytes):
        data = bytes(data)
    size = len(data)
    if size > max_datagram:
        raise LimitExceededError(f"datagram of {size} bytes exceeds max_datagram {max_datagram}")
    if size < DATAGRAM_OVERHEAD:
        raise DecodeError(
            f"datagram of {size} bytes is shorter than the {DATAGRAM_OVERHEAD}-byte minimum"
        )
    # The body length is not authentic yet: it only says where the auth block ends. A forged
    # one moves the block (the tag then fails) or points past the data (auth.open refuses).
    (body_length,) = _U32.unpack_from(data, _BODY_LENGTH_AT)
    bulk = DATAGRAM_OVERHEAD + body_length
    end = len(auth.open(data, now, end=bulk))
    version, message_type, flags, request_id, part, parts, _ = _HEADER.unpack_from(data, 0)
    if version != PROTOCOL_VERSION:
        raise DecodeError(f"wire version {version}, this node speaks {PROTOCOL_VERSION}")
    try:
        if flags:
            raise _BodyError(f"reserved header flags 0x{flags:04x} are set")
        entry = _DECODERS.get(message_type)
        if entry is None:
            raise _BodyError(f"unknown message type {message_type}", ErrorCode.UNKNOWN_TYPE)
        decode_body, single, has_bulk = entry
        if part >= parts or (single and parts != 1):
            raise _BodyError(f"part {part} of {parts} is not valid for this message type")
        if not has_bulk and bulk != size:
            raise _BodyError(f"{size - bulk} bytes after the auth block of a type without bulk")
        return decode_body(data, HEADER_SIZE, end, _Head(request_id, part, parts, bulk))
    except _BodyError as exc:
        reason, code = str(exc), exc.code
    except (InvalidMessageError, ValueError) as exc:  # a field out of range, bad text
        reason, code = f"invalid message: {exc}", ErrorCode.MALFORMED
    raise MessageDecodeError(reason, request_id=request_id, message_type=message_type, code=code)
