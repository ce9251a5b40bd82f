"""The virtual network's tunnel format: every datagram between vnet agents (sans-IO).

This module owns the format: it turns :data:`Message` objects into sealed datagrams and back, and
does no IO. Time (for the auth timestamp) is a parameter.

Datagram layout, version 1 (big-endian; ``n`` is the body length)::

    | offset | size | field       | meaning                                                    |
    |--------|------|-------------|------------------------------------------------------------|
    | 0      | 1    | version     | 1                                                          |
    | 1      | 1    | type        | :class:`MessageType`; decoded through a table              |
    | 2      | 1    | security    | 0: authenticated (plaintext), 1: encrypted (AEAD)          |
    | 3      | 1    | reserved    | 0                                                          |
    | 4      | 8    | sender      | the sending agent's id (u64, random per agent process)     |
    | 12     | 2    | body length | n                                                          |
    | 14     | n    | body        | per type, below; ciphertext when encrypted                 |
    | 14+n   | 1    | key id      | the auth block of :mod:`tmdht.auth` (34 bytes) ...         |
    | 15+n   | 1    | auth flags  | 0 (bit 0 marks open mode, no key)                          |
    | 16+n   | 8    | timestamp   | sender wall clock, ms since the Unix epoch                 |
    | 24+n   | 8    | nonce       | unique per datagram of a sender (replay detection)         |
    | 32+n   | 16   | tag         | authenticated: keyed BLAKE3 of bytes 0..32+n (tmdht.auth); |
    |        |      |             | encrypted: the ChaCha20-Poly1305 tag                       |

Every datagram carries 48 bytes of overhead (:data:`DATAGRAM_OVERHEAD`).

**Authenticated** datagrams are sealed and opened by :class:`tmdht.auth.Authenticator` exactly as
cluster datagrams are, with keys derived from the cluster key for this use only
(:func:`tunnel_keys`), so no tunnel tag is ever valid on the store's data plane and vice versa.
**Encrypted** datagrams (between sites: the agent encrypts what crosses the WAN) use
ChaCha20-Poly1305 from the ``cryptography`` package: the key is derived per *sender* from the
tunnel key and the sender's id (BLAKE3 key derivation), so nonces need to be unique per sender
only; the 96-bit nonce is four zero bytes and the u64 nonce of the auth block, which the sender
draws from a counter started at random; the associated data are the header and the auth block's
first 18 bytes. Both kinds share one :class:`tmdht.auth.ReplayWindow` and one nonce counter.
Decoding verifies the block before it reads the body: unauthentic bytes create no state.

Bodies (``u8``/``u16``/``u32``/``u64``; a MAC is 6 bytes; a frame is an Ethernet frame without
FCS, 14..:data:`tmdht.ethernet.MAX_FRAME` bytes, preceded by its u16 length)::

    | type                | body                                                           |
    |---------------------|----------------------------------------------------------------|
    | 1 FRAME             | vnet u32, origin u64, seq u64, src version u64, fence u64,     |
    |                     | flags u8 (:class:`FrameFlags`), frame                          |
    | 2 HANDOVER_BEGIN    | handover u64, vnet u32, mac, version u64, flows u16,           |
    |                     | flows x (origin u64, seq u64)                                  |
    | 3 HANDOVER_FRAME    | handover u64, hseq u64 (>= 1), origin u64, seq u64, flags u8,  |
    |                     | frame                                                          |
    | 4 HANDOVER_ACK      | handover u64, acked u64, flags u8 (bit 0 RESUMED), version u64,|
    |                     | ranges u8, ranges x (first u64, last u64): items received      |
    |                     | beyond ``acked`` (selective acknowledgement)                   |
    | 5 PREPARE           | handover u64, vnet u32, mac                                    |
    | 6 PREPARE_REPLY     | handover u64, status u8 (:class:`PrepareStatus`), version u64  |
    | 7 LOCATION          | vnet u32, mac, agent u64, version u64, flags u8                |
    |                     | (:class:`LocationFlags`), port u16, host                       |
    | 8 HELLO             | vnet u32, flags u8 (bit 0 LEAVING), port u16, host, site       |
    | 9 ABORT             | handover u64                                                   |

``host`` and ``site`` are a u8 length and that many ASCII bytes (a host is an address literal or
a name, at most :data:`MAX_HOST_BYTES`; a site at most :data:`MAX_SITE_BYTES`). Every count and
length must match the body exactly; unknown flag bits are refused; every encoding is canonical.
Decoding raises only :class:`tmdht.errors.DecodeError` (and its subclasses
:class:`tmdht.auth.AuthenticationError`, :class:`tmdht.auth.ReplayError`).
"""

