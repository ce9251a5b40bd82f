"""A store node's wave pages: what migration receivers learned, kept for their wave's next VMs.

Wave pages live in an LMDB environment of their own (``<data_dir>/waves``), apart from the
template store (:mod:`tmdht.node.storage`), so they are counted against their own capacity
(``wave_capacity``) and can never take room from templates or evict one: a full wave store
refuses new wave pages (after dropping expired ones); the template store never sees them.

A wave page is stored under its *wave key* (:mod:`tmdht.wave`), which the node cannot link to
the page's digest, so unlike a template it cannot be verified here: the receiver that fetches
it checks it against the digest the sender offered, and anything else is refused there (a
wrong page costs a body over the WAN, never wrong memory).

Databases::

    pages    wave key (32 B) -> be64 expiry (ms, the caller's clock) + the 4096-byte page
    expiry   be64 expiry (ms) + wave key -> empty: the pages in expiry order, for purging

Claims (WAVE_CLAIM, :mod:`tmdht.wire`): a receiver that misses a page may claim its wave key
for a short time while it fetches the page from its sender; others asking meanwhile are told
PENDING and wait for the page instead of fetching it too (VMs migrated at once walk the same
pages at the same time). Claims live in memory only (a restart forgets them: waiters then
fetch the page themselves after their bound), at most ``max_claims`` of them, each at most
:data:`MAX_CLAIM_TTL` seconds; a stored page ends its claim. Like pages, they are named by wave key
only, so another wave can neither see nor take them.

Durability: a cache, so commits do not fsync (``sync=False``): a power loss may forget the
last writes (the pages then come over the WAN again); a process killed mid-write loses nothing
committed. Time is a parameter of every call (seconds), as in the core.
"""

from __future__ import annotations

import enum
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import lmdb

from tmdht.errors import ConfigError
from tmdht.node.errors import StorageError
from tmdht.pages import PAGE_SIZE
from tmdht.wave import WAVE_KEY_SIZE, expires_at

__all__ = ["DEFAULT_MAX_CLAIMS", "MAX_CLAIM_TTL", "ClaimStatus", "WavePutResult", "WaveStore",
           "WaveStoreStats"]

_DB_PAGES: Final = b"pages"
_DB_EXPIRY: Final = b"expiry"
_EXPIRY = struct.Struct(">Q")
_PURGE_BATCH: Final = 4096
DEFAULT_MAX_CLAIMS: Final = 1 << 16
"""Claims a node keeps at most (about 100 bytes each); beyond, a miss is answered CLAIMED
without keeping a claim (the requester fetches the page; nobody is told to wait for it)."""
MAX_CLAIM_TTL: Final = 30.0
"""Longest a claim lasts, whatever a requester asks (seconds)."""


class ClaimStatus(enum.Enum):
    """What a claim found for one wave key."""

    CLAIMED = "claimed"
    """Neither stored nor claimed: the caller holds the claim now (or no room for one)."""
    PENDING = "pending"
    """Another caller's claim is live."""
    HELD = "held"
    """The page is stored and live."""


class WavePutResult(enum.Enum):
    """What a put did with one wave page."""

    STORED = "stored"
    """New: stored."""
    REFRESHED = "refreshed"
    """Already held: its time-to-live starts again."""
    FULL = "full"
    """Refused: the wave store is at its capacity (templates are never touched)."""
    INVALID = "invalid"
    """Refused: not a 32-byte key and a 4096-byte page."""


@dataclass(frozen=True, slots=True)
class WaveStoreStats:
    """Counts for metrics."""

    pages: int
    """Wave pages held (expired ones not yet purged included)."""
    capacity_pages: int
    """Wave pages the store accepts at most."""
    claims: int = 0
    """Claims held (expired ones not yet dropped included)."""


def _ms(seconds: float) -> int:
    return max(0, int(seconds * 1000))


