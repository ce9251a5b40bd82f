"""Durable page storage of a store node: template pages in LMDB, packed into slabs.

The store maps a page digest (BLAKE3-256 of the 4096-byte page) to the page. Every write is
verified (a page is stored only under its own digest; the all-zero page is never stored) and is
durable when the call returns: each ``put_many`` / ``delete_many`` is one LMDB transaction
committed with fsync, so a batch pays for one sync.

Why slabs
---------
LMDB's page size is the OS page size (4096). A 4096-byte value does not fit a B-tree node, so
plain LMDB stores it in *overflow pages*: a 16-byte header plus the value, i.e. two 4 KiB pages
per 4 KiB page -- twice the disk (measured: 2.04x). Overflow pages of one value are contiguous,
so a value of ``N * 4096 + t`` bytes (``t <= 4080 - 16``) costs only ``N + 1`` pages. The store
therefore packs pages into fixed-size *slab* values of ``slab_pages`` slots (64 by default)
and keeps an index ``digest -> (slab, slot)``. On-disk bytes per page byte are then about
``(N + 1) / N`` plus the index (~47 bytes a page): 1.04 at N = 64 (see bench/storage.py).

Databases inside the one LMDB environment (everything changes inside LMDB transactions, so a
crash leaves the last committed state and nothing else):

``index``      digest (32 B) -> slab id (u32 BE) + slot (u8). Digest order is DHT key order.
``slabs``      slab id -> ``slab_pages`` page slots followed by one 32-byte digest per slot
               (the trailer; lets :meth:`PageStore.check` cross-check the index). Always full
               size, so every slab costs the same run of LMDB pages and a freed run fits the
               next slab exactly (little free-space fragmentation).
``occupancy``  slab id -> bitmap of used slots (u64 LE).
``partial``    used-slot count (u8) + slab id -> empty: the slabs that have free slots, fewest
               used first, so new pages fill the emptiest slabs first and touch few slabs.
``meta``       str -> bytes, for the node (node id, ...) and the store's own format keys.
``buckets``    bucket -> page count and XOR of digests: the anti-entropy range hashes, kept in
               memory and saved here at close (:mod:`tmdht.node.buckets`; rebuilt from the
               index on open after a crash, or if missing or inconsistent).

Costs and trade-offs
--------------------
- A delete only updates the index and the slab's bitmap; it does not rewrite the slab. A slab
  whose last page is deleted is dropped, returning its pages to LMDB.
- Filling a hole rewrites its whole slab (LMDB is copy-on-write). So new pages go to the slabs
  with the most free slots, and only to slabs at least a quarter free (a rewrite costs at most
  4 pages written per page stored); otherwise they start fresh slabs. Once the slab count
  reaches what ``capacity_bytes`` of pages need, every hole is used first, so the slab count
  never exceeds ``ceil(capacity pages / slab_pages)`` and the map size is computed from that.
- LMDB reuses the pages a transaction frees only two transactions later: after churn the file
  holds those dead pages too (bench: 10% churn rounds on 100k pages settle at ~1.2x).
- Bytes of a deleted page stay in its slab until the slot is reused; they are unreachable.
"""

from __future__ import annotations

import enum
import errno
import itertools
import logging
import os
import resource
import struct
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Final

import lmdb

from tmdht.errors import (
    CapacityError,
    ConfigError,
    IntegrityError,
    TmdhtError,
    UsageError,
)
from tmdht.files import fsync_dir
from tmdht.native import pages_match
from tmdht.node.buckets import BucketIndex
from tmdht.node.errors import StorageError, StoreFormatError
from tmdht.pages import DIGEST_SIZE, PAGE_SIZE, ZERO_DIGEST, ByteView, digest_page

if TYPE_CHECKING:
    from types import TracebackType

log = logging.getLogger("tmdht.node")

__all__ = [
    "DEFAULT_SLAB_PAGES",
    "DEFAULT_SNAPSHOT_SLABS",
    "FORMAT_VERSION",
    "MAX_SLAB_PAGES",
    "RESERVED_META_PREFIX",
    "PageReader",
    "PageSnapshot",
    "PageStore",
    "PutResult",
    "StorageError",
    "StoreFormatError",
    "StoreStats",
    "recommended_map_size",
]

FORMAT_VERSION: Final = 1
"""On-disk format of the store; a store of another version is refused, never guessed at."""
DEFAULT_SLAB_PAGES: Final = 64
"""Page slots per slab for new stores: ratio 65/64 on disk, a 260 KiB rewrite per touched slab."""
MAX_SLAB_PAGES: Final = 64
"""The occupancy bitmap is a u64; the digest trailer (64 * 32 B) still fits the slab's last page."""
RESERVED_META_PREFIX: Final = "store."
"""Meta keys with this prefix belong to the store itself; the node may read but not write them."""

_META_FORMAT: Final = RESERVED_META_PREFIX + "format"
_META_SLAB_PAGES: Final = RESERVED_META_PREFIX + "slab_pages"
_DB_META: Final = b"meta"
_DB_INDEX: Final = b"index"
_DB_SLABS: Final = b"slabs"
_DB_OCCUPANCY: Final = b"occupancy"
_DB_PARTIAL: Final = b"partial"
_ALL_DBS: Final = (_DB_META, _DB_INDEX, _DB_SLABS, _DB_OCCUPANCY, _DB_PARTIAL)

_LOCATION = struct.Struct(">IB")  # slab id, slot: 5 bytes keep index entries small
_SLAB_ID = struct.Struct(">I")  # big-endian so the last key is the highest slab id
_MAX_SLAB_ID: Final = 0xFFFF_FFFF
_BITMAP_SIZE: Final = 8
_ITER_CHUNK: Final = 1024  # digests read per short read transaction in iter_digests
DEFAULT_SNAPSHOT_SLABS: Final = 16384
"""Slab views a :class:`PageSnapshot` keeps (16384 slabs of 64 hold 1M pages; ~3 MiB of views)."""
_MAX_META_KEY: Final = 256  # bytes of UTF-8; LMDB keys may be up to 511
_MAX_RANGE_KEY: Final = 64  # bytes in an iter_digests start key (a digest or a DHT key prefix)
_MIB: Final = 1 << 20
_LOW_DISK_BYTES: Final = 256 * _MIB  # below this much free space, a short write means "full"
# A partial slab is refilled (rewritten) only once this share of its slots is free, which caps
# the rewrite cost per hole at 100 / _REUSE_MIN_FREE_PERCENT pages -- until the store nears its
# capacity, when every hole is used (see PageStore._partial_slabs_for).
_REUSE_MIN_FREE_PERCENT: Final = 25
# errno values that mean "no room for the write": a full disk, a quota, a file size limit.
_OUT_OF_SPACE_ERRNOS: Final = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


