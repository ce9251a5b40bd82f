"""Crashes with real node processes: SIGKILL during puts and during gets, SIGSTOP (a hung node)
during gets, kill -9 during heavy writes."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from faults.faultlib import placed
from support.cluster import (
    FAST_NODE_ARGS,
    cluster_auth,
    eventually,
    expected_replicas,
    make_pages,
    metric,
    once_underway,
    scrape,
)

from tmdht import wire
from tmdht.aio.dataplane import DataPlaneClient
from tmdht.client.store import TemplateStoreClient
from tmdht.node.local import LocalCluster
from tmdht.node.storage import PageStore

pytestmark = pytest.mark.slow

ARGS = [*FAST_NODE_ARGS, "--log-level", "warning"]
N = 12_000
CHUNK = 1_000


def run(coro: object, timeout: float = 150) -> object:
    return asyncio.run(asyncio.wait_for(coro, timeout))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with LocalCluster(tmp_path_factory.mktemp("crashes"), 4, extra_args=ARGS) as c:
        yield c


async def publish(
    client: DataPlaneClient,
    cluster: LocalCluster,
    pages: list[tuple[bytes, bytes]],
    down: set[int],
) -> set[bytes]:
    """Put pages on their R closest nodes (of all 4) less those found ``down`` (a node that
    answered nothing joins them); returns the pages acknowledged by at least one replica."""
    digests = [d for d, _ in pages]
    placement = expected_replicas(cluster, digests, [0, 1, 2, 3], 3)
    per_node: dict[int, list[tuple[bytes, bytes]]] = {}
    for digest, page in pages:
        for node in placement[digest] - down:
            per_node.setdefault(node, []).append((digest, page))
    nodes = list(per_node)
    outcomes = await asyncio.gather(
        *(client.put_pages(cluster.nodes[n].address("data"), per_node[n]) for n in nodes)
    )
    ok = (wire.PutStatus.STORED, wire.PutStatus.PRESENT)
    down.update(n for n, o in zip(nodes, outcomes, strict=True) if o.unanswered and not o.status)
    return {d for o in outcomes for d, s in o.status.items() if s in ok}


def test_sigkill_during_puts_then_during_gets(cluster: LocalCluster) -> None:
    pages = make_pages(N, tag=81)
    key = cluster.key_file.read_text().strip()

    async def main() -> None:
        acknowledged: set[bytes] = set()
        async with await DataPlaneClient.open(cluster_auth(cluster), timeout=0.1) as client:
            started = time.monotonic()
            killer: asyncio.Task[None] | None = None
            down: set[int] = set()
            for at in range(0, N, CHUNK):
                if at == 3 * CHUNK:  # SIGKILL node 1 while this chunk is in flight
                    killer = asyncio.create_task(asyncio.to_thread(cluster.kill_node, 1))
                acknowledged |= await publish(client, cluster, pages[at : at + CHUNK], down)
            assert killer is not None
            await killer
            print(f"put {N:,} pages x3 with node 1 killed in {time.monotonic() - started:.1f} s")
        assert len(acknowledged) == N  # one dead replica of three never fails a put
        in_order = [d for d, _ in pages]

        # SIGKILL another node while a get_many of every page is under way.
        async with TemplateStoreClient([cluster.seed], cluster_key=key, hedge_after=0.05) as store:
            started = time.monotonic()
            underway = once_underway(store, after=N // 7 // 4)
            resolving = asyncio.create_task(store.get_many(in_order))
            await asyncio.wait_for(underway.wait(), 60)
            await asyncio.to_thread(cluster.kill_node, 2)
            got = await resolving
            assert got == [p for _, p in pages]
            print(
                f"got {N:,} pages with node 2 killed mid-way in {time.monotonic() - started:.1f} s"
            )

        # Recovery: both restart, and every acknowledged page is back on its R closest nodes.
        started = time.monotonic()
        cluster.restart_node(1)
        cluster.restart_node(2)
        async with await DataPlaneClient.open(cluster_auth(cluster)) as client:
            seconds = await placed(client, cluster, in_order, [0, 1, 2, 3], 90)
        print(
            f"R copies of every acknowledged page {seconds:.1f} s after the restarts "
            f"({time.monotonic() - started:.1f} s with the restarts)"
        )

    # A bound, not a speed check: the put phase alone took 50-87 s on a quiet machine here
    # (not yet explained; noted under issue 12), so 150 s left too little under CI load.
    run(main(), timeout=300)


def test_sigstop_during_gets_clients_hedge_and_the_view_recovers(cluster: LocalCluster) -> None:
    pages = make_pages(6_000, tag=82)
    digests = [d for d, _ in pages]
    key = cluster.key_file.read_text().strip()
    victim = 3
    node = cluster.nodes[victim]
    assert node.proc is not None

    async def main() -> None:
        async with TemplateStoreClient([cluster.seed], cluster_key=key, hedge_after=0.05) as store:
            await store.put_many(pages)
            async with await DataPlaneClient.open(cluster_auth(cluster)) as client:
                await placed(client, cluster, digests, [0, 1, 2, 3], 60)
            underway = once_underway(store, after=len(digests) // 7 // 4)
            started = time.monotonic()
            resolving = asyncio.create_task(store.get_many(digests))
            await asyncio.wait_for(underway.wait(), 60)
            node.proc.send_signal(signal.SIGSTOP)
            try:
                got = await resolving
                assert got == [p for _, p in pages]
                hung = time.monotonic() - started
                # A second pass with the node hung from the start: hedging, not waiting.
                started = time.monotonic()
                again = await store.get_many(digests)
                assert again == got
                second = time.monotonic() - started
            finally:
                node.proc.send_signal(signal.SIGCONT)
            print(
                f"get_many of {len(digests):,} with node {victim} SIGSTOPped mid-way: "
                f"{hung:.2f} s; with it hung throughout: {second:.2f} s"
            )

            # After SIGCONT every node lists all 4 members again and the node serves again.
            async def recovered() -> bool:
                return all(metric(scrape(cluster, i), "tmdht_known_peers") == 3 for i in range(4))

            started = time.monotonic()
            await eventually(recovered, 30, "every node sees 3 peers after SIGCONT")
            await store.refresh()
            assert len(store.members) == 4
            async with await DataPlaneClient.open(cluster_auth(cluster)) as client:
                info = await client.node_info(node.address("data"))
                assert info.node_id == node.node_id
            print(f"routing view whole again {time.monotonic() - started:.1f} s after SIGCONT")

    run(main())


def test_kill_9_during_heavy_writes_loses_no_acknowledged_page(tmp_path: Path) -> None:
    """One node, four writers putting as fast as they can; SIGKILL; restart; nothing lost."""
    with LocalCluster(tmp_path / "heavy", 1, replicas=1, extra_args=ARGS) as single:
        target = single.nodes[0].address("data")
        acked: set[bytes] = set()
        sent = 0

        async def writer(tag: int, stop: asyncio.Event) -> None:
            nonlocal sent
            async with await DataPlaneClient.open(
                cluster_auth(single), timeout=0.2, attempts=1
            ) as client:
                batch = 0
                while not stop.is_set():
                    pages = make_pages(256, tag=tag * 1000 + batch)
                    batch += 1
                    sent += len(pages)
                    outcome = await client.put_pages(target, pages)
                    acked.update(
                        d
                        for d, s in outcome.status.items()
                        if s in (wire.PutStatus.STORED, wire.PutStatus.PRESENT)
                    )
                    if outcome.unanswered:
                        return  # the node is gone

        async def main() -> None:
            stop = asyncio.Event()
            writers = [asyncio.create_task(writer(90 + i, stop)) for i in range(4)]

            async def enough() -> bool:
                return len(acked) >= 8_000

            await eventually(enough, 60, "8k pages acknowledged", interval=0.05)
            await asyncio.to_thread(single.kill_node, 0)
            stop.set()
            await asyncio.gather(*writers)

        run(main())
        assert single.nodes[0].proc is not None and single.nodes[0].proc.returncode == -9
        print(f"SIGKILL after {len(acked):,} of {sent:,} pages sent were acknowledged")
        single.restart_node(0)  # the store opens cleanly: the node becomes ready

        async def check() -> None:
            async with await DataPlaneClient.open(cluster_auth(single)) as client:
                held = await client.has(single.nodes[0].address("data"), sorted(acked))
                assert not held.unanswered
                assert held.held == acked, f"{len(acked - held.held)} acknowledged pages lost"

        run(check())
        assert single.stop_node(0) == 0
        store = PageStore.open(single.nodes[0].data_dir / "pages", capacity_bytes=10 << 30)
        try:
            assert store.check() >= len(acked)  # every table consistent, every page re-hashed
        finally:
            store.close()
