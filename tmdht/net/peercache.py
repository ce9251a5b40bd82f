"""The peer cache file: the members a node knew, so it can rejoin when its seeds are down.

A node writes ``peers.json`` in its data directory (atomically, :func:`tmdht.files.atomic_write`)
after each ring refresh that changed it and when it stops; on start, if no seed answers, it
bootstraps from the peers listed there. The file is bounded (:data:`MAX_CACHED_PEERS` entries,
the most recently heard first) and only a hint: a cached peer becomes a contact again only by
answering ``node_info`` with the id the cache names, over the overlay's authenticated datagrams
(cluster key tags), exactly as a seed would. A damaged or foreign file raises
:class:`~tmdht.errors.DecodeError`; the node logs it and starts without the cache.

Format (JSON, UTF-8)::

    {"format": "tmdht-peers", "version": 1,
     "peers": [{"id": "<40 hex>", "host": "<IP literal>", "port": <1..65535>}, ...]}
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from tmdht.errors import DecodeError
from tmdht.net.address import Address
from tmdht.net.membership import Member

__all__ = ["MAX_CACHED_PEERS", "CachedPeer", "decode_peer_cache", "encode_peer_cache", "to_cache"]

FORMAT: Final = "tmdht-peers"
VERSION: Final = 1
MAX_CACHED_PEERS: Final = 64
"""Most peers a cache holds (enough to reach the ring through any of a few survivors)."""
MAX_FILE_BYTES: Final = 64 * 1024
"""A larger file is not a peer cache."""
_ID_BYTES: Final = 20


@dataclass(frozen=True, slots=True)
class CachedPeer:
    """One peer as cached: its id and its overlay (kademlia) address."""

    node_id: bytes
    host: str
    port: int

    @property
    def address(self) -> Address:
        return (self.host, self.port)


def to_cache(members: Iterable[Member], self_id: bytes) -> list[CachedPeer]:
    """The peers worth caching: members other than ``self_id``, most recently heard first,
    bounded by :data:`MAX_CACHED_PEERS` (ties broken by id, so the file is stable)."""
    others = sorted(
        (m for m in members if m.node_id != self_id), key=lambda m: (-m.last_seen, m.node_id)
    )
    return [CachedPeer(m.node_id, m.host, m.port) for m in others[:MAX_CACHED_PEERS]]


def encode_peer_cache(peers: Iterable[CachedPeer]) -> bytes:
    """The file's bytes for ``peers`` (at most :data:`MAX_CACHED_PEERS` are kept)."""
    rows = [{"id": p.node_id.hex(), "host": p.host, "port": p.port} for p in peers]
    doc = {"format": FORMAT, "version": VERSION, "peers": rows[:MAX_CACHED_PEERS]}
    return (json.dumps(doc, indent=1) + "\n").encode()


def decode_peer_cache(data: bytes) -> list[CachedPeer]:
    """The peers of a cache file; DecodeError if it is not one (damaged, foreign, too big)."""
    if len(data) > MAX_FILE_BYTES:
        raise DecodeError(f"peer cache larger than {MAX_FILE_BYTES} bytes")
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DecodeError(f"peer cache is not JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise DecodeError("not a tmdht peer cache")
    if doc.get("version") != VERSION:
        raise DecodeError(f"peer cache version {doc.get('version')!r} is not {VERSION}")
    rows = doc.get("peers")
    if not isinstance(rows, list) or len(rows) > MAX_CACHED_PEERS:
        raise DecodeError(f"peer cache must list at most {MAX_CACHED_PEERS} peers")
    return [_peer(row) for row in rows]


def _peer(row: object) -> CachedPeer:
    if not isinstance(row, dict):
        raise DecodeError("a cached peer is an object")
    raw_id, host, port = row.get("id"), row.get("host"), row.get("port")
    try:
        node_id = bytes.fromhex(raw_id) if isinstance(raw_id, str) else b""
    except ValueError:
        node_id = b""
    if len(node_id) != _ID_BYTES:
        raise DecodeError(f"a cached peer id is {2 * _ID_BYTES} hex digits")
    if not isinstance(host, str) or len(host) > 64:
        raise DecodeError("a cached peer host is an IP literal")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise DecodeError(f"cached peer host {host!r:.70} is not an IP literal") from None
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
        raise DecodeError("a cached peer port is 1..65535")
    return CachedPeer(node_id, host, port)
