"""Helpers for tests against real node processes: a client view of a local cluster."""

from __future__ import annotations

import asyncio
import os
import time
import urllib.request
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from prometheus_client.parser import text_string_to_metric_families

from tmdht.aio.dataplane import DataPlaneClient
from tmdht.auth import Authenticator, ClusterKey, KeyRing, load_key
from tmdht.client.store import TemplateStoreClient
from tmdht.node.local import LocalCluster
from tmdht.pages import digest_page
from tmdht.placement import replica_indices

T = TypeVar("T")

FAST_NODE_ARGS = [
    "--replication-interval", "1", "--surplus-grace", "1", "--rpc-timeout", "0.3",
    "--refresh-interval", "5", "--log-format", "text",
]  # fmt: skip


def cluster_auth(cluster: LocalCluster) -> Authenticator:
    key = load_key(cluster.key_file.read_text().strip())
    return Authenticator.keyed(KeyRing(ClusterKey(1, key)))


def make_pages(n: int, tag: int) -> list[tuple[bytes, bytes]]:
    out = []
    for i in range(n):
        page = (tag.to_bytes(4, "big") + (i + 1).to_bytes(4, "big")) * 512
        out.append((digest_page(page), page))
    return out


def random_pages(n: int) -> list[tuple[bytes, bytes]]:
    """``n`` pages of random bytes with their digests."""
    out = []
    for _ in range(n):
        page = os.urandom(4096)
        out.append((digest_page(page), page))
    return out


async def eventually(
    check: Callable[[], Awaitable[T | None]], timeout: float, what: str, interval: float = 0.2
) -> T:
    """Re-check a condition across processes until it holds (bounded by count and time)."""
    deadline = time.monotonic() + timeout
    last: object = None
    for _ in range(int(timeout / interval) + 2):
        result = await check()
        if result:
            return result
        last = result
        if time.monotonic() >= deadline:
            break
        await asyncio.sleep(interval)  # a poll interval between checks of another process
    raise AssertionError(f"{what}: not true within {timeout:.0f} s (last: {last!r})")


async def holders(
    client: DataPlaneClient, cluster: LocalCluster, digests: list[bytes], live: list[int]
) -> dict[bytes, set[int]]:
    """Which live nodes hold each digest (HAS to every live node)."""
    out: dict[bytes, set[int]] = {d: set() for d in digests}
    results = await asyncio.gather(
        *(client.has(cluster.nodes[i].address("data"), digests) for i in live)
    )
    for i, result in zip(live, results, strict=True):
        assert not result.unanswered, f"node {i} did not answer HAS"
        for d in result.held:
            out[d].add(i)
    return out


def expected_replicas(
    cluster: LocalCluster, digests: list[bytes], live: list[int], r: int
) -> dict[bytes, set[int]]:
    ids = [cluster.nodes[i].node_id for i in live]
    placement = replica_indices(digests, ids, r)
    return {d: {live[j] for j in row} for d, row in zip(digests, placement.tolist(), strict=True)}


def scrape(
    cluster: LocalCluster, index: int
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    host, port = cluster.nodes[index].address("metrics")
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def metric(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def once_underway(store: TemplateStoreClient, after: int) -> asyncio.Event:
    """An event set once the store's data-plane client has received ``after`` datagrams."""
    dataplane: Any = store._dataplane
    original = dataplane._on_datagram
    underway = asyncio.Event()
    seen = 0

    def counting(data: bytes, addr: Any) -> None:
        nonlocal seen
        seen += 1
        if seen == after:
            underway.set()
        original(data, addr)

    dataplane._on_datagram = counting
    return underway
