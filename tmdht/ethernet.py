"""Ethernet frames as the virtual network sees them (sans-IO): addresses, headers, announcements.

A frame here is what a VM's NIC sends and receives: destination MAC, source MAC, EtherType (or a
VLAN tag), payload; no preamble and no FCS, as QEMU's ``-netdev stream``/``dgram`` carry them.
The virtual network reads only the two addresses and, for announcements, builds RARP and
gratuitous ARP frames the way QEMU's own ``announce-self`` does.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Final, NewType

from tmdht.errors import DecodeError, UsageError

__all__ = [
    "BROADCAST",
    "ETH_HEADER_SIZE",
    "MAC_SIZE",
    "MAX_FRAME",
    "MIN_FRAME",
    "MacAddress",
    "format_mac",
    "frame_addresses",
    "gratuitous_arp",
    "is_group",
    "mac",
    "parse_mac",
    "rarp_announce",
    "sender_ipv4",
]

MacAddress = NewType("MacAddress", bytes)
"""Six bytes, as on the wire."""

MAC_SIZE: Final = 6
ETH_HEADER_SIZE: Final = 14
"""Destination, source, EtherType."""
MIN_FRAME: Final = ETH_HEADER_SIZE
"""Shortest frame accepted (a header; QEMU pads nothing it passes on)."""
MAX_FRAME: Final = 16384
"""Longest frame carried: a 9000-byte jumbo frame with a VLAN tag fits with room to spare."""
BROADCAST: Final = MacAddress(b"\xff" * MAC_SIZE)

_ETHERTYPE_ARP: Final = 0x0806
_ETHERTYPE_RARP: Final = 0x8035
_ARP: Final = struct.Struct(">HHBBH6s4s6s4s")  # htype, ptype, hlen, plen, op, sha, spa, tha, tpa
_ARP_REQUEST: Final = 1
_RARP_REQUEST_REVERSE: Final = 3
_ETHERTYPE_IPV4: Final = 0x0800
_MIN_PADDED: Final = 60


def mac(raw: bytes) -> MacAddress:
    """Check six bytes and type them as a MAC address."""
    if len(raw) != MAC_SIZE:
        raise UsageError(f"a MAC address is {MAC_SIZE} bytes, got {len(raw)}")
    return MacAddress(bytes(raw))


def parse_mac(text: str) -> MacAddress:
    """``52:54:00:12:34:56`` (or with ``-``) -> six bytes; raises UsageError."""
    parts = text.strip().replace("-", ":").split(":")
    if len(parts) != MAC_SIZE or not all(len(p) == 2 for p in parts):
        raise UsageError(f"{text!r} is not a MAC address (e.g. 52:54:00:12:34:56)")
    try:
        return MacAddress(bytes(int(p, 16) for p in parts))
    except ValueError:
        raise UsageError(f"{text!r} is not a MAC address (hex digits)") from None


def format_mac(address: bytes) -> str:
    """Six bytes -> ``52:54:00:12:34:56``."""
    return ":".join(f"{b:02x}" for b in address)


def is_group(address: bytes) -> bool:
    """Broadcast or multicast (the I/G bit): delivered to every port of the network."""
    return bool(address[0] & 1)


def frame_addresses(frame: bytes) -> tuple[MacAddress, MacAddress]:
    """(destination, source) of a frame; raises DecodeError if it is not a frame we carry."""
    size = len(frame)
    if size < MIN_FRAME:
        raise DecodeError(f"a frame of {size} bytes is shorter than an Ethernet header")
    if size > MAX_FRAME:
        raise DecodeError(f"a frame of {size} bytes exceeds the {MAX_FRAME}-byte limit")
    return MacAddress(frame[:MAC_SIZE]), MacAddress(frame[MAC_SIZE : 2 * MAC_SIZE])


def rarp_announce(address: bytes) -> bytes:
    """The RARP "reverse request" QEMU sends after a migration (``qemu_announce_self``): a
    broadcast from the VM's MAC that teaches every switch on the way where the VM now is."""
    source = mac(address)
    body = _ARP.pack(1, _ETHERTYPE_IPV4, MAC_SIZE, 4, _RARP_REQUEST_REVERSE, source,
                     bytes(4), source, bytes(4))
    frame = BROADCAST + source + struct.pack(">H", _ETHERTYPE_RARP) + body
    return frame.ljust(_MIN_PADDED, b"\0")


def gratuitous_arp(address: bytes, ipv4: str) -> bytes:
    """A gratuitous ARP request (sender and target the VM's address): refreshes ARP caches."""
    source = mac(address)
    try:
        packed = ipaddress.IPv4Address(ipv4).packed
    except ValueError:
        raise UsageError(f"{ipv4!r} is not an IPv4 address") from None
    body = _ARP.pack(1, _ETHERTYPE_IPV4, MAC_SIZE, 4, _ARP_REQUEST, source, packed,
                     bytes(MAC_SIZE), packed)
    frame = BROADCAST + source + struct.pack(">H", _ETHERTYPE_ARP) + body
    return frame.ljust(_MIN_PADDED, b"\0")


def sender_ipv4(frame: bytes) -> str | None:
    """The IPv4 address a frame's sender uses, if the frame says it plainly (an ARP packet's
    sender address, or an IPv4 packet's source); None otherwise."""
    if len(frame) < ETH_HEADER_SIZE:
        return None
    (ethertype,) = struct.unpack_from(">H", frame, 12)
    if ethertype == _ETHERTYPE_ARP and len(frame) >= ETH_HEADER_SIZE + _ARP.size:
        spa = frame[28:32]
    elif ethertype == _ETHERTYPE_IPV4 and len(frame) >= ETH_HEADER_SIZE + 20:
        spa = frame[26:30]
    else:
        return None
    address = ipaddress.IPv4Address(spa)
    if address.is_unspecified or address.is_multicast:
        return None
    return str(address)
