"""The page store's bucket table (tmdht.node.buckets): kept in step with puts and deletes,
persisted, rebuilt when missing or inconsistent."""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import lmdb
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tmdht.node import buckets as node_buckets
from tmdht.node.storage import PageStore
from tmdht.pages import digest_page
from tmdht.rangehash import BucketTable

CAPACITY = 1 << 30


def page(n: int) -> bytes:
    return n.to_bytes(8, "little") * 512


def items(numbers: list[int]) -> list[tuple[bytes, bytes]]:
    return [(digest_page(page(n)), page(n)) for n in numbers]


def rebuilt(store: PageStore) -> BucketTable:
    return BucketTable.from_digests(store.iter_digests())


def apply(store: PageStore, put: bool, numbers: list[int]) -> None:
    if put:
        store.put_many(items(numbers))
    else:
        store.delete_many([digest_page(page(n)) for n in numbers])


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.booleans(), st.lists(st.integers(1, 60), max_size=12)), max_size=12))
def test_incremental_equals_rebuilt(tmp_path_factory: object, ops: list[tuple[bool, list[int]]]) -> None:
    path = tmp_path_factory.mktemp("store")  # type: ignore[attr-defined]
    with PageStore.open(path, capacity_bytes=CAPACITY) as store:
        for put, numbers in ops:
            apply(store, put, numbers)
            assert store.buckets.table() == rebuilt(store)
    with PageStore.open(path, capacity_bytes=CAPACITY) as store:
        assert not store.buckets.rebuilt
        assert store.buckets.table() == rebuilt(store)


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.booleans(), st.lists(st.integers(1, 40), max_size=12)), max_size=16),
       st.sampled_from([1, 7, node_buckets.FOLD_PENDING]), st.booleans())
def test_digests_folded_late_give_the_same_table(
    tmp_path_factory: object, ops: list[tuple[bool, list[int]]], fold_at: int, read: bool
) -> None:
    """Committed digests wait to be folded in (until a read, the save or ``FOLD_PENDING`` of
    them): puts and deletes of the same pages in any order, read only at the end or only
    after a reopen, give the table a rebuild computes."""
    path = tmp_path_factory.mktemp("store")  # type: ignore[attr-defined]
    with mock.patch.object(node_buckets, "FOLD_PENDING", fold_at):
        with PageStore.open(path, capacity_bytes=CAPACITY) as store:
            for put, numbers in ops:
                apply(store, put, numbers)
            if read:
                assert store.buckets.table() == rebuilt(store)
        with PageStore.open(path, capacity_bytes=CAPACITY) as store:
            assert not store.buckets.rebuilt
            assert store.buckets.table() == rebuilt(store)


def test_a_store_without_the_table_rebuilds_it(tmp_path: Path) -> None:
    with PageStore.open(tmp_path, capacity_bytes=CAPACITY) as store:
        store.put_many(items(list(range(1, 300))))
        expected = store.buckets.table()
    # Drop the table as a store written before it existed would lack it.
    env = lmdb.open(str(tmp_path), max_dbs=8)
    with env.begin(write=True) as txn:
        txn.drop(env.open_db(node_buckets.DB_NAME, txn=txn), delete=True)
    env.close()
    with PageStore.open(tmp_path, capacity_bytes=CAPACITY) as store:
        assert store.buckets.rebuilt
        assert store.buckets.table() == expected


def test_an_inconsistent_table_is_rebuilt(tmp_path: Path) -> None:
    with PageStore.open(tmp_path, capacity_bytes=CAPACITY) as store:
        store.put_many(items(list(range(1, 100))))
        expected = store.buckets.table()
    env = lmdb.open(str(tmp_path), max_dbs=8)
    with env.begin(write=True) as txn:
        db = env.open_db(node_buckets.DB_NAME, txn=txn)
        key = next(k for k, _ in txn.cursor(db=db) if len(k) == 2)
        txn.delete(key, db=db)  # counts no longer add up to the index
    env.close()
    with PageStore.open(tmp_path, capacity_bytes=CAPACITY) as store:
        assert store.buckets.rebuilt
        assert store.buckets.table() == expected


def test_rejected_and_present_pages_do_not_count(tmp_path: Path) -> None:
    with PageStore.open(tmp_path, capacity_bytes=CAPACITY) as store:
        store.put_many(items([1, 2]))
        store.put_many([*items([2, 3]), (digest_page(page(4)), page(5))])  # a bad digest
        store.delete_many([digest_page(page(9))])  # not held
        assert store.buckets.table() == rebuilt(store)
        assert int(store.buckets.table().counts.sum()) == 3


def test_a_store_that_was_not_closed_rebuilds_its_table(tmp_path: Path) -> None:
    """The table is saved at close; a process killed with the store open leaves no ``clean``
    marker, so the next open rebuilds the table from the index (pages put and deleted after
    the last clean close are counted exactly)."""
    import subprocess
    import sys
    import textwrap

    with PageStore.open(tmp_path, capacity_bytes=CAPACITY) as store:
        store.put_many(items(list(range(1, 50))))
    script = textwrap.dedent(f"""
        import os
        from pathlib import Path
        from tmdht.node.storage import PageStore
        from tmdht.pages import digest_page
        page = lambda n: n.to_bytes(8, "little") * 512
        store = PageStore.open(Path({str(tmp_path)!r}), capacity_bytes={CAPACITY})
        store.put_many([(digest_page(page(n)), page(n)) for n in range(50, 80)])
        store.delete_many([digest_page(page(n)) for n in range(1, 10)])
        os._exit(0)  # killed: no close
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
    with PageStore.open(tmp_path, capacity_bytes=CAPACITY) as store:
        assert store.buckets.rebuilt
        assert store.buckets.table() == rebuilt(store)
        assert int(store.buckets.table().counts.sum()) == 70
    with PageStore.open(tmp_path, capacity_bytes=CAPACITY) as store:  # closed cleanly above
        assert not store.buckets.rebuilt
        assert store.buckets.table() == rebuilt(store)
