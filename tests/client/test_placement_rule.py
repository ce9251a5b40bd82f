"""Clients follow the placement rule the nodes advertise (virtual IDs per node V, and R), with
real node processes: a cluster run with ``--virtual-ids 4`` is resolved by clients never told V,
``cluster status`` shows each member's V and R, and a mixed-V cluster is reported."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Awaitable, Callable, Iterator

import pytest
from support.cli import tmdht
from support.cluster import FAST_NODE_ARGS, eventually, holders, make_pages

from tmdht.aio.dataplane import DataPlaneClient
from tmdht.client.store import TemplateStoreClient
from tmdht.node.local import LocalCluster
from tmdht.placement import VIRTUAL_IDS, Ring

NODES = 4
V = 4
R = 2


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    args = [*FAST_NODE_ARGS, "--virtual-ids", str(V)]
    with LocalCluster(tmp_path_factory.mktemp("vrule"), NODES, replicas=R, extra_args=args) as c:
        yield c


def client(cluster: LocalCluster, **kw: object) -> TemplateStoreClient:
    key = cluster.key_file.read_text().strip()
    return TemplateStoreClient([cluster.seed], cluster_key=key, replicas=R, **kw)  # type: ignore[arg-type]


async def full_view(store: TemplateStoreClient, count: int) -> None:
    async def seen() -> bool:
        if len(store.members) < count:
            await store.refresh()
        return len(store.members) == count

    await eventually(seen, 30, f"{count} members in the client's view")


def status(cluster: LocalCluster, *more: str) -> str:
    return tmdht(
        "cluster", "status", "--seed", "{}:{}".format(*cluster.seed),
        "--cluster-key-file", str(cluster.key_file), *more,
    ).stdout  # fmt: skip


def test_a_client_not_told_v_places_and_finds_pages_like_the_nodes(
    cluster: LocalCluster, caplog: pytest.LogCaptureFixture
) -> None:
    pages = make_pages(200, tag=61)
    digests = [d for d, _ in pages]
    caplog.set_level(logging.WARNING, logger="tmdht.client")

    async def scenario() -> None:
        async with client(cluster) as writer:
            await full_view(writer, NODES)
            assert writer.virtual_ids == V and writer.requested_virtual_ids is None
            assert (writer.rule.virtual_ids, writer.rule.replicas, writer.rule.agreed) == (
                V,
                R,
                True,
            )
            members = writer.members
            assert {(m.virtual_ids, m.replicas) for m in members} == {(V, R)}
            summary = await writer.put_many(pages)
            assert not summary.under_replicated
            ids = [m.node_id for m in members]
            domains = [m.domain for m in members]
            index = {cluster.nodes[i].node_id: i for i in range(NODES)}

            def placed(virtual_ids: int) -> dict[bytes, set[int]]:
                rows = Ring(ids, domains, virtual_ids=virtual_ids).replica_rows(digests, R)
                return {
                    d: {index[ids[j]] for j in row} for d, row in zip(digests, rows, strict=True)
                }

            # The test can fail: the default V places some of these pages elsewhere.
            assert placed(V) != placed(VIRTUAL_IDS)
            probe = await DataPlaneClient.open(writer.auth)
            try:
                assert await holders(probe, cluster, digests, list(range(NODES))) == placed(V)
            finally:
                await probe.close()
        async with client(cluster) as reader:  # a fresh client, never told V either
            await full_view(reader, NODES)
            assert await reader.get_many(digests) == [p for _, p in pages]
            assert reader.stats.failovers == 0  # found on the first replica asked, every one
            assert reader.metrics.registry.get_sample_value("tmdht_client_virtual_ids") == V
        # A client told another V follows the nodes, and says so once.
        async with client(cluster, virtual_ids=VIRTUAL_IDS) as told:
            await full_view(told, NODES)
            await told.refresh()
            assert told.virtual_ids == V
            assert await told.get_many(digests[:20]) == [p for _, p in pages[:20]]

    asyncio.run(asyncio.wait_for(scenario(), 180))
    warnings = [r.getMessage() for r in caplog.records if "asked for" in r.getMessage()]
    assert len(warnings) == 1 and f"advertise V={V}" in warnings[0]
    assert not [r for r in caplog.records if "disagree" in r.getMessage()]


def test_cluster_status_shows_each_members_v_and_r(cluster: LocalCluster) -> None:
    doc = json.loads(status(cluster, "--json"))
    assert [(m["virtual_ids"], m["replicas"]) for m in doc["members"]] == [(V, R)] * NODES
    assert doc["placement"] == {"virtual_ids": V, "replicas": R, "agreed": True}
    table = [
        [cell.strip() for cell in re.split(r"[│┃|]", line)] for line in status(cluster).splitlines()
    ]
    header = next(row for row in table if "pages" in row)
    v, r = header.index("V"), header.index("R")
    rows = [row for row in table if len(row) == len(header) and row is not header]
    assert [(row[v], row[r]) for row in rows] == [(str(V), str(R))] * NODES
    assert not any("disagree" in " ".join(row) for row in table)


def test_a_mixed_v_cluster_is_warned_about_and_placed_by_the_majority(
    cluster: LocalCluster, caplog: pytest.LogCaptureFixture
) -> None:
    """Runs last: it adds a node that uses the default V to the module's cluster."""
    cluster.extra_args = [*FAST_NODE_ARGS, "--virtual-ids", str(VIRTUAL_IDS)]
    odd = cluster.add_node()
    caplog.set_level(logging.WARNING, logger="tmdht.client")

    async def scenario() -> None:
        async with client(cluster) as store:
            await full_view(store, NODES + 1)
            for _ in range(3):  # more views of the same disagreement: still one warning
                await store.refresh()
            assert store.virtual_ids == V  # four members advertise V=4, one V=16
            assert store.rule.virtual_ids_seen == ((V, NODES), (VIRTUAL_IDS, 1))
            disagreeing = store.metrics.registry.get_sample_value(
                "tmdht_client_placement_disagreements"
            )
            assert disagreeing == 1
            assert {m.node_id for m in store.members if m.virtual_ids == VIRTUAL_IDS} == {
                odd.node_id
            }

        # The nodes say so too, each side about the other (once per rule seen).
        def warned(node: int, v: int) -> Callable[[], Awaitable[bool]]:
            async def check() -> bool:
                return f"advertises V={v} R={R}" in cluster.nodes[node].log_path.read_text()

            return check

        await eventually(warned(0, VIRTUAL_IDS), 30, "node 0 warns about the odd node")
        await eventually(warned(NODES, V), 30, "the odd node warns about the others")
        assert cluster.nodes[0].log_path.read_text().count("advertises V=") == 1

    asyncio.run(asyncio.wait_for(scenario(), 180))
    warnings = [r.getMessage() for r in caplog.records if "disagree" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert f"V={V} ({NODES} members), V={VIRTUAL_IDS} (1 members)" in warnings[0]
    doc = json.loads(status(cluster, "--json"))
    assert sorted(m["virtual_ids"] for m in doc["members"]) == [V] * NODES + [VIRTUAL_IDS]
    assert doc["placement"]["agreed"] is False
    assert "members disagree on the placement rule" in status(cluster)
