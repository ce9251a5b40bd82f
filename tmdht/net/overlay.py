"""The overlay's sans-IO half: its configuration and its datagram format.

The overlay (ring membership and routing, :mod:`tmdht.aio.overlay`) speaks rpcudp's framing so the
control plane still reads like kademlia on the wire: ``0x00`` request / ``0x01`` answer, a 20-byte
message id, a msgpack body, and -- when a cluster key is set -- a 16-byte keyed BLAKE3 tag. This
module owns that format: :func:`decode_datagram` checks the size before anything is parsed, the
tag before msgpack is touched and the request shape before a handler sees it, and raises only
:class:`~tmdht.errors.DecodeError`. The answers peers send (``node_info``, ``find_node``) are
validated by :func:`parse_peer_info` and :func:`parse_contacts` before use.

Two frame versions share the port. Version 1 is rpcudp's (type ``0x00``/``0x01``). Version 2,
the *stamped* frame (type ``0x02`` request / ``0x03`` answer), adds a replay stamp under the
tag, checked like the data plane's (:class:`tmdht.auth.ReplayWindow`: a timestamp within +-10 s
of the receiver's clock and a 64-bit nonce not seen in that window)::

    | type (1) | msg id (20) | timestamp ms, u64 (8) | nonce, u64 (8) | msgpack body | tag (16) |

A stamped datagram replayed is dropped and counted (``ReplayError``). Version 1 frames are still
accepted, so nodes of the previous release keep working during a rolling upgrade (an answer
goes out in its request's version; requests go out stamped, unstamped only to an address that
has sent only unstamped frames); ``require_stamped`` refuses them once every node and client
is upgraded.
"""

from __future__ import annotations

import hmac
import ipaddress
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from struct import Struct
from typing import Final

import umsgpack
from blake3 import blake3
from kademlia.node import Node

from tmdht.auth import ReplayWindow
from tmdht.domains import MAX_VIRTUAL_IDS, FailureDomain
from tmdht.errors import (
    ConfigError,
    DecodeError,
    LimitExceededError,
    ReplayError,
    UnauthenticatedError,
    UsageError,
)

__all__ = [
    "ID_BITS",
    "ID_SIZE",
    "MAX_ADVERTISED_REPLICAS",
    "MAX_BODY_SIZE",
    "MAX_CONTACTS",
    "NO_ID",
    "PROTOCOL_VERSION",
    "STAMP_SIZE",
    "TAG_SIZE",
    "OverlayConfig",
    "PeerInfo",
    "Request",
    "Response",
    "check_node_id",
    "decode_datagram",
    "derive_tag_key",
    "encode_request",
    "encode_response",
    "parse_contacts",
    "parse_peer_info",
    "random_id_in",
    "sender_id",
]

ID_SIZE: Final = 20
"""Bytes in a node id or key (160 bits, the package's ID space)."""
ID_BITS: Final = ID_SIZE * 8

_REQUEST: Final = 0x00
_RESPONSE: Final = 0x01
_STAMPED_REQUEST: Final = 0x02
_STAMPED_RESPONSE: Final = 0x03
_HEADER_SIZE: Final = 1 + ID_SIZE
_STAMP: Final = Struct(">QQ")  # timestamp ms, nonce
STAMP_SIZE: Final = _STAMP.size
"""Bytes a version 2 (stamped) frame adds: timestamp and nonce."""
MAX_BODY_SIZE: Final = 8192
"""Largest msgpack body accepted or sent: rpcudp's own cap on a request."""
TAG_SIZE: Final = 16
"""Bytes of the keyed BLAKE3 tag appended to every datagram when a cluster key is set."""
_TAG_CONTEXT: Final = "tmdht 2024-06 overlay datagram tag v1"

PROTOCOL_VERSION: Final = 1
"""Version of the ``node_info`` answer (the ``v`` field); other versions are refused. Fields added
later are optional within a version (``domain``, ``virtual_ids``, ``replicas``): a reader ignores
keys it does not know and defaults the ones a peer did not send, so old and new nodes share a
ring."""
MAX_ADVERTISED_REPLICAS: Final = 1024
"""Largest replication factor (R) a ``node_info`` answer may advertise."""
MAX_CONTACTS: Final = 64
"""Most contacts accepted in one FIND_NODE answer (the package sends k, 20 by default)."""
_MAX_VERSION_CHARS: Final = 64
_MAX_HOST_CHARS: Final = 64
NO_ID: Final = b""
"""Sender id of a client-mode overlay: peers answer it but never record it as a contact."""