from __future__ import annotations

import itertools
import secrets
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import IntEnum, IntFlag
from typing import Any, Final, TypeAlias, TypeVar

from blake3 import blake3
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from tmdht.auth import (
    AUTH_OVERHEAD,
    TAG_SIZE,
    AuthenticationError,
    Authenticator,
    ClusterKey,
    KeyRing,
    ReplayWindow,
    keyring_from,
)
from tmdht.errors import DecodeError, LimitExceededError, UsageError
from tmdht.ethernet import MAC_SIZE, MAX_FRAME, MIN_FRAME

__all__ = [
    "DATAGRAM_OVERHEAD",
    "HEADER_SIZE",
    "MAX_DATAGRAM",
    "MAX_FLOWS",
    "MAX_HOST_BYTES",
    "MAX_SACK_RANGES",
    "MAX_SITE_BYTES",
    "PROTOCOL_VERSION",
    "Abort",
    "Envelope",
    "Frame",
    "FrameFlags",
    "HandoverAck",
    "HandoverBegin",
    "HandoverFrame",
    "Hello",
    "InvalidMessageError",
    "Location",
    "LocationFlags",
    "Message",
    "MessageType",
    "Prepare",
    "PrepareReply",
    "PrepareStatus",
    "Security",
    "TunnelCodec",
    "tunnel_keys",
]

PROTOCOL_VERSION: Final = 1
_HEADER: Final = struct.Struct(">BBBBQH")
HEADER_SIZE: Final = _HEADER.size
"""Bytes of the fixed header (14)."""
DATAGRAM_OVERHEAD: Final = HEADER_SIZE + AUTH_OVERHEAD
"""Header plus auth block (48)."""
MAX_DATAGRAM: Final = 65507
"""Largest datagram sent or accepted (UDP over IPv4)."""
MAX_FLOWS: Final = 256
"""Most (origin, seq) pairs in one HANDOVER_BEGIN."""
MAX_SACK_RANGES: Final = 16
"""Most ranges of received items in one HANDOVER_ACK."""
MAX_HOST_BYTES: Final = 64
MAX_SITE_BYTES: Final = 32
_U16_MAX: Final = 0xFFFF
_U32_MAX: Final = 0xFFFF_FFFF
_U64_MAX: Final = (1 << 64) - 1
_SECURITY_AUTHENTICATED: Final = 0
_SECURITY_ENCRYPTED: Final = 1
_TUNNEL_KEY_CONTEXT: Final = "tmdht 2025 vnet tunnel key v1"
_AEAD_KEY_CONTEXT: Final = "tmdht 2025 vnet tunnel aead per-sender key v1"
_AEAD_CACHE: Final = 4096
_BLOCK_HEAD: Final = struct.Struct(">BBQQ")  # the auth block without its tag (18 bytes)


class MessageType(IntEnum):
    """The type byte of a tunnel datagram."""

    FRAME = 1
    HANDOVER_BEGIN = 2
    HANDOVER_FRAME = 3
    HANDOVER_ACK = 4
    PREPARE = 5
    PREPARE_REPLY = 6
    LOCATION = 7
    HELLO = 8
    ABORT = 9


class FrameFlags(IntFlag):
    """How a frame travels."""

    FLOODED = 1
    """Sent to every agent of the network because the sender did not know where its
    destination is: only the agent hosting the destination delivers it."""
    FORWARDED = 2
    """Passed on by an agent that is not its origin (the destination moved away from it)."""


class LocationFlags(IntFlag):
    """What a LOCATION says."""

    GONE = 1
    """The MAC is nowhere (its port was removed); ``agent`` is the last agent that held it."""
    NOT_HERE = 2
    """The sender does not host the MAC: the receiver's information is stale, look it up."""


class PrepareStatus(IntEnum):
    """A source agent's answer to PREPARE."""

    ACCEPTED = 1
    """The port is here; frames will follow the VM to the sender of PREPARE."""
    UNKNOWN_PORT = 2
    """No port with that MAC in that network here."""


_HELLO_LEAVING: Final = 1
_ACK_RESUMED: Final = 1


class Security(IntEnum):
    """How a datagram was protected (what :meth:`TunnelCodec.decode` found)."""

    AUTHENTICATED = _SECURITY_AUTHENTICATED
    ENCRYPTED = _SECURITY_ENCRYPTED


