"""The wave store through real node processes: pages found only with the wave's secret, their
time-to-live, and capacity pressure that never touches templates."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.cluster import FAST_NODE_ARGS, eventually, make_pages

from tmdht import wire
from tmdht.client.store import TemplateStoreClient
from tmdht.client.wave import open_wave_client
from tmdht.node.local import LocalCluster
from tmdht.wave import WaveCredentials

WAVE = WaveCredentials("tenant-a", bytes(range(1, 33)))
WAVE_CAPACITY_PAGES = 48  # per node


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    args = [*FAST_NODE_ARGS, "--wave-capacity", str(WAVE_CAPACITY_PAGES * 4096),
            "--wave-max-ttl", "600"]
    with LocalCluster(tmp_path_factory.mktemp("waves"), 2, extra_args=args) as c:
        yield c


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 120))


async def _with_store(cluster: LocalCluster, body: Any) -> Any:
    async with TemplateStoreClient([cluster.seed], cluster_key=cluster.key_file.read_text(),
                                   replicas=2) as store:
        return await body(store)


def test_wave_pages_are_found_only_with_the_waves_secret(cluster: LocalCluster) -> None:
    pages = make_pages(40, tag=71)

    async def body(store: TemplateStoreClient) -> None:
        mine = await open_wave_client(store, WAVE)
        other = await open_wave_client(store, WaveCredentials("tenant-a", bytes(range(2, 34))))
        renamed = await open_wave_client(store, WaveCredentials("tenant-b", WAVE.secret))
        try:
            assert await mine.store(pages) == len(pages)
            digests = [d for d, _ in pages]
            assert await mine.fetch(digests) == dict(pages)
            assert await other.fetch(digests) == {}
            assert await renamed.fetch(digests) == {}
            # ... and the template namespace does not hold them either.
            found, _missing = await store.resolve(digests)
            assert found == {}
        finally:
            for client in (mine, other, renamed):
                client.close()

    run(_with_store(cluster, body))


def test_wave_pages_expire(cluster: LocalCluster) -> None:
    pages = make_pages(5, tag=72)

    async def body(store: TemplateStoreClient) -> None:
        short = await open_wave_client(store, WAVE, ttl=1)
        try:
            stored_at = time.monotonic()
            assert await short.store(pages) == len(pages)
            digests = [d for d, _ in pages]
            first = await short.fetch(digests)
            assert len(first) == len(pages) or time.monotonic() - stored_at >= 1

            async def expired() -> bool:
                return not await short.fetch(digests)

            await eventually(expired, 15, "the wave pages expire")
        finally:
            short.close()

    run(_with_store(cluster, body))


def test_wave_capacity_pressure_never_evicts_templates(cluster: LocalCluster) -> None:
    templates = make_pages(60, tag=73)
    flood = make_pages(4 * WAVE_CAPACITY_PAGES, tag=74)

    async def body(store: TemplateStoreClient) -> None:
        await store.put_many([p for _, p in templates])
        waves = await open_wave_client(store, WaveCredentials("flood", bytes(range(5, 37))))
        try:
            stored = await waves.store(flood)
            assert stored <= 2 * WAVE_CAPACITY_PAGES
            assert waves.stats.refused >= len(flood) - 2 * WAVE_CAPACITY_PAGES
        finally:
            waves.close()
        found, missing = await store.resolve([d for d, _ in templates])
        assert not missing and found == dict(templates)

    run(_with_store(cluster, body))


def test_a_node_without_a_wave_store_answers_misses(tmp_path: Path) -> None:
    with LocalCluster(tmp_path / "cl", 1, extra_args=[*FAST_NODE_ARGS, "--wave-capacity", "0"]
                      ) as lone:
        async def body(store: TemplateStoreClient) -> None:
            waves = await open_wave_client(store, WAVE)
            try:
                assert await waves.store(make_pages(3, tag=75)) == 0
                assert await waves.fetch([d for d, _ in make_pages(3, tag=75)]) == {}
            finally:
                waves.close()

        async def main() -> None:
            async with TemplateStoreClient([lone.seed], cluster_key=lone.key_file.read_text(),
                                           replicas=1) as store:
                await body(store)

        run(main())


CLAIMED, PENDING, HELD = (wire.WaveClaimStatus.CLAIMED, wire.WaveClaimStatus.PENDING,
                          wire.WaveClaimStatus.HELD)


@pytest.fixture(scope="module")
def roomy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A cluster whose wave stores the capacity test above does not fill."""
    with LocalCluster(tmp_path_factory.mktemp("claims"), 2, extra_args=FAST_NODE_ARGS) as c:
        yield c