class PutResult(enum.Enum):
    """What ``put_many`` did with one page."""

    STORED = "stored"
    """The page was new and is now durable."""
    PRESENT = "present"
    """The store already held the page (or an earlier item of the same call stored it)."""
    REJECTED_DIGEST = "rejected_digest"
    """The page is not 4096 bytes, does not hash to its digest, or is the all-zero page (which
    is never stored: it travels as a ZERO record). Nothing was written for it."""
    REJECTED_FULL = "rejected_full"
    """No room: the capacity limit, LMDB's map or the disk is full. Nothing was written."""


@dataclass(frozen=True, slots=True)
class StoreStats:
    """A snapshot of a store's size, for metrics and logs."""

    pages: int
    """Pages held."""
    bytes_stored: int
    """Page bytes held (``pages * 4096``); what ``capacity_bytes`` limits."""
    capacity_bytes: int
    """Page bytes accepted at most."""
    slabs: int
    """Slabs in use (each ``slab_pages + 1`` LMDB pages on disk)."""
    partial_slabs: int
    """Slabs with free slots (holes left by deletes, or the last slab filled)."""
    slab_pages: int
    """Page slots per slab."""
    disk_bytes: int
    """Bytes allocated on disk by the store's files."""
    map_size: int
    """LMDB's map size, the hard limit behind the capacity."""


def _slab_value_size(slab_pages: int) -> int:
    return slab_pages * (PAGE_SIZE + DIGEST_SIZE)


