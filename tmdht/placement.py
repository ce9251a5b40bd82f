"""Replica placement: which nodes hold a page.

A page's DHT key is the first 160 bits of its digest. Its replica set is chosen from the live
nodes by XOR distance between their 160-bit IDs and the key (Kademlia's metric), respecting the
nodes' failure domains. Everyone computes it the same way from the same membership, so a client
with a complete view reaches a replica in one hop.

The rule, one replica at a time (greedy, closest first):

    the next replica is the closest node, among those not chosen yet, that shares the least
    with the replicas already chosen: a node in an unused zone if there is one; else a node in
    an unused rack (of a used zone); else on an unused host; else any node.

So the R replicas land in R distinct zones whenever the ring spans at least R zones. With fewer
zones every zone holds a replica and the rest go to the closest remaining nodes, preferring
racks, then hosts, not used yet: nothing is refused for lack of domains, and the copies are as
spread as the ring allows. The set is returned closest first. Two consequences hold for every
key and are property-tested (tests/test_placement_domains.py): losing one whole zone (rack,
host) never loses every replica while the ring spans two of them and R >= 2; and a node joining
or leaving changes only the replica sets that contain it, like plain XOR placement. Nodes
without domains, or whose domains all differ at the first level that tells any of them apart,
place exactly as plain XOR distance does.

The rule is Cassandra's NetworkTopologyStrategy rack rule (walk the ring from the key, skip
nodes whose rack already holds a replica, take the skipped ones in ring order once every rack is
used) on Kademlia's metric, with Ceph CRUSH's hierarchy (zone > rack > host) spread level by
level. Like CRUSH, placement is a pure function of the membership (nothing stored per page) and
moves little when it changes; unlike CRUSH there are no weights and no per-pool rules, and
unlike NetworkTopologyStrategy no per-zone replica count to configure. As with both, domains
should be of similar size: a zone takes at most one copy of a key while the ring has R zones,
so the nodes of a zone much larger than the others hold fewer pages each (bench/simulate.py).

Virtual IDs (tokens): with random IDs, XOR placement gives a node the keys of the part of the
key space nearer to it than to any other node, and with a few dozen nodes those parts differ a
lot (copies per node max/mean about 2 at 32 nodes in 8 host domains, R=3). So each member
stands in the ring at ``virtual_ids`` (V) points, its *tokens*: token 0 is its node ID, token
``i`` the first 160 bits of BLAKE3(``b"tmdht-vid"`` || node ID || ``i`` as u16 big-endian)
(:func:`tokens_of`). The rule above then walks tokens instead of node IDs, closest first, and
treats the member as the narrowest failure domain below its host: a token whose member already
holds a replica is skipped while another member can take the replica, so the R replicas are R
distinct members, in R distinct domains whenever the ring has that many. A member's load is the
sum of V independent parts, so its spread shrinks about as 1/sqrt(V) (bench/simulate.py).
Tokens are derived from the node ID, never sent: every node and client computes the same ones,
provided they agree on V (a cluster-wide setting, like R; :data:`VIRTUAL_IDS` by default). With
V = 1 the tokens are the node IDs and placement is exactly the rule above. A member joining or
leaving still changes only the replica sets that hold it (its tokens are the only points that
appear or go).

Batch placement is vectorised with numpy on the top 64 bits of the IDs, which orders distinct
node IDs exactly unless two share their first 64 bits (then the exact 160-bit comparison
decides, in Python). A :class:`Ring` prepares one membership view (sorted IDs, domain codes)
once; each digest then looks only at the ``2 * WINDOW`` IDs next to its key in sorted order,
which hold its closest nodes unless a certificate says otherwise (then that digest is placed
again from a wider window, up to the whole ring). The module-level functions keep a few recent
rings, so calling them again with an unchanged view costs no preparation; with domains, or with
thousands of members, keep the :class:`Ring` of the current view instead (hashing the view to
find it in the cache costs about as much as placing a small batch). Everything said about IDs
there holds for tokens: a :class:`Ring` of N members holds N * V sorted points.
"""

