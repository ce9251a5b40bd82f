"""A network partition (nftables drops between the two sides), a full disk (a small tmpfs as a
node's data dir) and per-source rate limiting, with real node processes."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import pytest
from faults.faultlib import Partition, Tmpfs, placed
from support.cluster import FAST_NODE_ARGS, cluster_auth, eventually, make_pages, metric, scrape

from tmdht import wire
from tmdht.aio.dataplane import DataPlaneClient
from tmdht.client.store import TemplateStoreClient
from tmdht.node.local import LocalCluster

pytestmark = pytest.mark.slow

ARGS = [*FAST_NODE_ARGS, "--log-level", "warning"]


def run(coro: object, timeout: float = 150) -> object:
    return asyncio.run(asyncio.wait_for(coro, timeout))  # type: ignore[arg-type]


def test_partition_majority_serves_then_heals_to_r_copies(tmp_path: Path) -> None:
    """5 nodes split 3 | 2: the majority (with the client) keeps serving reads and writes;
    after the split heals every page is on its R closest of all 5 again."""
    with LocalCluster(tmp_path / "partition", 5, extra_args=ARGS) as cluster:
        key = cluster.key_file.read_text().strip()
        before = make_pages(3_000, tag=91)
        during = make_pages(1_000, tag=92)
        digests = [d for d, _ in before + during]
        majority, minority = [0, 1, 2], [3, 4]

        async def main() -> None:
            async with TemplateStoreClient([cluster.seed], cluster_key=key) as store:
                await store.put_many(before)
            async with await DataPlaneClient.open(cluster_auth(cluster)) as client:
                await placed(client, cluster, [d for d, _ in before], list(range(5)), 60)

            split = Partition(cluster.nodes[i].pid for i in minority)
            started = time.monotonic()
            with split:
                # The majority sees the minority leave and restores R copies among itself.
                async def majority_alone() -> bool:
                    return all(
                        metric(scrape(cluster, i), "tmdht_known_peers") == 2 for i in majority
                    )

                await eventually(majority_alone, 30, "the majority lists only itself")
                left = time.monotonic() - started
                async with TemplateStoreClient(
                    [cluster.nodes[0].address("kademlia")], cluster_key=key, hedge_after=0.05
                ) as store:
                    assert len(store.members) == 3
                    assert await store.get_many([d for d, _ in before]) == [p for _, p in before]
                    summary = await store.put_many(during)
                    # (PRESENT: replication from a first replica can beat the client's own PUT.)
                    assert summary.stored + summary.present == 3 * len(during)
                    assert not summary.under_replicated
                async with await DataPlaneClient.open(cluster_auth(cluster)) as client:
                    seconds = await placed(client, cluster, digests, majority, 60)
                # The minority is unreachable from here: its data plane answers nothing.
                async with await DataPlaneClient.open(
                    cluster_auth(cluster), timeout=0.1, attempts=1
                ) as client:
                    got = await client.get_pages(cluster.nodes[3].address("data"), digests[:10])
                    assert got.unanswered == set(digests[:10])
                print(
                    f"partition: majority alone after {left:.1f} s, R copies among it "
                    f"{seconds:.1f} s later"
                )
            healed = time.monotonic()

            async def whole() -> bool:
                return all(metric(scrape(cluster, i), "tmdht_known_peers") == 4 for i in range(5))

            await eventually(whole, 60, "every node lists the other 4 after healing")
            async with await DataPlaneClient.open(cluster_auth(cluster)) as client:
                seconds = await placed(client, cluster, digests, list(range(5)), 90)
            print(
                f"healed: ring whole and every page on its R closest of 5 "
                f"{time.monotonic() - healed:.1f} s after the split ended (placement {seconds:.1f} s)"
            )

        run(main(), timeout=240)


def test_disk_full_rejects_puts_and_keeps_serving_gets(tmp_path: Path) -> None:
    root = tmp_path / "full"
    with Tmpfs(root / "node-0", "3m"), LocalCluster(root, 1, replicas=1, extra_args=ARGS) as one:
        target = one.nodes[0].address("data")

        async def main() -> None:
            stored: list[tuple[bytes, bytes]] = []
            statuses: set[wire.PutStatus] = set()
            async with await DataPlaneClient.open(cluster_auth(one)) as client:
                full_batch = None
                for batch in range(300):  # 300 x 16 pages = 19 MiB: far more than 3 MiB
                    pages = make_pages(16, tag=9400 + batch)
                    outcome = await client.put_pages(target, pages)
                    assert not outcome.unanswered  # a full disk answers, it does not time out
                    statuses |= set(outcome.status.values())
                    stored += [
                        (d, p) for d, p in pages if outcome.status[d] == wire.PutStatus.STORED
                    ]
                    if set(outcome.status.values()) == {wire.PutStatus.REJECTED_FULL}:
                        full_batch = batch
                        break
                assert full_batch is not None, statuses
                assert stored, "nothing fit at all"
                # Gets keep working, every stored page byte for byte.
                got = await client.get_pages(target, [d for d, _ in stored])
                assert got.pages == dict(stored) and not got.unanswered
                info = await client.node_info(target)
                assert info.pages_stored == len(stored)
            print(f"disk full (3 MiB tmpfs) after {len(stored)} pages; gets still served")

        run(main())
        samples = scrape(one, 0)
        assert metric(samples, "tmdht_put_rejected_total", reason="full") >= 16
        assert one.stop_node(0) == 0  # a clean shutdown on a full disk


def test_a_flooding_source_is_rate_limited_and_counted(tmp_path: Path) -> None:
    limited = [*ARGS, "--rate-limit", "200", "--rate-limit-burst", "50"]
    with LocalCluster(tmp_path / "limited", 1, replicas=1, extra_args=limited) as one:
        target = one.nodes[0].address("data")
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            for _ in range(1000):  # forged: the limiter runs before authentication
                sock.sendto(b"\x01" * 100, target)
        finally:
            sock.close()

        async def main() -> None:
            async def counted() -> bool:
                samples = scrape(one, 0)
                limited = metric(samples, "tmdht_bad_datagrams_total", reason="rate_limited")
                auth = metric(samples, "tmdht_bad_datagrams_total", reason="auth")
                return limited >= 500 and limited + auth == 1000

            await eventually(counted, 10, "most of a 1000-datagram burst rate limited")
            # The bucket refills: the same source is served again.
            async with await DataPlaneClient.open(cluster_auth(one), timeout=0.3) as client:
                info = await client.node_info(target)
                assert info.node_id == one.nodes[0].node_id

        run(main())
