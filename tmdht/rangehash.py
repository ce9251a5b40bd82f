"""Range-hash anti-entropy, sans-IO: bucket hashes over the key space and what to compare.

Replicas keep a *bucket table*: the key space is cut into ``2 ** BUCKET_BITS`` fixed buckets
by the first ``BUCKET_BITS`` bits of a page's digest (its DHT key), and each bucket keeps the
number of pages held in it and the XOR of their digests. XOR is order independent and its own
inverse, so a put XORs a digest in and a delete XORs it out: the table is maintained
incrementally, and a table rebuilt from the store's digests equals it exactly
(:meth:`BucketTable.from_digests`). The digest already is a BLAKE3 output, so it serves as the
entry hash itself (no second hash per page); two different page sets collide only by accident
(2**-256 per comparison together with an equal count) or by someone publishing pages chosen
for it, which costs only a missed repair (every page is still checked against its digest).
XOR is also linear over ranges: the hash of a run of buckets is the XOR of theirs, so a peer
answers for any aligned group of buckets without storing a tree.

Which buckets two replicas compare (:class:`BucketOwners`): placement
(:class:`tmdht.placement.Ring`) walks the ring's *points* (the members' tokens, V per member;
with V = 1 the node IDs) in order of XOR distance to the key and, for each replica, picks the
first point that satisfies the failure-domain rule, a rule that looks only at the point's
member (its domain path and identity) and the picks so far. Within a range of keys sharing
their first ``b`` bits, the distance of a point to every key of the range has the same first
``b`` bits (the point's prefix XOR the range's), so points with different ``b``-bit prefixes
keep one order across the range; only points sharing their ``b``-bit prefix (a *group*) swap
order among themselves, and only a group holding points of two or more members can change
anything (points of one member are interchangeable). Call those points *colliding*. If at one
key of the range the rule picks no colliding point, it picks the same points at every key of
the range: every point scanned before a pick is rejected under the same picks-so-far whatever
the order inside its group, and every pick is a point outside any colliding group, at the same
place in the order. So the replica set is the same across the range.

A bucket is a range of ``BUCKET_BITS`` bits. If its picks at its first key hold no colliding
point, it is *uniform*. Otherwise it is cut in halves, and halves of halves, each settled the
same way one bit deeper (up to 64 bits; then it counts as not uniform), until every part is
settled: the bucket is uniform iff every part has the bucket's replica set. Two replicas
compare the hashes of the uniform buckets both should hold; the rest (non-uniform buckets,
pages a node holds but no longer owes) go through per-page HAS, which is exact. Non-uniform
buckets are the ones where a boundary between two points' regions falls inside the bucket,
which happens about as often as points share a bucket: with N * V points and 2**16 buckets,
measured (R=3, V=16): 0.05 % of the buckets at 32 nodes, 1.3 % at 100, 3.7 % at 300, 12 % at
1000 (V=1: none at 32 and 100, 0.2 % at 1000).

How they compare (:class:`RangeComparison`): the requester asks its peer for the hashes of
aligned *groups* of buckets, restricted to a mask of the buckets to compare (the requester's
choice, so both sides hash exactly the same buckets even if their membership views differ),
and compares them with its own. Groups that differ are asked again one level finer
(``LEVELS``: 4096 buckets, then 64, then 1), down to single buckets. A quiet cluster therefore
costs one or two datagrams per peer per sweep; the descent costs a few KiB per differing
region. Only the buckets that differ then go to per-page HAS and PUT.

Who pushes (:func:`designated_source`): a replica whose bucket differs from a peer's pushes
the pages the peer lacks only if it is the first member of the bucket's replica set other
than the peer; the others wait one sweep, and push only if the bucket still differs then (the
designated source is dead or lacks the pages too). So a node that lost its store receives each
page once, not once per surviving replica.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final

import numpy as np
import numpy.typing as npt

from tmdht.errors import UsageError
from tmdht.pages import DIGEST_SIZE
from tmdht.placement import NODE_ID_SIZE, Ring

__all__ = [
    "BUCKETS",
    "BUCKET_BITS",
    "ENTRY_SIZE",
    "LEVELS",
    "BucketOwners",
    "BucketTable",
    "RangeComparison",
    "RangeQuery",
    "bucket_of",
    "bucket_prefix",
    "buckets_of",
    "designated_source",
    "mask_from_bits",
    "mask_to_bits",
]

BUCKET_BITS: Final = 16
"""Buckets are the first 16 bits of a digest: 65,536 buckets, ~15 pages each at 1M pages."""
BUCKETS: Final = 1 << BUCKET_BITS
LEVELS: Final = (12, 6, 0)
"""Group sizes (log2 buckets) a comparison descends through: 4096 buckets, 64, then 1."""
ENTRY_SIZE: Final = 4 + DIGEST_SIZE
"""Wire bytes per group hash: count u32 and the 32-byte XOR."""
_WORDS: Final = DIGEST_SIZE // 8


def bucket_of(digest: bytes) -> int:
    """The bucket of a digest (or key): its first ``BUCKET_BITS`` bits."""
    return int.from_bytes(digest[:2], "big") >> (16 - BUCKET_BITS)


def bucket_prefix(bucket: int) -> bytes:
    """The shortest byte prefix every digest of ``bucket`` starts with (BUCKET_BITS = 16)."""
    return bucket.to_bytes(2, "big")


def _digest_rows(digests: Sequence[bytes] | bytes) -> npt.NDArray[np.uint8]:
    raw = digests if isinstance(digests, bytes) else b"".join(digests)
    if len(raw) % DIGEST_SIZE:
        raise UsageError("digests are 32 bytes")
    return np.frombuffer(raw, np.uint8).reshape(-1, DIGEST_SIZE)


def buckets_of(digests: Sequence[bytes] | bytes) -> npt.NDArray[np.intp]:
    """The bucket of each digest (32 bytes each, or one buffer of them)."""
    rows = _digest_rows(digests)
    prefix = rows[:, 0].astype(np.intp) << 8 | rows[:, 1].astype(np.intp)
    return prefix >> (16 - BUCKET_BITS)


def mask_to_bits(mask: npt.NDArray[np.bool_]) -> bytes:
    """A boolean mask as a bitmap: entry ``i`` is bit ``i % 8`` of byte ``i // 8`` (LSB first)."""
    return np.packbits(mask.astype(np.bool_), bitorder="little").tobytes()


