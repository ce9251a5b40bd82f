"""Authentication of data-plane datagrams with the shared cluster key (sans-IO).

No sockets, no clocks, no event loop: the caller passes ``now`` (wall-clock seconds since the
Unix epoch, i.e. ``time.time()``, *not* ``loop.time()``: timestamps are compared across hosts).

Every datagram carries an *auth block* of 34 bytes, owned by this module, right after the bytes
it authenticates (the *payload*). :mod:`tmdht.wire` frames the payload (header and body), calls
:meth:`Authenticator.seal` and :meth:`Authenticator.open`, and may append bytes after the block
that the tag does not cover (page bytes, bound to digests in the payload; ``open(..., end=)``
locates a block that is not at the end)::

    | offset (from end of payload) | size | field                                            |
    |------------------------------|------|--------------------------------------------------|
    | +0                           | 1    | key id: 1..255; 0 only in open mode              |
    | +1                           | 1    | auth flags: bit 0 OPEN; other bits must be 0     |
    | +2                           | 8    | sender timestamp, ms since the Unix epoch (u64)  |
    | +10                          | 8    | nonce (u64, unique per sender's datagram)        |
    | +18                          | 16   | tag: keyed BLAKE3 over payload + bytes +0..+18   |

The tag covers everything before it, the auth block fields included, so neither the key id, the
timestamp nor the nonce can be changed without the key. It is the first 16 bytes of keyed BLAKE3
(``blake3(data, key=tag_key)``) where ``tag_key`` is derived from the 32-byte cluster key with
BLAKE3's key-derivation mode and a context string private to this use: the same cluster key may
then authenticate other traffic (e.g. the control plane) without one tag ever being valid in the
other protocol.

Modes and policy:

- **Keyed** (production): a datagram is accepted only if its key id names a key the
  :class:`KeyRing` accepts at ``now`` and its tag matches; then the :class:`ReplayWindow` checks
  its timestamp and nonce. Open datagrams are refused.
- **Open** (local development, no key): datagrams carry key id 0, the OPEN flag and an all-zero
  tag. An open-mode node refuses *keyed* datagrams too: it cannot verify them, and accepting them
  would let a misconfigured node silently join a keyed cluster. A mismatch in either direction is
  therefore loud (every datagram dropped and counted) instead of half-working.

Errors: :class:`AuthenticationError` (bad or missing tag, unknown or expired key id, open/keyed
mismatch) and :class:`ReplayError` (a nonce seen before, or a timestamp the window can no longer
vouch for; :class:`ClockSkewError` when the timestamp is outside ``now +- window``). Both subclass
:class:`tmdht.errors.DecodeError`: they are the remote side's fault about bytes that arrived, a
node handles them like any bad datagram (drop, count by class), and the invariant "decoding a
datagram raises only DecodeError" keeps holding when authentication is part of decoding.

Key rotation without dropping traffic, in three steps over the cluster:

1. every node *also accepts* the new key: ``keyring.accept(new_key)``;
2. every node *sends* with it: ``keyring.rotate(new_key, now=..., grace=...)``: the old key stays
   accepted until ``now + grace``;
3. after the grace period the old key is refused everywhere.

A node gets its keys from a *key file* (:func:`parse_cluster_keys`): one key as 64 hex digits
(key id 1), or one ``id:hex`` line per key, the first line naming the key to send with and every
line a key to accept. The three steps above are then three edits of the file (each followed by a
rolling restart of the nodes): ``1:OLD`` -> ``1:OLD`` + ``2:NEW`` -> ``2:NEW`` + ``1:OLD`` ->
``2:NEW``.
"""

from __future__ import annotations

import heapq
import hmac
import itertools
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from struct import Struct
from typing import Final

from blake3 import blake3

from tmdht.errors import (
    AuthenticationError,
    ClockSkewError,
    ConfigError,
    ReplayError,
    UsageError,
)
from tmdht.pages import ByteView

__all__ = [
    "AUTH_OVERHEAD",
    "CLUSTER_KEY_SIZE",
    "DEFAULT_REPLAY_CAPACITY",
    "DEFAULT_REPLAY_WINDOW",
    "FLAG_OPEN",
    "MAX_KEYS",
    "TAG_SIZE",
    "AuthenticationError",
    "Authenticator",
    "ClockSkewError",
    "ClusterKey",
    "KeyRing",
    "ReplayError",
    "ReplayWindow",
    "keyring_from",
    "load_key",
    "parse_cluster_keys",
]

