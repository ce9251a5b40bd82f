"""Failures during resolution, with real node processes: SIGKILL mid-get_many, all replicas gone."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest
from support.cluster import (
    FAST_NODE_ARGS,
    cluster_auth,
    eventually,
    expected_replicas,
    holders,
    make_pages,
    once_underway,
)

from tmdht.aio.dataplane import DataPlaneClient
from tmdht.client import PagesUnavailable, TemplateStoreClient
from tmdht.node.local import LocalCluster

pytestmark = pytest.mark.slow

N = 100_000


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    args = [*FAST_NODE_ARGS, "--log-level", "warning"]
    with LocalCluster(tmp_path_factory.mktemp("failover"), 4, extra_args=args) as c:
        yield c


def test_sigkill_during_a_100k_get_many_then_all_replicas_gone(cluster: LocalCluster) -> None:
    pages = make_pages(N, tag=21)
    digests = [d for d, _ in pages]

    async def main() -> None:
        key = cluster.key_file.read_text().strip()
        async with TemplateStoreClient([cluster.seed], cluster_key=key, hedge_after=0.05) as store:
            started = time.monotonic()
            await store.put_many(pages)
            print(f"published {N:,} pages x3 in {time.monotonic() - started:.1f} s")

            # Kill a node once the resolution is well under way (after ~1/5 of the answers).
            underway = once_underway(store, after=N // 7 // 5)  # ~7 pages per answer datagram
            victim = 2
            resolving = asyncio.create_task(store.get_many(digests))
            await asyncio.wait_for(underway.wait(), 60)
            await asyncio.to_thread(cluster.kill_node, victim)
            got = await resolving
            assert got == [p for _, p in pages]  # every page, verified, in order
            print(
                f"resolved {N:,} pages in {time.monotonic() - started:.1f} s with node {victim} killed; "
                f"failovers {store.metrics.registry.get_sample_value('tmdht_client_failovers_total')}, "
                f"hedges {store.metrics.registry.get_sample_value('tmdht_client_hedges_total')}"
            )

        # All replicas of some pages gone: back to 4 nodes, a fresh set of pages placed exactly
        # on their 3 closest, then 3 nodes killed at once. Pages the survivor does not hold have
        # lost every replica, and exactly those are reported.
        cluster.restart_node(victim)
        fresh = make_pages(3000, tag=22)
        fresh_digests = [d for d, _ in fresh]
        live = [0, 1, 2, 3]
        async with await DataPlaneClient.open(cluster_auth(cluster)) as probe:

            async def whole_ring() -> bool:
                infos = await asyncio.gather(
                    *(probe.node_info(cluster.nodes[i].address("data")) for i in live)
                )
                return all(
                    i.node_id == cluster.nodes[n].node_id for i, n in zip(infos, live, strict=True)
                )

            await eventually(whole_ring, 30, "all 4 nodes serving")
            async with TemplateStoreClient([cluster.seed], cluster_key=key) as store:

                async def four() -> bool:
                    return len(await store.refresh()) == 4

                await eventually(four, 30, "4 members in the view")
                await store.put_many(fresh)
            want = expected_replicas(cluster, fresh_digests, live, 3)

            async def placed() -> bool:
                return await holders(probe, cluster, fresh_digests, live) == want

            await eventually(placed, 60, "fresh pages on exactly their 3 closest nodes")
        for i in (0, 1, 2):
            cluster.kill_node(i)
        survivor = cluster.nodes[3]
        gone = {d for d in fresh_digests if 3 not in want[d]}
        assert gone and len(gone) < len(fresh_digests)
        async with TemplateStoreClient([survivor.address("kademlia")], cluster_key=key) as store:
            with pytest.raises(PagesUnavailable) as info:
                await store.get_many(fresh_digests)
            assert info.value.digests == frozenset(gone)

    asyncio.run(asyncio.wait_for(main(), 300))