class InvalidMessageError(UsageError):
    """A message field is out of range (raised by the message's constructor)."""


def _u(value: int, bits: int, what: str) -> None:
    if not 0 <= value < 1 << bits:
        raise InvalidMessageError(f"{what} {value!r} is not a u{bits}")


def _check_mac(address: bytes) -> None:
    if not isinstance(address, bytes) or len(address) != MAC_SIZE:
        raise InvalidMessageError(f"a MAC address is {MAC_SIZE} bytes")


def _check_frame(frame: bytes) -> None:
    if not isinstance(frame, bytes) or not MIN_FRAME <= len(frame) <= MAX_FRAME:
        raise InvalidMessageError(f"a frame is {MIN_FRAME}..{MAX_FRAME} bytes")


_KNOWN_FRAME_FLAGS: Final = int(FrameFlags.FLOODED | FrameFlags.FORWARDED)


def _check_frame_flags(flags: int) -> None:
    if not isinstance(flags, int) or flags & ~_KNOWN_FRAME_FLAGS or flags < 0:
        raise InvalidMessageError(f"unknown frame flags {flags!r}")


_M = TypeVar("_M")


def _unchecked(cls: type[_M], **fields: object) -> _M:
    """A message built without ``__post_init__``, for values already proven valid."""
    msg = object.__new__(cls)
    for name, value in fields.items():
        object.__setattr__(msg, name, value)
    return msg


def _check_text(text: str, limit: int, what: str) -> None:
    try:
        raw = text.encode("ascii")
    except UnicodeEncodeError:
        raise InvalidMessageError(f"{what} {text!r} is not ASCII") from None
    if len(raw) > limit:
        raise InvalidMessageError(f"{what} is {len(raw)} bytes, the limit is {limit}")


@dataclass(frozen=True, slots=True, kw_only=True)
class Frame:
    """An Ethernet frame travelling to the agent that hosts its destination (or to every agent
    of the network, for broadcast, multicast and unknown unicast)."""

    vnet: int
    """The virtual network (u32)."""
    origin: int
    """The agent the frame entered the virtual network at (u64)."""
    seq: int
    """The origin's sequence number of the frame (u64, increasing across everything the origin
    sends): receivers deliver a flow's frames in this order, each once."""
    src_version: int
    """The location version of the frame's source MAC at the origin (0: unknown)."""
    fence: int
    """0, or the last seq the origin sent to this destination before its location changed: the
    receiver delivers this frame only after that one (or a timeout)."""
    flags: int
    """:class:`FrameFlags` bits (a plain int: the forwarding path tests them per frame)."""
    frame: bytes
    """The Ethernet frame."""

    def __post_init__(self) -> None:
        _u(self.vnet, 32, "vnet")
        for name in ("origin", "seq", "src_version", "fence"):
            _u(getattr(self, name), 64, name)
        _check_frame_flags(self.flags)
        _check_frame(self.frame)

    @classmethod
    def trusted(cls, vnet: int, origin: int, seq: int, src_version: int, fence: int, flags: int,
                frame: bytes) -> Frame:
        """A FRAME built without validation, for the forwarding path: every field comes from a
        validated port or message (a bad one makes :meth:`TunnelCodec.encode` fail)."""
        return _unchecked(cls, vnet=vnet, origin=origin, seq=seq, src_version=src_version,
                          fence=fence, flags=flags, frame=frame)


@dataclass(frozen=True, slots=True, kw_only=True)
class HandoverBegin:
    """Source -> destination: a migrating VM's frames follow (item 0 of the handover)."""

    handover: int
    """The handover id (u64, chosen by the destination in PREPARE)."""
    vnet: int
    mac: bytes
    version: int
    """The MAC's location version at the source (the destination claims a higher one)."""
    flows: tuple[tuple[int, int], ...]
    """(origin, seq) of the last frame of each origin the VM is known to have received: the
    destination delivers later frames only."""

    def __post_init__(self) -> None:
        _u(self.handover, 64, "handover")
        _u(self.vnet, 32, "vnet")
        _check_mac(self.mac)
        _u(self.version, 64, "version")
        object.__setattr__(self, "flows", tuple(tuple(f) for f in self.flows))
        if len(self.flows) > MAX_FLOWS:
            raise InvalidMessageError(f"{len(self.flows)} flows, the limit is {MAX_FLOWS}")
        for origin, seq in self.flows:
            _u(origin, 64, "flow origin")
            _u(seq, 64, "flow seq")


