"""The store node's overlay: ring membership and routing on the kademlia package.

Pages never travel here (the UDP data plane moves them). The overlay's job is that every node, and
every client, knows the live members of the ring and where their data planes listen:

- Node ids are 160-bit, drawn once and kept in ``<data dir>/node.json`` (JSON, written
  atomically), so a restarted node keeps its place in the ring.
- Contacts are learned from the package's FIND_NODE lookups and from requests; a contact becomes
  a *member* only after it answered a ``node_info`` RPC itself (id, data host/port, metrics port,
  version), validated before use.
- :meth:`Overlay.crawl` sweeps the whole id space with iterative lookups, so a node or a client
  ends up with the complete membership for one-hop routing; :meth:`Overlay.members` returns it.
- Liveness is local and forgiving: one missed RPC makes a contact *suspect* (skipped by lookups,
  still a member); ``max_failures`` missed RPCs in a row make it *dead* (evicted, ``LEFT``); a
  dead contact is remembered, so peers that still list it cannot hand it back, until it answers
  again (``JOINED``) or the record expires.

The sans-IO part (:class:`PeerBook`) takes the time as a parameter; :class:`Overlay` is its
asyncio skin. See :mod:`tmdht.node._kademlia_compat` for what is fixed in the package itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import heapq
import ipaddress
import json
import logging
import os
import secrets
import socket
import tempfile
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self

from kademlia.node import Node

from tmdht import __version__
from tmdht.errors import ConfigError, DecodeError, TmdhtError, UsageError

from ._kademlia_compat import (
    ID_BITS,
    ID_SIZE,
    Address,
    NodeLookup,
    OverlayClosedError,
    OverlayError,
    OverlayProtocol,
    ProtocolStats,
    RequestHandler,
    RoutingTable,
    RpcTimeoutError,
    derive_tag_key,
    random_id_in,
)

__all__ = [
    "NODE_FILE",
    "PROTOCOL_VERSION",
    "Member",
    "MembershipEvent",
    "MembershipEventKind",
    "MembershipSubscription",
    "NodeInfo",
    "Overlay",
    "OverlayClosedError",
    "OverlayConfig",
    "OverlayError",
    "OverlayStats",
    "PeerBook",
    "RpcTimeoutError",
    "SocketBuffers",
    "UnknownPeerError",
    "load_or_create_node_id",
    "parse_contacts",
    "parse_node_info",
    "xor_distance",
]

log = logging.getLogger("tmdht.node.overlay")

NODE_FILE: Final = "node.json"
"""Name of the identity file in the node's data directory."""
_NODE_FILE_FORMAT: Final = 1
PROTOCOL_VERSION: Final = 1
"""Version of the ``node_info`` answer (the ``v`` field); other versions are refused."""
_MAX_CONTACTS: Final = 64
"""Most contacts accepted in one FIND_NODE answer (the package sends k, 20 by default)."""
_MAX_VERSION_CHARS: Final = 64
_MAX_HOST_CHARS: Final = 64
_NO_ID: Final = b""
"""Sender id of a client-mode overlay: peers answer it but never record it as a contact."""


class UnknownPeerError(OverlayError):
    """The node id asked for is not a known contact."""


# ----------------------------------------------------------------------------------------------
# Configuration and public value types


