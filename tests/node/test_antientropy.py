"""Range-hash anti-entropy with real node processes (issue 16, part 2): quiet sweeps send only
RANGE_HASH queries; a node that lost pages gets exactly them back, once each; pages moved away
by a join (surplus dropped, so bucket tables shrink) leave the cluster quiet again."""

from __future__ import annotations

import asyncio
from pathlib import Path

from support.cluster import (
    FAST_NODE_ARGS,
    eventually,
    expected_replicas,
    holders,
    make_pages,
    metric,
    scrape,
)

from tmdht.aio.dataplane import DataPlaneClient
from tmdht.client.store import TemplateStoreClient
from tmdht.node.local import LocalCluster
from tmdht.node.storage import PageStore


async def full_view(store: TemplateStoreClient, members: int) -> None:
    for _ in range(50):  # bounded: the view fills within a few crawls
        if len(store.members) == members:
            return
        await asyncio.sleep(0.2)  # between crawls of other processes' ring
        await store.refresh()


def requests(c: LocalCluster, i: int, kind: str) -> float:
    return metric(scrape(c, i), "tmdht_requests_total", type=kind)


def sweeps(c: LocalCluster, i: int) -> float:
    return metric(scrape(c, i), "tmdht_replication_sweeps_total")


async def more_sweeps(c: LocalCluster, nodes: list[int], count: int) -> None:
    start = {i: sweeps(c, i) for i in nodes}

    async def done() -> bool:
        return all(sweeps(c, i) >= start[i] + count for i in nodes)

    await eventually(done, 90, f"{count} more sweeps on nodes {nodes}")


async def quiet(c: LocalCluster, nodes: list[int]) -> None:
    """Two sweeps on every node send no HAS and no PUT, and some RANGE_HASH."""
    before = {(i, k): requests(c, i, k) for i in nodes for k in ("has", "put_pages", "range_hash")}
    await more_sweeps(c, nodes, 2)
    after = {(i, k): requests(c, i, k) for i in nodes for k in ("has", "put_pages", "range_hash")}
    for i in nodes:
        assert after[(i, "has")] == before[(i, "has")], f"node {i} was asked HAS"
        assert after[(i, "put_pages")] == before[(i, "put_pages")], f"node {i} was sent PUT"
        assert after[(i, "range_hash")] > before[(i, "range_hash")]


# Sources other than a bucket's designated one wait max(interval, grace) before they push: a
# grace longer than the test keeps them waiting, so each lost page is sent exactly once.
PATIENT_ARGS = [*FAST_NODE_ARGS[:2], "--surplus-grace", "300", *FAST_NODE_ARGS[4:]]


def test_lost_pages_return_once_and_quiet_sweeps_send_only_hashes(tmp_path: Path) -> None:
    with LocalCluster(tmp_path, 3, replicas=3, extra_args=PATIENT_ARGS) as c:
        key = c.key_file.read_text().strip()
        pages = make_pages(600, tag=162)
        digests = [d for d, _ in pages]
        lost = digests[::17]

        async def scenario() -> None:
            async with TemplateStoreClient([c.seed], cluster_key=key, replicas=3) as store:
                await full_view(store, 3)
                await store.put_many(pages)
                client = await DataPlaneClient.open(store.auth)
                try:
                    everywhere = {d: {0, 1, 2} for d in digests}

                    async def all_held() -> bool:
                        return await holders(client, c, digests, [0, 1, 2]) == everywhere

                    await eventually(all_held, 30, "every page on every node")
                    await more_sweeps(c, [0, 1, 2], 2)  # the client's fresh pages settled
                    await quiet(c, [0, 1, 2])

                    # Node 2 loses some pages while down; it restarts with the same identity.
                    c.stop_node(2)
                    with PageStore.open(c.nodes[2].data_dir / "pages", capacity_bytes=1 << 30) as s:
                        assert s.delete_many(lost) == len(lost)
                    c.restart_node(2)
                    await eventually(all_held, 60, "the lost pages back on node 2")
                    samples = scrape(c, 2)
                    # Exactly the lost pages came back, each sent once (one designated source).
                    assert metric(samples, "tmdht_put_pages_total", result="stored") == len(lost)
                    assert metric(samples, "tmdht_put_pages_total", result="present") == 0
                    # Node 2 checks pages PUT to it on their replicas once (HAS); then quiet.
                    await more_sweeps(c, [0, 1, 2], 2)
                    await quiet(c, [0, 1, 2])
                finally:
                    await client.close()

        asyncio.run(scenario())


def test_pages_moved_by_a_join_leave_the_cluster_quiet(tmp_path: Path) -> None:
    """R = 2 over 3 nodes, then a 4th joins: pages move to it and the surplus copies are dropped
    (deletes update the bucket tables); then every page is exactly on its replicas and sweeps
    are quiet again."""
    with LocalCluster(tmp_path, 3, replicas=2, extra_args=FAST_NODE_ARGS) as c:
        key = c.key_file.read_text().strip()
        pages = make_pages(400, tag=163)
        digests = [d for d, _ in pages]

        async def scenario() -> None:
            async with TemplateStoreClient([c.seed], cluster_key=key, replicas=2) as store:
                await full_view(store, 3)
                await store.put_many(pages)
                client = await DataPlaneClient.open(store.auth)
                try:
                    c.add_node()
                    live = [0, 1, 2, 3]

                    async def placed() -> bool:
                        want = expected_replicas(c, digests, live, 2)
                        return await holders(client, c, digests, live) == want

                    await eventually(placed, 90, "every page exactly on its 2 replicas")
                    await more_sweeps(c, live, 2)
                    await quiet(c, live)
                finally:
                    await client.close()

        asyncio.run(scenario())