@dataclass(frozen=True, slots=True, kw_only=True)
class HandoverFrame:
    """Source -> destination: one frame of a handover, number ``hseq`` (1, 2, ...)."""

    handover: int
    hseq: int
    """Position in the handover (>= 1), so the destination delivers in order and acknowledges."""
    origin: int
    seq: int
    flags: int
    """:class:`FrameFlags` bits."""
    frame: bytes

    def __post_init__(self) -> None:
        _u(self.handover, 64, "handover")
        _u(self.hseq, 64, "hseq")
        if self.hseq < 1:
            raise InvalidMessageError("a handover frame's hseq is >= 1 (0 is the BEGIN)")
        _u(self.origin, 64, "origin")
        _u(self.seq, 64, "seq")
        _check_frame_flags(self.flags)
        _check_frame(self.frame)


@dataclass(frozen=True, slots=True, kw_only=True)
class HandoverAck:
    """Destination -> source: items ``0..acked`` arrived; ``resumed``: the VM runs here now
    (the source may forget what it kept to re-deliver if the migration had failed)."""

    handover: int
    acked: int
    resumed: bool
    version: int
    """The location version the destination claimed (0 until resumed)."""
    ranges: tuple[tuple[int, int], ...] = ()
    """(first, last) hseq ranges received beyond ``acked``, ascending, disjoint, not touching
    ``acked``: the source does not resend them."""

    def __post_init__(self) -> None:
        _u(self.handover, 64, "handover")
        _u(self.acked, 64, "acked")
        _u(self.version, 64, "version")
        if not isinstance(self.resumed, bool):
            raise InvalidMessageError("resumed is a bool")
        object.__setattr__(self, "ranges", tuple(tuple(r) for r in self.ranges))
        if len(self.ranges) > MAX_SACK_RANGES:
            raise InvalidMessageError(f"at most {MAX_SACK_RANGES} ranges")
        low = self.acked + 1
        for first, last in self.ranges:
            _u(first, 64, "range first")
            _u(last, 64, "range last")
            if not low < first <= last:
                raise InvalidMessageError("ranges must ascend beyond acked with gaps between")
            low = last + 1


@dataclass(frozen=True, slots=True, kw_only=True)
class Prepare:
    """Destination -> source: a VM with this MAC is about to arrive here; send its frames."""

    handover: int
    vnet: int
    mac: bytes

    def __post_init__(self) -> None:
        _u(self.handover, 64, "handover")
        _u(self.vnet, 32, "vnet")
        _check_mac(self.mac)


@dataclass(frozen=True, slots=True, kw_only=True)
class PrepareReply:
    """Source -> destination: the answer to PREPARE."""

    handover: int
    status: PrepareStatus
    version: int

    def __post_init__(self) -> None:
        _u(self.handover, 64, "handover")
        if self.status not in _PREPARE_STATUS:
            raise InvalidMessageError(f"unknown prepare status {self.status!r}")
        _u(self.version, 64, "version")


@dataclass(frozen=True, slots=True, kw_only=True)
class Location:
    """Where a MAC is: agent ``agent`` (reachable at host:port) since location ``version``."""

    vnet: int
    mac: bytes
    agent: int
    version: int
    flags: LocationFlags
    host: str
    port: int

    def __post_init__(self) -> None:
        _u(self.vnet, 32, "vnet")
        _check_mac(self.mac)
        _u(self.agent, 64, "agent")
        _u(self.version, 64, "version")
        _u(int(self.flags), 8, "flags")
        if self.flags & ~(LocationFlags.GONE | LocationFlags.NOT_HERE):
            raise InvalidMessageError(f"unknown location flags {int(self.flags):#x}")
        _check_text(self.host, MAX_HOST_BYTES, "host")
        _u(self.port, 16, "port")


@dataclass(frozen=True, slots=True, kw_only=True)
class Hello:
    """An agent joins (or, ``leaving``, leaves) a virtual network: flood to it from now on."""

    vnet: int
    leaving: bool
    host: str
    port: int
    site: str

    def __post_init__(self) -> None:
        _u(self.vnet, 32, "vnet")
        if not isinstance(self.leaving, bool):
            raise InvalidMessageError("leaving is a bool")
        _check_text(self.host, MAX_HOST_BYTES, "host")
        _u(self.port, 16, "port")
        _check_text(self.site, MAX_SITE_BYTES, "site")


@dataclass(frozen=True, slots=True, kw_only=True)
class Abort:
    """Source -> destination: the VM resumed at the source; drop what the handover brought."""

    handover: int

    def __post_init__(self) -> None:
        _u(self.handover, 64, "handover")