CLUSTER_KEY_SIZE: Final = 32
"""Bytes in a cluster key (a BLAKE3 key)."""
TAG_SIZE: Final = 16
"""Bytes in a datagram tag (128 bits: forging needs ~2**128 tries, each a datagram)."""
FLAG_OPEN: Final = 0x01
"""Auth flag: the datagram is unauthenticated (open mode, key id 0, all-zero tag)."""

_AUTH_BLOCK: Final = Struct(">BBQQ")  # key id, auth flags, timestamp ms, nonce
AUTH_OVERHEAD: Final = _AUTH_BLOCK.size + TAG_SIZE
"""Bytes the auth block adds to every datagram (34)."""

DEFAULT_REPLAY_WINDOW: Final = 10.0
"""Seconds a timestamp may differ from the receiver's clock (NTP keeps a data center within ms)."""
DEFAULT_REPLAY_CAPACITY: Final = 1 << 17
"""Nonces a :class:`ReplayWindow` remembers (about 200 bytes each: ~25 MiB at the cap)."""

_OPEN_KEY_ID: Final = 0
_ZERO_TAG: Final = bytes(TAG_SIZE)
_U64_MAX: Final = (1 << 64) - 1
_TAG_KEY_CONTEXT: Final = "tmdht 2024-06 data-plane datagram tag v1"


def load_key(material: str | bytes) -> bytes:
    """Validate a cluster key: 32 raw bytes, or 64 hex digits (str or ASCII bytes).

    Surrounding whitespace (a trailing newline in a key file) is ignored for the hex forms.
    Reading files or the environment is the caller's job. Raises ConfigError.
    """
    if isinstance(material, bytes) and len(material) == CLUSTER_KEY_SIZE:
        return bytes(material)
    if isinstance(material, bytes):
        try:
            text = material.decode("ascii")
        except UnicodeDecodeError:
            raise ConfigError(
                f"a cluster key is {CLUSTER_KEY_SIZE} raw bytes or {2 * CLUSTER_KEY_SIZE} hex "
                f"digits, got {len(material)} non-ASCII bytes"
            ) from None
    else:
        text = material
    text = text.strip()
    if len(text) != 2 * CLUSTER_KEY_SIZE:
        raise ConfigError(
            f"a cluster key is {2 * CLUSTER_KEY_SIZE} hex digits, got {len(text)} characters"
        )
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise ConfigError("a cluster key in text form must be hexadecimal") from None


MAX_KEYS: Final = 8
"""Most keys one key file may list (a rotation needs two)."""


def parse_cluster_keys(text: str) -> list[ClusterKey]:
    """Parse a key file (or $TMDHT_CLUSTER_KEY): the sending key first, then the other accepted.

    Accepted forms: a single key of 64 hex digits (key id 1), or one ``id:hex`` entry per line
    (``id`` 1..255; commas separate entries too, for environment variables). Blank lines and
    ``#`` comments are ignored. Raises ConfigError on anything else, on a repeated key id, and
    on more than :data:`MAX_KEYS` keys. Error messages never include key material.
    """
    entries = [
        entry.strip()
        for line in text.splitlines()
        for entry in line.split("#", 1)[0].split(",")
        if entry.strip()
    ]
    if not entries:
        raise ConfigError("no cluster key found (expected 64 hex digits or id:hex lines)")
    if len(entries) > MAX_KEYS:
        raise ConfigError(f"at most {MAX_KEYS} cluster keys, got {len(entries)}")
    keys: list[ClusterKey] = []
    for number, entry in enumerate(entries, 1):
        key_id_text, sep, material = entry.rpartition(":")
        if not sep:
            if len(entries) > 1:
                raise ConfigError(f"key {number}: several keys need ids: write id:hex per line")
            key_id_text, material = "1", entry
        try:
            key_id = int(key_id_text.strip())
        except ValueError:
            raise ConfigError(f"key {number}: the key id must be a number 1..255") from None
        try:
            key = ClusterKey(key_id, load_key(material))
        except ConfigError as exc:
            raise ConfigError(f"key {number}: {exc}") from None
        if any(k.key_id == key.key_id for k in keys):
            raise ConfigError(f"key id {key.key_id} is listed twice")
        keys.append(key)
    return keys