from __future__ import annotations

import bisect
import functools
from collections.abc import Sequence
from typing import Final

import blake3
import numpy as np
import numpy.typing as npt

from tmdht.domains import MAX_LABEL_BYTES, MAX_VIRTUAL_IDS, VIRTUAL_IDS, FailureDomain
from tmdht.errors import UsageError
from tmdht.pages import DIGEST_SIZE, KEY_SIZE

__all__ = [
    "MAX_LABEL_BYTES",
    "MAX_VIRTUAL_IDS",
    "NODE_ID_SIZE",
    "VIRTUAL_IDS",
    "WINDOW",
    "FailureDomain",
    "Ring",
    "closest",
    "distance",
    "replica_indices",
    "replica_rows",
    "tokens_of",
]

NODE_ID_SIZE: Final = KEY_SIZE
_TOKEN_CONTEXT: Final = b"tmdht-vid"
SMALL_BATCH: Final = 16
"""Up to this many digests :meth:`Ring.replica_rows` places in plain Python: numpy's fixed cost
per call is more than sorting a few XOR distances per digest."""
WINDOW: Final = 16
"""Neighbours on each side of a key, in sorted ID order, that placement examines first."""
_CACHED_RINGS: Final = 4
_NO_LIMIT: Final = np.uint64(2**64 - 1)
"""Certificate limit on a side of the window that has no node beyond it."""


def distance(a: bytes, b: bytes) -> int:
    """XOR distance of two 160-bit IDs (or keys; a page digest is cut to its key)."""
    return int.from_bytes(a[:NODE_ID_SIZE], "big") ^ int.from_bytes(b[:NODE_ID_SIZE], "big")


@functools.lru_cache(maxsize=1 << 14)
def _joined_tokens(node_id: bytes, virtual_ids: int) -> bytes:
    """A member's tokens, one after the other (a client rebuilds its view on every membership
    change: the last 16k members' tokens are kept, about 6 MiB at V = 16)."""
    return node_id + b"".join(
        blake3.blake3(_TOKEN_CONTEXT + node_id + i.to_bytes(2, "big")).digest(NODE_ID_SIZE)
        for i in range(1, virtual_ids)
    )


def _check_virtual_ids(virtual_ids: int) -> None:
    if not (isinstance(virtual_ids, int) and 1 <= virtual_ids <= MAX_VIRTUAL_IDS):
        raise UsageError(f"virtual IDs per node must be between 1 and {MAX_VIRTUAL_IDS}")


def tokens_of(node_id: bytes, virtual_ids: int = VIRTUAL_IDS) -> tuple[bytes, ...]:
    """The ``virtual_ids`` placement points (tokens) of a member: its ID, then BLAKE3-derived
    ones (see the module docstring). Deterministic."""
    if len(node_id) != NODE_ID_SIZE:
        raise UsageError("node IDs are 20 bytes")
    _check_virtual_ids(virtual_ids)
    joined = _joined_tokens(bytes(node_id), virtual_ids)
    return tuple(joined[i : i + NODE_ID_SIZE] for i in range(0, len(joined), NODE_ID_SIZE))


def closest(key: bytes, node_ids: Sequence[bytes], count: int) -> list[int]:
    """Indices into ``node_ids`` of the ``count`` IDs closest to ``key``, closest first."""
    target = int.from_bytes(key[:NODE_ID_SIZE], "big")
    order = sorted(
        range(len(node_ids)), key=lambda i: int.from_bytes(node_ids[i], "big") ^ target
    )
    return order[:count]