@dataclass(frozen=True, slots=True)
class OverlayConfig:
    """Everything the overlay needs; validated on construction (``ConfigError``)."""

    data_port: int
    """UDP port of this node's page data plane, advertised to peers (0 only with join=False)."""
    data_dir: Path | None = None
    """Where ``node.json`` keeps the node id; None (or client mode) draws a fresh id."""
    host: str = "0.0.0.0"
    """IP literal the kademlia socket binds to."""
    port: int = 0
    """Kademlia UDP port; 0 picks a free one (see :attr:`Overlay.port`)."""
    seeds: tuple[tuple[str, int], ...] = ()
    """(host, port) of kademlia sockets to bootstrap from; hostnames are resolved."""
    advertised_host: str = ""
    """IP peers should use for the data plane; "" means the address our datagrams come from."""
    metrics_port: int = 0
    """Prometheus port advertised to peers (0: none)."""
    join: bool = True
    """False: client mode. Crawl and watch the ring without becoming a member of it."""
    rpc_timeout: float = 1.0
    """Seconds to wait for one answer (the package waits 5)."""
    refresh_interval: float = 60.0
    """Seconds between crawls of the whole ring (bucket refresh included)."""
    probe_interval: float = 1.0
    """Seconds between liveness passes (re-probe suspects, probe silent members)."""
    silence_timeout: float = 15.0
    """A member not heard from for this long is probed."""
    max_failures: int = 3
    """Missed RPCs in a row after which a contact is dead (the package evicts after one)."""
    dead_ttl: float = 600.0
    """Seconds a dead contact is remembered (and refused when peers list it)."""
    dead_retry_interval: float = 30.0
    """A dead contact is re-probed this often, in the background, until ``dead_ttl`` (so the
    two sides of a healed partition find each other again)."""
    ksize: int = 20
    """Kademlia k: bucket size and contacts per FIND_NODE answer."""
    alpha: int = 3
    """Kademlia alpha: parallel queries per lookup round."""
    max_in_flight: int = 32
    """Most RPCs outstanding at once; bounds the burst of answers the socket must buffer."""
    socket_buffer_bytes: int = 4 * 1024 * 1024
    """SO_RCVBUF/SO_SNDBUF asked for (capped by net.core.rmem_max/wmem_max); 0 keeps defaults."""
    max_crawl_lookups: int = 512
    """Upper bound on the iterative lookups of one crawl (about 2 N / k are needed)."""
    max_peers: int = 10_000
    """Most contacts remembered (live, candidate or dead); further strangers are ignored."""
    cluster_key: bytes | None = None
    """Shared cluster key: if set, every datagram carries a keyed BLAKE3 tag; others are dropped."""
    accepted_cluster_keys: tuple[bytes, ...] = ()
    """Other cluster keys whose tags are accepted too (during a key rotation); sends use
    ``cluster_key``."""

    def __post_init__(self) -> None:
        """Refuse values the overlay cannot run with; accept lists and str paths."""
        # Frozen: normalise through object.__setattr__ (lists from a config file, str paths).
        object.__setattr__(self, "seeds", tuple(tuple(seed) for seed in self.seeds))
        if self.data_dir is not None:
            object.__setattr__(self, "data_dir", Path(self.data_dir))
        _check_ip(self.host, "host")
        if self.advertised_host:
            _check_ip(self.advertised_host, "advertised_host")
        _check_port(self.port, "port", allow_zero=True)
        _check_port(self.data_port, "data_port", allow_zero=not self.join)
        _check_port(self.metrics_port, "metrics_port", allow_zero=True)
        for seed in self.seeds:
            if len(seed) != 2 or not isinstance(seed[0], str) or not seed[0]:
                raise ConfigError(f"a seed is (host, port), got {seed!r}")
            _check_port(seed[1], "seed port", allow_zero=False)
        for name in ("rpc_timeout", "refresh_interval", "probe_interval", "silence_timeout"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.dead_ttl < 0 or self.dead_retry_interval < 0:
            raise ConfigError("dead_ttl and dead_retry_interval must be >= 0")
        limits = {"max_failures": 1, "ksize": 1, "alpha": 1, "max_in_flight": 1}
        for name, low in limits.items():
            if getattr(self, name) < low:
                raise ConfigError(f"{name} must be >= {low}, got {getattr(self, name)!r}")
        if self.ksize > _MAX_CONTACTS:
            raise ConfigError(f"ksize must be <= {_MAX_CONTACTS} (answers must fit a datagram)")
        if self.socket_buffer_bytes < 0 or self.max_crawl_lookups < 1 or self.max_peers < 1:
            raise ConfigError("socket_buffer_bytes >= 0, max_crawl_lookups/max_peers >= 1")
        if self.cluster_key is not None and len(self.cluster_key) < 16:
            raise ConfigError("cluster_key must be at least 16 bytes")
        object.__setattr__(self, "accepted_cluster_keys", tuple(self.accepted_cluster_keys))
        if self.accepted_cluster_keys and self.cluster_key is None:
            raise ConfigError("accepted_cluster_keys need a cluster_key to send with")
        if any(len(k) < 16 for k in self.accepted_cluster_keys):
            raise ConfigError("accepted_cluster_keys must be at least 16 bytes each")


def _check_ip(value: str, name: str) -> None:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise ConfigError(f"{name} must be an IP literal, got {value!r}") from None


def _check_port(value: object, name: str, *, allow_zero: bool) -> None:
    low = 0 if allow_zero else 1
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= 65535:
        raise ConfigError(f"{name} must be an integer in {low}..65535, got {value!r}")


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """What a node advertises about itself in its ``node_info`` answer."""

    node_id: bytes
    """160-bit node id (20 bytes)."""
    data_host: str
    """IP of its page data plane; "" means the address its kademlia datagrams come from."""
    data_port: int
    """UDP port of its page data plane."""
    metrics_port: int
    """Its Prometheus port (0: none)."""
    version: str
    """Its software version."""

    def to_wire(self) -> dict[str, object]:
        """The msgpack-able answer."""
        return {
            "v": PROTOCOL_VERSION,
            "id": self.node_id,
            "data_host": self.data_host,
            "data_port": self.data_port,
            "metrics_port": self.metrics_port,
            "version": self.version,
        }


@dataclass(frozen=True, slots=True)
class Member:
    """One live member of the ring, as this overlay knows it."""

    node_id: bytes
    """160-bit node id (20 bytes)."""
    host: str
    """IP of its kademlia socket (the address it answered from)."""
    port: int
    """Port of its kademlia socket."""
    data_host: str
    """IP of its page data plane."""
    data_port: int
    """UDP port of its page data plane."""
    metrics_port: int
    """Its Prometheus port (0: none)."""
    version: str
    """Its software version."""
    last_seen: float
    """``time.monotonic()`` when it last answered or asked us something directly."""
    suspect: bool = False
    """It missed its last RPC(s) but not yet ``max_failures`` in a row: still a member."""

    @property
    def data_address(self) -> Address:
        """(host, port) to send data-plane datagrams to."""
        return (self.data_host, self.data_port)

    def same_view(self, other: Member) -> bool:
        """True if nothing a user routes by differs (liveness fields aside)."""
        return replace(self, last_seen=0.0, suspect=False) == replace(
            other, last_seen=0.0, suspect=False
        )


class MembershipEventKind(enum.Enum):
    """What happened to a member."""

    JOINED = "joined"
    """It answered node_info and is now a member (new, or back from the dead)."""
    LEFT = "left"
    """It missed ``max_failures`` RPCs in a row (or was replaced by another id at its address)."""
    UPDATED = "updated"
    """Its address or advertised info changed (e.g. restarted on another port)."""


@dataclass(frozen=True, slots=True)
class MembershipEvent:
    """One membership change, delivered to subscribers in order."""

    kind: MembershipEventKind
    """joined, left or updated."""
    member: Member
    """The member after the change (for LEFT: as last known)."""


@dataclass(frozen=True, slots=True)
class SocketBuffers:
    """Kernel buffer sizes of the kademlia socket (Linux reports twice what it grants)."""

    requested: int
    """Bytes asked for with SO_RCVBUF/SO_SNDBUF (0: defaults kept)."""
    receive: int
    """SO_RCVBUF as read back."""
    send: int
    """SO_SNDBUF as read back."""
    rmem_max: int | None
    """net.core.rmem_max, the cap for unprivileged processes (None: not Linux)."""


@dataclass(frozen=True, slots=True)
class OverlayStats:
    """A snapshot of the overlay's counters (socket counters plus membership ones)."""

    socket: ProtocolStats
    """Datagram and RPC counters (see ProtocolStats)."""
    bad_replies: int
    """Answers that did not validate (counted as failures of the peer)."""
    members: int
    """Members now, self included."""
    suspects: int
    """Members that missed their last RPC."""
    dead: int
    """Dead contacts remembered."""
    routing_contacts: int
    """Contacts in the k-bucket routing table (suspects included, replacement caches not)."""


def xor_distance(a: bytes, b: bytes) -> int:
    """Kademlia distance between two 160-bit ids."""
    return int.from_bytes(a, "big") ^ int.from_bytes(b, "big")


# ----------------------------------------------------------------------------------------------
# Validation of what peers send


def _node_id(value: object, what: str) -> bytes:
    if not isinstance(value, bytes) or len(value) != ID_SIZE:
        raise DecodeError(f"{what} must be {ID_SIZE} bytes")
    return value


def _port(value: object, what: str, *, allow_zero: bool) -> int:
    low = 0 if allow_zero else 1
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= 65535:
        raise DecodeError(f"{what} must be an integer in {low}..65535")
    return value


def _ip(value: object, what: str, *, allow_empty: bool) -> str:
    if not isinstance(value, str) or len(value) > _MAX_HOST_CHARS:
        raise DecodeError(f"{what} must be a short string")
    if value == "" and allow_empty:
        return value
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise DecodeError(f"{what} is not an IP literal") from None


def parse_node_info(raw: object) -> NodeInfo:
    """Validate a ``node_info`` answer; raise DecodeError on anything unexpected."""
    if not isinstance(raw, dict):
        raise DecodeError("node_info answer must be a map")
    version = raw.get("v")
    if version != PROTOCOL_VERSION or isinstance(version, bool):
        raise DecodeError(f"node_info answer version {version!r} is not {PROTOCOL_VERSION}")
    software = raw.get("version")
    if (
        not isinstance(software, str)
        or len(software) > _MAX_VERSION_CHARS
        or not software.isprintable()
    ):
        raise DecodeError("node_info version must be a short printable string")
    return NodeInfo(
        node_id=_node_id(raw.get("id"), "node_info id"),
        data_host=_ip(raw.get("data_host"), "node_info data_host", allow_empty=True),
        data_port=_port(raw.get("data_port"), "node_info data_port", allow_zero=False),
        metrics_port=_port(raw.get("metrics_port"), "node_info metrics_port", allow_zero=True),
        version=software,
    )


def parse_contacts(raw: object) -> list[Node]:
    """Validate a FIND_NODE answer ``[[id, ip, port], ...]``; raise DecodeError if malformed."""
    if not isinstance(raw, list) or len(raw) > _MAX_CONTACTS:
        raise DecodeError(f"find_node answer must be a list of at most {_MAX_CONTACTS} contacts")
    contacts = []
    for entry in raw:
        if not isinstance(entry, list) or len(entry) != 3:
            raise DecodeError("a contact must be [id, ip, port]")
        contacts.append(
            Node(
                _node_id(entry[0], "contact id"),
                _ip(entry[1], "contact ip", allow_empty=False),
                _port(entry[2], "contact port", allow_zero=False),
            )
        )
    return contacts


def _sender_id(args: tuple[Any, ...], count: int) -> bytes:
    """The sender id every request starts with (kademlia's convention); b"" from a client."""
    if len(args) != count:
        raise DecodeError(f"expected {count} arguments, got {len(args)}")
    sender = args[0]
    if sender == _NO_ID:
        return _NO_ID
    return _node_id(sender, "sender id")


# ----------------------------------------------------------------------------------------------
# Node identity


def load_or_create_node_id(data_dir: Path) -> bytes:
    """The node's 160-bit id from ``data_dir/node.json``, drawn and saved on first use.

    The file is created atomically and never overwritten (hard link of a fsynced temp file), so
    two processes racing on one directory agree on one id. A damaged file raises ConfigError: a
    node must not silently take a new place in the ring.
    """
    path = data_dir / NODE_FILE
    try:
        return _read_node_file(path)
    except FileNotFoundError:
        pass
    node_id = secrets.token_bytes(ID_SIZE)
    text = json.dumps({"format": _NODE_FILE_FORMAT, "node_id": node_id.hex()}, indent=2) + "\n"
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=data_dir, prefix=f".{NODE_FILE}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as tmp:
                tmp.write(text)
                tmp.flush()
                os.fsync(tmp.fileno())
            try:
                os.link(tmp_name, path)
            except FileExistsError:
                return _read_node_file(path)  # another process won the race: use its id
            _fsync_dir(data_dir)
        finally:
            os.unlink(tmp_name)
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc}") from exc
    log.info("new node id %s saved in %s", node_id.hex(), path)
    return node_id


