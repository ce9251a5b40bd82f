"""Restart without seeds (issue 16, part 3): a node rejoins the ring through the peers it saved,
with real node processes."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from pathlib import Path

from support.cluster import FAST_NODE_ARGS, eventually

from tmdht.client.store import TemplateStoreClient
from tmdht.node.local import LocalCluster, read_ready_line


def test_a_node_rejoins_from_its_peer_cache_when_its_seed_is_down(tmp_path: Path) -> None:
    with LocalCluster(tmp_path, 3, extra_args=FAST_NODE_ARGS) as c:
        key = c.key_file.read_text().strip()
        cache = c.nodes[2].data_dir / "peers.json"
        others = {c.nodes[0].node_id.hex(), c.nodes[1].node_id.hex()}

        async def cached_both() -> bool:
            if not cache.exists():
                return False
            return {p["id"] for p in json.loads(cache.read_text())["peers"]} == others

        asyncio.run(eventually(cached_both, 60, "node 2 caches both peers"))
        dead_seed = "{}:{}".format(*c.nodes[0].address("kademlia"))
        c.stop_node(2)
        c.stop_node(0)  # everyone's seed: node 2 restarts pointing at a dead address

        node = c.nodes[2]
        args = [dead_seed if a == "{seed}" else a for a in node.args]
        env = {k: v for k, v in os.environ.items() if not k.startswith("TMDHT_")}
        with (tmp_path / "restart.log").open("ab") as log:
            proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=log, env=env)
        try:
            status = read_ready_line(proc, 60, "restarted node 2")
            new_port = status["kademlia"][1]

            async def node_1_sees_it() -> bool:
                seed = c.nodes[1].address("kademlia")
                async with TemplateStoreClient([seed], cluster_key=key, timeout=0.5) as store:
                    return any(
                        m.node_id == node.node_id and m.port == new_port for m in store.members
                    )

            asyncio.run(eventually(node_1_sees_it, 60, "node 1 knows node 2 at its new port"))
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
            if proc.stdout is not None:
                proc.stdout.close()
