"""Replica placement: the vectorised path agrees with plain XOR-distance sorting."""

from __future__ import annotations

import os

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from tmdht.placement import SMALL_BATCH, closest, distance, replica_indices, replica_rows

ids20 = st.binary(min_size=20, max_size=20)


@settings(max_examples=200, deadline=None)
@given(ids20, ids20, ids20)
def test_xor_distance_is_a_metric(a: bytes, b: bytes, c: bytes) -> None:
    assert distance(a, a) == 0
    assert distance(a, b) == distance(b, a)
    assert distance(a, c) == distance(a, b) ^ distance(b, c)
    assert (distance(a, b) == 0) == (a == b)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(ids20, min_size=1, max_size=12, unique=True), st.integers(1, 5), st.integers(0, 2**32)
)
def test_batch_placement_matches_brute_force(nodes: list[bytes], replicas: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    digests = [rng.bytes(32) for _ in range(50)]
    got = replica_indices(digests, nodes, replicas)
    arr = replica_indices(
        np.frombuffer(b"".join(digests), np.uint8).reshape(-1, 32), nodes, replicas
    )
    for i, d in enumerate(digests):
        want = sorted(range(len(nodes)), key=lambda j: distance(d, nodes[j]))[:replicas]
        assert got[i].tolist() == want == arr[i].tolist()
        assert closest(d, nodes, replicas) == want
    # Small batches take the plain-Python path, large ones numpy: both give the same rows.
    assert replica_rows(digests[:SMALL_BATCH], nodes, replicas) == got[:SMALL_BATCH].tolist()
    assert replica_rows(digests, nodes, replicas) == got.tolist()


def test_ids_sharing_a_prefix_are_ordered_exactly() -> None:
    prefix = os.urandom(8)
    nodes = [prefix + os.urandom(12) for _ in range(4)]
    digests = [prefix + os.urandom(24) for _ in range(20)]
    got = replica_indices(digests, nodes, 2)
    for i, d in enumerate(digests):
        assert got[i].tolist() == sorted(range(4), key=lambda j: distance(d, nodes[j]))[:2]