def test_a_claimed_page_is_pending_for_others_until_stored_then_found(
        roomy: LocalCluster) -> None:
    pages = make_pages(30, tag=76)
    digests = [d for d, _ in pages]

    async def body(store: TemplateStoreClient) -> None:
        first = await open_wave_client(store, WAVE)
        second = await open_wave_client(store, WAVE)  # another receiver of the same wave
        try:
            assert await first.claim(digests, ttl=60) == [CLAIMED] * len(pages)
            assert await second.claim(digests, ttl=60) == [PENDING] * len(pages)
            assert await first.claim(digests[:1], ttl=60) == [PENDING]  # one claim per page
            assert await first.store(pages[:10]) == 10  # what the claimer got so far
            assert await second.claim(digests, ttl=60) == [HELD] * 10 + [PENDING] * 20
            assert await second.fetch(digests) == dict(pages[:10])
            assert second.stats.pending == 2 * len(pages) - 10 and second.stats.claimed == 0
        finally:
            first.close()
            second.close()

    run(_with_store(roomy, body))


def test_claims_are_not_visible_to_another_wave(roomy: LocalCluster) -> None:
    pages = make_pages(20, tag=77)
    digests = [d for d, _ in pages]

    async def body(store: TemplateStoreClient) -> None:
        mine = await open_wave_client(store, WAVE)
        other = await open_wave_client(store, WaveCredentials("tenant-a", bytes(range(3, 35))))
        renamed = await open_wave_client(store, WaveCredentials("tenant-c", WAVE.secret))
        try:
            assert await mine.claim(digests, ttl=60) == [CLAIMED] * len(pages)
            # Another secret or id names other keys: nothing claimed there, nothing to wait
            # for, and nothing learned about this wave's pages.
            assert await other.claim(digests, ttl=60) == [CLAIMED] * len(pages)
            assert await renamed.claim(digests, ttl=60) == [CLAIMED] * len(pages)
            assert await other.store(pages) == len(pages)
            assert await mine.claim(digests, ttl=60) == [PENDING] * len(pages)
            assert await mine.fetch(digests) == {}
        finally:
            for client in (mine, other, renamed):
                client.close()

    run(_with_store(roomy, body))


def test_expired_claims_vanish(roomy: LocalCluster) -> None:
    digests = [d for d, _ in make_pages(10, tag=78)]

    async def body(store: TemplateStoreClient) -> None:
        claimer = await open_wave_client(store, WAVE)
        waiter = await open_wave_client(store, WAVE)
        try:
            assert await claimer.claim(digests, ttl=0.3) == [CLAIMED] * len(digests)

            async def taken_over() -> bool:
                # Pending while the claim lives; once it expired the asker claims them.
                statuses = await waiter.claim(digests, ttl=60)
                assert set(statuses) <= {PENDING, CLAIMED}
                return statuses == [CLAIMED] * len(digests)

            await eventually(taken_over, 15, "the expired claims are taken over", 0.05)
            assert await claimer.claim(digests, ttl=60) == [PENDING] * len(digests)
        finally:
            claimer.close()
            waiter.close()

    run(_with_store(roomy, body))