def _read_node_file(path: Path) -> bytes:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read node id from {path}: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != _NODE_FILE_FORMAT:
        raise ConfigError(f"{path} is not a tmdht node file of format {_NODE_FILE_FORMAT}")
    hex_id = data.get("node_id")
    try:
        node_id = bytes.fromhex(hex_id) if isinstance(hex_id, str) else b""
    except ValueError:
        node_id = b""
    if len(node_id) != ID_SIZE:
        raise ConfigError(f"{path}: node_id must be {ID_SIZE * 2} hex digits")
    return node_id


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------------
# Sans-IO liveness and membership


class _NodeLog(logging.LoggerAdapter[logging.Logger]):
    """Prefixes messages with the overlay's short id: a process may run several (tests, bench)."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        return f"[{self.extra['node'] if self.extra else '?'}] {msg}", kwargs


@dataclass(slots=True)
class _Peer:
    """What the book knows about one contact."""

    node: Node
    """Its id and the kademlia address we trust (the last one it answered from)."""
    verified: bool = False
    """It answered us (or asked us) directly since it was learned or came back."""
    info: NodeInfo | None = None
    """Its last validated node_info answer."""
    info_at: float = 0.0
    """Monotonic time of that answer."""
    failures: int = 0
    """RPCs missed in a row."""
    dead: bool = False
    """It missed max_failures RPCs in a row: evicted, refused when peers list it."""
    last_seen: float = 0.0
    """Monotonic time of the last direct evidence."""
    expires: float = 0.0
    """Dead: forget the record after this."""
    retry_at: float = 0.0
    """Dead or suspect: earliest probe prompted by a peer listing it (or another address)."""
    announced: Member | None = None
    """What subscribers were last told (None: not a member for them)."""

    @property
    def healthy(self) -> bool:
        return not self.dead and self.failures == 0

    @property
    def address(self) -> Address:
        return (self.node.ip, self.node.port)


class PeerBook:
    """Liveness and membership of every contact; no IO, the time is a parameter.

    The overlay feeds it what happened (``heard``, ``got_info``, ``failed``, ``mentioned``,
    ``tick``) and runs the probes it asks for (:meth:`take_wanted`). Methods that change
    membership return the :class:`MembershipEvent` list to publish.
    """

    def __init__(
        self,
        self_id: bytes,
        *,
        ksize: int,
        max_failures: int,
        silence_timeout: float,
        info_max_age: float,
        dead_ttl: float,
        dead_retry_interval: float,
        max_peers: int,
        authenticated: bool = False,
    ) -> None:
        """Create an empty book for the node ``self_id``.

        ``authenticated``: every datagram carries a valid cluster-key tag, so a datagram from a
        known node at a new address is the node itself (restarted elsewhere) and is believed at
        once; without a key the known address is probed first (anyone could claim the id).
        """
        self.self_id = self_id
        self._authenticated = authenticated
        self._log = _NodeLog(log, {"node": _short(self_id)})
        self.router = RoutingTable(ksize, Node(self_id), self._bucket_full)
        self._max_failures = max_failures
        self._silence_timeout = silence_timeout
        self._info_max_age = info_max_age
        self._dead_ttl = dead_ttl
        self._dead_retry = dead_retry_interval
        self._max_peers = max_peers
        self._peers: dict[bytes, _Peer] = {}
        self._wanted: dict[bytes, Address] = {}
        self._full_heads: list[Node] = []

    # -- what happened ----------------------------------------------------------------------

    def heard(self, node_id: bytes, addr: Address, now: float) -> list[MembershipEvent]:
        """``node_id`` answered us, or asked us something, from ``addr``."""
        if node_id in (self.self_id, _NO_ID):
            return []
        peer = self._peers.get(node_id)
        refetch = False
        if peer is None:
            if len(self._peers) >= self._max_peers:
                return []
            peer = self._peers[node_id] = _Peer(Node(node_id, *addr))
        elif peer.address != addr:
            if peer.verified and peer.healthy and not self._authenticated:
                # A healthy contact is not moved on one datagram from elsewhere (that would let
                # anyone hijack it); probe the known address instead. If that fails, the contact
                # turns suspect and the next datagram from the new address is believed.
                if now >= peer.retry_at:
                    peer.retry_at = now + self._dead_retry
                    self._wanted.setdefault(node_id, peer.address)
                    self._log.info(
                        "%s heard from %s:%d, probing its known address first",
                        _short(node_id),
                        *addr,
                    )
                return []
            # Restarted elsewhere: its data port may have changed too, so ask again (keeping the
            # old info meanwhile, so it stays a member and subscribers see UPDATED).
            peer.node = Node(node_id, *addr)
            refetch = True
        if peer.dead:
            self._log.info("%s at %s:%d answers again", _short(node_id), *addr)
            peer.info = None  # it comes back (JOINED) with what it advertises now
            peer.retry_at = 0.0
        peer.verified, peer.dead, peer.failures = True, False, 0
        peer.last_seen = now
        if peer.info is None or refetch:
            self._wanted[node_id] = addr
        self.router.add_contact(peer.node)  # also moves it to its bucket's tail (most recent)
        return self._settle(peer, now)

    def got_info(self, info: NodeInfo, addr: Address, now: float) -> list[MembershipEvent]:
        """``info.node_id`` answered node_info from ``addr``: it is (still) a member."""
        events = self.heard(info.node_id, addr, now)
        peer = self._peers.get(info.node_id)
        if peer is not None and peer.address == addr and not peer.dead:
            peer.info, peer.info_at = info, now
            self._wanted.pop(info.node_id, None)
            events += self._settle(peer, now)
        return events

    def failed(
        self, node_id: bytes, addr: Address, now: float, *, gone: bool = False
    ) -> list[MembershipEvent]:
        """An RPC to ``node_id`` at ``addr`` got no (valid) answer.

        ``gone``: another node answered at that address, so this one is certainly not there.
        """
        peer = self._peers.get(node_id)
        if peer is None or peer.dead or peer.address != addr:
            return []  # a probe of some other address says nothing about the trusted one
        peer.failures = self._max_failures if gone else peer.failures + 1
        if peer.failures < self._max_failures:
            self._log.info(
                "%s at %s:%d missed %d RPC(s): suspect", _short(node_id), *addr, peer.failures
            )
            return self._settle(peer, now)
        self._log.warning(
            "%s at %s:%d missed %d RPCs in a row: dead", _short(node_id), *addr, peer.failures
        )
        peer.dead, peer.verified = True, False
        peer.expires = now + self._dead_ttl
        peer.retry_at = now + self._dead_retry
        self._wanted.pop(node_id, None)
        self.router.remove_contact(peer.node)
        return self._settle(peer, now)

    def mentioned(self, node: Node, now: float) -> Node | None:
        """A peer listed ``node`` in a FIND_NODE answer: the contact to query, or None.

        Dead and suspect contacts are refused, which is what keeps lookups from waiting on the
        same dead node again and again; a listed dead node is re-probed in the background at
        most every ``dead_retry_interval``. A healthy contact is returned at the address we
        trust, whatever address the peer gave.
        """
        if node.id == self.self_id:
            return None
        addr = (node.ip, node.port)
        peer = self._peers.get(node.id)
        if peer is None:
            if len(self._peers) >= self._max_peers:
                return None
            self._peers[node.id] = _Peer(Node(node.id, *addr))
            self._wanted[node.id] = addr
            return node
        if peer.healthy:
            return peer.node
        if peer.dead and peer.address != addr and not peer.verified:
            peer.node = Node(node.id, *addr)  # nothing trusted any more: try the new address
            self._wanted[node.id] = addr
            peer.retry_at = now + self._dead_retry
        elif now >= peer.retry_at:
            peer.retry_at = now + self._dead_retry
            self._wanted.setdefault(node.id, addr)
        return None

    def tick(self, now: float) -> None:
        """A liveness pass: forget expired dead contacts, ask to probe suspect/silent ones."""
        for node_id, peer in list(self._peers.items()):
            if peer.dead:
                if now >= peer.expires:
                    del self._peers[node_id]
                    self._wanted.pop(node_id, None)
                elif now >= peer.retry_at:
                    # Not only crashes kill contacts: after a network partition each side holds
                    # the other dead and no member mentions it any more, so without this retry
                    # the two sides would never look for each other again (found by
                    # tests/faults: a 3 | 2 split stayed split after the packets flowed again).
                    peer.retry_at = now + self._dead_retry
                    self._wanted.setdefault(node_id, peer.address)
                continue
            if (
                peer.failures
                or not peer.verified
                or peer.info is None
                or now - peer.last_seen >= self._silence_timeout
                # A node that restarted on the same address keeps talking to us, so it is never
                # silent; re-asking node_info now and then catches a changed data port.
                or now - peer.info_at >= self._info_max_age
            ):
                self._wanted.setdefault(node_id, peer.address)

    def take_wanted(self) -> dict[bytes, Address]:
        """The probes (node_info RPCs) the book wants run now, by node id; clears the list."""
        self._flush_full_heads()
        wanted, self._wanted = self._wanted, {}
        return wanted

    # -- views ------------------------------------------------------------------------------

    def peer_address(self, node_id: bytes) -> Address | None:
        """The trusted address of a remembered contact, dead or alive."""
        peer = self._peers.get(node_id)
        return peer.address if peer is not None else None

    def members(self) -> list[Member]:
        """Every live member we know except ourselves, ordered by node id."""
        return sorted(
            (m for peer in self._peers.values() if (m := self._member(peer)) is not None),
            key=lambda m: m.node_id,
        )

    def lacks_info(self, node_id: bytes) -> bool:
        """True if a live contact has not yet answered node_info."""
        peer = self._peers.get(node_id)
        return peer is not None and not peer.dead and peer.info is None

    def lookup_start(self, target: bytes, count: int) -> list[Node]:
        """Healthy contacts of the routing table closest to ``target``, to start a lookup."""
        return self.neighbors(target, count, exclude=None)

    def neighbors(self, target: bytes, count: int, exclude: bytes | None) -> list[Node]:
        """The FIND_NODE answer: healthy routing-table contacts closest to ``target``."""
        key = int.from_bytes(target, "big")
        candidates = (
            node
            for node in self.router.contacts()
            if node.id != exclude and (peer := self._peers.get(node.id)) and peer.healthy
        )
        return heapq.nsmallest(count, candidates, key=lambda node: node.long_id ^ key)

    def counts(self) -> tuple[int, int]:
        """(suspect members, dead contacts)."""
        suspects = sum(1 for p in self._peers.values() if self._member(p) and p.failures)
        return suspects, sum(1 for p in self._peers.values() if p.dead)

    # -- internals --------------------------------------------------------------------------

    def _member(self, peer: _Peer) -> Member | None:
        info = peer.info
        if info is None or peer.dead or not peer.verified:
            return None
        return Member(
            node_id=peer.node.id,
            host=peer.node.ip,
            port=peer.node.port,
            data_host=info.data_host or peer.node.ip,
            data_port=info.data_port,
            metrics_port=info.metrics_port,
            version=info.version,
            last_seen=peer.last_seen,
            suspect=peer.failures > 0,
        )

    def _settle(self, peer: _Peer, now: float) -> list[MembershipEvent]:
        """Compare the member view with what subscribers were told; return what to tell."""
        self._flush_full_heads()
        current, before = self._member(peer), peer.announced
        peer.announced = current
        if current is None:
            return [] if before is None else [MembershipEvent(MembershipEventKind.LEFT, before)]
        if before is None:
            return [MembershipEvent(MembershipEventKind.JOINED, current)]
        if not current.same_view(before):
            return [MembershipEvent(MembershipEventKind.UPDATED, current)]
        return []

    def _bucket_full(self, head: Node) -> None:
        # Called from inside RoutingTable.add_contact; handled once the book's state is settled.
        self._full_heads.append(head)

    def _flush_full_heads(self) -> None:
        # The paper probes the least recently seen contact of a full bucket; it is probed like
        # any other contact (and replaced only after max_failures missed RPCs).
        heads, self._full_heads = self._full_heads, []
        for head in heads:
            peer = self._peers.get(head.id)
            if peer is not None and not peer.dead:
                self._wanted.setdefault(head.id, peer.address)


def _short(node_id: bytes) -> str:
    return node_id.hex()[:12]


# ----------------------------------------------------------------------------------------------
# Subscriptions


class MembershipSubscription:
    """An ordered stream of membership events; iterate with ``async for`` or call :meth:`get`.

    Events are queued without bound (membership changes are rare); the stream ends when the
    subscription or the overlay is closed.
    """

    def __init__(self, on_close: Callable[[MembershipSubscription], None]) -> None:
        """Created by :meth:`Overlay.subscribe`."""
        self._queue: asyncio.Queue[MembershipEvent | None] = asyncio.Queue()
        self._on_close = on_close
        self._closed = False

    def _put(self, event: MembershipEvent) -> None:
        if not self._closed:
            self._queue.put_nowait(event)

    def close(self) -> None:
        """End the stream (idempotent); queued events are still delivered."""
        if not self._closed:
            self._closed = True
            self._queue.put_nowait(None)
            self._on_close(self)

    async def get(self) -> MembershipEvent:
        """The next event; raises OverlayClosedError once the stream has ended."""
        event = await self._queue.get()
        if event is None:
            self._queue.put_nowait(None)  # keep later get() calls ending too
            raise OverlayClosedError("membership subscription closed")
        return event

    def get_nowait(self) -> MembershipEvent | None:
        """The next event if one is queued, else None."""
        with contextlib.suppress(asyncio.QueueEmpty):
            event = self._queue.get_nowait()
            if event is None:
                self._queue.put_nowait(None)
            return event
        return None

    def __aiter__(self) -> AsyncIterator[MembershipEvent]:
        """Iterate until the stream ends."""
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[MembershipEvent]:
        while True:
            try:
                yield await self.get()
            except OverlayClosedError:
                return


# ----------------------------------------------------------------------------------------------
# The asyncio overlay


class Overlay:
    """A node's (or a client's) view of the ring, on a kademlia UDP socket.

    Use ``overlay = await Overlay.start(config)`` and ``await overlay.stop()``, or
    ``async with Overlay(config) as overlay``. Every background task is owned by the overlay and
    cancelled by :meth:`stop`.
    """

    def __init__(self, config: OverlayConfig) -> None:
        """Prepare an overlay; nothing happens until :meth:`start` (or ``async with``)."""
        self.config = config
        if config.data_dir is not None and config.join:
            self.node_id = load_or_create_node_id(config.data_dir)
        else:
            self.node_id = secrets.token_bytes(ID_SIZE)
        self._node = Node(self.node_id)
        self._log = _NodeLog(log, {"node": _short(self.node_id)})
        self._book = PeerBook(
            self.node_id,
            ksize=config.ksize,
            max_failures=config.max_failures,
            silence_timeout=config.silence_timeout,
            info_max_age=config.refresh_interval,
            dead_ttl=config.dead_ttl,
            dead_retry_interval=config.dead_retry_interval,
            max_peers=config.max_peers,
            authenticated=config.cluster_key is not None,
        )
        self._protocol: OverlayProtocol | None = None
        self._transport: asyncio.DatagramTransport | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._checks: dict[bytes, asyncio.Task[None]] = {}
        self._crawl_task: asyncio.Task[list[Member]] | None = None
        self._subscriptions: list[MembershipSubscription] = []
        self._bad_replies = 0
        self._started = False
        self._stopping = False
        self._stopped = asyncio.Event()
        self.port = 0
        self.socket_buffers = SocketBuffers(config.socket_buffer_bytes, 0, 0, None)

    # -- lifecycle --------------------------------------------------------------------------

    @classmethod
    async def start(cls, config: OverlayConfig) -> Overlay:
        """Bind, bootstrap from the seeds, crawl once and start the background jobs."""
        overlay = cls(config)
        await overlay._start()
        return overlay

    async def __aenter__(self) -> Self:
        """Start if not started yet."""
        if not self._started:
            await self._start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop."""
        await self.stop()

    async def _start(self) -> None:
        if self._started:
            raise UsageError("overlay already started")
        self._started = True
        loop = asyncio.get_running_loop()
        sock = self._open_socket()
        handlers: dict[str, RequestHandler] = {
            "ping": self._rpc_ping,
            "find_node": self._rpc_find_node,
            "node_info": self._rpc_node_info,
        }
        if not self.config.join:
            handlers = {"ping": self._rpc_ping}  # a client answers pings, never lists contacts
        tag_key = derive_tag_key(self.config.cluster_key) if self.config.cluster_key else None
        protocol = OverlayProtocol(
            self._node,
            self._book.router,
            handlers,
            rpc_timeout=self.config.rpc_timeout,
            max_in_flight=self.config.max_in_flight,
            tag_key=tag_key,
            other_tag_keys=[derive_tag_key(k) for k in self.config.accepted_cluster_keys]
            if tag_key is not None
            else [],
        )
        try:
            transport, _ = await loop.create_datagram_endpoint(lambda: protocol, sock=sock)
        except BaseException:
            sock.close()
            raise
        self._transport, self._protocol = transport, protocol
        self.port = sock.getsockname()[1]
        self._log.info(
            "overlay %s on %s:%d (data port %d, rcvbuf %d, sndbuf %d)",
            _short(self.node_id),
            self.config.host,
            self.port,
            self.config.data_port,
            self.socket_buffers.receive,
            self.socket_buffers.send,
        )
        try:
            await self.bootstrap()
        except BaseException:
            await self.stop()
            raise
        self._spawn(self._liveness_loop(), "overlay-liveness")
        self._spawn(self._refresh_loop(), "overlay-refresh")

    def _open_socket(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.config.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            wanted = self.config.socket_buffer_bytes
            if wanted:
                # The default (net.core.rmem_default, 208 KiB here) holds about 12 datagrams of
                # 8 KiB or 92 of 1 KiB: a burst of answers while the loop is busy overflows it.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, wanted)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, wanted)
            self.socket_buffers = SocketBuffers(
                requested=wanted,
                receive=sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF),
                send=sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF),
                rmem_max=_read_sysctl("/proc/sys/net/core/rmem_max"),
            )
            # Linux doubles the value for its bookkeeping and caps the request at rmem_max.
            if wanted and self.socket_buffers.receive < wanted:
                self._log.warning(
                    "overlay socket got SO_RCVBUF %d < %d asked (net.core.rmem_max=%s): "
                    "raise the sysctl to avoid dropped datagrams",
                    self.socket_buffers.receive,
                    wanted,
                    self.socket_buffers.rmem_max,
                )
            sock.bind((self.config.host, self.config.port))
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            raise ConfigError(
                f"cannot bind the overlay socket to {self.config.host}:{self.config.port}: {exc}"
            ) from exc
        return sock

    async def stop(self) -> None:
        """Cancel every background task, fail outstanding RPCs, close the socket (idempotent)."""
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        try:
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self._transport is not None:
                self._transport.close()
            if self._protocol is not None:
                await self._protocol.wait_closed()
            for subscription in list(self._subscriptions):
                subscription.close()
        finally:
            self._stopped.set()
        self._log.info("overlay %s stopped", _short(self.node_id))

    @property
    def running(self) -> bool:
        """True between start and stop."""
        return self._started and not self._stopping

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """Start an owned background task: kept until done, its failure logged, stop() ends it."""
        if self._stopping:
            coro.close()
            raise OverlayClosedError("overlay is stopped")
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if isinstance(exc, OverlayClosedError):
            self._log.debug("overlay task %s ended: %s", task.get_name(), exc)
        elif exc is not None:
            self._log.error("overlay task %s failed", task.get_name(), exc_info=exc)

    # -- public API -------------------------------------------------------------------------

    @property
    def address(self) -> Address:
        """(host, port) the kademlia socket is bound to."""
        return (self.config.host, self.port)

    def members(self) -> list[Member]:
        """The live members this node knows, itself included (unless in client mode).

        Suspect members (missed their last RPC, not yet ``max_failures``) are included so one
        slow answer does not move replicas; dead ones never are.
        """
        members = self._book.members()
        if self.config.join:
            members.append(self._self_member())
            members.sort(key=lambda m: m.node_id)
        return members

    def member(self, node_id: bytes) -> Member | None:
        """One member by id, or None."""
        return next((m for m in self.members() if m.node_id == node_id), None)

    def _self_member(self) -> Member:
        host = self.config.advertised_host or self.config.host
        return Member(
            node_id=self.node_id,
            host=host,
            port=self.port,
            data_host=host,
            data_port=self.config.data_port,
            metrics_port=self.config.metrics_port,
            version=__version__,
            last_seen=time.monotonic(),
        )

    def stats(self) -> OverlayStats:
        """A snapshot of the counters (for logs and Prometheus)."""
        suspects, dead = self._book.counts()
        socket_stats = replace(self._protocol.stats) if self._protocol else ProtocolStats()
        return OverlayStats(
            socket=socket_stats,
            bad_replies=self._bad_replies,
            members=len(self.members()),
            suspects=suspects,
            dead=dead,
            routing_contacts=len(self._book.router.contacts()),
        )

    def subscribe(self, *, replay: bool = True) -> MembershipSubscription:
        """A stream of membership events; ``replay`` first yields JOINED for current members."""
        if self._stopping:
            raise OverlayClosedError("overlay is stopped")
        subscription = MembershipSubscription(self._subscriptions.remove)
        if replay:
            for member in self._book.members():
                subscription._put(MembershipEvent(MembershipEventKind.JOINED, member))
        self._subscriptions.append(subscription)
        return subscription

    async def bootstrap(self, seeds: Iterable[tuple[str, int]] | None = None) -> list[Member]:
        """Ask each seed (default: the configured ones) for node_info, then crawl.

        Seeds that do not answer are logged and skipped: the first node of a cluster starts
        with none answering, and the refresh job retries while the node knows nobody.
        """
        addresses = await self._resolve(self.config.seeds if seeds is None else seeds)
        results = await asyncio.gather(
            *(self._fetch_info(None, addr) for addr in addresses), return_exceptions=True
        )
        answered = []
        for addr, result in zip(addresses, results, strict=True):
            if isinstance(result, NodeInfo):
                if result.node_id != self.node_id:
                    answered.append(result.node_id)
            elif isinstance(result, TmdhtError):
                self._log.info("seed %s:%d: %s", *addr, result)
            else:
                raise result
        if addresses and not answered and not self._book.members():
            self._log.warning("no seed answered (%d tried)", len(addresses))
        if self._book.members() or answered:
            await self.crawl()
        return self._book.members()

    async def crawl(self) -> list[Member]:
        """Discover the whole ring; return :meth:`members` once new contacts have answered.

        A lookup of our own id (the Kademlia join) and of stale buckets, then a sweep of the id
        space: a region whose lookup returns k contacts inside it may hold more, so it is split
        in two and each half is looked up, until every region holds fewer than k. That takes
        about 2 N / k lookups for N nodes. Concurrent callers share one crawl.
        """
        if self._crawl_task is None or self._crawl_task.done():
            self._crawl_task = self._spawn(self._crawl(), "overlay-crawl")
        task = self._crawl_task
        try:
            # shield: a caller that gives up must not cancel the crawl others are waiting for.
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if task.cancelled() and current is not None and not current.cancelling():
                raise OverlayClosedError("overlay stopped during the crawl") from None
            raise

    async def closest(self, key: bytes, count: int) -> list[Member]:
        """The ``count`` members closest to ``key`` by XOR distance, after an iterative lookup.

        Members include this node and suspects (see :meth:`members`); never dead contacts.
        """
        if not isinstance(key, bytes) or len(key) != ID_SIZE:
            raise UsageError(f"a key is {ID_SIZE} bytes")
        if count < 1:
            raise UsageError("count must be >= 1")
        found = await self._lookup(key)
        await self._settle_checks([node.id for node in found])
        number = int.from_bytes(key, "big")
        return heapq.nsmallest(
            count, self.members(), key=lambda m: int.from_bytes(m.node_id, "big") ^ number
        )

    async def probe(self, node_id: bytes) -> Member:
        """Ask a known contact for node_info now; raise RpcTimeoutError if it does not answer.

        The result counts for liveness like any probe. Useful when the data plane suspects a
        node. Raises UnknownPeerError for an id never heard of.
        """
        addr = self._book.peer_address(node_id)
        if addr is None:
            raise UnknownPeerError(f"no contact {node_id.hex()}")
        await self._fetch_info(node_id, addr)
        member = self.member(node_id)
        if member is None:
            raise UnknownPeerError(f"{node_id.hex()} answered but is no member")
        return member

    # -- requests we answer (synchronously, from datagram_received) -------------------------

    def _rpc_ping(self, addr: Address, args: tuple[Any, ...]) -> bytes:
        self._heard(_sender_id(args, 1), addr)
        return self.node_id

    def _rpc_find_node(self, addr: Address, args: tuple[Any, ...]) -> list[list[object]]:
        sender = _sender_id(args, 2)
        target = _node_id(args[1], "find_node key")
        self._heard(sender, addr)
        neighbors = self._book.neighbors(target, self.config.ksize, exclude=sender)
        return [[node.id, node.ip, node.port] for node in neighbors]

    def _rpc_node_info(self, addr: Address, args: tuple[Any, ...]) -> dict[str, object]:
        self._heard(_sender_id(args, 1), addr)
        info = NodeInfo(
            node_id=self.node_id,
            data_host=self.config.advertised_host,
            data_port=self.config.data_port,
            metrics_port=self.config.metrics_port,
            version=__version__,
        )
        return info.to_wire()

    def _heard(self, sender: bytes, addr: Address) -> None:
        if sender != _NO_ID:
            self._publish(self._book.heard(sender, addr, time.monotonic()))

    # -- requests we send -------------------------------------------------------------------

    @property
    def _sender(self) -> bytes:
        return self.node_id if self.config.join else _NO_ID

    async def _call(
        self, expected: bytes | None, addr: Address, method: str, args: Sequence[object]
    ) -> Any:
        if self._protocol is None:
            raise OverlayClosedError("overlay not started")
        try:
            return await self._protocol.call(addr, method, args)
        except RpcTimeoutError:
            if expected is not None:
                self._publish(self._book.failed(expected, addr, time.monotonic()))
            raise

    def _bad_reply(self, expected: bytes | None, addr: Address, exc: DecodeError) -> None:
        self._bad_replies += 1
        self._log.warning("bad answer from %s:%d: %s", *addr, exc)
        if expected is not None:
            self._publish(self._book.failed(expected, addr, time.monotonic()))

    async def _fetch_info(self, expected: bytes | None, addr: Address) -> NodeInfo:
        """node_info RPC: the probe that makes a contact a member (and keeps it one)."""
        raw = await self._call(expected, addr, "node_info", [self._sender])
        try:
            info = parse_node_info(raw)
        except DecodeError as exc:
            self._bad_reply(expected, addr, exc)
            raise
        now = time.monotonic()
        if expected is not None and info.node_id != expected:
            # Another node now answers at that address (e.g. data dir wiped): the one we
            # expected is certainly not there; the new one is a fine contact.
            self._publish(self._book.failed(expected, addr, now, gone=True))
        if info.node_id != self.node_id:
            self._publish(self._book.got_info(info, addr, now))
        return info

    async def _find_node(self, peer: Node, target: Node) -> list[Node]:
        """FIND_NODE on ``peer`` for the lookup: the listed contacts worth querying."""
        addr = (peer.ip, peer.port)
        raw = await self._call(peer.id, addr, "find_node", [self._sender, target.id])
        try:
            contacts = parse_contacts(raw)
        except DecodeError as exc:
            self._bad_reply(peer.id, addr, exc)
            raise
        now = time.monotonic()
        self._publish(self._book.heard(peer.id, addr, now))
        usable = [node for c in contacts if (node := self._book.mentioned(c, now)) is not None]
        self._pump()
        return usable

    async def _lookup(self, target: bytes) -> list[Node]:
        start = self._book.lookup_start(target, self.config.ksize)
        lookup = NodeLookup(
            self._find_node, Node(target), start, self.config.ksize, self.config.alpha
        )
        return await lookup.find()

    async def _crawl(self) -> list[Member]:
        k = self.config.ksize
        found: set[bytes] = set()
        targets = [
            self.node_id,
            *self._book.router.refresh_ids(self.config.refresh_interval, time.monotonic()),
        ]
        for target in targets:
            found.update(node.id for node in await self._lookup(target))
        lookups = len(targets)
        regions: deque[tuple[int, int]] = deque([(0, 0)])
        while regions and lookups < self.config.max_crawl_lookups:
            prefix, bits = regions.popleft()
            nodes = await self._lookup(random_id_in(prefix, bits))
            lookups += 1
            found.update(node.id for node in nodes)
            inside = sum(1 for node in nodes if node.long_id >> (ID_BITS - bits) == prefix)
            if inside >= k and bits < ID_BITS:
                regions.extend(((prefix << 1, bits + 1), ((prefix << 1) | 1, bits + 1)))
        if regions:
            self._log.warning(
                "crawl stopped after %d lookups with %d regions left", lookups, len(regions)
            )
        # Every contact learned on the way, not only the lookups' results, should be a member
        # (with its data port) when crawl() returns.
        await self._settle_checks(found | set(self._checks))
        members = self.members()
        self._log.debug("crawl: %d lookups, %d members", lookups, len(members))
        return members

    # -- background jobs --------------------------------------------------------------------

    def _publish(self, events: list[MembershipEvent]) -> None:
        for event in events:
            self._log.info(
                "member %s %s (%s:%d, data %s:%d)",
                _short(event.member.node_id),
                event.kind.value,
                event.member.host,
                event.member.port,
                event.member.data_host,
                event.member.data_port,
            )
            for subscription in self._subscriptions:
                subscription._put(event)
        self._pump()

    def _pump(self) -> None:
        """Start the probes the book asked for, one at a time per contact."""
        if self._stopping or self._protocol is None:
            return
        for node_id, addr in self._book.take_wanted().items():
            if node_id not in self._checks:
                task = self._spawn(self._check(node_id, addr), "overlay-check")
                self._checks[node_id] = task
                task.add_done_callback(functools.partial(self._check_done, node_id))

    def _check_done(self, node_id: bytes, _task: asyncio.Task[None]) -> None:
        self._checks.pop(node_id, None)

    async def _check(self, node_id: bytes, addr: Address) -> None:
        try:
            await self._fetch_info(node_id, addr)
        except (OverlayError, DecodeError) as exc:
            self._log.debug("probe of %s at %s:%d: %s", _short(node_id), *addr, exc)

    async def _settle_checks(self, node_ids: Iterable[bytes]) -> None:
        """Wait for the running probes of the given contacts that have not answered node_info.

        Each probe is bounded by the RPC timeout, so this is bounded too.
        """
        self._pump()
        pending = {
            self._checks[n] for n in node_ids if n in self._checks and self._book.lacks_info(n)
        }
        if pending:
            await asyncio.wait(pending)

    async def _liveness_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.probe_interval)
            self._book.tick(time.monotonic())
            self._pump()

    async def _refresh_loop(self) -> None:
        # A node that knows nobody asks its seeds again after 1 s, 2 s, 4 s ... up to the refresh
        # interval: nodes started together (a StatefulSet, a compose file, several systemd
        # instances) all find their seeds not yet listening on the first try.
        alone_wait = 1.0
        while True:
            alone = not self._book.members() and bool(self.config.seeds)
            await asyncio.sleep(
                min(alone_wait, self.config.refresh_interval)
                if alone
                else self.config.refresh_interval
            )
            alone_wait = alone_wait * 2 if alone else 1.0
            try:
                if not self._book.members():
                    await self.bootstrap()
                else:
                    await self.crawl()
            except TmdhtError as exc:
                self._log.warning("ring refresh failed: %s", exc)
            except Exception:
                # A bug in one refresh must not end refreshing for the life of the node.
                log.exception("[%s] ring refresh failed unexpectedly", _short(self.node_id))

    async def _resolve(self, seeds: Iterable[tuple[str, int]]) -> list[Address]:
        """Seeds as IP literals of the socket's family; unresolvable ones are logged, skipped."""
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in self.config.host else socket.AF_INET
        addresses: list[Address] = []
        for host, port in seeds:
            try:
                ipaddress.ip_address(host)
            except ValueError:
                try:
                    infos = await loop.getaddrinfo(
                        host, port, family=family, type=socket.SOCK_DGRAM
                    )
                except OSError as exc:
                    self._log.warning("seed %s:%d does not resolve: %s", host, port, exc)
                    continue
                addresses.extend((str(info[4][0]), int(info[4][1])) for info in infos[:1])
            else:
                addresses.append((host, port))
        return addresses


def _read_sysctl(path: str) -> int | None:
    try:
        return int(Path(path).read_text().strip())
    except (OSError, ValueError):
        return None