class WaveStore:
    """Wave pages with a time-to-live in their own LMDB environment (see the module docstring).

    Calls are synchronous and short (one transaction each, no fsync).
    """

    def __init__(self, env: lmdb.Environment, capacity_pages: int, max_ttl: float,
                 max_claims: int = DEFAULT_MAX_CLAIMS) -> None:
        """Use :meth:`open`."""
        self._env: lmdb.Environment | None = env
        self._capacity_pages = capacity_pages
        self._max_ttl = max_ttl
        self._max_claims = max_claims
        # wave key -> expiry (seconds, the caller's clock), in the order claims were made.
        self._claims: dict[bytes, float] = {}
        self._pages = env.open_db(_DB_PAGES)
        self._expiry = env.open_db(_DB_EXPIRY)
        self._lock = threading.Lock()

    @classmethod
    def open(cls, path: Path, *, capacity_bytes: int, max_ttl: float,
             max_claims: int = DEFAULT_MAX_CLAIMS) -> WaveStore:
        """Open (creating) the wave store in ``path``; ConfigError for bad settings,
        StorageError if LMDB cannot open it."""
        if capacity_bytes < PAGE_SIZE:
            raise ConfigError(f"wave_capacity must hold at least one page, got {capacity_bytes}")
        if max_ttl <= 0:
            raise ConfigError(f"wave_max_ttl must be positive, got {max_ttl}")
        if max_claims < 0:
            raise ConfigError(f"max_claims must be >= 0, got {max_claims}")
        pages = capacity_bytes // PAGE_SIZE
        # 4 KiB + 8 bytes is two LMDB pages (overflow); the expiry index and B-tree on top.
        map_size = pages * 2 * PAGE_SIZE * 5 // 4 + (16 << 20)
        try:
            path.mkdir(parents=True, exist_ok=True)
            env = lmdb.open(str(path), map_size=map_size, subdir=True, max_dbs=2, sync=False,
                            metasync=False, writemap=False, readahead=False, meminit=False)
        except (lmdb.Error, OSError) as exc:
            raise StorageError(f"cannot open the wave store {path}: {exc}") from exc
        return cls(env, pages, max_ttl, max_claims)

    def close(self) -> None:
        """Close (idempotent)."""
        env, self._env = self._env, None
        if env is not None:
            env.close()

    def _require(self) -> lmdb.Environment:
        if self._env is None:
            raise StorageError("the wave store is closed")
        return self._env

    @property
    def capacity_pages(self) -> int:
        """Wave pages held at most."""
        return self._capacity_pages

    def stats(self) -> WaveStoreStats:
        """Pages held and the capacity."""
        with self._require().begin() as txn:
            pages = txn.stat(self._pages)["entries"]
        return WaveStoreStats(pages, self._capacity_pages, len(self._claims))

    def put_many(self, items: Sequence[tuple[bytes, bytes]], ttl: float, now: float
                 ) -> list[WavePutResult]:
        """Keep ``(wave key, page)`` pairs until ``now + ttl`` (ttl capped by the node's
        ``wave_max_ttl``); expired pages are purged first to make room. One result per item."""
        expiry = _EXPIRY.pack(_ms(expires_at(now, min(ttl, self._max_ttl))))
        results: list[WavePutResult] = []
        try:
            with self._lock, self._require().begin(write=True) as txn:
                self._purge(txn, now)
                held = txn.stat(self._pages)["entries"]
                for key, page in items:
                    if len(key) != WAVE_KEY_SIZE or len(page) != PAGE_SIZE:
                        results.append(WavePutResult.INVALID)
                        continue
                    old = txn.get(key, db=self._pages)
                    if old is not None:
                        txn.delete(bytes(old[:8]) + key, db=self._expiry)
                        txn.put(key, expiry + bytes(old[8:]), db=self._pages)
                        txn.put(expiry + key, b"", db=self._expiry)
                        results.append(WavePutResult.REFRESHED)
                        continue
                    if held >= self._capacity_pages:
                        results.append(WavePutResult.FULL)
                        continue
                    txn.put(key, expiry + bytes(page), db=self._pages)
                    txn.put(expiry + key, b"", db=self._expiry)
                    held += 1
                    results.append(WavePutResult.STORED)
                for key, _ in items:  # stored, refreshed or refused: no one waits any longer
                    self._claims.pop(bytes(key), None)
        except lmdb.MapFullError:
            return [WavePutResult.FULL for _ in items]
        except lmdb.Error as exc:
            raise StorageError(f"wave store put failed: {exc}") from exc
        return results

    def get_many(self, keys: Sequence[bytes], now: float) -> list[bytes | None]:
        """The live pages of ``keys`` (None: never stored, purged or expired at ``now``)."""
        cutoff = _ms(now)
        out: list[bytes | None] = []
        try:
            with self._require().begin() as txn:
                for key in keys:
                    value = txn.get(key, db=self._pages)
                    if value is None or _EXPIRY.unpack(value[:8])[0] <= cutoff:
                        out.append(None)
                    else:
                        out.append(bytes(value[8:]))
        except lmdb.Error as exc:
            raise StorageError(f"wave store read failed: {exc}") from exc
        return out

    def claim_many(self, keys: Sequence[bytes], ttl: float, now: float) -> list[ClaimStatus]:
        """For each key: HELD if a live page is stored under it, PENDING if another claim on it
        is live at ``now``, else CLAIMED, and a claim until ``now + ttl`` (capped at
        MAX_CLAIM_TTL) is kept unless the store holds ``max_claims`` live ones already."""
        ttl = min(max(ttl, 0.0), MAX_CLAIM_TTL)
        cutoff = _ms(now)
        out: list[ClaimStatus] = []
        try:
            with self._lock, self._require().begin() as txn:
                self._drop_claims(now)
                for key in keys:
                    value = txn.get(key, db=self._pages)
                    if value is not None and _EXPIRY.unpack(value[:8])[0] > cutoff:
                        out.append(ClaimStatus.HELD)
                        continue
                    expiry = self._claims.get(key)
                    if expiry is not None and now < expiry:
                        out.append(ClaimStatus.PENDING)
                        continue
                    if len(self._claims) < self._max_claims:
                        self._claims.pop(key, None)  # re-inserted last: claims stay in order
                        self._claims[bytes(key)] = now + ttl
                    out.append(ClaimStatus.CLAIMED)
        except lmdb.Error as exc:
            raise StorageError(f"wave store read failed: {exc}") from exc
        return out

    def _drop_claims(self, now: float) -> None:
        """Drop expired claims from the oldest on (a later, shorter claim waits for the ones
        before it; it is refused as expired when asked for meanwhile)."""
        doomed: list[bytes] = []
        for key, expiry in self._claims.items():
            if expiry > now or len(doomed) >= _PURGE_BATCH:
                break
            doomed.append(key)
        for key in doomed:
            del self._claims[key]

    def purge(self, now: float) -> int:
        """Drop the pages expired at ``now``; returns how many."""
        try:
            with self._lock, self._require().begin(write=True) as txn:
                return self._purge(txn, now, limit=None)
        except lmdb.Error as exc:
            raise StorageError(f"wave store purge failed: {exc}") from exc

    def _purge(self, txn: lmdb.Transaction, now: float, limit: int | None = _PURGE_BATCH
               ) -> int:
        cutoff = _ms(now)
        cursor = txn.cursor(db=self._expiry)
        doomed: list[bytes] = []
        for raw, _ in cursor:
            if _EXPIRY.unpack(raw[:8])[0] > cutoff or (limit is not None and len(doomed) >= limit):
                break
            doomed.append(bytes(raw))
        for raw in doomed:
            txn.delete(raw, db=self._expiry)
            txn.delete(raw[8:], db=self._pages)
        return len(doomed)