# ----------------------------------------------------------------------------------------------
# Configuration


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
    replay_window: float = 10.0
    """Seconds a stamped datagram's timestamp may differ from this host's clock."""
    require_stamped: bool = False
    """Refuse unstamped (version 1) datagrams: once every node and client runs version 2."""
    domain: FailureDomain | None = None
    """This node's failure domain, advertised in ``node_info`` (None: not advertised; peers
    then take its IP as its host)."""
    virtual_ids: int | None = None
    """The placement rule's V this node uses, advertised in ``node_info`` so clients follow it
    (None: not advertised, client mode)."""
    replicas: int | None = None
    """The replication factor R this node uses, advertised in ``node_info`` (shown and checked
    by clients; None: not advertised)."""
    peer_cache: Path | None = None
    """File where the members known are kept (:mod:`tmdht.net.peercache`) to rejoin from when
    no seed answers; None: no cache (client mode)."""

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
        if self.ksize > MAX_CONTACTS:
            raise ConfigError(f"ksize must be <= {MAX_CONTACTS} (answers must fit a datagram)")
        if self.socket_buffer_bytes < 0 or self.max_crawl_lookups < 1 or self.max_peers < 1:
            raise ConfigError("socket_buffer_bytes >= 0, max_crawl_lookups/max_peers >= 1")
        if not self.replay_window > 0:
            raise ConfigError(f"replay_window must be > 0, got {self.replay_window!r}")
        if self.cluster_key is not None and len(self.cluster_key) < 16:
            raise ConfigError("cluster_key must be at least 16 bytes")
        object.__setattr__(self, "accepted_cluster_keys", tuple(self.accepted_cluster_keys))
        if self.accepted_cluster_keys and self.cluster_key is None:
            raise ConfigError("accepted_cluster_keys need a cluster_key to send with")
        if any(len(k) < 16 for k in self.accepted_cluster_keys):
            raise ConfigError("accepted_cluster_keys must be at least 16 bytes each")
        rule_limits = (("virtual_ids", MAX_VIRTUAL_IDS), ("replicas", MAX_ADVERTISED_REPLICAS))
        for name, limit in rule_limits:
            value = getattr(self, name)
            if value is not None and (
                not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= limit
            ):
                raise ConfigError(f"{name} must be None or an integer in 1..{limit}")


def _check_ip(value: str, name: str) -> None:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise ConfigError(f"{name} must be an IP literal, got {value!r}") from None


def _check_port(value: object, name: str, *, allow_zero: bool) -> None:
    low = 0 if allow_zero else 1
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= 65535:
        raise ConfigError(f"{name} must be an integer in {low}..65535, got {value!r}")


# ----------------------------------------------------------------------------------------------
# The datagram format


@dataclass(frozen=True, slots=True)
class Request:
    """A decoded RPC request (rpcudp type byte 0x00)."""

    msg_id: bytes
    """20 random bytes chosen by the caller; the answer carries them back."""
    method: str
    """Name of the remote procedure (``ping``, ``find_node``, ``node_info``)."""
    args: tuple[object, ...]
    """Positional arguments as decoded; the handler validates them."""
    stamped: bool = False
    """Sent as a version 2 frame (with a replay stamp): answer it in one too."""


@dataclass(frozen=True, slots=True)
class Response:
    """A decoded RPC answer (rpcudp type byte 0x01)."""

    msg_id: bytes
    """The id of the request this answers."""
    value: object
    """The answer as decoded; the caller validates it."""
    stamped: bool = False
    """Arrived as a version 2 frame (with a replay stamp)."""


def derive_tag_key(cluster_key: bytes) -> bytes:
    """The overlay's own 32-byte tag key, derived so it never equals another plane's key."""
    return bytes(blake3(cluster_key, derive_key_context=_TAG_CONTEXT).digest())


def _tag(body: bytes, tag_key: bytes) -> bytes:
    return bytes(blake3(body, key=tag_key).digest(length=TAG_SIZE))


Stamp = tuple[int, int]
"""(timestamp in ms since the Unix epoch, nonce): what makes a frame version 2."""


def _frame(
    kind: int, msg_id: bytes, payload: object, tag_key: bytes | None, stamp: Stamp | None
) -> bytes:
    body: bytes = umsgpack.packb(payload)
    if len(body) > MAX_BODY_SIZE:
        raise LimitExceededError(f"overlay message body of {len(body)} bytes > {MAX_BODY_SIZE}")
    if stamp is None:
        datagram = bytes((kind,)) + msg_id + body
    else:
        datagram = bytes((kind + _STAMPED_REQUEST,)) + msg_id + _STAMP.pack(*stamp) + body
    return datagram + _tag(datagram, tag_key) if tag_key is not None else datagram