def keyring_from(keys: list[ClusterKey]) -> KeyRing:
    """A key ring sending with ``keys[0]`` and accepting every key listed."""
    if not keys:
        raise ConfigError("a key ring needs at least one key")
    ring = KeyRing(keys[0])
    for key in keys[1:]:
        ring.accept(key)
    return ring


@dataclass(frozen=True, slots=True)
class ClusterKey:
    """One cluster key and the id that names it on the wire."""

    key_id: int
    """1..255, carried in every datagram so verifiers know which key to try (0 means open)."""
    secret: bytes = field(repr=False)
    """The 32-byte key, e.g. from :func:`load_key`. Never printed."""
    tag_key: bytes = field(init=False, repr=False, compare=False)
    """The tag key derived from ``secret`` (computed once)."""

    def __post_init__(self) -> None:
        if not 1 <= self.key_id <= 255:
            raise ConfigError(f"a cluster key id is 1..255, got {self.key_id}")
        if len(self.secret) != CLUSTER_KEY_SIZE:
            raise ConfigError(f"a cluster key is {CLUSTER_KEY_SIZE} bytes, got {len(self.secret)}")
        derived = blake3(self.secret, derive_key_context=_TAG_KEY_CONTEXT).digest()
        object.__setattr__(self, "tag_key", derived)


class KeyRing:
    """The key a node sends with, and the keys it accepts (each possibly until a deadline)."""

    def __init__(self, current: ClusterKey) -> None:
        self._current = current
        self._accepted: dict[int, tuple[ClusterKey, float | None]] = {}

    @property
    def current(self) -> ClusterKey:
        """The key outgoing datagrams are sealed with (always accepted too)."""
        return self._current

    def accept(self, key: ClusterKey, *, until: float | None = None) -> None:
        """Also accept ``key``, forever (``until=None``) or until the wall-clock time ``until``."""
        self._check_id_free(key)
        self._accepted[key.key_id] = (key, until)

    def rotate(self, new: ClusterKey, *, now: float, grace: float) -> None:
        """Send with ``new`` from now on; keep accepting the old key until ``now + grace``."""
        if new.key_id == self._current.key_id:
            raise UsageError(f"a new key needs a new key id, {new.key_id} is the current one")
        if grace < 0:
            raise UsageError(f"a grace period is >= 0 seconds, got {grace}")
        self._check_id_free(new)
        self._accepted.pop(new.key_id, None)
        self._accepted[self._current.key_id] = (self._current, now + grace)
        self._current = new

    def replace(self, keys: list[ClusterKey]) -> None:
        """Send with ``keys[0]`` and accept exactly ``keys`` from now on (a re-read key file).
        Raises UsageError (and changes nothing) on an empty list or a key id named twice."""
        if not keys:
            raise UsageError("a key ring needs at least one key")
        if len({key.key_id for key in keys}) != len(keys):
            raise UsageError("a key id is listed twice")
        self._current = keys[0]
        self._accepted = {key.key_id: (key, None) for key in keys[1:]}

    def key_for(self, key_id: int, now: float) -> ClusterKey | None:
        """The key named ``key_id`` if it is accepted at ``now``, else None (expired ones go)."""
        if key_id == self._current.key_id:
            return self._current
        entry = self._accepted.get(key_id)
        if entry is None:
            return None
        key, until = entry
        if until is not None and now > until:
            del self._accepted[key_id]
            return None
        return key

    def accepted_ids(self, now: float) -> list[int]:
        """Ids of every key accepted at ``now``, the current one first (for status pages)."""
        ids = [self._current.key_id]
        ids += [i for i in list(self._accepted) if self.key_for(i, now) is not None]
        return ids

    def _check_id_free(self, key: ClusterKey) -> None:
        """Refuse two different secrets under one key id (verifiers could not tell them apart)."""
        same_id = [self._current] if key.key_id == self._current.key_id else []
        if key.key_id in self._accepted:
            same_id.append(self._accepted[key.key_id][0])
        for other in same_id:
            if not hmac.compare_digest(other.secret, key.secret):
                raise UsageError(f"key id {key.key_id} already names another key")