def _highest_bit(values: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    """Each value's highest set bit alone (0 stays 0)."""
    smeared = values.copy()
    for shift in (1, 2, 4, 8, 16, 32):
        smeared |= smeared >> np.uint64(shift)
    return smeared ^ (smeared >> np.uint64(1))


def _highest_int_bit(value: int) -> int:
    """The highest set bit of ``value`` alone (0 for 0: an equal ID certifies nothing)."""
    return 1 << (value.bit_length() - 1) if value else 0


def _key_tops(digests: npt.NDArray[np.uint8] | Sequence[bytes]) -> npt.NDArray[np.uint64]:
    """The top 64 bits of each digest's key."""
    if isinstance(digests, np.ndarray):
        rows = digests.reshape(len(digests), -1)
        if rows.shape[1] < NODE_ID_SIZE:
            raise UsageError("digests must hold at least 20 bytes")
        keys = np.ascontiguousarray(rows[:, :8], np.uint8)
    else:
        if any(len(d) < NODE_ID_SIZE for d in digests):
            raise UsageError("digests must hold at least 20 bytes")
        raw = b"".join(digests)
        if len(raw) == len(digests) * DIGEST_SIZE:
            # Whole digests in one buffer: numpy cuts the keys, no slice per digest in Python.
            keys = np.frombuffer(raw, dtype=np.uint8).reshape(-1, DIGEST_SIZE)[:, :8]
        else:
            raw = b"".join(bytes(d[:8]) for d in digests)
            keys = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 8)
        keys = np.ascontiguousarray(keys)
    return keys.view(">u8")[:, 0].astype(np.uint64)


def _digest_bytes(digests: npt.NDArray[np.uint8] | Sequence[bytes], row: int) -> bytes:
    if isinstance(digests, np.ndarray):
        return digests.reshape(len(digests), -1)[row, :NODE_ID_SIZE].tobytes()
    return bytes(digests[row][:NODE_ID_SIZE])


