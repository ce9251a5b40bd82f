"""Faults on a cluster of real node processes: SIGKILL, restart, a joining node."""

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
)

from tmdht import wire
from tmdht.aio.dataplane import DataPlaneClient
from tmdht.node.local import LocalCluster

pytestmark = pytest.mark.slow

PAGES = make_pages(300, tag=7)
DIGESTS = [d for d, _ in PAGES]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with LocalCluster(tmp_path_factory.mktemp("faults"), 4, extra_args=FAST_NODE_ARGS) as c:
        yield c


def run(coro: object) -> object:
    return asyncio.run(asyncio.wait_for(coro, 300))  # type: ignore[arg-type]


async def placed(
    client: DataPlaneClient, cluster: LocalCluster, live: list[int], timeout: float
) -> float:
    """Wait until every page is on exactly its R closest live nodes; returns the seconds taken."""
    want = expected_replicas(cluster, DIGESTS, live, 3)
    started = time.monotonic()

    async def check() -> bool:
        return await holders(client, cluster, DIGESTS, live) == want

    await eventually(check, timeout, f"pages on their 3 closest of nodes {live}")
    return time.monotonic() - started


def test_killed_node_then_restart_then_join(cluster: LocalCluster) -> None:
    async def main() -> None:
        async with await DataPlaneClient.open(cluster_auth(cluster)) as client:
            outcome = await client.put_pages(cluster.nodes[0].address("data"), PAGES)
            assert set(outcome.status.values()) == {wire.PutStatus.STORED}
            # Only node 0 holds them: its fresh-page check pushes them on once the other replicas
            # still lack them FRESH_RECHECK later (node/replication.py), so allow for that.
            await placed(client, cluster, [0, 1, 2, 3], 60)

            # SIGKILL a node holding pages: the survivors restore R copies among themselves.
            victim = 1
            before = await holders(client, cluster, DIGESTS, [victim])
            held_by_victim = {d for d, nodes in before.items() if nodes}
            assert held_by_victim
            cluster.kill_node(victim)
            seconds = await placed(client, cluster, [0, 2, 3], 60)
            print(f"R copies restored {seconds:.1f} s after SIGKILL")

            # The restarted node keeps what it had.
            cluster.restart_node(victim)
            after = await holders(client, cluster, sorted(held_by_victim), [victim])
            assert all(after[d] == {victim} for d in held_by_victim)
            await placed(client, cluster, [0, 1, 2, 3], 60)

            # A joining node receives the pages it is now responsible for.
            cluster.add_node()
            seconds = await placed(client, cluster, [0, 1, 2, 3, 4], 60)
            print(f"joining node filled in {seconds:.1f} s")
            got = await client.get_pages(cluster.nodes[4].address("data"), DIGESTS)
            share = set(got.pages)
            assert share and all(got.pages[d] == dict(PAGES)[d] for d in share)

        # SIGTERM: a graceful stop (exit code 0, LMDB closed: it reopens with every page).
        assert cluster.stop_node(4) == 0
        assert "shutting down" in cluster.nodes[4].log_path.read_text()
        cluster.restart_node(4)
        async with await DataPlaneClient.open(cluster_auth(cluster)) as client:
            again = await client.has(cluster.nodes[4].address("data"), sorted(share))
            assert again.held == share

    run(main())