Message: TypeAlias = (
    Frame | HandoverBegin | HandoverFrame | HandoverAck | Prepare | PrepareReply | Location
    | Hello | Abort
)
"""Any tunnel message."""

_PREPARE_STATUS: Final[dict[int, PrepareStatus]] = {int(s): s for s in PrepareStatus}


@dataclass(frozen=True, slots=True)
class Envelope:
    """A decoded datagram: who sent it, how it was protected, what it says."""

    sender: int
    security: Security
    message: Message


# --- bodies ----------------------------------------------------------------------------------

_FRAME_HEAD: Final = struct.Struct(">IQQQQBH")
_BEGIN_HEAD: Final = struct.Struct(f">QI{MAC_SIZE}sQH")
_FLOW: Final = struct.Struct(">QQ")
_HFRAME_HEAD: Final = struct.Struct(">QQQQBH")
_ACK: Final = struct.Struct(">QQBQB")
_RANGE: Final = struct.Struct(">QQ")
_PREPARE: Final = struct.Struct(f">QI{MAC_SIZE}s")
_PREPARE_REPLY: Final = struct.Struct(">QBQ")
_LOCATION_HEAD: Final = struct.Struct(f">I{MAC_SIZE}sQQBH")
_HELLO_HEAD: Final = struct.Struct(">IBH")
_ABORT: Final = struct.Struct(">Q")


def _short(text: str) -> bytes:
    raw = text.encode("ascii")
    return bytes((len(raw),)) + raw


def _encode_frame(m: Frame) -> bytes:
    return _FRAME_HEAD.pack(m.vnet, m.origin, m.seq, m.src_version, m.fence, m.flags,
                            len(m.frame)) + m.frame


def _encode_begin(m: HandoverBegin) -> bytes:
    head = _BEGIN_HEAD.pack(m.handover, m.vnet, m.mac, m.version, len(m.flows))
    return head + b"".join(_FLOW.pack(o, s) for o, s in m.flows)


def _encode_hframe(m: HandoverFrame) -> bytes:
    return _HFRAME_HEAD.pack(m.handover, m.hseq, m.origin, m.seq, m.flags,
                             len(m.frame)) + m.frame


def _encode_ack(m: HandoverAck) -> bytes:
    head = _ACK.pack(m.handover, m.acked, _ACK_RESUMED if m.resumed else 0, m.version,
                     len(m.ranges))
    return head + b"".join(_RANGE.pack(first, last) for first, last in m.ranges)


def _encode_prepare(m: Prepare) -> bytes:
    return _PREPARE.pack(m.handover, m.vnet, m.mac)


def _encode_prepare_reply(m: PrepareReply) -> bytes:
    return _PREPARE_REPLY.pack(m.handover, m.status, m.version)


def _encode_location(m: Location) -> bytes:
    return _LOCATION_HEAD.pack(m.vnet, m.mac, m.agent, m.version, m.flags, m.port) + _short(
        m.host)


def _encode_hello(m: Hello) -> bytes:
    flags = _HELLO_LEAVING if m.leaving else 0
    return _HELLO_HEAD.pack(m.vnet, flags, m.port) + _short(m.host) + _short(m.site)


def _encode_abort(m: Abort) -> bytes:
    return _ABORT.pack(m.handover)


_ENCODERS: Final[dict[type, tuple[MessageType, Callable[[Any], bytes]]]] = {
    Frame: (MessageType.FRAME, _encode_frame),
    HandoverBegin: (MessageType.HANDOVER_BEGIN, _encode_begin),
    HandoverFrame: (MessageType.HANDOVER_FRAME, _encode_hframe),
    HandoverAck: (MessageType.HANDOVER_ACK, _encode_ack),
    Prepare: (MessageType.PREPARE, _encode_prepare),
    PrepareReply: (MessageType.PREPARE_REPLY, _encode_prepare_reply),
    Location: (MessageType.LOCATION, _encode_location),
    Hello: (MessageType.HELLO, _encode_hello),
    Abort: (MessageType.ABORT, _encode_abort),
}


class _BodyError(Exception):
    """Internal: a body is malformed; decode() turns it into DecodeError."""


def _fixed(body: bytes, layout: struct.Struct, *, exact: bool) -> tuple[Any, ...]:
    if len(body) < layout.size or (exact and len(body) != layout.size):
        raise _BodyError(f"body of {len(body)} bytes, the type needs "
                         f"{'exactly' if exact else 'at least'} {layout.size}")
    return layout.unpack_from(body, 0)


