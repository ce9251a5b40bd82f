"""Versioned soft-state records kept by store nodes (sans-IO): the vnet's MAC directory.

A store node keeps, besides pages, small *records* for other parts of the system: under a
32-byte key, up to :data:`MAX_ENTRIES_PER_KEY` entries, each named by a u64 entry id and carrying
a u64 version, a lease (time to live) and an opaque value of at most :data:`MAX_VALUE_BYTES`.
The virtual network stores there where each MAC is (one entry per MAC key: the highest version
wins) and which agents host each virtual network (one entry per agent under the network's key).
Records are placed like pages: on the R nodes closest to the key (:mod:`tmdht.placement`).

Rules, which every node applies the same way so replicas converge without coordination:

- A put with a *higher* version than the entry's replaces it (value, lease). A put with the
  *same* version renews the lease (and the value, which the writer keeps equal). A put with a
  *lower* version is refused as STALE and changes nothing: a moved VM's new location cannot be
  overwritten by its old host's late refresh.
- Entries expire when their lease ends (writers renew them; a crashed writer's entries go away).
  An expired entry's version is forgotten with it.
- Memory is bounded: at most ``max_records`` entries in all and :data:`MAX_ENTRIES_PER_KEY` per
  key; a put that would exceed either is refused as FULL (nothing is evicted: leases free room).

Records are not written to disk: a restarted node is refilled by the writers' renewals within one
renewal period. Time is a parameter (seconds, any monotonic origin).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from enum import IntEnum
from typing import Final

from tmdht.errors import UsageError

__all__ = [
    "DEFAULT_MAX_RECORDS",
    "KEY_SIZE",
    "MAX_ENTRIES_PER_KEY",
    "MAX_TTL",
    "MAX_VALUE_BYTES",
    "RecordEntry",
    "RecordStatus",
    "RecordStore",
]

KEY_SIZE: Final = 32
"""Bytes in a record key (a BLAKE3 digest of whatever names the record)."""
MAX_VALUE_BYTES: Final = 128
"""Largest entry value."""
MAX_ENTRIES_PER_KEY: Final = 24
"""Most entries under one key (all of them fit one answer of the smallest datagram size)."""
MAX_TTL: Final = 3600.0
"""Longest lease, in seconds."""
DEFAULT_MAX_RECORDS: Final = 200_000
"""Entries a node keeps at most by default (about 300 bytes each: ~60 MiB at the cap)."""


class RecordStatus(IntEnum):
    """What a node did with a put."""

    STORED = 1
    """The entry was created or replaced by a higher version."""
    RENEWED = 2
    """Same version: the lease was extended."""
    STALE = 3
    """The node holds a higher version; nothing changed."""
    FULL = 4
    """The node (or the key) is at its entry limit; nothing changed."""


@dataclass(frozen=True, slots=True)
class RecordEntry:
    """One entry as a node returns it."""

    entry_id: int
    version: int
    ttl: float
    """Seconds of lease left."""
    value: bytes


@dataclass(slots=True)
class _Slot:
    version: int
    expires: float
    value: bytes


class RecordStore:
    """The records of one node, in memory, bounded."""

    def __init__(self, *, max_records: int = DEFAULT_MAX_RECORDS) -> None:
        if max_records < 1:
            raise UsageError("max_records must be >= 1")
        self.max_records = max_records
        self._keys: dict[bytes, dict[int, _Slot]] = {}
        self._count = 0
        self._expiry: list[tuple[float, bytes, int]] = []  # heap of (expires, key, entry id)

    def __len__(self) -> int:
        """Live entries (as of the last sweep)."""
        return self._count

    def put(self, key: bytes, entry_id: int, version: int, ttl: float, value: bytes,
            now: float) -> tuple[RecordStatus, int]:
        """Apply one put; returns the status and the version the node holds afterwards."""
        if len(key) != KEY_SIZE:
            raise UsageError(f"a record key is {KEY_SIZE} bytes")
        if len(value) > MAX_VALUE_BYTES:
            raise UsageError(f"a record value is at most {MAX_VALUE_BYTES} bytes")
        if not 0 < ttl <= MAX_TTL:
            raise UsageError(f"a record lease is in (0, {MAX_TTL}] seconds")
        self.sweep(now)
        entries = self._keys.get(key)
        slot = entries.get(entry_id) if entries is not None else None
        expires = now + ttl
        if slot is not None and slot.expires <= now:  # expired, not swept yet: a new entry
            slot.version, slot.value, slot.expires = version, bytes(value), expires
            heapq.heappush(self._expiry, (expires, key, entry_id))
            return RecordStatus.STORED, version
        if slot is not None:
            if version < slot.version:
                return RecordStatus.STALE, slot.version
            status = RecordStatus.RENEWED if version == slot.version else RecordStatus.STORED
            slot.version, slot.value = version, bytes(value)
            if expires > slot.expires:
                slot.expires = expires
                heapq.heappush(self._expiry, (expires, key, entry_id))
            return status, version
        if self._count >= self.max_records or (
                entries is not None and len(entries) >= MAX_ENTRIES_PER_KEY):
            return RecordStatus.FULL, 0
        if entries is None:
            entries = self._keys[key] = {}
        entries[entry_id] = _Slot(version, expires, bytes(value))
        self._count += 1
        heapq.heappush(self._expiry, (expires, key, entry_id))
        return RecordStatus.STORED, version

    def get(self, key: bytes, now: float) -> list[RecordEntry]:
        """The live entries under ``key``, by entry id."""
        entries = self._keys.get(key)
        if not entries:
            return []
        return [RecordEntry(entry_id, slot.version, slot.expires - now, slot.value)
                for entry_id, slot in sorted(entries.items()) if slot.expires > now]

    def sweep(self, now: float, limit: int = 1000) -> int:
        """Forget up to ``limit`` entries whose lease ended; returns how many went."""
        removed = 0
        heap = self._expiry
        while heap and heap[0][0] <= now and removed < limit:
            expires, key, entry_id = heapq.heappop(heap)
            entries = self._keys.get(key)
            slot = entries.get(entry_id) if entries is not None else None
            if slot is None or slot.expires != expires:
                continue  # renewed (a later heap item stands for it) or already gone
            del entries[entry_id]  # type: ignore[union-attr]
            if not entries:
                del self._keys[key]
            self._count -= 1
            removed += 1
        return removed