class Ring:
    """One membership view prepared for placement; immutable, built once per view.

    ``node_ids[i]`` (20 bytes each) lives in ``domains[i]``; without ``domains`` every node is
    its own domain. Each member stands at ``virtual_ids`` tokens (:func:`tokens_of`). Placement
    returns indices into ``node_ids``.
    """

    __slots__ = (
        "_distinct",
        "_exact_only",
        "_order",
        "_order_list",
        "_sorted_code_lists",
        "_sorted_codes",
        "_sorted_ints",
        "_sorted_tops",
        "node_ids",
        "virtual_ids",
    )

    def __init__(
        self,
        node_ids: Sequence[bytes],
        domains: Sequence[FailureDomain] | None = None,
        *,
        virtual_ids: int = VIRTUAL_IDS,
    ) -> None:
        """Prepare ``node_ids`` (and their ``domains``, same length) for placement."""
        if any(len(n) != NODE_ID_SIZE for n in node_ids):
            raise UsageError("node IDs are 20 bytes")
        if domains is not None and len(domains) != len(node_ids):
            raise UsageError(f"{len(domains)} failure domains for {len(node_ids)} nodes")
        _check_virtual_ids(virtual_ids)
        self.node_ids: tuple[bytes, ...] = tuple(bytes(n) for n in node_ids)
        """The members, in the caller's order."""
        self.virtual_ids = virtual_ids
        """Tokens per member (V)."""
        # Points: every member's tokens, member after member (point p is member p // V's).
        points = b"".join(_joined_tokens(n, virtual_ids) for n in self.node_ids)
        owners = np.repeat(np.arange(len(self.node_ids), dtype=np.intp), virtual_ids)
        raw = np.frombuffer(points, np.uint8).reshape(-1, NODE_ID_SIZE)
        tops = np.ascontiguousarray(raw[:, :8]).view(">u8")[:, 0].astype(np.uint64)
        order = np.argsort(tops, kind="stable")
        self._exact_only = bool(len(tops) > 1 and np.any(np.diff(tops[order]) == 0))
        ints = [int.from_bytes(points[i : i + NODE_ID_SIZE], "big")
                for i in range(0, len(points), NODE_ID_SIZE)]
        if self._exact_only:
            # Sorted by the full 160 bits, the index breaking ties between equal points (as a
            # stable sort by distance does).
            order = np.array(sorted(range(len(ints)), key=lambda i: (ints[i], i)), np.intp)
        order = order.astype(np.intp)
        # Sorted position -> member (the points themselves are only needed sorted).
        self._order = owners[order]
        self._order_list: list[int] = self._order.tolist()
        self._sorted_ints = [ints[i] for i in order.tolist()]
        self._sorted_tops = tops[order]
        codes, distinct = _domain_codes(domains, len(self.node_ids))
        if virtual_ids > 1 and len(self.node_ids) > 1:
            # The member is the narrowest domain: its tokens exclude each other.
            member = np.arange(len(self.node_ids), dtype=np.int32)[None, :]
            codes, distinct = np.concatenate([codes, member]), (*distinct, len(self.node_ids))
        self._distinct = distinct
        self._sorted_codes = codes[:, owners][:, order]
        self._sorted_code_lists: list[list[int]] = self._sorted_codes.tolist()
        for array in (self._order, self._sorted_tops, self._sorted_codes):
            array.flags.writeable = False

    def __len__(self) -> int:
        return len(self.node_ids)

    @property
    def spreads_domains(self) -> bool:
        """False if placement is plain XOR distance over node IDs (one token per node, and no
        domains or none that constrain)."""
        return len(self._distinct) > 0

    # -- one key, plain Python -----------------------------------------------------------------

    def place(self, key: bytes, replicas: int) -> list[int]:
        """Indices of the replica set of ``key`` (a digest or a key), closest first."""
        if replicas < 1:
            raise UsageError("replicas must be at least 1")
        if len(key) < NODE_ID_SIZE:
            raise UsageError("digests must hold at least 20 bytes")
        return self._place(int.from_bytes(key[:NODE_ID_SIZE], "big"), min(replicas, len(self)))

    def _place(self, key: int, count: int) -> list[int]:
        order = self._order_list
        return [order[j] for j in self._place_positions(key, count)]

    def _place_positions(self, key: int, count: int) -> list[int]:
        """Sorted positions (points) of the picks for ``key``, closest first."""
        if count == 0:
            return []
        ints, size, half = self._sorted_ints, len(self._sorted_ints), max(WINDOW, count)
        if size <= 2 * half:
            # A small ring: every point is a candidate, nothing to certify.
            dist = [v ^ key for v in ints]
            ranked = sorted(range(size), key=dist.__getitem__)
            if not self._distinct:
                return ranked[:count]
            picked = self._choose(ranked, count, True)
            assert picked is not None
            return picked
        at = bisect.bisect_left(ints, key)
        while True:
            low = max(0, min(at - half, size - 2 * half))
            high = min(size, low + 2 * half)
            dist = [ints[j] ^ key for j in range(low, high)]
            near = sorted(range(len(dist)), key=dist.__getitem__)
            # Every ID outside the window is at least as far as the highest bit of the distance
            # to the window's nearer outside neighbour (IDs further out share no longer a
            # prefix with the key): the candidates closer than that are the start of the
            # ring's XOR order, and the rule may pick among them only.
            bound = min(
                (_highest_int_bit(ints[j] ^ key) for j in (low - 1, high) if 0 <= j < size),
                default=1 << (NODE_ID_SIZE * 8),
            )
            sure = [low + r for r in near if dist[r] < bound]
            picked = self._choose(sure, count, len(sure) == size)
            if picked is not None:
                return picked
            half *= 8  # rare: the key's closest nodes straddle a window edge, or domains are few

    def _choose(self, ranked: list[int], count: int, complete: bool) -> list[int] | None:
        """The rule over ``ranked`` (sorted positions, closest first): the picks closest first,
        or None if a pick may lie beyond ``ranked`` (unless ``complete``)."""
        if not self._distinct:
            return ranked[:count] if complete or len(ranked) >= count else None
        codes, distinct = self._sorted_code_lists, self._distinct
        levels = range(len(distinct))
        used: list[set[int]] = [set() for _ in levels]
        taken: set[int] = set()  # ranks into ``ranked``
        for _ in range(count):
            # The least any remaining node can share with the picks: the first level with an
            # unused label (past every level, all remaining nodes share the full path).
            least = next((lv for lv in levels if distinct[lv] > len(used[lv])), len(distinct))
            for rank, j in enumerate(ranked):
                if rank in taken:
                    continue
                # Labels are paths: a node that differs at one level differs below it too.
                shared = next((lv for lv in levels if codes[lv][j] not in used[lv]), len(distinct))
                if shared == least:
                    break
            else:
                assert not complete, "the rule found no node"
                return None
            taken.add(rank)
            for lv in levels:
                used[lv].add(codes[lv][j])
        return [ranked[r] for r in sorted(taken)]

    # -- batches, numpy ------------------------------------------------------------------------

    def replica_indices(
        self, digests: npt.NDArray[np.uint8] | Sequence[bytes], replicas: int
    ) -> npt.NDArray[np.intp]:
        """For each digest, the indices of its replica set, closest first.

        ``digests`` is a sequence of digests (or keys) or a uint8 array of one per row. Returns
        an array of shape (len(digests), min(replicas, len(ring))).
        """
        result: npt.NDArray[np.intp] = self._order[self.replica_positions(digests, replicas)]
        return result

    def replica_positions(
        self, digests: npt.NDArray[np.uint8] | Sequence[bytes], replicas: int
    ) -> npt.NDArray[np.intp]:
        """:meth:`replica_indices` as the tokens picked: positions in sorted token order (see
        :meth:`token_prefixes`; :attr:`members_by_position` maps them to members)."""
        if replicas < 1:
            raise UsageError("replicas must be at least 1")
        key_tops = _key_tops(digests)
        count = min(replicas, len(self))
        if count == 0 or len(key_tops) == 0:
            return np.empty((len(key_tops), count), dtype=np.intp)
        if self._exact_only:
            # Two points share their first 64 bits: exact comparison, one digest at a time.
            rows = [self._place_positions(int.from_bytes(_digest_bytes(digests, i), "big"), count)
                    for i in range(len(key_tops))]
            return np.array(rows, dtype=np.intp).reshape(len(key_tops), count)
        half = max(WINDOW, count)
        positions, unsure = self._place_tops(key_tops, count, half)
        while unsure is not None and np.count_nonzero(unsure) > SMALL_BATCH:
            # Many keys whose picks may lie beyond the window (few domains, or many tokens
            # per member): a wider window for them, still in numpy.
            half *= 8
            again = np.flatnonzero(unsure)
            positions[again], wider = self._place_tops(key_tops[again], count, half)
            unsure[again] = False if wider is None else wider
        if unsure is not None:
            for i in np.flatnonzero(unsure).tolist():
                positions[i] = self._place_positions(
                    int.from_bytes(_digest_bytes(digests, i), "big"), count)
        return positions

    @property
    def members_by_position(self) -> npt.NDArray[np.intp]:
        """The member (index into ``node_ids``) of each token, in sorted token order."""
        return self._order

    def token_prefixes(self, bits: int) -> npt.NDArray[np.uint64]:
        """The first ``bits`` (at most 64) bits of each token, in sorted token order."""
        if not 0 <= bits <= 64:
            raise UsageError("a token prefix is at most 64 bits")
        if not bits:
            return np.zeros_like(self._sorted_tops)
        prefixes: npt.NDArray[np.uint64] = self._sorted_tops >> np.uint64(64 - bits)
        return prefixes

    def _place_tops(
        self, key_tops: npt.NDArray[np.uint64], count: int, half: int
    ) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.bool_] | None]:
        """Sorted positions of each key's picks from the ``2 * half`` points next to it, and
        which rows must be placed exactly (None: none)."""
        tops, size = self._sorted_tops, len(self._sorted_tops)
        if size <= 2 * half:
            # A small ring: every node is a candidate, nothing to certify.
            return self._pick(None, key_tops[:, None] ^ tops[None, :], None, count)
        width = 2 * half
        at = np.searchsorted(tops, key_tops, side="left").astype(np.intp)
        low = np.clip(np.minimum(at - half, size - width), 0, None)
        near = low[:, None] + np.arange(width, dtype=np.intp)
        # Certificate (see _place): candidates closer than ``limit`` lead the ring's XOR order.
        limit = np.full(len(key_tops), _NO_LIMIT, np.uint64)
        for outside in (low - 1, low + width):
            exists = (outside >= 0) & (outside < size)
            edge = _highest_bit(tops[np.clip(outside, 0, size - 1)] ^ key_tops)
            limit = np.where(exists, np.minimum(limit, edge), limit)
        return self._pick(near, tops[near] ^ key_tops[:, None], limit, count)

    def _pick(
        self,
        near: npt.NDArray[np.intp] | None,
        dist: npt.NDArray[np.uint64],
        limit: npt.NDArray[np.uint64] | None,
        count: int,
    ) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.bool_] | None]:
        """The rule over candidates ``near`` (sorted positions; None: the whole ring) at
        ``dist``; those not closer than ``limit`` (None: no limit) may be preceded by other
        nodes. Sorted positions of the picks closest first, and the rows to place exactly."""
        if not self._distinct:
            if count < dist.shape[1]:
                ranks = np.argpartition(dist, count - 1, axis=1)[:, :count]
                ranks = np.take_along_axis(
                    ranks, np.take_along_axis(dist, ranks, axis=1).argsort(axis=1), axis=1
                )
            else:
                ranks = np.argsort(dist, axis=1)
            if near is None or limit is None:
                return ranks if near is None else np.take_along_axis(near, ranks, axis=1), None
            last = np.take_along_axis(dist, ranks[:, -1:], axis=1)[:, 0]
            return np.take_along_axis(near, ranks, axis=1), last >= limit
        ranks = np.argsort(dist, axis=1)
        near = ranks if near is None else np.take_along_axis(near, ranks, axis=1)
        if limit is None:
            sure = np.ones(near.shape, dtype=np.bool_)
        else:
            sure = np.take_along_axis(dist, ranks, axis=1) < limit[:, None]
        # Most keys find their picks among the first few candidates: try those first.
        head = min(near.shape[1], 2 * count + 2)
        picks, unsure = self._choose_batch(near[:, :head], sure[:, :head], count)
        if head < near.shape[1] and unsure.any():
            again = np.flatnonzero(unsure)
            picks[again], unsure[again] = self._choose_batch(near[again], sure[again], count)
        return np.take_along_axis(near, picks, axis=1), unsure

    def _choose_batch(
        self, near: npt.NDArray[np.intp], sure: npt.NDArray[np.bool_], count: int
    ) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.bool_]]:
        """:meth:`_choose` for every row at once, over candidates closest first (``near``), of
        which those ``sure`` lead the ring's order: ranks of the picks, and the unsure rows."""
        rows, width = near.shape
        every = np.arange(rows)
        distinct = self._distinct
        codes = self._sorted_codes[:, near]  # levels x rows x width
        # matches[lv]: the candidate's level-lv label is a pick's; shared: at how many levels.
        matches = np.zeros(codes.shape, dtype=np.bool_)
        shared = np.zeros((rows, width), dtype=np.int8)
        used = np.zeros((len(distinct), rows), dtype=np.int32)
        free = sure.copy()
        picks = np.empty((rows, count), dtype=np.intp)
        unsure = np.zeros(rows, dtype=np.bool_)
        for slot in range(count):
            least = np.full(rows, len(distinct), dtype=np.int8)
            for lv in reversed(range(len(distinct))):
                least[used[lv] < distinct[lv]] = lv
            fits = free & (shared == least[:, None])
            rank = np.argmax(fits, axis=1)
            unsure |= ~fits[every, rank]
            picks[:, slot] = rank
            free[every, rank] = False
            if slot + 1 == count:
                break
            for lv, level in enumerate(codes):
                used[lv] += ~matches[lv, every, rank]
                new = (level == level[every, rank][:, None]) & ~matches[lv]
                matches[lv] |= new
                shared += new
        return np.sort(picks, axis=1), unsure

    def replica_rows(self, digests: Sequence[bytes], replicas: int) -> list[list[int]]:
        """``replica_indices(digests, replicas).tolist()``, cheaper for small batches."""
        if len(digests) > SMALL_BATCH:
            rows: list[list[int]] = self.replica_indices(digests, replicas).tolist()
            return rows
        if replicas < 1:
            raise UsageError("replicas must be at least 1")
        if any(len(d) < NODE_ID_SIZE for d in digests):
            raise UsageError("digests must hold at least 20 bytes")
        count = min(replicas, len(self))
        return [self._place(int.from_bytes(d[:NODE_ID_SIZE], "big"), count) for d in digests]