def _tail_frame(body: bytes, at: int, length: int) -> bytes:
    if len(body) - at != length:
        raise _BodyError(f"frame length {length} does not match the {len(body) - at} bytes left")
    if not MIN_FRAME <= length <= MAX_FRAME:
        raise _BodyError(f"a frame is {MIN_FRAME}..{MAX_FRAME} bytes, got {length}")
    return body[at:]


def _read_short(body: bytes, at: int, what: str) -> tuple[str, int]:
    if at >= len(body):
        raise _BodyError(f"body ends before the {what} length")
    length = body[at]
    end = at + 1 + length
    if end > len(body):
        raise _BodyError(f"{what} of {length} bytes runs past the body")
    try:
        return body[at + 1 : end].decode("ascii"), end
    except UnicodeDecodeError:
        raise _BodyError(f"{what} is not ASCII") from None


def _decode_frame(body: bytes) -> Message:
    vnet, origin, seq, src_version, fence, flags, length = _fixed(body, _FRAME_HEAD, exact=False)
    frame = _tail_frame(body, _FRAME_HEAD.size, length)
    if flags & ~_KNOWN_FRAME_FLAGS:
        raise _BodyError(f"unknown frame flags {flags:#x}")
    # Every field was just range-checked by the Struct formats and the checks above.
    return _unchecked(Frame, vnet=vnet, origin=origin, seq=seq, src_version=src_version,
                      fence=fence, flags=flags, frame=frame)


def _decode_begin(body: bytes) -> Message:
    handover, vnet, address, version, count = _fixed(body, _BEGIN_HEAD, exact=False)
    if count > MAX_FLOWS:
        raise _BodyError(f"{count} flows, the limit is {MAX_FLOWS}")
    if len(body) != _BEGIN_HEAD.size + count * _FLOW.size:
        raise _BodyError(f"body of {len(body)} bytes does not hold {count} flows exactly")
    flows = tuple(_FLOW.iter_unpack(body[_BEGIN_HEAD.size :]))
    return HandoverBegin(handover=handover, vnet=vnet, mac=address, version=version, flows=flows)


def _decode_hframe(body: bytes) -> Message:
    handover, hseq, origin, seq, flags, length = _fixed(body, _HFRAME_HEAD, exact=False)
    frame = _tail_frame(body, _HFRAME_HEAD.size, length)
    if flags & ~_KNOWN_FRAME_FLAGS:
        raise _BodyError(f"unknown frame flags {flags:#x}")
    if hseq < 1:
        raise _BodyError("a handover frame's hseq is >= 1")
    return _unchecked(HandoverFrame, handover=handover, hseq=hseq, origin=origin, seq=seq,
                      flags=flags, frame=frame)


def _decode_ack(body: bytes) -> Message:
    handover, acked, flags, version, count = _fixed(body, _ACK, exact=False)
    if flags & ~_ACK_RESUMED:
        raise _BodyError(f"unknown ack flags {flags:#x}")
    if count > MAX_SACK_RANGES:
        raise _BodyError(f"{count} ranges, the limit is {MAX_SACK_RANGES}")
    if len(body) != _ACK.size + count * _RANGE.size:
        raise _BodyError(f"body of {len(body)} bytes does not hold {count} ranges exactly")
    ranges = tuple(_RANGE.iter_unpack(body[_ACK.size :]))
    return HandoverAck(handover=handover, acked=acked, resumed=bool(flags), version=version,
                       ranges=ranges)


def _decode_prepare(body: bytes) -> Message:
    handover, vnet, address = _fixed(body, _PREPARE, exact=True)
    return Prepare(handover=handover, vnet=vnet, mac=address)


def _decode_prepare_reply(body: bytes) -> Message:
    handover, status, version = _fixed(body, _PREPARE_REPLY, exact=True)
    if status not in _PREPARE_STATUS:
        raise _BodyError(f"unknown prepare status {status}")
    return PrepareReply(handover=handover, status=_PREPARE_STATUS[status], version=version)


def _decode_location(body: bytes) -> Message:
    vnet, address, agent, version, flags, port = _fixed(body, _LOCATION_HEAD, exact=False)
    host, end = _read_short(body, _LOCATION_HEAD.size, "host")
    if end != len(body):
        raise _BodyError(f"{len(body) - end} bytes after the host")
    return Location(vnet=vnet, mac=address, agent=agent, version=version,
                    flags=LocationFlags(flags), host=host, port=port)


