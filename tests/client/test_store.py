"""The client library against a real 4-node cluster: resolution, failover, integrity, publish."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Iterator

import lmdb
import pytest
from support.cluster import FAST_NODE_ARGS, eventually, make_pages

from tmdht.client import BlockingTemplateStoreClient, PagesUnavailable, TemplateStoreClient
from tmdht.node.local import LocalCluster
from tmdht.pages import PAGE_SIZE, ZERO_DIGEST, ZERO_PAGE
from tmdht.placement import replica_indices

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with LocalCluster(tmp_path_factory.mktemp("client"), 4, extra_args=FAST_NODE_ARGS) as c:
        yield c


def client(cluster: LocalCluster, **kw: object) -> TemplateStoreClient:
    return TemplateStoreClient(
        [cluster.seed], cluster_key=cluster.key_file.read_text().strip(), **kw
    )  # type: ignore[arg-type]


def run(coro: object) -> object:
    return asyncio.run(asyncio.wait_for(coro, 180))  # type: ignore[arg-type]


def test_publish_and_resolve_in_request_order(cluster: LocalCluster) -> None:
    pages = make_pages(500, tag=11)

    async def main() -> None:
        async with client(cluster, cache_pages=100) as store:
            assert len(store.members) == 4
            summary = await store.put_many([p for _, p in pages])
            # 3 replica writes a page; a replica's own push may beat the client's (PRESENT).
            assert summary.pages == 500 and summary.stored + summary.present == 1500
            assert summary.stored >= 500 and not summary.under_replicated
            digests = [d for d, _ in pages]
            order = [*digests[::-1], ZERO_DIGEST, digests[0]]  # reversed, a zero page, a repeat
            got = await store.get_many(order)
            assert got == [dict(pages)[d] if d != ZERO_DIGEST else ZERO_PAGE for d in order]
            assert await store.has_many([digests[0], bytes(32)]) == [True, False]
            again = await store.get_many(digests[:50])  # the cache holds the last 100 resolved
            assert again == [p for _, p in pages[:50]]
            samples = store.metrics.registry
            assert samples.get_sample_value("tmdht_client_pages_resolved_total") >= 551
            assert samples.get_sample_value("tmdht_client_verification_failures_total") == 0

    run(main())


def test_missing_pages_are_named_exactly(cluster: LocalCluster) -> None:
    stored = make_pages(20, tag=12)
    absent = [d for d, _ in make_pages(7, tag=13)]

    async def main() -> None:
        async with client(cluster) as store:
            await store.put_many(stored)
            with pytest.raises(PagesUnavailable) as info:
                await store.get_many([d for d, _ in stored] + absent)
            assert info.value.digests == frozenset(absent)
            found, unavailable = await store.resolve([d for d, _ in stored] + absent)
            assert unavailable == set(absent) and found == dict(stored)

    run(main())


def test_blocking_facade(cluster: LocalCluster) -> None:
    pages = make_pages(30, tag=14)
    with BlockingTemplateStoreClient(
        [cluster.seed], cluster_key=cluster.key_file.read_text().strip()
    ) as store:
        store.put_many(pages)
        assert store.get_many([d for d, _ in pages]) == [p for _, p in pages]


def _corrupt_on_disk(data_dir: object, digest: bytes) -> None:
    """Flip a byte of a stored page inside a stopped node's LMDB (a disk fault)."""
    env = lmdb.open(str(data_dir), max_dbs=8, subdir=True)
    try:
        index, slabs = env.open_db(b"index"), env.open_db(b"slabs")
        with env.begin(write=True) as txn:
            slab_id, slot = struct.unpack(">IB", txn.get(digest, db=index))
            key = struct.pack(">I", slab_id)
            value = bytearray(txn.get(key, db=slabs))
            value[slot * PAGE_SIZE + 100] ^= 0xFF
            txn.put(key, bytes(value), db=slabs)
    finally:
        env.close()


def test_a_corrupted_page_is_detected_and_served_by_another_replica(cluster: LocalCluster) -> None:
    pages = make_pages(10, tag=15)
    digests = [d for d, _ in pages]
    ids = [n.node_id for n in cluster.nodes]
    first = replica_indices(digests, ids, 3)[:, 0].tolist()
    victim = first[0]
    bad = [d for d, f in zip(digests, first, strict=True) if f == victim]

    async def publish() -> None:
        async with client(cluster) as store:
            await store.put_many(pages)

    run(publish())
    assert cluster.stop_node(victim) == 0
    for digest in bad:
        _corrupt_on_disk(cluster.nodes[victim].data_dir / "pages", digest)
    cluster.restart_node(victim)

    async def main() -> None:
        async with client(cluster, hedge_after=5.0) as store:
            restarted = cluster.nodes[victim]

            async def back() -> bool:
                members = {m.node_id: m.data_address for m in await store.refresh()}
                return len(members) == 4 and members.get(restarted.node_id) == restarted.address(
                    "data"
                )

            await eventually(back, 30, "the whole ring, the restarted node at its new address")
            got = await store.get_many(digests)
            assert got == [p for _, p in pages]  # the right bytes, from another replica
            failures = store.metrics.registry.get_sample_value(
                "tmdht_client_verification_failures_total"
            )
            assert failures == len(bad)

    run(main())