def _domain_codes(
    domains: Sequence[FailureDomain] | None, size: int
) -> tuple[npt.NDArray[np.int32], tuple[int, ...]]:
    """Per level that constrains placement, each node's label path code; distinct codes per level.

    Levels that tell no nodes apart (a zone every node shares) or add nothing to the level
    above (one rack per zone) are dropped, and so is every level from the first at which all
    nodes differ: no node still to choose can share a label there with a chosen one. No level
    left means plain XOR order.
    """
    if domains is None or size < 2:
        return np.zeros((0, size), np.int32), ()
    if not all(isinstance(d, FailureDomain) for d in domains):
        raise UsageError("failure domains must be FailureDomain values")
    levels: list[list[int]] = []
    distinct: list[int] = []
    previous = 1
    paths = [d.path for d in domains]
    for depth in (1, 2, 3):
        # Codes in order of first appearance: only their equality matters to the rule.
        labels: dict[tuple[str, ...], int] = {}
        codes = [labels.setdefault(p[:depth], len(labels)) for p in paths]
        if len(labels) == size:
            break  # every node differs from here on: no remaining node can share a label
        if len(labels) == previous:
            continue  # this level tells no more nodes apart than the one above
        levels.append(codes)
        distinct.append(len(labels))
        previous = len(labels)
    return np.array(levels, dtype=np.int32).reshape(len(levels), size), tuple(distinct)