def mask_from_bits(bits: bytes, count: int) -> npt.NDArray[np.bool_]:
    """The first ``count`` entries of a bitmap written by :func:`mask_to_bits`."""
    array = np.unpackbits(np.frombuffer(bits, np.uint8), count=count, bitorder="little")
    return array.astype(np.bool_)


class BucketTable:
    """Per bucket: pages held and the XOR of their digests (as four little-endian u64)."""

    __slots__ = ("counts", "hashes")

    def __init__(
        self,
        counts: npt.NDArray[np.int64] | None = None,
        hashes: npt.NDArray[np.uint64] | None = None,
    ) -> None:
        self.counts: npt.NDArray[np.int64] = (
            np.zeros(BUCKETS, np.int64) if counts is None else counts
        )
        self.hashes: npt.NDArray[np.uint64] = (
            np.zeros((BUCKETS, _WORDS), np.uint64) if hashes is None else hashes
        )
        if self.counts.shape != (BUCKETS,) or self.hashes.shape != (BUCKETS, _WORDS):
            raise UsageError("a bucket table has one count and one hash per bucket")

    @classmethod
    def from_digests(cls, digests: Iterable[bytes]) -> BucketTable:
        """The table of a set of digests (each once), e.g. rebuilt from a store."""
        table = cls()
        batch: list[bytes] = []
        for digest in digests:
            batch.append(digest)
            if len(batch) >= 65536:
                table.toggle(batch, 1)
                batch = []
        table.toggle(batch, 1)
        return table

    def toggle(self, digests: Sequence[bytes] | bytes, sign: int) -> None:
        """XOR ``digests`` in (``sign`` 1: added) or out (-1: removed); each digest once."""
        rows = _digest_rows(digests)
        if not len(rows):
            return
        buckets = buckets_of(digests)
        words = np.ascontiguousarray(rows).view("<u8").astype(np.uint64)
        np.bitwise_xor.at(self.hashes, buckets, words)
        np.add.at(self.counts, buckets, sign)

    def copy(self) -> BucketTable:
        return BucketTable(self.counts.copy(), self.hashes.copy())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, BucketTable):
            return NotImplemented
        return bool(
            np.array_equal(self.counts, other.counts) and np.array_equal(self.hashes, other.hashes)
        )

    __hash__ = None  # type: ignore[assignment]  # mutable

    def entry(self, bucket: int) -> tuple[int, bytes]:
        """(count, 32-byte hash) of one bucket."""
        return int(self.counts[bucket]), self.hashes[bucket].astype("<u8").tobytes()

    def fold(
        self, mask: npt.NDArray[np.bool_], first: int, groups: int, group_bits: int
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.uint64]]:
        """Counts and hashes of ``groups`` groups of ``2**group_bits`` buckets from bucket
        ``first``, over the buckets of ``mask`` (one flag per bucket of the range) only."""
        size = groups << group_bits
        if not (first >= 0 and first + size <= BUCKETS and mask.shape == (size,)):
            raise UsageError(f"groups {first}+{groups}<<{group_bits} do not fit the table")
        counts = np.where(mask, self.counts[first : first + size], 0)
        hashes = np.where(mask[:, None], self.hashes[first : first + size], np.uint64(0))
        group_counts = counts.reshape(groups, -1).sum(axis=1)
        group_hashes = np.bitwise_xor.reduce(hashes.reshape(groups, -1, _WORDS), axis=1)
        return group_counts, group_hashes.astype(np.uint64)

    def encode_entries(
        self, mask: npt.NDArray[np.bool_], first: int, groups: int, group_bits: int
    ) -> tuple[tuple[int, bytes], ...]:
        """:meth:`fold` as wire entries: (count, 32-byte hash) per group."""
        counts, hashes = self.fold(mask, first, groups, group_bits)
        raw = hashes.astype("<u8").tobytes()
        return tuple(
            (int(c), raw[i * DIGEST_SIZE : (i + 1) * DIGEST_SIZE])
            for i, c in enumerate(counts.tolist())
        )