def _decode_hello(body: bytes) -> Message:
    vnet, flags, port = _fixed(body, _HELLO_HEAD, exact=False)
    if flags & ~_HELLO_LEAVING:
        raise _BodyError(f"unknown hello flags {flags:#x}")
    host, at = _read_short(body, _HELLO_HEAD.size, "host")
    site, end = _read_short(body, at, "site")
    if end != len(body):
        raise _BodyError(f"{len(body) - end} bytes after the site")
    return Hello(vnet=vnet, leaving=bool(flags), host=host, port=port, site=site)


def _decode_abort(body: bytes) -> Message:
    (handover,) = _fixed(body, _ABORT, exact=True)
    return Abort(handover=handover)


_DECODERS: Final[dict[int, Callable[[bytes], Message]]] = {
    MessageType.FRAME: _decode_frame,
    MessageType.HANDOVER_BEGIN: _decode_begin,
    MessageType.HANDOVER_FRAME: _decode_hframe,
    MessageType.HANDOVER_ACK: _decode_ack,
    MessageType.PREPARE: _decode_prepare,
    MessageType.PREPARE_REPLY: _decode_prepare_reply,
    MessageType.LOCATION: _decode_location,
    MessageType.HELLO: _decode_hello,
    MessageType.ABORT: _decode_abort,
}


# --- security --------------------------------------------------------------------------------


def tunnel_keys(cluster_keys: Sequence[ClusterKey]) -> list[ClusterKey]:
    """The tunnel's keys: each cluster key's secret run through BLAKE3 key derivation with a
    context of the tunnel's own (same key ids). Tags and ciphertexts made with them are never
    valid in the store cluster's protocols, and the reverse."""
    return [ClusterKey(k.key_id, blake3(k.secret, derive_key_context=_TUNNEL_KEY_CONTEXT).digest())
            for k in cluster_keys]


def _nonce_counter() -> Callable[[], int]:
    counter = itertools.count(secrets.randbits(64))
    return lambda: next(counter) & _U64_MAX