class ReplayWindow:
    """Refuses datagrams whose timestamp is stale or whose (key id, nonce) was already seen.

    A timestamp must lie within ``now +- window``. Every accepted nonce is remembered until its
    timestamp leaves the window (after that the timestamp check alone refuses a replay), so the
    memory is bounded by the traffic of one window, and hard-capped at ``capacity`` entries.
    When the cap is reached the oldest entry is forgotten and the window's lower edge moves up to
    its timestamp: a datagram stamped at or before that edge is refused, since the window could no
    longer tell whether it is a replay. Under overload the window thus shrinks instead of
    growing or letting replays through; legitimate senders only lose datagrams that were already
    ``capacity / rate`` seconds late.
    """

    def __init__(
        self, *, window: float = DEFAULT_REPLAY_WINDOW, capacity: int = DEFAULT_REPLAY_CAPACITY
    ) -> None:
        if window <= 0:
            raise UsageError(f"a replay window is > 0 seconds, got {window}")
        if capacity < 1:
            raise UsageError(f"a replay window remembers >= 1 nonce, got {capacity}")
        self._window_ms = int(window * 1000)
        self._capacity = capacity
        self._seen: dict[int, int] = {}  # (key id << 64 | nonce) -> timestamp ms
        self._by_time: list[tuple[int, int]] = []  # heap of (timestamp ms, seen key)
        self._floor_ms = -1  # timestamps <= floor are refused (forgotten under the cap)

    def __len__(self) -> int:
        """Nonces currently remembered (never more than ``capacity``)."""
        return len(self._seen)

    @property
    def capacity(self) -> int:
        """The most nonces remembered at once."""
        return self._capacity

    def check(self, key_id: int, nonce: int, timestamp_ms: int, now: float) -> None:
        """Accept and remember one datagram's nonce, or raise ReplayError / ClockSkewError."""
        now_ms = int(now * 1000)
        if abs(timestamp_ms - now_ms) > self._window_ms:
            raise ClockSkewError(
                f"timestamp {timestamp_ms} ms is {(timestamp_ms - now_ms) / 1000:+.3f} s from "
                f"now, outside the +-{self._window_ms / 1000:g} s window"
            )
        self._expire(now_ms - self._window_ms)
        if timestamp_ms <= self._floor_ms:
            raise ReplayError(
                f"timestamp {timestamp_ms} ms is older than the replay memory reaches "
                f"({self._floor_ms} ms, capacity {self._capacity} reached)"
            )
        seen_key = key_id << 64 | nonce
        if seen_key in self._seen:
            raise ReplayError(f"nonce {nonce:016x} under key id {key_id} was already seen")
        self._seen[seen_key] = timestamp_ms
        heapq.heappush(self._by_time, (timestamp_ms, seen_key))
        if len(self._seen) > self._capacity:
            oldest_ms, oldest_key = heapq.heappop(self._by_time)
            del self._seen[oldest_key]
            self._floor_ms = max(self._floor_ms, oldest_ms)

    def _expire(self, horizon_ms: int) -> None:
        """Forget nonces whose timestamps the window check refuses anyway."""
        by_time = self._by_time
        while by_time and by_time[0][0] < horizon_ms:
            _, seen_key = heapq.heappop(by_time)
            del self._seen[seen_key]


def _nonce_counter() -> Callable[[], int]:
    """Nonces for one sender: a counter from a random 64-bit start.

    Unique per sender for 2**64 datagrams; two senders collide only if their runs of nonces
    overlap (about (n + m) / 2**64 for runs of n and m) and then within one replay window. It
    costs no system call per datagram (``secrets.randbits`` per datagram cost ~1.4 µs here).
    Nonces need to be unique, not unpredictable: the tag covers them.
    """
    counter = itertools.count(secrets.randbits(64))
    return lambda: next(counter) & _U64_MAX