class BucketOwners:
    """The replica set of every bucket in one membership view, and which buckets are uniform
    (same replica set for every key of the bucket; see the module docstring)."""

    __slots__ = ("rows", "uniform")

    def __init__(self, ring: Ring, replicas: int) -> None:
        positions = ring.replica_positions(_prefix_keys(np.arange(BUCKETS, dtype=np.uint64),
                                                        BUCKET_BITS), replicas)
        members = ring.members_by_position
        self.rows: npt.NDArray[np.intp] = members[positions]
        """Per bucket, the indices (into the ring's members) of its replicas, closest first."""
        self.uniform: npt.NDArray[np.bool_] = np.ones(BUCKETS, np.bool_)
        """Buckets whose replica set is the same for every key in them."""
        if not self.rows.size:
            return
        # Buckets whose picks at their first key include a colliding token: look closer.
        suspect = _colliding(ring, BUCKET_BITS)[positions].any(axis=1)
        reference = np.sort(self.rows, axis=1)
        # Sub-ranges still to settle: (bucket, prefix of ``depth`` bits).
        buckets = np.flatnonzero(suspect).astype(np.intp)
        prefixes = buckets.astype(np.uint64)
        for depth in range(BUCKET_BITS + 1, 65):
            if not len(buckets):
                return
            # Both halves of each sub-range; the picks of a half where no picked token collides
            # at ``depth`` bits hold across that half.
            buckets = np.repeat(buckets, 2)
            prefixes = (np.repeat(prefixes, 2) << np.uint64(1)) | np.tile(
                np.array([0, 1], np.uint64), len(prefixes))
            picked = ring.replica_positions(_prefix_keys(prefixes, depth), replicas)
            differs = (np.sort(members[picked], axis=1) != reference[buckets]).any(axis=1)
            self.uniform[buckets[differs]] = False
            again = _colliding(ring, depth)[picked].any(axis=1) & self.uniform[buckets]
            buckets, prefixes = buckets[again], prefixes[again]
        self.uniform[buckets] = False  # tokens alike in 64 bits: not worth telling apart

    def holds(self, index: int) -> npt.NDArray[np.bool_]:
        """Buckets whose replica set contains member ``index``."""
        if not self.rows.size:
            return np.zeros(BUCKETS, np.bool_)
        result: npt.NDArray[np.bool_] = (self.rows == index).any(axis=1)
        return result

    def joint(self, a: int, b: int) -> npt.NDArray[np.bool_]:
        """Uniform buckets both members ``a`` and ``b`` should hold: the ones they compare."""
        result: npt.NDArray[np.bool_] = self.uniform & self.holds(a) & self.holds(b)
        return result