def encode_request(
    msg_id: bytes,
    method: str,
    args: Sequence[object],
    tag_key: bytes | None = None,
    stamp: Stamp | None = None,
) -> bytes:
    """One request datagram: rpcudp's framing ``0x00 | msg_id | msgpack([method, args])``, or
    with a ``stamp`` the version 2 frame (``0x02``, the stamp after the message id)."""
    return _frame(_REQUEST, msg_id, [method, list(args)], tag_key, stamp)


def encode_response(
    msg_id: bytes, value: object, tag_key: bytes | None = None, stamp: Stamp | None = None
) -> bytes:
    """One answer datagram: ``0x01 | msg_id | msgpack(value)``, or with a ``stamp`` the
    version 2 frame (``0x03``)."""
    return _frame(_RESPONSE, msg_id, value, tag_key, stamp)


# umsgpack raises its own UnpackException family on bad input, but also ValueError/TypeError from
# ext and timestamp decoding and RecursionError on deeply nested arrays (8 KiB of 0x91 bytes).
_UNPACK_FAILURES: Final = (umsgpack.UnpackException, RecursionError, ValueError, TypeError)


def decode_datagram(
    datagram: bytes,
    tag_key: bytes | None = None,
    other_tag_keys: Sequence[bytes] = (),
    *,
    replay: ReplayWindow | None = None,
    now: float = 0.0,
    require_stamped: bool = False,
) -> Request | Response:
    """Decode one datagram from the network; raise only :class:`DecodeError` on bad bytes.

    A stamped (version 2) frame's stamp is checked by ``replay`` at wall-clock time ``now``
    once the tag verified (``ReplayError``, ``ClockSkewError``); an unstamped one is refused
    with ``require_stamped`` (``ReplayError``: it cannot be told from a replay).

    The size is checked before anything is parsed, the tag (when a key is set) before msgpack is
    touched, and the request shape before a handler sees it. The tag carries no key id, so during
    a key rotation the tag is checked against ``tag_key`` and then each of ``other_tag_keys``
    (the keys still, or already, accepted): one more BLAKE3 of <= 8 KiB per extra key, paid only
    by datagrams that the sending key does not open.
    """
    limit = _HEADER_SIZE + STAMP_SIZE + MAX_BODY_SIZE + (TAG_SIZE if tag_key is not None else 0)
    if len(datagram) > limit:
        raise LimitExceededError(f"datagram of {len(datagram)} bytes > {limit}")
    if tag_key is not None:
        datagram, tag = datagram[:-TAG_SIZE], datagram[-TAG_SIZE:]
        if len(tag) != TAG_SIZE or not any(
            hmac.compare_digest(tag, _tag(datagram, key)) for key in (tag_key, *other_tag_keys)
        ):
            raise UnauthenticatedError("datagram without a valid cluster tag")
    if len(datagram) <= _HEADER_SIZE:
        raise DecodeError(f"datagram of {len(datagram)} bytes has no body")
    kind, msg_id = datagram[0], bytes(datagram[1:_HEADER_SIZE])
    if kind not in (_REQUEST, _RESPONSE, _STAMPED_REQUEST, _STAMPED_RESPONSE):
        raise DecodeError(f"unknown datagram type 0x{kind:02x}")
    body_at = _HEADER_SIZE
    stamped = kind >= _STAMPED_REQUEST
    if stamped:
        body_at += STAMP_SIZE
        if len(datagram) <= body_at:
            raise DecodeError(f"stamped datagram of {len(datagram)} bytes has no body")
        timestamp_ms, nonce = _STAMP.unpack_from(datagram, _HEADER_SIZE)
        if replay is not None:
            replay.check(0, nonce, timestamp_ms, now)
        kind -= _STAMPED_REQUEST
    elif require_stamped:
        raise ReplayError("unstamped (version 1) datagram refused: stamps are required")
    try:
        payload = umsgpack.unpackb(bytes(datagram[body_at:]))
    except _UNPACK_FAILURES as exc:
        raise DecodeError(f"bad msgpack body: {type(exc).__name__}") from None
    if kind == _RESPONSE:
        return Response(msg_id, payload, stamped)
    if (
        not isinstance(payload, list)
        or len(payload) != 2
        or not isinstance(payload[0], str)
        or not isinstance(payload[1], list)
    ):
        raise DecodeError("a request body must be [method: str, args: list]")
    return Request(msg_id, payload[0], tuple(payload[1]), stamped)


