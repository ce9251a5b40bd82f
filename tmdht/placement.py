"""Replica placement: which nodes hold a page.

A page's DHT key is the first 160 bits of its digest; its replica set is the R live nodes whose
160-bit IDs are closest to the key by XOR distance (Kademlia's metric). Everyone computes it the
same way from the same membership, so a client with a complete view reaches a replica in one hop.

Batch placement is vectorised with numpy: distances are compared on their top 64 bits, which
orders distinct node IDs exactly unless two IDs share their first 64 bits (then the exact 160-bit
comparison decides, in Python).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import numpy as np
import numpy.typing as npt

from tmdht.errors import UsageError
from tmdht.pages import DIGEST_SIZE, KEY_SIZE

__all__ = [
    "NODE_ID_SIZE",
    "closest",
    "distance",
    "replica_indices",
    "replica_rows",
]

NODE_ID_SIZE: Final = KEY_SIZE
SMALL_BATCH: Final = 16
"""Up to this many digests :func:`replica_rows` places in plain Python: numpy's fixed cost per
call (~80 µs) is more than sorting a few XOR distances per digest."""


def distance(a: bytes, b: bytes) -> int:
    """XOR distance of two 160-bit IDs (or keys; a page digest is cut to its key)."""
    return int.from_bytes(a[:NODE_ID_SIZE], "big") ^ int.from_bytes(b[:NODE_ID_SIZE], "big")


def closest(key: bytes, node_ids: Sequence[bytes], count: int) -> list[int]:
    """Indices into ``node_ids`` of the ``count`` IDs closest to ``key``, closest first."""
    target = int.from_bytes(key[:NODE_ID_SIZE], "big")
    order = sorted(
        range(len(node_ids)), key=lambda i: int.from_bytes(node_ids[i], "big") ^ target
    )
    return order[:count]


def replica_indices(
    digests: npt.NDArray[np.uint8] | Sequence[bytes], node_ids: Sequence[bytes], replicas: int
) -> npt.NDArray[np.intp]:
    """For each digest, the indices of its ``replicas`` closest nodes, closest first.

    Returns an array of shape (len(digests), min(replicas, len(node_ids))).
    """
    if replicas < 1:
        raise UsageError("replicas must be at least 1")
    if any(len(n) != NODE_ID_SIZE for n in node_ids):
        raise UsageError("node IDs are 20 bytes")
    if isinstance(digests, np.ndarray):
        keys = np.ascontiguousarray(digests.reshape(len(digests), -1)[:, :NODE_ID_SIZE], np.uint8)
    else:
        raw = b"".join(bytes(d[:NODE_ID_SIZE]) for d in digests)
        keys = np.frombuffer(raw, dtype=np.uint8).reshape(-1, NODE_ID_SIZE)
    if keys.shape[1] != NODE_ID_SIZE:
        raise UsageError("digests must hold at least 20 bytes")
    key_top = np.ascontiguousarray(keys[:, :8]).view(">u8")[:, 0].astype(np.uint64)
    r = min(replicas, len(node_ids))
    if r == 0 or len(key_top) == 0:
        return np.empty((len(key_top), r), dtype=np.intp)
    tops = [int.from_bytes(n[:8], "big") for n in node_ids]
    node_top = np.array(tops, dtype=np.uint64)
    dist = key_top[:, None] ^ node_top[None, :]
    if len(set(tops)) == len(tops):
        if r < len(node_ids):
            part = np.argpartition(dist, r - 1, axis=1)[:, :r]
            order = np.take_along_axis(dist, part, axis=1).argsort(axis=1)
            return np.take_along_axis(part, order, axis=1)
        return np.argsort(dist, axis=1)
    # Two node IDs share their first 64 bits: exact comparison, one digest at a time.
    return np.array([closest(row.tobytes(), node_ids, r) for row in keys], dtype=np.intp)


def replica_rows(
    digests: Sequence[bytes], node_ids: Sequence[bytes], replicas: int
) -> list[list[int]]:
    """``replica_indices(digests, node_ids, replicas).tolist()``, cheaper for small batches."""
    if len(digests) > SMALL_BATCH:
        raw = b"".join(digests)
        if len(raw) == len(digests) * DIGEST_SIZE and all(len(d) == DIGEST_SIZE for d in digests):
            # Whole digests in one buffer: numpy cuts the keys, no slice per digest in Python.
            keys = np.frombuffer(raw, dtype=np.uint8).reshape(-1, DIGEST_SIZE)
            rows: list[list[int]] = replica_indices(keys, node_ids, replicas).tolist()
        else:
            rows = replica_indices(digests, node_ids, replicas).tolist()
        return rows
    if replicas < 1:
        raise UsageError("replicas must be at least 1")
    if any(len(n) != NODE_ID_SIZE for n in node_ids):
        raise UsageError("node IDs are 20 bytes")
    if any(len(d) < NODE_ID_SIZE for d in digests):
        raise UsageError("digests must hold at least 20 bytes")
    r = min(replicas, len(node_ids))
    return [closest(d, node_ids, r) for d in digests]