@functools.lru_cache(maxsize=_CACHED_RINGS)
def _cached_ring(
    node_ids: tuple[bytes, ...], domains: tuple[FailureDomain, ...] | None, virtual_ids: int
) -> Ring:
    return Ring(node_ids, domains, virtual_ids=virtual_ids)


def _ring(
    node_ids: Sequence[bytes], domains: Sequence[FailureDomain] | None, virtual_ids: int
) -> Ring:
    return _cached_ring(tuple(node_ids), None if domains is None else tuple(domains), virtual_ids)


def replica_indices(
    digests: npt.NDArray[np.uint8] | Sequence[bytes],
    node_ids: Sequence[bytes],
    replicas: int,
    *,
    domains: Sequence[FailureDomain] | None = None,
    virtual_ids: int = VIRTUAL_IDS,
) -> npt.NDArray[np.intp]:
    """For each digest, the indices of its replica set among ``node_ids``, closest first.

    Returns an array of shape (len(digests), min(replicas, len(node_ids))). ``domains[i]`` is
    the failure domain of ``node_ids[i]``; without them every node is its own domain.
    """
    if replicas < 1:
        raise UsageError("replicas must be at least 1")
    return _ring(node_ids, domains, virtual_ids).replica_indices(digests, replicas)


def replica_rows(
    digests: Sequence[bytes],
    node_ids: Sequence[bytes],
    replicas: int,
    *,
    domains: Sequence[FailureDomain] | None = None,
    virtual_ids: int = VIRTUAL_IDS,
) -> list[list[int]]:
    """``replica_indices(digests, node_ids, replicas).tolist()``, cheaper for small batches."""
    if replicas < 1:
        raise UsageError("replicas must be at least 1")
    return _ring(node_ids, domains, virtual_ids).replica_rows(digests, replicas)