def random_id_in(prefix: int, bits: int, rng: random.Random | None = None) -> bytes:
    """A random 160-bit id whose first ``bits`` bits are ``prefix``."""
    free = ID_BITS - bits
    low = (rng or random).getrandbits(free) if free else 0
    return ((prefix << free) | low).to_bytes(ID_SIZE, "big")


# ----------------------------------------------------------------------------------------------
# Validation of what peers send


@dataclass(frozen=True, slots=True)
class PeerInfo:
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
    domain: FailureDomain | None = None
    """Its failure domain (``domain``: [zone, rack, host]); None if it sent none (an older
    node)."""
    virtual_ids: int | None = None
    """Its placement rule's V, tokens per member (``virtual_ids``); None if it sent none (an
    older node)."""
    replicas: int | None = None
    """Its replication factor R (``replicas``); None if it sent none (an older node)."""

    def to_wire(self) -> dict[str, object]:
        """The msgpack-able answer."""
        answer: dict[str, object] = {
            "v": PROTOCOL_VERSION,
            "id": self.node_id,
            "data_host": self.data_host,
            "data_port": self.data_port,
            "metrics_port": self.metrics_port,
            "version": self.version,
        }
        if self.domain is not None:
            answer["domain"] = list(self.domain.path)
        if self.virtual_ids is not None:
            answer["virtual_ids"] = self.virtual_ids
        if self.replicas is not None:
            answer["replicas"] = self.replicas
        return answer


def check_node_id(value: object, what: str) -> bytes:
    """A 20-byte node id from a peer, or DecodeError."""
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


def parse_peer_info(raw: object) -> PeerInfo:
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
    return PeerInfo(
        node_id=check_node_id(raw.get("id"), "node_info id"),
        data_host=_ip(raw.get("data_host"), "node_info data_host", allow_empty=True),
        data_port=_port(raw.get("data_port"), "node_info data_port", allow_zero=False),
        metrics_port=_port(raw.get("metrics_port"), "node_info metrics_port", allow_zero=True),
        version=software,
        domain=_domain(raw.get("domain")),
        virtual_ids=_optional_count(raw.get("virtual_ids"), "virtual_ids", MAX_VIRTUAL_IDS),
        replicas=_optional_count(raw.get("replicas"), "replicas", MAX_ADVERTISED_REPLICAS),
    )


def _optional_count(raw: object, what: str, limit: int) -> int | None:
    """An optional small positive count of a ``node_info`` answer (None if absent)."""
    if raw is None:
        return None
    if not isinstance(raw, int) or isinstance(raw, bool) or not 1 <= raw <= limit:
        raise DecodeError(f"node_info {what} must be an integer in 1..{limit}, got {raw!r}")
    return raw


def _domain(raw: object) -> FailureDomain | None:
    """The optional ``domain`` of a ``node_info`` answer: [zone, rack, host] labels."""
    if raw is None:
        return None
    if not isinstance(raw, list) or len(raw) != 3 or not all(isinstance(x, str) for x in raw):
        raise DecodeError("node_info domain must be [zone, rack, host] strings")
    try:
        return FailureDomain(*raw)
    except UsageError as exc:
        raise DecodeError(f"node_info domain: {exc}") from None


def parse_contacts(raw: object) -> list[Node]:
    """Validate a FIND_NODE answer ``[[id, ip, port], ...]``; raise DecodeError if malformed."""
    if not isinstance(raw, list) or len(raw) > MAX_CONTACTS:
        raise DecodeError(f"find_node answer must be a list of at most {MAX_CONTACTS} contacts")
    contacts = []
    for entry in raw:
        if not isinstance(entry, list) or len(entry) != 3:
            raise DecodeError("a contact must be [id, ip, port]")
        contacts.append(
            Node(
                check_node_id(entry[0], "contact id"),
                _ip(entry[1], "contact ip", allow_empty=False),
                _port(entry[2], "contact port", allow_zero=False),
            )
        )
    return contacts


def sender_id(args: tuple[object, ...], count: int) -> bytes:
    """The sender id every request starts with (kademlia's convention); b"" from a client."""
    if len(args) != count:
        raise DecodeError(f"expected {count} arguments, got {len(args)}")
    sender = args[0]
    if sender == NO_ID:
        return NO_ID
    return check_node_id(sender, "sender id")
