"""A 4-node cluster of real node processes on loopback: ring, placement, bad input, metrics."""

from __future__ import annotations

import asyncio
import os
import socket
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.cluster import (
    FAST_NODE_ARGS,
    cluster_auth,
    eventually,
    expected_replicas,
    holders,
    make_pages,
    metric,
    scrape,
)

from tmdht import wire
from tmdht.aio.dataplane import DataPlaneClient
from tmdht.aio.overlay import Overlay
from tmdht.net.overlay import OverlayConfig
from tmdht.node.local import LocalCluster

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with LocalCluster(tmp_path_factory.mktemp("cluster"), 4, extra_args=FAST_NODE_ARGS) as c:
        yield c


def run(coro: object) -> object:
    return asyncio.run(asyncio.wait_for(coro, 120))  # type: ignore[arg-type]


def test_ring_forms_from_one_seed(cluster: LocalCluster) -> None:
    async def main() -> None:
        key = cluster.key_file.read_text().strip()
        overlay = await Overlay.start(
            OverlayConfig(
                data_port=0, join=False, seeds=(cluster.seed,), cluster_key=bytes.fromhex(key)
            )
        )
        try:
            members = await overlay.crawl()
        finally:
            await overlay.stop()
        got = {m.node_id: m.data_address for m in members}
        assert got == {n.node_id: n.address("data") for n in cluster.nodes}

    run(main())


def test_put_through_any_node_lands_on_its_r_closest(cluster: LocalCluster) -> None:
    async def main() -> None:
        pages = make_pages(200, tag=1)
        digests = [d for d, _ in pages]
        live = [0, 1, 2, 3]
        async with await DataPlaneClient.open(cluster_auth(cluster)) as client:
            outcome = await client.put_pages(cluster.nodes[2].address("data"), pages)
            assert set(outcome.status.values()) == {wire.PutStatus.STORED}
            want = expected_replicas(cluster, digests, live, 3)

            async def placed() -> bool:
                return await holders(client, cluster, digests, live) == want

            await eventually(placed, 30, "every page on exactly its 3 closest nodes")

    run(main())


def test_wrong_digest_is_rejected(cluster: LocalCluster) -> None:
    async def main() -> None:
        (d1, _), (_, p2) = make_pages(2, tag=2)
        async with await DataPlaneClient.open(cluster_auth(cluster)) as client:
            outcome = await client.put_pages(cluster.nodes[0].address("data"), [(d1, p2)])
            assert outcome.status == {d1: wire.PutStatus.REJECTED_DIGEST}
            got = await client.get_pages(cluster.nodes[0].address("data"), [d1])
            assert got.missing == {d1}
        assert metric(scrape(cluster, 0), "tmdht_put_rejected_total", reason="digest") >= 1

    run(main())


def test_bad_datagrams_are_dropped_and_counted_while_serving(cluster: LocalCluster) -> None:
    target = cluster.nodes[1].address("data")
    before = scrape(cluster, 1)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        valid_open = wire.encode(
            wire.NodeInfoRequest(request_id=1),
            max_datagram=65507,
            auth=__import__("tmdht.auth", fromlist=["Authenticator"]).Authenticator.open_mode(),
            now=time.time(),
        )
        for datagram in (b"", b"\x01\x02", os.urandom(300), os.urandom(65000), valid_open):
            sock.sendto(datagram, target)
    finally:
        sock.close()

    async def main() -> None:
        async with await DataPlaneClient.open(cluster_auth(cluster)) as client:
            info = await client.node_info(target)  # still serving
            assert info.node_id == cluster.nodes[1].node_id

            async def counted() -> bool:
                after = scrape(cluster, 1)
                dropped = sum(
                    metric(after, "tmdht_bad_datagrams_total", reason=r)
                    - metric(before, "tmdht_bad_datagrams_total", reason=r)
                    for r in ("auth", "malformed", "oversize", "replay")
                )
                return dropped >= 5

            await eventually(counted, 10, "5 bad datagrams counted")

    run(main())


def test_metrics_and_health_endpoints(cluster: LocalCluster) -> None:
    async def main() -> None:
        pages = make_pages(50, tag=3)
        async with await DataPlaneClient.open(cluster_auth(cluster)) as client:
            before = scrape(cluster, 3)
            await client.put_pages(cluster.nodes[3].address("data"), pages)
            await client.get_pages(cluster.nodes[3].address("data"), [d for d, _ in pages])
            after = scrape(cluster, 3)
        assert metric(after, "tmdht_requests_total", type="put_pages") > metric(
            before, "tmdht_requests_total", type="put_pages"
        )
        assert (
            metric(after, "tmdht_request_pages_total", type="get_pages")
            >= metric(before, "tmdht_request_pages_total", type="get_pages") + 50
        )
        assert metric(after, "tmdht_request_duration_seconds_count", type="get_pages") > 0
        assert metric(after, "tmdht_known_peers") == 3
        assert metric(after, "tmdht_capacity_bytes") > 0
        assert metric(after, "process_resident_memory_bytes") > 0
        total = sum(metric(scrape(cluster, i), "tmdht_stored_pages") for i in range(4))
        assert total >= 3 * 200  # the pages of the placement test, at least

    run(main())
    for path in ("/healthz", "/readyz"):
        host, port = cluster.nodes[0].address("metrics")
        with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=5) as response:
            assert response.status == 200 and b'"ready": true' in response.read()


def test_node_refuses_to_start_without_a_key(tmp_path: Path) -> None:
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("TMDHT_")}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tmdht.cli",
            "node",
            "run",
            "--data-dir",
            str(tmp_path / "n"),
            "--data-port",
            "0",
            "--kademlia-port",
            "0",
            "--metrics-port",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert proc.returncode != 0 and "no cluster key" in proc.stderr
