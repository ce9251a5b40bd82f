"""The page store's bucket table (anti-entropy range hashes): in memory, saved in LMDB at close.

One more database in the store's LMDB environment, ``buckets``: bucket (u16 BE) -> page count
(u32 BE) + XOR of the digests (32 bytes), per :mod:`tmdht.rangehash`; plus the keys ``format``
-> the bucket bits and ``clean`` -> b"1". The table lives in memory (a
:class:`~tmdht.rangehash.BucketTable` that answers RANGE_HASH queries without touching LMDB): a
put or delete hands its digests over once its transaction has committed
(:meth:`BucketIndex.apply`); XOR and addition commute, so writers may land in any order. They
are folded into the table in batches, when it is read (a RANGE_HASH answer, a sweep, the save)
or :data:`FOLD_PENDING` digests wait: toggling each group commit's few hundred digests in the
writer thread cost 1.0-1.3 us per page stored (numpy calls on a 2.5 MiB table, first touches
of a fresh one included; the in-process ``bench/publish.py --node-cpu``), 0.03 us now plus the
batched fold (about 0.2 us per digest).

Writing the touched buckets in every page transaction kept the stored table exact after any
crash, but cost about a third of a group commit's CPU (a B-tree update per touched bucket, and
as many more dirty pages to fsync: ``bench/publish.py`` on a quiet machine, 20k pages in groups
of 180, 34-40 vs 22-25 us per page). So the table is saved whole when the store closes
(:meth:`BucketIndex.save`, with the ``clean`` marker), and :meth:`BucketIndex.open` uses a saved
table only if the marker is there, deleting it in the same transaction: a store that was not
closed (a crash, kill -9) has no marker and its table is rebuilt from the index, one scan of the
digests (about a second per million pages). A saved table is also checked against the index
(format key present, total count equal to the index's entries) and rebuilt if it does not match
(a store written before the table existed, or by a build that did not keep it).
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Sequence
from typing import Any, Final

import lmdb
import numpy as np
import numpy.typing as npt

from tmdht.pages import DIGEST_SIZE
from tmdht.rangehash import BUCKET_BITS, BUCKETS, BucketTable

__all__ = ["DB_NAME", "FOLD_PENDING", "BucketIndex"]

DB_NAME: Final = b"buckets"
_FORMAT_KEY: Final = b"format"
_CLEAN_KEY: Final = b"clean"
_BUCKET_KEY: Final = struct.Struct(">H")
_ENTRY: Final = struct.Struct(f">I{DIGEST_SIZE}s")
FOLD_PENDING: Final = 1 << 16
"""Digests handed over by :meth:`BucketIndex.apply` that may wait before they are folded into
the table (about 4 MiB of bytes objects; a fold of that many takes about 15 ms)."""


class BucketIndex:
    """The ``buckets`` database of one store and its in-memory mirror."""

    def __init__(self, db: lmdb._Database, table: BucketTable) -> None:
        """Use :meth:`open`."""
        self._db = db
        self._table = table
        self._lock = threading.Lock()
        self._added: list[bytes] = []
        self._removed: list[bytes] = []
        self.rebuilt = False
        """True if :meth:`open` rebuilt the table from the index."""

    @classmethod
    def open(cls, env: lmdb.Environment, index: lmdb._Database) -> BucketIndex:
        """Open the table of a store's ``index``: the one saved at the last close, or rebuilt
        from the index if the store was not closed cleanly or the saved table does not match."""
        with env.begin(write=True) as txn:
            db = env.open_db(DB_NAME, txn=txn)
            clean = txn.get(_CLEAN_KEY, db=db) == b"1"
            table = _load(txn, db) if clean else None
            entries = txn.stat(index)["entries"]
            rebuilt = table is None or int(table.counts.sum()) != entries
            if table is None or rebuilt:
                table = _rebuild(txn, db, index)
            txn.delete(_CLEAN_KEY, db=db)  # until save(): a crash from here on rebuilds
        result = cls(db, table)
        result.rebuilt = rebuilt
        return result

    def save(self, env: lmdb.Environment) -> None:
        """Store the whole table with the ``clean`` marker (the store is closing: no writer is
        left)."""
        with self._lock, env.begin(write=True) as txn:
            self._fold()
            txn.drop(self._db, delete=False)
            _store(txn, self._db, self._table)
            txn.put(_CLEAN_KEY, b"1", db=self._db)

    def apply(self, digests: Sequence[bytes], sign: int) -> None:
        """Take a committed transaction's ``digests`` (each once, all new or all just deleted)
        into the table: added (``sign`` 1) or removed (-1). They are folded in when the table
        is next read, or once :data:`FOLD_PENDING` wait."""
        with self._lock:
            (self._added if sign > 0 else self._removed).extend(digests)
            if len(self._added) + len(self._removed) >= FOLD_PENDING:
                self._fold()

    def _fold(self) -> None:
        """Toggle the pending digests into the table (the caller holds the lock)."""
        if self._added:
            self._table.toggle(self._added, 1)
            self._added = []
        if self._removed:
            self._table.toggle(self._removed, -1)
            self._removed = []

    def table(self) -> BucketTable:
        """A copy of the table."""
        with self._lock:
            self._fold()
            return self._table.copy()

    def entries(
        self, mask: npt.NDArray[np.bool_], first: int, groups: int, group_bits: int
    ) -> tuple[tuple[int, bytes], ...]:
        """(count, XOR) of groups of buckets over ``mask`` (a RANGE_HASH answer)."""
        with self._lock:
            self._fold()
            return self._table.encode_entries(mask, first, groups, group_bits)


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
    """Recompute the table from every digest of ``index``; the stale saved one is dropped."""
    txn.drop(db, delete=False)
    with txn.cursor(db=index) as cursor:
        return BucketTable.from_digests(
            bytes(key) for key in cursor.iternext(keys=True, values=False))


def _store(txn: lmdb.Transaction[Any], db: lmdb._Database, table: BucketTable) -> None:
    """Write ``table``'s non-empty buckets and the format key into the (empty) ``db``."""
    for bucket in np.flatnonzero(table.counts).tolist():
        count, xor = table.entry(bucket)
        txn.put(_BUCKET_KEY.pack(bucket), _ENTRY.pack(count, xor), db=db)
    txn.put(_FORMAT_KEY, str(BUCKET_BITS).encode(), db=db)