def _prefix_keys(prefixes: npt.NDArray[np.uint64], bits: int) -> npt.NDArray[np.uint8]:
    """The first key (20 bytes) of each range of keys starting with a ``bits``-bit prefix."""
    tops = prefixes.astype(np.uint64) << np.uint64(64 - bits)
    keys = np.zeros((len(prefixes), NODE_ID_SIZE), np.uint8)
    keys[:, :8] = tops.astype(">u8").view(np.uint8).reshape(-1, 8)
    return keys


def _colliding(ring: Ring, bits: int) -> npt.NDArray[np.bool_]:
    """Per token (sorted order), whether it shares its first ``bits`` bits with a token of
    another member: the tokens whose order among themselves varies within such a range."""
    prefixes = ring.token_prefixes(bits)
    members = ring.members_by_position
    if len(prefixes) < 2:
        return np.zeros(len(prefixes), np.bool_)
    starts = np.flatnonzero(np.concatenate([[True], prefixes[1:] != prefixes[:-1]]))
    mixed = np.minimum.reduceat(members, starts) != np.maximum.reduceat(members, starts)
    sizes = np.diff(np.append(starts, len(prefixes)))
    return np.repeat(mixed, sizes)


def designated_source(rows: npt.NDArray[np.intp], target: int) -> npt.NDArray[np.intp]:
    """Per bucket (row of replica indices, closest first), the first replica other than
    ``target``: the one that pushes to ``target`` what it lacks (-1: no other replica)."""
    others = rows != target
    first = np.argmax(others, axis=1)
    picked = np.take_along_axis(rows, first[:, None], axis=1)[:, 0]
    return np.where(others.any(axis=1), picked, -1).astype(np.intp)


@dataclass(frozen=True, slots=True)
class RangeQuery:
    """One question to a peer: hashes of ``groups`` groups of ``2**group_bits`` buckets from
    bucket ``first``, over the buckets flagged in ``mask`` (one flag per bucket)."""

    first: int
    group_bits: int
    groups: int
    mask: npt.NDArray[np.bool_] = field(compare=False)

    @property
    def mask_bits(self) -> bytes:
        return mask_to_bits(self.mask)


