"""The virtual network's MAC directory as records in the store cluster (sans-IO).

The directory lives in the store nodes' soft-state records (:mod:`tmdht.records`, carried by
RECORD_PUT/RECORD_GET of :mod:`tmdht.wire`), placed like pages on the R nodes closest to each
record's key. Two kinds of records, each a key derivation and a value format owned here:

- **Location** of a MAC in a network: key ``BLAKE3("tmdht vnet location" || vnet u32 || mac)``,
  one entry (id 0) whose *version* is the MAC's location version (it grows by one each time the
  VM moves; the store keeps the highest) and whose value names the agent::

      | 1 format (1) | 8 agent id | 2 tunnel port | 1 flags (bit 0 GONE) | 1 n | n host |

- **Members** of a network (the agents that host its ports, to flood to): key
  ``BLAKE3("tmdht vnet network" || vnet u32)``, one entry per agent (entry id = agent id)::

      | 1 format (1) | 2 tunnel port | 1 n | n host | 1 m | m site |

Both are renewed by their writers within their lease; a crashed agent's entries expire.
Decoding raises only :class:`tmdht.errors.DecodeError`.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import Final

from blake3 import blake3

from tmdht.errors import DecodeError, UsageError
from tmdht.tunnel import MAX_HOST_BYTES, MAX_SITE_BYTES
from tmdht.vswitch import LocationRecord, MemberRecord

__all__ = [
    "LOCATION_ENTRY",
    "decode_location",
    "decode_member",
    "encode_location",
    "encode_member",
    "location_key",
    "network_key",
    "newest_location",
]

LOCATION_ENTRY: Final = 0
"""The entry id of a location record (one entry per MAC key)."""
_FORMAT: Final = 1
_GONE: Final = 1
_LOCATION_HEAD: Final = struct.Struct(">BQHB")
_MEMBER_HEAD: Final = struct.Struct(">BH")
_VNET: Final = struct.Struct(">I")


def location_key(vnet: int, mac: bytes) -> bytes:
    """The record key of a MAC's location in ``vnet``."""
    if len(mac) != 6:
        raise UsageError("a MAC is 6 bytes")
    return blake3(b"tmdht vnet location\0" + _VNET.pack(vnet) + mac).digest()


def network_key(vnet: int) -> bytes:
    """The record key of ``vnet``'s member list."""
    return blake3(b"tmdht vnet network\0" + _VNET.pack(vnet)).digest()


def _short(text: str, limit: int, what: str) -> bytes:
    raw = text.encode("ascii")
    if len(raw) > limit:
        raise UsageError(f"{what} is longer than {limit} bytes")
    return bytes((len(raw),)) + raw


def _read_short(value: bytes, at: int, limit: int, what: str) -> tuple[str, int]:
    if at >= len(value):
        raise DecodeError(f"record ends before the {what}")
    length = value[at]
    end = at + 1 + length
    if length > limit or end > len(value):
        raise DecodeError(f"bad {what} length {length}")
    try:
        return value[at + 1 : end].decode("ascii"), end
    except UnicodeDecodeError:
        raise DecodeError(f"{what} is not ASCII") from None


def encode_location(agent: int, host: str, port: int, *, gone: bool = False) -> bytes:
    """The value of a location entry."""
    head = _LOCATION_HEAD.pack(_FORMAT, agent, port, _GONE if gone else 0)
    return head + _short(host, MAX_HOST_BYTES, "host")


def decode_location(value: bytes, version: int) -> LocationRecord:
    """A location entry's value (and its version) as a :class:`LocationRecord`."""
    if len(value) < _LOCATION_HEAD.size:
        raise DecodeError("location record too short")
    fmt, agent, port, flags = _LOCATION_HEAD.unpack_from(value, 0)
    if fmt != _FORMAT or flags & ~_GONE or agent == 0:
        raise DecodeError("not a location record of a known format")
    host, end = _read_short(value, _LOCATION_HEAD.size, MAX_HOST_BYTES, "host")
    if end != len(value):
        raise DecodeError("bytes after a location record")
    return LocationRecord(agent, host, port, version, bool(flags & _GONE))


def encode_member(host: str, port: int, site: str) -> bytes:
    """The value of a member entry."""
    return (_MEMBER_HEAD.pack(_FORMAT, port) + _short(host, MAX_HOST_BYTES, "host")
            + _short(site, MAX_SITE_BYTES, "site"))


def decode_member(agent: int, value: bytes) -> MemberRecord:
    """A member entry (its entry id is the agent id) as a :class:`MemberRecord`."""
    if len(value) < _MEMBER_HEAD.size:
        raise DecodeError("member record too short")
    fmt, port = _MEMBER_HEAD.unpack_from(value, 0)
    if fmt != _FORMAT or agent == 0:
        raise DecodeError("not a member record of a known format")
    host, at = _read_short(value, _MEMBER_HEAD.size, MAX_HOST_BYTES, "host")
    site, end = _read_short(value, at, MAX_SITE_BYTES, "site")
    if end != len(value):
        raise DecodeError("bytes after a member record")
    return MemberRecord(agent, host, port, site)


def newest_location(answers: Iterable[tuple[int, bytes]]) -> LocationRecord | None:
    """The newest decodable location among (version, value) answers of several replicas
    (equal versions: the higher agent id, as :class:`tmdht.fdb.ForwardingTable` decides)."""
    best: LocationRecord | None = None
    for version, value in answers:
        try:
            record = decode_location(value, version)
        except DecodeError:
            continue
        if best is None or (record.version, record.agent) > (best.version, best.agent):
            best = record
    return best