class TunnelCodec:
    """Encodes and decodes one agent's tunnel datagrams (its key ring, replay window, nonces).

    ``keys`` are the *cluster* keys (from the key file; the first one sends), or None for open
    mode (local development: no tags, no encryption). Use one codec per agent socket.
    """

    def __init__(self, agent_id: int, keys: Sequence[ClusterKey] | None, *,
                 replay: ReplayWindow | None = None) -> None:
        _u(agent_id, 64, "agent id")
        if agent_id == 0:
            raise UsageError("agent id 0 is reserved")
        self.agent_id = agent_id
        self._nonce = _nonce_counter()
        if keys is None:
            self._keyring: KeyRing | None = None
            self.auth = Authenticator(keyring=None, replay=replay or ReplayWindow(),
                                      nonce_source=self._nonce)
        else:
            self._keyring = keyring_from(tunnel_keys(keys))
            self.auth = Authenticator(keyring=self._keyring, replay=replay or ReplayWindow(),
                                      nonce_source=self._nonce)
        self._aead: dict[tuple[int, int], ChaCha20Poly1305] = {}

    def replace_keys(self, keys: Sequence[ClusterKey]) -> None:
        """Send with ``keys[0]`` and accept exactly ``keys`` from now on (a re-read cluster key
        file). UsageError, changing nothing, in open mode or for an empty list."""
        if self._keyring is None:
            raise UsageError("an open-mode tunnel codec cannot take keys")
        self._keyring.replace(tunnel_keys(keys))
        self._aead.clear()  # ciphers are cached by key id, and a re-read file may reuse one

    @property
    def can_encrypt(self) -> bool:
        """False in open mode (no key to encrypt with)."""
        return self._keyring is not None

    def _cipher(self, key: ClusterKey, sender: int) -> ChaCha20Poly1305:
        cache_key = (key.key_id, sender)
        cipher = self._aead.get(cache_key)
        if cipher is None:
            if len(self._aead) >= _AEAD_CACHE:
                self._aead.pop(next(iter(self._aead)))
            material = key.secret + sender.to_bytes(8, "big")
            derived = blake3(material, derive_key_context=_AEAD_KEY_CONTEXT).digest()
            cipher = self._aead[cache_key] = ChaCha20Poly1305(derived)
        return cipher

    def encode(self, message: Message, *, now: float, encrypt: bool = False) -> bytes:
        """One sealed datagram (encrypted if ``encrypt``). Raises UsageError on bad input."""
        entry = _ENCODERS.get(type(message))
        if entry is None:
            raise UsageError(f"not a tunnel message: {type(message).__name__}")
        message_type, encode_body = entry
        body = encode_body(message)
        if len(body) > _U16_MAX or DATAGRAM_OVERHEAD + len(body) > MAX_DATAGRAM:
            raise InvalidMessageError(f"a {message_type.name} body of {len(body)} bytes is too big")
        if not encrypt:
            header = _HEADER.pack(PROTOCOL_VERSION, message_type, _SECURITY_AUTHENTICATED, 0,
                                  self.agent_id, len(body))
            return self.auth.seal(header + body, now)
        if self._keyring is None:
            raise UsageError("cannot encrypt in open mode (no cluster key)")
        timestamp_ms = int(now * 1000)
        if not 0 <= timestamp_ms <= _U64_MAX:
            raise UsageError(f"now must be seconds since the Unix epoch, got {now}")
        key = self._keyring.current
        nonce = self._nonce()
        header = _HEADER.pack(PROTOCOL_VERSION, message_type, _SECURITY_ENCRYPTED, 0,
                              self.agent_id, len(body))
        block = _BLOCK_HEAD.pack(key.key_id, 0, timestamp_ms, nonce)
        sealed = self._cipher(key, self.agent_id).encrypt(
            bytes(4) + nonce.to_bytes(8, "big"), body, header + block)
        return b"".join((header, sealed[:-TAG_SIZE], block, sealed[-TAG_SIZE:]))

    def decode(self, datagram: bytes, *, now: float) -> Envelope:
        """Verify (and decrypt) one datagram and decode it. Raises only DecodeError."""
        size = len(datagram)
        if size > MAX_DATAGRAM:
            raise LimitExceededError(f"datagram of {size} bytes exceeds {MAX_DATAGRAM}")
        if size < DATAGRAM_OVERHEAD:
            raise DecodeError(f"datagram of {size} bytes is shorter than {DATAGRAM_OVERHEAD}")
        version, message_type, security, reserved, sender, length = _HEADER.unpack_from(
            datagram, 0)
        if HEADER_SIZE + length + AUTH_OVERHEAD != size:
            raise DecodeError(f"body length {length} does not match a {size}-byte datagram")
        if security == _SECURITY_AUTHENTICATED:
            payload = self.auth.open(datagram, now)
            body = bytes(payload[HEADER_SIZE:])
        elif security == _SECURITY_ENCRYPTED:
            body = self._decrypt(datagram, sender, length, now)
        else:
            raise AuthenticationError(f"unknown security mode {security}")
        if version != PROTOCOL_VERSION:
            raise DecodeError(f"tunnel version {version}, this agent speaks {PROTOCOL_VERSION}")
        if reserved:
            raise DecodeError(f"reserved header byte is {reserved:#x}")
        if sender == 0:
            raise DecodeError("sender id 0 is reserved")
        decoder = _DECODERS.get(message_type)
        if decoder is None:
            raise DecodeError(f"unknown message type {message_type}")
        try:
            message = decoder(body)
        except _BodyError as exc:
            raise DecodeError(f"{MessageType(message_type).name}: {exc}") from None
        except (InvalidMessageError, ValueError) as exc:
            raise DecodeError(f"{MessageType(message_type).name}: invalid: {exc}") from None
        return Envelope(sender, Security(security), message)

    def _decrypt(self, datagram: bytes, sender: int, length: int, now: float) -> bytes:
        if self._keyring is None:
            raise AuthenticationError("encrypted datagram refused: this agent runs in open mode")
        block_at = HEADER_SIZE + length
        key_id, flags, timestamp_ms, nonce = _BLOCK_HEAD.unpack_from(datagram, block_at)
        if flags:
            raise AuthenticationError(f"unknown auth flags {flags:#x} on an encrypted datagram")
        key = self._keyring.key_for(key_id, now)
        if key is None:
            raise AuthenticationError(f"unknown or expired key id {key_id}")
        tag_at = block_at + _BLOCK_HEAD.size
        aad = datagram[:HEADER_SIZE] + datagram[block_at:tag_at]
        sealed = datagram[HEADER_SIZE:block_at] + datagram[tag_at:]
        try:
            body = self._cipher(key, sender).decrypt(bytes(4) + nonce.to_bytes(8, "big"),
                                                     sealed, aad)
        except InvalidTag:
            raise AuthenticationError(f"bad AEAD tag (key id {key_id})") from None
        replay = self.auth.replay
        if replay is not None:
            replay.check(key_id, nonce, timestamp_ms, now)
        return body
