"""The page store's bucket table (anti-entropy range hashes) kept in LMDB beside the pages.

One more database in the store's LMDB environment, ``buckets``: bucket (u16 BE) -> page count
(u32 BE) + XOR of the digests (32 bytes), per :mod:`tmdht.rangehash`; plus the key
``format`` -> the bucket bits. A put or delete updates the touched buckets in the same
transaction as the index (:meth:`BucketIndex.stage`), so a crash leaves the table consistent
with the pages, and an in-memory mirror (a :class:`~tmdht.rangehash.BucketTable`) answers
RANGE_HASH queries without touching LMDB. The mirror takes a transaction's delta once it has
committed (:meth:`BucketIndex.apply`); XOR and addition commute, so deltas of concurrent
writers may land in any order.

On open the table is checked against the index (format key present, total count equal to the
index's entries) and rebuilt from the index if it is missing or does not match (a store
written before the table existed, or by a build that did not keep it): one scan of the digests.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import lmdb
import numpy as np
import numpy.typing as npt

from tmdht.pages import DIGEST_SIZE
from tmdht.rangehash import BUCKET_BITS, BUCKETS, BucketTable, buckets_of

__all__ = ["DB_NAME", "BucketDelta", "BucketIndex"]

DB_NAME: Final = b"buckets"
_FORMAT_KEY: Final = b"format"
_BUCKET_KEY: Final = struct.Struct(">H")
_ENTRY: Final = struct.Struct(f">I{DIGEST_SIZE}s")
_WORDS: Final = DIGEST_SIZE // 8
_REBUILD_BATCH: Final = 65536


@dataclass(frozen=True, slots=True)
class BucketDelta:
    """What one transaction changed: per touched bucket, the count change and the XOR."""

    buckets: npt.NDArray[np.intp]
    counts: npt.NDArray[np.int64]
    hashes: npt.NDArray[np.uint64]


class BucketIndex:
    """The ``buckets`` database of one store and its in-memory mirror."""

    def __init__(self, db: lmdb._Database, table: BucketTable) -> None:
        """Use :meth:`open`."""
        self._db = db
        self._table = table
        self._lock = threading.Lock()
        self.rebuilt = False
        """True if :meth:`open` rebuilt the table from the index."""

    @classmethod
    def open(cls, env: lmdb.Environment, index: lmdb._Database) -> BucketIndex:
        """Open (creating, or rebuilding if inconsistent) the table of a store's ``index``."""
        with env.begin(write=True) as txn:
            db = env.open_db(DB_NAME, txn=txn)
            table = _load(txn, db)
            entries = txn.stat(index)["entries"]
            rebuilt = table is None or int(table.counts.sum()) != entries
            if table is None or rebuilt:
                table = _rebuild(txn, db, index)
        result = cls(db, table)
        result.rebuilt = rebuilt
        return result

    def stage(self, txn: lmdb.Transaction[Any], digests: Sequence[bytes], sign: int) -> BucketDelta:
        """Record in ``txn`` that ``digests`` (each once, all new or all just deleted) were
        added (``sign`` 1) or removed (-1); returns the delta to :meth:`apply` once committed."""
        delta = _delta(digests, sign)
        for bucket, count, xor in zip(
            delta.buckets.tolist(), delta.counts.tolist(), delta.hashes, strict=True
        ):
            key = _BUCKET_KEY.pack(bucket)
            raw = txn.get(key, db=self._db)
            old_count, old_xor = _ENTRY.unpack(raw) if raw is not None else (0, bytes(DIGEST_SIZE))
            new_xor = np.frombuffer(old_xor, "<u8") ^ xor
            new_count = old_count + count
            if new_count:
                txn.put(key, _ENTRY.pack(new_count, new_xor.astype("<u8").tobytes()), db=self._db)
            elif raw is not None:
                txn.delete(key, db=self._db)
        return delta

    def apply(self, delta: BucketDelta) -> None:
        """Take a committed transaction's delta into the mirror."""
        with self._lock:
            self._table.counts[delta.buckets] += delta.counts
            self._table.hashes[delta.buckets] ^= delta.hashes

    def table(self) -> BucketTable:
        """A copy of the table."""
        with self._lock:
            return self._table.copy()

    def entries(
        self, mask: npt.NDArray[np.bool_], first: int, groups: int, group_bits: int
    ) -> tuple[tuple[int, bytes], ...]:
        """(count, XOR) of groups of buckets over ``mask`` (a RANGE_HASH answer)."""
        with self._lock:
            return self._table.encode_entries(mask, first, groups, group_bits)


def _delta(digests: Sequence[bytes], sign: int) -> BucketDelta:
    if not digests:
        empty = np.empty(0, np.intp)
        return BucketDelta(empty, np.empty(0, np.int64), np.empty((0, _WORDS), np.uint64))
    raw = b"".join(digests)
    buckets = buckets_of(raw)
    words = np.frombuffer(raw, "<u8").reshape(-1, _WORDS).astype(np.uint64)
    touched, inverse = np.unique(buckets, return_inverse=True)
    counts = np.zeros(len(touched), np.int64)
    np.add.at(counts, inverse, sign)
    hashes = np.zeros((len(touched), _WORDS), np.uint64)
    np.bitwise_xor.at(hashes, inverse, words)
    return BucketDelta(touched.astype(np.intp), counts, hashes)


def _load(txn: lmdb.Transaction[bytes], db: lmdb._Database) -> BucketTable | None:
    """The stored table, or None if it is missing or of another bucket size."""
    if txn.get(_FORMAT_KEY, db=db) != str(BUCKET_BITS).encode():
        return None
    table = BucketTable()
    with txn.cursor(db=db) as cursor:
        for key, value in cursor:
            if len(key) != _BUCKET_KEY.size:
                continue  # the format key
            if len(value) != _ENTRY.size:
                return None
            (bucket,) = _BUCKET_KEY.unpack(key)
            if bucket >= BUCKETS:
                return None
            count, xor = _ENTRY.unpack(value)
            table.counts[bucket] = count
            table.hashes[bucket] = np.frombuffer(xor, "<u8")
    return table


def _rebuild(
    txn: lmdb.Transaction[bytes], db: lmdb._Database, index: lmdb._Database
) -> BucketTable:
    """Recompute the table from every digest of ``index`` and store it (in ``txn``)."""
    txn.drop(db, delete=False)
    table = BucketTable()
    batch: list[bytes] = []
    with txn.cursor(db=index) as cursor:
        for key in cursor.iternext(keys=True, values=False):
            batch.append(bytes(key))
            if len(batch) >= _REBUILD_BATCH:
                table.toggle(batch, 1)
                batch = []
    table.toggle(batch, 1)
    for bucket in np.flatnonzero(table.counts).tolist():
        count, xor = table.entry(bucket)
        txn.put(_BUCKET_KEY.pack(bucket), _ENTRY.pack(count, xor), db=db)
    txn.put(_FORMAT_KEY, str(BUCKET_BITS).encode(), db=db)
    return table
