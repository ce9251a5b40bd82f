"""Failures during resolution, with real node processes: SIGKILL mid-get_many, all replicas gone."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest
from support.cluster import FAST_NODE_ARGS, cluster_auth, make_pages

from tmdht.client.dataplane import DataPlaneClient
from tmdht.client.store import PagesUnavailable, TemplateStoreClient
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
            dataplane: Any = store._dataplane
            original = dataplane._on_datagram
            underway = asyncio.Event()
            seen = 0

            def counting(data: bytes, addr: Any) -> None:
                nonlocal seen
                seen += 1
                if seen == N // 7 // 5:  # ~7 pages per answer datagram
                    underway.set()
                original(data, addr)

            dataplane._on_datagram = counting
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

        # Kill two more: pages whose every replica is gone are named exactly.
        cluster.kill_node(0)
        cluster.kill_node(1)
        survivor = cluster.nodes[3]
        async with await DataPlaneClient.open(cluster_auth(cluster)) as probe:
            held = (await probe.has(survivor.address("data"), digests)).held
        gone = set(digests) - held
        assert gone and held
        sample = digests[:2000] + sorted(gone)[:50]
        async with TemplateStoreClient([survivor.address("kademlia")], cluster_key=key) as store:
            with pytest.raises(PagesUnavailable) as info:
                await store.get_many(sample)
            assert info.value.digests == frozenset(d for d in sample if d in gone)

    asyncio.run(asyncio.wait_for(main(), 300))