class Authenticator:
    """Seals outgoing payloads and opens incoming datagrams, keyed or in open mode.

    Build one per node or client with :meth:`keyed` or :meth:`open_mode`; it holds the key ring
    and the replay window (its only state), so use one instance per receiving socket.
    """

    def __init__(
        self,
        *,
        keyring: KeyRing | None,
        replay: ReplayWindow | None,
        nonce_source: Callable[[], int] | None = None,
    ) -> None:
        """``nonce_source``: a 64-bit nonce per datagram sealed (default: a randomly started
        counter of this instance)."""
        self._keyring = keyring
        self._replay = replay
        self._nonce_source = nonce_source or _nonce_counter()

    @classmethod
    def keyed(
        cls,
        keyring: KeyRing,
        *,
        window: float = DEFAULT_REPLAY_WINDOW,
        capacity: int = DEFAULT_REPLAY_CAPACITY,
    ) -> Authenticator:
        """Production mode: tag with the current key, verify, refuse replays and open datagrams."""
        return cls(keyring=keyring, replay=ReplayWindow(window=window, capacity=capacity))

    @classmethod
    def open_mode(cls, *, replay: ReplayWindow | None = None) -> Authenticator:
        """Local development without a key: no tags; keyed datagrams are refused."""
        return cls(keyring=None, replay=replay)

    @property
    def is_open(self) -> bool:
        """True in open (unauthenticated) mode."""
        return self._keyring is None

    @property
    def keyring(self) -> KeyRing | None:
        """The key ring (None in open mode)."""
        return self._keyring

    @property
    def replay(self) -> ReplayWindow | None:
        """The replay window, if replays are checked."""
        return self._replay

    def next_nonce(self) -> int:
        """The nonce for the next datagram sealed (for a native sealer doing :meth:`seal`'s
        work; :meth:`seal` takes its own)."""
        return self._nonce_source()

    def seal(self, payload: ByteView, now: float) -> bytes:
        """Return ``payload`` followed by the auth block stamped with ``now`` and its tag."""
        timestamp_ms = int(now * 1000)
        if not 0 <= timestamp_ms <= _U64_MAX:
            raise UsageError(f"now must be seconds since the Unix epoch, got {now}")
        nonce = self._nonce_source()
        if self._keyring is None:
            block = _AUTH_BLOCK.pack(_OPEN_KEY_ID, FLAG_OPEN, timestamp_ms, nonce)
            return b"".join((payload, block, _ZERO_TAG))
        key = self._keyring.current
        block = _AUTH_BLOCK.pack(key.key_id, 0, timestamp_ms, nonce)
        hasher = blake3(payload, key=key.tag_key)
        hasher.update(block)
        return b"".join((payload, block, hasher.digest(TAG_SIZE)))

    def open(self, datagram: ByteView, now: float, *, end: int | None = None) -> memoryview:
        """Verify a datagram and return its payload (a view, no copy), or raise.

        The auth block is the last 34 bytes of ``datagram[:end]`` (``end`` defaults to the whole
        datagram). Bytes from ``end`` on are *not* covered by the tag: a caller that passes
        ``end`` must authenticate them some other way (:mod:`tmdht.wire` binds page bytes to
        digests carried in the tagged part). An ``end`` outside ``AUTH_OVERHEAD..len`` is an
        AuthenticationError, so a caller may pass a length read from unverified bytes.

        Raises AuthenticationError or ReplayError (both DecodeError). The replay window records
        the nonce only after the tag was verified: unauthenticated bytes change no state.
        """
        view = memoryview(datagram)
        size = view.nbytes
        if end is None:
            end = size
        elif not 0 <= end <= size:
            raise AuthenticationError(
                f"auth block ending at byte {end} lies outside the {size}-byte datagram"
            )
        if end < AUTH_OVERHEAD:
            raise AuthenticationError(f"datagram of {end} bytes is too short for an auth block")
        block_at = end - AUTH_OVERHEAD
        tag_at = end - TAG_SIZE
        key_id, flags, timestamp_ms, nonce = _AUTH_BLOCK.unpack_from(view, block_at)
        if self._keyring is None:
            if not flags & FLAG_OPEN:
                raise AuthenticationError(
                    f"keyed datagram (key id {key_id}) refused: this node runs in open mode"
                )
            if flags != FLAG_OPEN or key_id != _OPEN_KEY_ID or view[tag_at:end] != _ZERO_TAG:
                raise AuthenticationError("malformed open-mode auth block")
        else:
            if flags & FLAG_OPEN:
                raise AuthenticationError("open (unauthenticated) datagram refused")
            if flags:
                raise AuthenticationError(f"unknown auth flags 0x{flags:02x}")
            key = self._keyring.key_for(key_id, now)
            if key is None:
                raise AuthenticationError(f"unknown or expired key id {key_id}")
            expected = blake3(view[:tag_at], key=key.tag_key).digest(TAG_SIZE)
            if not hmac.compare_digest(expected, view[tag_at:end]):
                raise AuthenticationError(f"bad tag (key id {key_id})")
        if self._replay is not None:
            self._replay.check(key_id, nonce, timestamp_ms, now)
        return view[:block_at]