def _slab_disk_pages(slab_pages: int) -> int:
    """LMDB pages one slab occupies: a 16-byte overflow header plus the value, rounded up."""
    return -(-(16 + _slab_value_size(slab_pages)) // PAGE_SIZE)


def _check_slab_pages(slab_pages: int) -> int:
    if isinstance(slab_pages, bool) or not isinstance(slab_pages, int):
        raise ConfigError(f"slab_pages must be an int, got {slab_pages!r}")
    if not 1 <= slab_pages <= MAX_SLAB_PAGES:
        raise ConfigError(f"slab_pages must be in 1..{MAX_SLAB_PAGES}, got {slab_pages}")
    return slab_pages


def recommended_map_size(capacity_bytes: int, slab_pages: int = DEFAULT_SLAB_PAGES) -> int:
    """LMDB map size for a store of ``capacity_bytes`` page bytes, with headroom.

    The store enforces the capacity itself; the map is the hard stop behind it. It must hold the
    slabs of a full store (a store never has more than ``ceil(capacity pages / slab_pages)``:
    near capacity every hole is refilled before a slab is added), the index at its worst
    B-tree fill (~95 bytes a page at half-full leaves; 128 are reserved) and the small slab
    tables. On top comes headroom for LMDB's copy-on-write: the pages a transaction frees
    (old versions of rewritten slabs and index pages) are reused only two transactions later,
    so up to two transactions' worth of rewrites is dead space; 1 GiB covers two transactions
    that each rewrite ~2000 slabs (refilling holes at capacity touches at most one slab per
    page put), and a quarter more covers index churn. The map is address space, not disk:
    the data file only grows as pages are written, so generous headroom costs nothing.
    """
    if isinstance(capacity_bytes, bool) or not isinstance(capacity_bytes, int):
        raise ConfigError(f"capacity_bytes must be an int, got {capacity_bytes!r}")
    if capacity_bytes < 0:
        raise ConfigError(f"capacity_bytes must be >= 0, got {capacity_bytes}")
    _check_slab_pages(slab_pages)
    capacity_pages = capacity_bytes // PAGE_SIZE
    slabs = -(-capacity_pages // slab_pages)
    needed = slabs * _slab_disk_pages(slab_pages) * PAGE_SIZE + capacity_pages * 128 + slabs * 128
    headroom = needed // 4 + 1024 * _MIB
    return -(-(needed + headroom) // _MIB) * _MIB


def _digest_key(digest: object) -> bytes:
    """Validate a digest given by the caller (the wire codec has already checked its length)."""
    if not isinstance(digest, bytes | bytearray | memoryview):
        raise UsageError(f"a page digest must be bytes, got {type(digest).__name__}")
    key = bytes(digest)
    if len(key) != DIGEST_SIZE:
        raise UsageError(f"a page digest is {DIGEST_SIZE} bytes, got {len(key)}")
    return key


def _page_view(page: object) -> memoryview | None:
    """A flat byte view of a page, or None when it is not a 4096-byte buffer."""
    try:
        view = memoryview(page)  # type: ignore[arg-type]
    except TypeError:
        return None
    if not view.c_contiguous or view.nbytes != PAGE_SIZE:
        return None
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def _is_out_of_space(exc: lmdb.Error) -> bool:
    """True when LMDB failed for lack of room (its map, the disk, a quota, a file size limit)."""
    return isinstance(exc, lmdb.MapFullError | lmdb.DiskError) or (exc.code in _OUT_OF_SPACE_ERRNOS)


def _partial_key(used: int, slab_id: int) -> bytes:
    return bytes((used,)) + _SLAB_ID.pack(slab_id)


def _checked_keys(digests: Sequence[bytes]) -> Sequence[bytes]:
    """``digests`` as 32-byte ``bytes`` keys: checked in bulk, converted if need be."""
    if digests and (set(map(type, digests)) != {bytes} or set(map(len, digests)) != {32}):
        return [_digest_key(digest) for digest in digests]  # raises on a bad one
    return digests


def _page_views(
    path: Path,
    index_get: Callable[[bytes], memoryview | None],
    slabs_get: Callable[[ByteView], memoryview | None],
    digests: Sequence[bytes],
    slabs: dict[int, memoryview],
) -> list[memoryview | None]:
    """Look ``digests`` up: a view of each page in the map, None where it is not held.

    ``slabs`` caches slab id -> view of the whole slab for the transaction the getters read
    (filled here), so a slab holding several of the pages is looked up once.
    """
    unpack = _LOCATION.unpack
    views: list[memoryview | None] = []
    for digest in digests:
        location = index_get(digest)
        if location is None:
            views.append(None)
            continue
        slab_id, slot = unpack(location)
        slab = slabs.get(slab_id)
        if slab is None:
            slab = slabs_get(location[:4])
            if slab is None:
                raise IntegrityError(f"page store {path}: index names a lost slab")
            slabs[slab_id] = slab
        start = slot * PAGE_SIZE
        views.append(slab[start : start + PAGE_SIZE])
    return views


class _SlabEdit:
    """One slab being filled inside a write transaction."""

    __slots__ = ("bitmap", "old_used", "slab_id", "value")

    def __init__(self, slab_id: int, value: bytearray, bitmap: int) -> None:
        self.slab_id = slab_id
        self.value = value
        self.bitmap = bitmap
        self.old_used = bitmap.bit_count()


class PageReader:
    """Zero-copy page reads inside one read transaction: made by :meth:`PageStore.reading`."""

    __slots__ = ("_index", "_path", "_slabs")

    def __init__(self, path: Path, index: lmdb.Cursor[memoryview], slabs: lmdb.Cursor[memoryview]):
        self._path = path
        self._index: lmdb.Cursor[memoryview] | None = index
        self._slabs = slabs

    def views(self, digests: Sequence[bytes]) -> list[memoryview | None]:
        """Views of the pages for ``digests`` in order (None where a page is not held).

        Each view is the page's 4096 bytes inside LMDB's map, valid until the ``reading()``
        block ends. Digests are 32 bytes (UsageError otherwise); a list of ``bytes`` is checked
        in bulk, other buffer types are converted. A slab holding several pages is looked up once.
        """
        index = self._index
        if index is None:
            raise UsageError("a PageReader is used only inside its reading() block")
        return _page_views(self._path, index.get, self._slabs.get, _checked_keys(digests), {})

    def _close(self) -> None:
        self._index = None


class PageSnapshot:
    """Zero-copy reads from a read transaction kept open across calls (:meth:`PageStore.snapshot`).

    For one thread's hot path (the data plane's event loop). :meth:`PageStore.reading` pays for
    a transaction begin, two cursors and their teardown on every call, and looks every slab up
    again; a snapshot keeps the transaction, the cursors and the slab views from call to call:

    - *Fresh.* Every write the store commits (``put_many``, ``delete_many``) bumps its
      generation before the call returns, and the next read here begins a new transaction. So
      a page whose PUT was acknowledged is seen by every later read.
    - *Short.* An open read transaction stops LMDB from reusing pages freed after it began (the
      file grows under writes). The owner calls :meth:`release` on a short bound (the data plane:
      a few ms after first use); the next read begins a new transaction. :meth:`PageStore.close`
      closes every snapshot.
    - *Slab views* are cached per LMDB snapshot (up to ``max_slabs``; a full cache is emptied
      before the next call, which adds only the slabs it reads): a transaction that
      begins on the same transaction id as the last one sees the same pages at the same
      addresses (LMDB is copy-on-write and nothing committed in between), so the cache
      survives a :meth:`release` when no write happened; otherwise it is dropped.

    Views it returns are valid until the next call on the snapshot (a read may renew the
    transaction; :meth:`release`, :meth:`close` and :meth:`PageStore.close` end it): use them
    (send them) before that; copy what must outlive it. Not thread-safe: one thread uses a
    snapshot (LMDB runs with MDB_NOTLS, so the transaction itself is not tied to a thread, but
    the cursors and the cache are unlocked).
    """

    __slots__ = (
        "_cache_txn_id",
        "_generation",
        "_index_get",
        "_max_slabs",
        "_slabs",
        "_slabs_get",
        "_store",
        "_txn",
    )

    def __init__(self, store: PageStore, max_slabs: int) -> None:
        """Use :meth:`PageStore.snapshot`."""
        self._store: PageStore | None = store
        self._max_slabs = max_slabs
        self._txn: lmdb.Transaction[memoryview] | None = None
        self._generation = -1
        self._index_get: Callable[[bytes], memoryview | None] = _closed_get
        self._slabs_get: Callable[[ByteView], memoryview | None] = _closed_get
        self._slabs: dict[int, memoryview] = {}  # slab id -> slab view, for _cache_txn_id
        self._cache_txn_id = -1

    @property
    def is_open(self) -> bool:
        """Whether a read transaction is open (pinning a snapshot of the store)."""
        return self._txn is not None

    def views(self, digests: Sequence[bytes]) -> list[memoryview | None]:
        """Views of the pages for ``digests`` in order (None where a page is not held).

        As :meth:`PageReader.views`; the views are valid until the next call on this snapshot.
        """
        digests = _checked_keys(digests)
        store = self._current()
        if len(self._slabs) >= self._max_slabs:
            self._slabs.clear()  # bounded; refills with what is asked for now
        try:
            return _page_views(store._path, self._index_get, self._slabs_get, digests, self._slabs)
        except lmdb.Error as exc:
            self.release()
            raise store._translate(exc, "reading pages") from exc

    def has(self, digests: Sequence[bytes]) -> list[bool]:
        """For each digest, whether the store holds its page (index lookups only)."""
        keys = _checked_keys(digests)
        store = self._current()
        index_get = self._index_get
        try:
            return [index_get(key) is not None for key in keys]
        except lmdb.Error as exc:
            self.release()
            raise store._translate(exc, "looking up pages") from exc

    def _current(self) -> PageStore:
        """The store, with a transaction open on its latest committed state."""
        store = self._store
        if store is None:
            raise UsageError("this page snapshot is closed")
        if self._txn is None or self._generation != store._generation:
            self._begin(store)
        return store

    def _begin(self, store: PageStore) -> None:
        """(Re)open the transaction on the store's latest committed state."""
        self.release()
        env = store._require_env()
        generation = store._generation  # read first: a commit racing with begin renews again
        try:
            txn = env.begin(buffers=True)
            try:
                index_get = txn.cursor(db=store._index).get
                slabs_get = txn.cursor(db=store._slabs).get
                txn_id = txn.id()
            except BaseException:
                txn.abort()
                raise
        except lmdb.Error as exc:
            raise store._translate(exc, "reading pages") from exc
        if txn_id != self._cache_txn_id:
            self._slabs.clear()
            self._cache_txn_id = txn_id
        self._txn, self._generation = txn, generation
        self._index_get, self._slabs_get = index_get, slabs_get

    def release(self) -> None:
        """End the read transaction (if open): LMDB may reuse what it pinned. Reads reopen it."""
        txn, self._txn = self._txn, None
        self._index_get = self._slabs_get = _closed_get
        if txn is not None:
            txn.abort()  # closes its cursors too

    def close(self) -> None:
        """Release, and refuse further reads (idempotent)."""
        self.release()
        self._slabs.clear()
        store, self._store = self._store, None
        if store is not None:
            store._snapshots.discard(self)


def _closed_get(key: ByteView) -> memoryview | None:
    raise UsageError("a page snapshot read outside its transaction")


class PageStore:
    """Verified, durable page storage in an LMDB data dir (see the module docstring).

    Open with :meth:`open` (also a context manager). Calls are synchronous and short: each is
    one LMDB transaction, so they may run on a worker thread; LMDB serialises writers and
    readers never block. Do not call :meth:`close` while other threads are inside a call.
    Only one ``PageStore`` per data dir may be open in a process (LMDB's rule).
    """

    _open_paths: ClassVar[set[Path]] = set()
    _open_paths_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(
        self,
        env: lmdb.Environment,
        path: Path,
        capacity_bytes: int,
        slab_pages: int,
        dbs: dict[bytes, lmdb._Database],
    ) -> None:
        """Use :meth:`open`; this wires an already opened environment (``path`` resolved)."""
        self._env: lmdb.Environment | None = env
        self._path = path
        self._capacity_bytes = capacity_bytes
        self._capacity_pages = capacity_bytes // PAGE_SIZE
        self._slab_pages = slab_pages
        self._slab_size = _slab_value_size(slab_pages)
        self._slab_budget = -(-self._capacity_pages // slab_pages)
        self._reuse_min_free = max(1, -(-slab_pages * _REUSE_MIN_FREE_PERCENT // 100))
        self._meta = dbs[_DB_META]
        self._index = dbs[_DB_INDEX]
        self._slabs = dbs[_DB_SLABS]
        self._occupancy = dbs[_DB_OCCUPANCY]
        self._partial = dbs[_DB_PARTIAL]
        # Bumped after every committed write that changes pages (any thread; next() on a count
        # is atomic), so a PageSnapshot knows to begin a new transaction.
        self._generations = itertools.count(1)
        self._generation = 0
        self._snapshots: set[PageSnapshot] = set()
        self.buckets = BucketIndex.open(env, self._index)
        """The anti-entropy bucket table (counts and XOR hashes per key-space bucket)."""

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    def open(
        cls,
        path: Path,
        *,
        capacity_bytes: int,
        map_size: int | None = None,
        slab_pages: int = DEFAULT_SLAB_PAGES,
    ) -> PageStore:
        """Open (creating if needed) the store in directory ``path``.

        ``capacity_bytes`` limits the page bytes held (a runtime setting: it may change between
        opens; a store above a lowered capacity just refuses new pages). ``map_size`` defaults
        to :func:`recommended_map_size`; a smaller explicit value makes LMDB's map the limit
        (reported as ``REJECTED_FULL``). ``slab_pages`` applies only when the store is created;
        an existing store keeps the value recorded in its meta.

        Raises ConfigError for bad settings, StoreFormatError for a dir holding something else
        or another format version, UsageError if the dir is already open in this process and
        StorageError if LMDB cannot open it.
        """
        recommended = recommended_map_size(capacity_bytes, slab_pages)  # validates both
        map_size = recommended if map_size is None else map_size
        if isinstance(map_size, bool) or not isinstance(map_size, int) or map_size <= 0:
            raise ConfigError(f"map_size must be a positive int, got {map_size!r}")
        path = Path(path)
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create page store dir {path}: {exc}") from exc
        key = path.resolve()
        with cls._open_paths_lock:
            if key in cls._open_paths:
                # A second environment on the same files in one process would break LMDB's
                # locking (closing either drops the other's flock).
                raise UsageError(f"page store {path} is already open in this process")
            cls._open_paths.add(key)
        env: lmdb.Environment | None = None
        try:
            env = lmdb.open(
                str(path),
                map_size=map_size,
                subdir=True,
                max_dbs=len(_ALL_DBS) + 1,  # + the bucket table (tmdht.node.buckets)
                sync=True,  # durability: commit returns after fsync
                metasync=True,
                writemap=False,  # writes via pwrite: a full disk is an error, not SIGBUS
                readahead=False,  # random page reads; readahead only evicts the cache
                meminit=False,  # fresh pages are fully written before use
            )
            found_slab_pages, dbs, created = cls._init_layout(env, slab_pages)
            if created:
                # LMDB syncs its files, not the directory entries naming them: without this a
                # power loss right after creation could lose the whole (acknowledged) store.
                fsync_dir(key)
                fsync_dir(key.parent)
            return cls(env, key, capacity_bytes, found_slab_pages, dbs)
        except BaseException as exc:
            if env is not None:
                env.close()
            with cls._open_paths_lock:
                cls._open_paths.discard(key)
            if isinstance(exc, lmdb.InvalidError | lmdb.VersionMismatchError):
                raise StoreFormatError(f"{path} is not a readable LMDB store: {exc}") from exc
            if isinstance(exc, lmdb.Error | OSError):
                raise StorageError(f"cannot open page store {path}: {exc}") from exc
            raise

    @staticmethod
    def _init_layout(
        env: lmdb.Environment, slab_pages: int
    ) -> tuple[int, dict[bytes, lmdb._Database], bool]:
        """Create the databases of a new store or validate those of an existing one.

        Returns the store's slab size, its databases and whether it was just created.
        """
        with env.begin(write=True) as txn:
            names = {bytes(name) for name, _ in txn.cursor()}
            if _DB_META not in names:
                if names:
                    raise StoreFormatError("the LMDB environment is not a tmdht page store")
                dbs = {name: env.open_db(name, txn=txn) for name in _ALL_DBS}
                txn.put(_META_FORMAT.encode(), str(FORMAT_VERSION).encode(), db=dbs[_DB_META])
                txn.put(_META_SLAB_PAGES.encode(), str(slab_pages).encode(), db=dbs[_DB_META])
                return slab_pages, dbs, True
            meta = env.open_db(_DB_META, txn=txn, create=False)
            version = txn.get(_META_FORMAT.encode(), db=meta)
            if version != str(FORMAT_VERSION).encode():
                raise StoreFormatError(
                    f"page store format {version!r} is not the supported {FORMAT_VERSION}"
                )
            raw_slab_pages = txn.get(_META_SLAB_PAGES.encode(), db=meta)
            try:
                found = _check_slab_pages(int(raw_slab_pages or b""))
            except (ValueError, ConfigError) as exc:
                raise StoreFormatError(f"bad slab size in store meta: {raw_slab_pages!r}") from exc
            missing = [name for name in _ALL_DBS if name not in names]
            if missing:
                raise StoreFormatError(f"page store lacks databases {missing}")
            dbs = {name: env.open_db(name, txn=txn, create=False) for name in _ALL_DBS}
            return found, dbs, False

    def close(self) -> None:
        """Close the store (idempotent), ending its snapshots. Committed pages are durable."""
        for snapshot in list(self._snapshots):
            snapshot.close()
        env, self._env = self._env, None
        if env is None:
            return
        try:
            self.buckets.save(env)
        except lmdb.Error as exc:  # a full disk: the next open rebuilds the table instead
            log.warning("page store %s: bucket table not saved (%s); it is rebuilt on open",
                        self._path, exc)
        env.close()
        with self._open_paths_lock:
            self._open_paths.discard(self._path)

    def __enter__(self) -> PageStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _require_env(self) -> lmdb.Environment:
        if self._env is None:
            raise UsageError(f"page store {self._path} is closed")
        return self._env

    @contextmanager
    def _lmdb_errors(self, action: str) -> Iterator[None]:
        """Translate LMDB's errors into the tmdht hierarchy (the transaction is already aborted)."""
        try:
            yield
        except lmdb.Error as exc:
            raise self._translate(exc, action) from exc

    def _translate(self, exc: lmdb.Error, action: str) -> TmdhtError:
        """The tmdht error for an LMDB error met while doing ``action``."""
        if _is_out_of_space(exc) or (exc.code == errno.EIO and self._out_of_room()):
            return CapacityError(f"store {self._path} is full while {action}: {exc}")
        return StorageError(f"page store {self._path} failed while {action}: {exc}")

    def _out_of_room(self) -> bool:
        """Whether the filesystem or the file size limit leaves no room for the data file.

        LMDB reports a *short* write -- what a full disk or RLIMIT_FSIZE produces once part of
        the data fits -- as EIO, not ENOSPC. Such an EIO counts as "full" when the disk is nearly
        full or the file is at its size limit; any other EIO is a real I/O error.
        """
        try:
            fs = os.statvfs(self._path)
            size = os.stat(self._path / "data.mdb").st_size
        except OSError:
            return False
        if fs.f_bavail * fs.f_frsize < _LOW_DISK_BYTES:
            return True
        soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
        return soft != resource.RLIM_INFINITY and size + self._slab_size >= soft

    # ------------------------------------------------------------------ properties

    @property
    def path(self) -> Path:
        """The data dir (absolute)."""
        return self._path

    @property
    def capacity_bytes(self) -> int:
        """Page bytes the store accepts at most (set at open)."""
        return self._capacity_bytes

    @property
    def slab_pages(self) -> int:
        """Page slots per slab (fixed when the store was created)."""
        return self._slab_pages

    @property
    def map_size(self) -> int:
        """LMDB's map size in bytes (the hard limit behind ``capacity_bytes``)."""
        return self._require_env().info()["map_size"]

    @property
    def page_count(self) -> int:
        """Pages held."""
        env = self._require_env()
        with self._lmdb_errors("counting"), env.begin() as txn:
            return txn.stat(self._index)["entries"]

    def __len__(self) -> int:
        return self.page_count

    @property
    def bytes_stored(self) -> int:
        """Page bytes held (``page_count * 4096``), the quantity the capacity limits."""
        return self.page_count * PAGE_SIZE

    def stats(self) -> StoreStats:
        """Counts for metrics (one short read transaction and two stat calls)."""
        env = self._require_env()
        with self._lmdb_errors("counting"), env.begin() as txn:
            pages = txn.stat(self._index)["entries"]
            slabs = txn.stat(self._slabs)["entries"]
            partial_slabs = txn.stat(self._partial)["entries"]
        return StoreStats(
            pages=pages,
            bytes_stored=pages * PAGE_SIZE,
            capacity_bytes=self._capacity_bytes,
            slabs=slabs,
            partial_slabs=partial_slabs,
            slab_pages=self._slab_pages,
            disk_bytes=self.disk_bytes(),
            map_size=env.info()["map_size"],
        )

    def disk_bytes(self) -> int:
        """Bytes the store's files occupy on disk (allocated blocks, not apparent size)."""
        self._require_env()
        total = 0
        for name in ("data.mdb", "lock.mdb"):
            try:
                total += os.stat(self._path / name).st_blocks * 512
            except FileNotFoundError:
                continue
        return total

    # ------------------------------------------------------------------ writes

    def put_many(self, items: Sequence[tuple[bytes, ByteView]]) -> list[PutResult]:
        """Store ``(digest, page)`` pairs; one result per item, in order.

        Every page is verified before the transaction starts. New pages are admitted in order
        while the capacity allows; the rest are ``REJECTED_FULL``. The whole call is one
        transaction: when it returns, every ``STORED`` page is durable; if LMDB's map or the
        disk fills up, nothing of the call is written and its new pages are ``REJECTED_FULL``.

        A digest that is not 32 bytes raises UsageError before anything is written (digests
        are keys the caller has already validated); a bad page is only ``REJECTED_DIGEST``.
        """
        env = self._require_env()
        results: list[PutResult | None] = [None] * len(items)
        views: list[memoryview | None] = [None] * len(items)
        first_of: dict[bytes, int] = {}  # digest -> index of its first valid item
        duplicates: list[tuple[int, int]] = []
        parsed: list[tuple[bytes, memoryview | None]] = []
        for i, item in enumerate(items):
            try:
                digest, page = item
            except (TypeError, ValueError) as exc:
                raise UsageError(f"item {i} is not a (digest, page) pair") from exc
            parsed.append((_digest_key(digest), _page_view(page)))
        # The zero digest is checked first: it names the one page that is never stored. The
        # rest are hashed in one call (natively: the GIL released, across cores).
        hashed = [
            (i, key, view)
            for i, (key, view) in enumerate(parsed)
            if view is not None and key != ZERO_DIGEST
        ]
        verdicts = pages_match([k for _, k, _ in hashed], [v for _, _, v in hashed])
        good = {i for (i, _, _), ok in zip(hashed, verdicts, strict=True) if ok}
        for i, (key, view) in enumerate(parsed):
            if view is None or i not in good:
                results[i] = PutResult.REJECTED_DIGEST
                continue
            first = first_of.get(key)
            if first is None:
                first_of[key] = i
                views[i] = view
            else:
                duplicates.append((i, first))

        if first_of:
            admitted: list[tuple[bytes, memoryview]] = []
            try:
                with (
                    self._lmdb_errors("storing pages"),
                    env.begin(write=True, buffers=True) as txn,
                ):
                    room = self._capacity_pages - txn.stat(self._index)["entries"]
                    for key, i in first_of.items():
                        if txn.get(key, db=self._index) is not None:
                            results[i] = PutResult.PRESENT
                        elif room > 0:
                            view = views[i]
                            assert view is not None  # set for every first valid item
                            admitted.append((key, view))
                            results[i] = PutResult.STORED
                            room -= 1
                        else:
                            results[i] = PutResult.REJECTED_FULL
                    if admitted:
                        self._place(txn, admitted)
                if admitted:  # committed
                    self._generation = next(self._generations)
                    self.buckets.apply([key for key, _ in admitted], 1)
            except CapacityError:
                # The transaction was aborted: none of this call's pages were written.
                for i in first_of.values():
                    if results[i] is PutResult.STORED:
                        results[i] = PutResult.REJECTED_FULL

        for i, first in duplicates:
            outcome = results[first]
            results[i] = PutResult.PRESENT if outcome is PutResult.STORED else outcome
        return [result if result is not None else PutResult.REJECTED_DIGEST for result in results]

    def _place(
        self, txn: lmdb.Transaction[memoryview], pages: list[tuple[bytes, memoryview]]
    ) -> None:
        """Write new pages into free slots (emptiest slabs first), then into fresh slabs."""
        edits = self._partial_slabs_for(txn, len(pages))
        free_slots = [
            (edit, slot)
            for edit in edits
            for slot in range(self._slab_pages)
            if not edit.bitmap >> slot & 1
        ]
        needed_new = -(-max(0, len(pages) - len(free_slots)) // self._slab_pages)
        if needed_new:
            with txn.cursor(db=self._slabs) as cursor:
                next_id = _SLAB_ID.unpack(cursor.key())[0] + 1 if cursor.last() else 0
            if next_id + needed_new - 1 > _MAX_SLAB_ID:
                raise StorageError(f"page store {self._path} ran out of slab ids")
            for slab_id in range(next_id, next_id + needed_new):
                edit = _SlabEdit(slab_id, bytearray(self._slab_size), 0)
                edits.append(edit)
                free_slots.extend((edit, slot) for slot in range(self._slab_pages))

        trailer = self._slab_pages * PAGE_SIZE
        locations: list[tuple[bytes, bytes]] = []
        for (key, view), (edit, slot) in zip(pages, free_slots, strict=False):
            edit.value[slot * PAGE_SIZE : (slot + 1) * PAGE_SIZE] = view
            edit.value[trailer + slot * DIGEST_SIZE : trailer + (slot + 1) * DIGEST_SIZE] = key
            edit.bitmap |= 1 << slot
            locations.append((key, _LOCATION.pack(edit.slab_id, slot)))

        for edit in edits:
            if edit.bitmap.bit_count() == edit.old_used:
                continue  # picked as a candidate but not needed
            self._write_slab(txn, edit)
        # Sorted keys touch each index leaf once instead of in random order.
        locations.sort()
        for key, location in locations:
            txn.put(key, location, db=self._index)

    def _partial_slabs_for(self, txn: lmdb.Transaction[memoryview], count: int) -> list[_SlabEdit]:
        """Pick partial slabs (emptiest first) to take ``count`` new pages, and load them.

        Filling a hole rewrites its whole slab, so a slab with fewer than ``_reuse_min_free``
        free slots is only refilled when a new slab would take the store past the slab count a
        full store needs. Below that, writes stay cheap; at it, every hole is used, so the disk
        never exceeds what ``capacity_bytes`` of pages need (and the map size was sized for).
        """
        slab_count = txn.stat(self._slabs)["entries"]
        chosen: list[int] = []
        free = 0
        with txn.cursor(db=self._partial) as cursor:
            for key in cursor.iternext(keys=True, values=False):
                if free >= count:
                    break
                slab_free = self._slab_pages - key[0]
                new_slabs = -(-(count - free) // self._slab_pages)
                if slab_free < self._reuse_min_free and slab_count + new_slabs <= self._slab_budget:
                    break  # the rest are fuller still (sorted by used count)
                free += slab_free
                chosen.append(_SLAB_ID.unpack_from(key, 1)[0])
        edits = []
        for slab_id in chosen:
            slab_key = _SLAB_ID.pack(slab_id)
            value = txn.get(slab_key, db=self._slabs)
            bitmap = txn.get(slab_key, db=self._occupancy)
            if value is None or bitmap is None or len(value) != self._slab_size:
                raise IntegrityError(f"page store {self._path}: slab {slab_id} is damaged")
            # A copy: the slab is rewritten whole (LMDB is copy-on-write anyway).
            edits.append(_SlabEdit(slab_id, bytearray(value), int.from_bytes(bitmap, "little")))
        return edits

    def _write_slab(self, txn: lmdb.Transaction[memoryview], edit: _SlabEdit) -> None:
        slab_key = _SLAB_ID.pack(edit.slab_id)
        txn.put(slab_key, edit.value, db=self._slabs)
        self._set_occupancy(txn, edit.slab_id, edit.old_used, edit.bitmap)

    def _set_occupancy(
        self, txn: lmdb.Transaction[Any], slab_id: int, old_used: int, bitmap: int
    ) -> None:
        """Record a slab's new bitmap and keep the ``partial`` table in step with it."""
        slab_key = _SLAB_ID.pack(slab_id)
        used = bitmap.bit_count()
        if 0 < old_used < self._slab_pages:
            txn.delete(_partial_key(old_used, slab_id), db=self._partial)
        if used == 0:
            txn.delete(slab_key, db=self._slabs)
            txn.delete(slab_key, db=self._occupancy)
            return
        txn.put(slab_key, bitmap.to_bytes(_BITMAP_SIZE, "little"), db=self._occupancy)
        if used < self._slab_pages:
            txn.put(_partial_key(used, slab_id), b"", db=self._partial)

    def delete_many(self, digests: Sequence[bytes]) -> int:
        """Delete pages by digest in one durable transaction; returns how many were held.

        Only the index and the slabs' bitmaps change (no slab is rewritten); a slab left empty
        is dropped. Raises CapacityError if LMDB has no room even for that (a full map or disk)
        -- nothing is deleted then.
        """
        env = self._require_env()
        keys = list(dict.fromkeys(_digest_key(digest) for digest in digests))
        if not keys:
            return 0
        deleted = 0
        with self._lmdb_errors("deleting pages"), env.begin(write=True) as txn:
            freed: dict[int, int] = {}  # slab id -> bitmap of slots freed
            gone: list[bytes] = []
            for key in keys:
                location = txn.pop(key, db=self._index)
                if location is None:
                    continue
                gone.append(key)
                slab_id, slot = _LOCATION.unpack(location)
                freed[slab_id] = freed.get(slab_id, 0) | 1 << slot
                deleted += 1
            for slab_id, slots in freed.items():
                raw = txn.get(_SLAB_ID.pack(slab_id), db=self._occupancy)
                if raw is None:
                    raise IntegrityError(f"page store {self._path}: slab {slab_id} has no bitmap")
                bitmap = int.from_bytes(raw, "little")
                self._set_occupancy(txn, slab_id, bitmap.bit_count(), bitmap & ~slots)
        if deleted:  # committed
            self._generation = next(self._generations)
            self.buckets.apply(gone, -1)
        return deleted

    # ------------------------------------------------------------------ reads

    def get_many(self, digests: Sequence[bytes]) -> list[bytes | None]:
        """The pages for ``digests`` in order, None where the store does not hold one.

        Pages are copies (bytes) that outlive the read transaction. They were verified when
        stored; LMDB keeps no checksums, so receivers verify them again (the system contract).
        """
        with self.reading() as reader:
            return [None if view is None else bytes(view) for view in reader.views(digests)]

    def snapshot(self, *, max_slabs: int = DEFAULT_SNAPSHOT_SLABS) -> PageSnapshot:
        """A :class:`PageSnapshot`: reads from a transaction kept open across calls.

        For a hot read path on one thread; its owner must :meth:`PageSnapshot.release` it on a
        short bound and close it when done (closing the store closes it too).
        """
        self._require_env()
        if isinstance(max_slabs, bool) or not isinstance(max_slabs, int) or max_slabs < 1:
            raise UsageError(f"max_slabs must be a positive int, got {max_slabs!r}")
        snapshot = PageSnapshot(self, max_slabs)
        self._snapshots.add(snapshot)
        return snapshot

    @contextmanager
    def reading(self) -> Iterator[PageReader]:
        """A :class:`PageReader` over one LMDB read transaction, for zero-copy reads.

        The views it returns point into LMDB's map and are valid only inside the ``with``
        block (use them, e.g. send them, before it ends; copy what must outlive it). Keep the
        block short: an open read transaction stops LMDB from reusing pages freed by writers.
        LMDB errors become StorageError as everywhere else.
        """
        env = self._require_env()
        with (
            self._lmdb_errors("reading pages"),
            env.begin(buffers=True) as txn,
            txn.cursor(db=self._index) as index,  # cursors skip a db lookup per get
            txn.cursor(db=self._slabs) as slabs,
        ):
            reader = PageReader(self._path, index, slabs)
            try:
                yield reader
            finally:
                reader._close()

    def has_many(self, digests: Sequence[bytes]) -> list[bool]:
        """For each digest, whether the store holds its page (index lookups only)."""
        env = self._require_env()
        keys = [_digest_key(digest) for digest in digests]
        with (
            self._lmdb_errors("looking up pages"),
            env.begin(buffers=True) as txn,
            txn.cursor(db=self._index) as index,
        ):
            return [index.get(key) is not None for key in keys]

    def iter_digests(
        self, start: bytes = b"", limit: int | None = None, *, inclusive: bool = True
    ) -> Iterator[bytes]:
        """Digests held, in ascending order (== DHT key order), from ``start`` on.

        ``start`` may be a whole digest or a key prefix (e.g. a 20-byte DHT key); with
        ``inclusive=False`` a digest equal to ``start`` is skipped, so a scan resumes after the
        last digest it saw. At most ``limit`` digests are yielded. Digests are read in chunks,
        each in its own short read transaction, so a slow consumer never pins old LMDB pages;
        pages added or deleted meanwhile may or may not appear.
        """
        self._require_env()
        if not isinstance(start, bytes | bytearray | memoryview):
            raise UsageError(f"start must be bytes, got {type(start).__name__}")
        start = bytes(start)
        if len(start) > _MAX_RANGE_KEY:
            raise UsageError(f"start is {len(start)} bytes, at most {_MAX_RANGE_KEY}")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)):
            raise UsageError(f"limit must be an int or None, got {limit!r}")
        if limit is not None and limit < 0:
            raise UsageError(f"limit must be >= 0, got {limit}")
        return self._iter_digests(start, limit, inclusive)

    def _iter_digests(self, start: bytes, limit: int | None, inclusive: bool) -> Iterator[bytes]:
        remaining = limit
        while remaining is None or remaining > 0:
            want = _ITER_CHUNK if remaining is None else min(_ITER_CHUNK, remaining)
            chunk = self._digest_chunk(start, inclusive, want)
            yield from chunk
            if len(chunk) < want:
                return
            start, inclusive = chunk[-1], False
            if remaining is not None:
                remaining -= len(chunk)

    def _digest_chunk(self, start: bytes, inclusive: bool, want: int) -> list[bytes]:
        env = self._require_env()
        chunk: list[bytes] = []
        with (
            self._lmdb_errors("listing digests"),
            env.begin() as txn,
            txn.cursor(db=self._index) as cursor,
        ):
            found = cursor.set_range(start) if start else cursor.first()
            if not found:
                return chunk
            for key in cursor.iternext(keys=True, values=False):
                if not inclusive and key == start:
                    continue
                chunk.append(key)
                if len(chunk) >= want:
                    break
        return chunk

    # ------------------------------------------------------------------ meta

    def get_meta(self, key: str) -> bytes | None:
        """The meta value under ``key``, or None. Keys starting with ``store.`` are the store's."""
        env = self._require_env()
        raw_key = self._meta_key(key)
        with self._lmdb_errors("reading meta"), env.begin() as txn:
            return txn.get(raw_key, db=self._meta)

    def set_meta(self, key: str, value: ByteView) -> None:
        """Durably set a meta value (JSON-encode structured values). ``store.*`` is reserved."""
        env = self._require_env()
        raw_key = self._meta_key(key, writing=True)
        if not isinstance(value, bytes | bytearray | memoryview):
            raise UsageError(f"a meta value must be bytes, got {type(value).__name__}")
        with self._lmdb_errors("writing meta"), env.begin(write=True) as txn:
            txn.put(raw_key, bytes(value), db=self._meta)

    def delete_meta(self, key: str) -> bool:
        """Durably delete a meta key; returns whether it existed. ``store.*`` is reserved."""
        env = self._require_env()
        raw_key = self._meta_key(key, writing=True)
        with self._lmdb_errors("deleting meta"), env.begin(write=True) as txn:
            return txn.delete(raw_key, db=self._meta)

    @staticmethod
    def _meta_key(key: str, *, writing: bool = False) -> bytes:
        if not isinstance(key, str) or not key:
            raise UsageError(f"a meta key must be a non-empty str, got {key!r}")
        if writing and key.startswith(RESERVED_META_PREFIX):
            raise UsageError(f"meta keys starting with {RESERVED_META_PREFIX!r} are reserved")
        raw = key.encode()
        if len(raw) > _MAX_META_KEY:
            raise UsageError(f"meta key is {len(raw)} bytes of UTF-8, at most {_MAX_META_KEY}")
        return raw

    # ------------------------------------------------------------------ maintenance

    def check(self, *, verify_pages: bool = True) -> int:
        """Cross-check every table and (by default) re-hash every page; returns the page count.

        Raises IntegrityError on the first inconsistency. Runs in one read transaction (a
        consistent snapshot), so on a large store run it off the hot path: while it runs, LMDB
        cannot reuse pages freed by writers and the file may grow.
        """
        env = self._require_env()
        used: dict[int, int] = {}  # slab id -> bitmap of the slots the index points at
        count = 0
        with self._lmdb_errors("checking"), env.begin(buffers=True) as txn:
            with txn.cursor(db=self._occupancy) as cursor:
                occupancy = {
                    _SLAB_ID.unpack(key)[0]: int.from_bytes(value, "little")
                    for key, value in cursor
                }
            with txn.cursor(db=self._index) as index, txn.cursor(db=self._slabs) as slabs:
                for key, location in index:
                    digest = bytes(key)
                    slab_id, slot = _LOCATION.unpack(location)
                    marked = occupancy.get(slab_id, 0) | used.get(slab_id, 0) << self._slab_pages
                    problem = self._entry_problem(
                        digest, slabs.get(location[:4]), slot, marked, verify_pages
                    )
                    if problem:
                        raise IntegrityError(f"{self._path}: {digest.hex()[:16]}: {problem}")
                    used[slab_id] = used.get(slab_id, 0) | 1 << slot
                    count += 1
            if used != occupancy:
                raise IntegrityError(f"{self._path}: slab bitmaps disagree with the index")
            with txn.cursor(db=self._slabs) as cursor:
                slab_ids = {
                    _SLAB_ID.unpack(key)[0] for key in cursor.iternext(keys=True, values=False)
                }
            if slab_ids != set(occupancy):
                raise IntegrityError(f"{self._path}: slabs and bitmaps list different slabs")
            with txn.cursor(db=self._partial) as cursor:
                partial = {bytes(key) for key in cursor.iternext(keys=True, values=False)}
            expected = {
                _partial_key(bitmap.bit_count(), slab_id)
                for slab_id, bitmap in occupancy.items()
                if bitmap.bit_count() < self._slab_pages
            }
            if partial != expected:
                raise IntegrityError(f"{self._path}: the partial-slab table disagrees")
        return count

    def _entry_problem(
        self, digest: bytes, slab: memoryview | None, slot: int, marked: int, verify_page: bool
    ) -> str | None:
        """What is wrong with one index entry, if anything.

        ``marked`` holds the slab's occupancy bitmap in its low ``slab_pages`` bits and the
        slots already claimed by other index entries above them.
        """
        if slot >= self._slab_pages or not marked >> slot & 1:
            return "its slot is not marked used"
        if marked >> (self._slab_pages + slot) & 1:
            return "its slot is claimed by another digest too"
        if slab is None or len(slab) != self._slab_size:
            return "its slab is missing or short"
        trailer = self._slab_pages * PAGE_SIZE + slot * DIGEST_SIZE
        if slab[trailer : trailer + DIGEST_SIZE] != digest:
            return "the slab's trailer names another page in its slot"
        if verify_page and digest_page(slab[slot * PAGE_SIZE : (slot + 1) * PAGE_SIZE]) != digest:
            return "the page does not match its digest"
        return None