class RangeComparison:
    """Which buckets of ``mask`` differ between the local table and a peer's, by descent.

    Sans-IO: take :meth:`queries`, ask them, feed each answer to :meth:`answer` (or
    :meth:`unanswered`), repeat until :attr:`done`. :attr:`differing` then lists the buckets
    whose pages the local node may have and the peer lack (a bucket where the local node holds
    nothing is not listed: the peer pushes those). ``max_mask_bytes`` and ``max_groups`` bound
    one query and its answer (so each fits a datagram).
    """

    def __init__(
        self,
        local: BucketTable,
        mask: npt.NDArray[np.bool_],
        *,
        max_mask_bytes: int,
        max_groups: int,
        levels: Sequence[int] = LEVELS,
    ) -> None:
        if mask.shape != (BUCKETS,):
            raise UsageError("the mask has one flag per bucket")
        if not levels or list(levels) != sorted(set(levels), reverse=True) or levels[-1] != 0:
            raise UsageError("levels descend to single buckets (0)")
        if levels[0] > BUCKET_BITS or max_groups < 1 or max_mask_bytes < 1:
            raise UsageError("bad comparison limits")
        self.local = local
        # Only buckets the local node holds pages in can need a push from here.
        self.mask = mask & (local.counts > 0)
        self.levels = tuple(levels)
        self.max_mask_bits = max_mask_bytes * 8
        self.max_groups = max_groups
        self.differing: list[int] = []
        """Buckets found to differ (ascending within each answer)."""
        self.unanswered_buckets = 0
        """Buckets of queries the peer did not answer."""
        self.queries_sent = 0
        self._pending: list[RangeQuery] = []
        self._outstanding = 0
        self._plan(0, BUCKETS, 0)

    @property
    def done(self) -> bool:
        return not self._pending and not self._outstanding

    def queries(self) -> list[RangeQuery]:
        """The queries to send now (each answered by :meth:`answer` or :meth:`unanswered`)."""
        out, self._pending = self._pending, []
        self._outstanding += len(out)
        self.queries_sent += len(out)
        return out

    def answer(self, query: RangeQuery, entries: Sequence[tuple[int, bytes]]) -> None:
        """The peer's (count, hash) per group of ``query``."""
        self._outstanding -= 1
        if len(entries) != query.groups:
            self.unanswered_buckets += int(query.mask.sum())
            return
        counts, hashes = self.local.fold(query.mask, query.first, query.groups, query.group_bits)
        raw = hashes.astype("<u8").tobytes()
        size = 1 << query.group_bits
        level = self.levels.index(query.group_bits)
        for g, (count, digest) in enumerate(entries):
            local_count = int(counts[g])
            if not local_count:
                continue  # nothing here to push (masked to buckets this node holds pages in)
            if count == local_count and digest == raw[g * DIGEST_SIZE : (g + 1) * DIGEST_SIZE]:
                continue
            start = query.first + g * size
            if query.group_bits == 0:
                self.differing.append(start)
            elif count == 0:
                # The peer holds nothing there: every local bucket of the group differs.
                sub = self.mask[start : start + size]
                self.differing.extend((start + np.flatnonzero(sub)).tolist())
            else:
                self._plan(start, size, level + 1)

    def unanswered(self, query: RangeQuery) -> None:
        """The peer did not answer ``query``: its buckets stay unknown this sweep."""
        self._outstanding -= 1
        self.unanswered_buckets += int(query.mask.sum())

    def _plan(self, start: int, size: int, level: int) -> None:
        """Queue queries over buckets ``start..start+size`` at ``levels[level]``."""
        group_bits = self.levels[level]
        per_query = min(self.max_groups, max(1, self.max_mask_bits >> group_bits))
        group = 1 << group_bits
        if group > self.max_mask_bits:
            raise UsageError("a group's mask does not fit one query")
        end = start + size
        at = start
        while at < end:
            groups = min(per_query, (end - at) >> group_bits)
            span = groups << group_bits
            mask = self.mask[at : at + span]
            if mask.any():
                self._pending.append(RangeQuery(at, group_bits, groups, mask.copy()))
            at += span
