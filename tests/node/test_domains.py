"""Failure domains with real node processes: replicas land in distinct domains, and a client's
placement matches the nodes' (issue 16, part 1)."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path

from support.cli import tmdht
from support.cluster import FAST_NODE_ARGS, eventually, holders, make_pages, metric, scrape

from tmdht.aio.dataplane import DataPlaneClient
from tmdht.client.store import TemplateStoreClient
from tmdht.node.local import LocalCluster
from tmdht.placement import FailureDomain, Ring

ZONES = [FailureDomain("z1", "", ""), FailureDomain("z2", "", ""), FailureDomain("z3", "", "")]


def test_replicas_land_in_distinct_zones(tmp_path: Path) -> None:
    """Six nodes in three zones (two each), R = 3: every page has one copy per zone, where the
    client's Ring (built from the members' advertised domains) put it; the nodes' replication
    agrees (it neither moves nor drops anything); ``cluster status`` shows the domains."""
    with LocalCluster(tmp_path, 6, replicas=3, extra_args=FAST_NODE_ARGS, domains=ZONES) as c:
        key = c.key_file.read_text().strip()
        zone_of = {i: ZONES[i % 3].zone for i in range(6)}
        pages = make_pages(300, tag=16)
        digests = [d for d, _ in pages]

        async def scenario() -> None:
            async with TemplateStoreClient([c.seed], cluster_key=key, replicas=3) as store:
                for _ in range(50):  # bounded: the view fills within a few crawls
                    if len(store.members) == 6:
                        break
                    await asyncio.sleep(0.2)
                    await store.refresh()
                members = store.members
                # Labels as configured; the host label defaults to the machine's name.
                assert {m.domain for m in members} == {
                    FailureDomain(z.zone, "", socket.gethostname()) for z in ZONES
                }
                await store.put_many(pages)
                ring = Ring([m.node_id for m in members], [m.domain for m in members])
                index = {c.nodes[i].node_id: i for i in range(6)}
                expected = {
                    d: {index[members[j].node_id] for j in row}
                    for d, row in zip(digests, ring.replica_rows(digests, 3), strict=True)
                }
                client = await DataPlaneClient.open(store.auth)
                try:
                    held = await holders(client, c, digests, list(range(6)))
                    assert held == expected
                    # Every node completes two more anti-entropy sweeps (the nodes' placement):
                    # nothing may move or vanish, so nodes and client agree.
                    swept = {i: sweeps(i) for i in range(6)}

                    async def two_more() -> bool:
                        return all(sweeps(i) >= swept[i] + 2 for i in range(6))

                    await eventually(two_more, 60, "two sweeps on every node")
                    assert await holders(client, c, digests, list(range(6))) == expected
                finally:
                    await client.close()
                for digest in digests:
                    assert sorted(zone_of[i] for i in held[digest]) == ["z1", "z2", "z3"]

        def sweeps(i: int) -> float:
            return metric(scrape(c, i), "tmdht_replication_sweeps_total")

        asyncio.run(scenario())
        out = tmdht(
            "cluster", "status", "--seed", "{}:{}".format(*c.seed),
            "--cluster-key-file", str(c.key_file), "--json",
        )  # fmt: skip
        doc = json.loads(out.stdout)
        assert sorted(m["domain"]["zone"] for m in doc["members"]) == sorted(
            zone_of[i] for i in range(6)
        )
