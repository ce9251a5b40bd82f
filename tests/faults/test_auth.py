"""Cluster authentication with real node processes: strangers get nothing, forgeries and replays
are dropped and counted, a node with another key never joins, and keys rotate without downtime."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from support.cluster import FAST_NODE_ARGS, eventually, holders, make_pages, metric, scrape

from tmdht import wire
from tmdht.aio.dataplane import DataPlaneClient
from tmdht.aio.overlay import Overlay
from tmdht.auth import Authenticator, ClusterKey, KeyRing, keyring_from, parse_cluster_keys
from tmdht.client.store import TemplateStoreClient
from tmdht.errors import NodeUnreachableError
from tmdht.files import atomic_write
from tmdht.net.overlay import (
    OverlayConfig,
    Response,
    decode_datagram,
    derive_tag_key,
    encode_request,
)
from tmdht.node.local import LocalCluster

pytestmark = pytest.mark.slow

ARGS = [*FAST_NODE_ARGS, "--log-level", "warning"]
PAGES = make_pages(40, tag=71)
DIGESTS = [d for d, _ in PAGES]


def run(coro: object) -> object:
    return asyncio.run(asyncio.wait_for(coro, 120))  # type: ignore[arg-type]


def auth_for(text: str) -> Authenticator:
    return Authenticator.keyed(keyring_from(parse_cluster_keys(text)))


def stranger() -> Authenticator:
    return Authenticator.keyed(KeyRing(ClusterKey(1, secrets.token_bytes(32))))


def dropped(cluster: LocalCluster, index: int, name: str, reason: str) -> float:
    return metric(scrape(cluster, index), name, reason=reason)


async def answers(auth: Authenticator, cluster: LocalCluster, index: int) -> bool:
    """Whether node ``index`` answers NODE_INFO to a client with ``auth``."""
    async with await DataPlaneClient.open(auth, timeout=0.1, attempts=2) as client:
        try:
            await client.node_info(cluster.nodes[index].address("data"))
        except NodeUnreachableError:
            return False
        return True


async def crawl(seed: tuple[str, int], keys_text: str) -> set[bytes]:
    keys = parse_cluster_keys(keys_text)
    overlay = await Overlay.start(
        OverlayConfig(
            data_port=0,
            join=False,
            seeds=(seed,),
            cluster_key=keys[0].secret,
            accepted_cluster_keys=tuple(k.secret for k in keys[1:]),
            rpc_timeout=0.3,
        )
    )
    try:
        return {m.node_id for m in await overlay.crawl()}
    finally:
        await overlay.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with LocalCluster(tmp_path_factory.mktemp("auth"), 3, extra_args=ARGS) as c:
        key = c.key_file.read_text()

        async def put() -> None:
            async with await DataPlaneClient.open(auth_for(key)) as client:
                outcome = await client.put_pages(c.nodes[0].address("data"), PAGES)
                assert set(outcome.status.values()) == {wire.PutStatus.STORED}

        run(put())
        yield c


def test_a_client_with_a_wrong_key_or_none_gets_nothing(cluster: LocalCluster) -> None:
    before = [dropped(cluster, i, "tmdht_bad_datagrams_total", "auth") for i in range(3)]

    async def main() -> None:
        for auth in (stranger(), Authenticator.open_mode()):
            async with await DataPlaneClient.open(auth, timeout=0.1, attempts=2) as client:
                for node in cluster.nodes:
                    got = await client.get_pages(node.address("data"), DIGESTS)
                    assert not got.pages and got.unanswered == set(DIGESTS)
                    put = await client.put_pages(node.address("data"), make_pages(5, tag=72))
                    assert not put.status and len(put.unanswered) == 5
                    with pytest.raises(NodeUnreachableError):
                        await client.node_info(node.address("data"))
                assert client.stats.datagrams_received == 0  # not even an error answer
        # The right key still works, and the stranger's pages were never stored.
        async with await DataPlaneClient.open(auth_for(cluster.key_file.read_text())) as client:
            got = await client.get_pages(cluster.nodes[1].address("data"), DIGESTS)
            assert not got.unanswered
            has = await client.has(
                cluster.nodes[1].address("data"), [d for d, _ in make_pages(5, tag=72)]
            )
            assert not has.held

    run(main())
    after = [dropped(cluster, i, "tmdht_bad_datagrams_total", "auth") for i in range(3)]
    # 2 clients x (GET 2 tries + PUT 2 tries + NODE_INFO 2 tries) per node, at least.
    assert all(a - b >= 12 for a, b in zip(after, before, strict=True)), (before, after)


def test_forged_and_replayed_datagrams_are_dropped_and_counted(cluster: LocalCluster) -> None:
    auth = auth_for(cluster.key_file.read_text())
    target = cluster.nodes[2].address("data")
    before = scrape(cluster, 2)
    request = wire.encode(
        wire.GetPages(request_id=99, digests=tuple(wire.PageDigest(d) for d in DIGESTS[:3])),
        max_datagram=32768,
        auth=auth,
        now=time.time(),
    )
    forged_tag = request[:-1] + bytes([request[-1] ^ 1])
    forged_body = bytes([request[0]]) + bytes([request[1] ^ 0x40]) + request[2:]
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(2)
    try:
        sock.sendto(request, target)
        answer = wire.decode(sock.recv(65536), max_datagram=65507, auth=auth, now=time.time())
        assert isinstance(answer, wire.Pages) and answer.request_id == 99
        sock.settimeout(0.5)
        for datagram in (request, request, forged_tag, forged_body):  # 2 replays, 2 forgeries
            sock.sendto(datagram, target)
        with pytest.raises(TimeoutError):
            sock.recv(65536)  # none of them is answered
        # The Kademlia port drops untagged or badly tagged datagrams the same way.
        kademlia = cluster.nodes[2].address("kademlia")
        for _ in range(3):
            sock.sendto(b"\x00" + os.urandom(20) + b"\x92\xa4ping\x90" + os.urandom(16), kademlia)
    finally:
        sock.close()

    async def counted() -> bool:
        after = scrape(cluster, 2)

        def grew(name: str, reason: str) -> float:
            return metric(after, name, reason=reason) - metric(before, name, reason=reason)

        return (
            grew("tmdht_bad_datagrams_total", "replay") >= 2
            and grew("tmdht_bad_datagrams_total", "auth") >= 2
            and grew("tmdht_overlay_bad_datagrams_total", "auth") >= 3
        )

    run(eventually(counted, 10, "replays and forgeries counted on both ports"))


def test_a_node_with_another_key_does_not_join(cluster: LocalCluster, tmp_path: Path) -> None:
    seed = "{}:{}".format(*cluster.seed)
    before = [dropped(cluster, i, "tmdht_overlay_bad_datagrams_total", "auth") for i in range(3)]
    with LocalCluster(tmp_path / "outsider", 1, extra_args=[*ARGS, "--seed", seed]) as outsider:
        key = cluster.key_file.read_text()

        async def main() -> None:
            members = await crawl(cluster.seed, key)
            assert members == {n.node_id for n in cluster.nodes}
            # Nor does the outsider learn anyone: its own crawl finds only itself.
            mine = await crawl(outsider.seed, outsider.key_file.read_text())
            assert mine == {outsider.nodes[0].node_id}
            # Its data plane refuses the cluster's key too.
            async with await DataPlaneClient.open(auth_for(key), timeout=0.1, attempts=1) as c:
                with pytest.raises(NodeUnreachableError):
                    await c.node_info(outsider.nodes[0].address("data"))

        run(main())
        assert metric(scrape(outsider, 0), "tmdht_known_peers") == 0
    after = [dropped(cluster, i, "tmdht_overlay_bad_datagrams_total", "auth") for i in range(3)]
    assert after[0] > before[0] or after[1] > before[1] or after[2] > before[2]
    assert sum(metric(scrape(cluster, i), "tmdht_known_peers") for i in range(3)) == 6


def test_key_rotation_without_downtime(tmp_path: Path) -> None:
    """The three steps of SECURITY.md on a 3-node cluster, restarting nodes one at a time."""
    old, new = secrets.token_hex(32), secrets.token_hex(32)
    step1, step2, step3 = f"1:{old}\n2:{new}\n", f"2:{new}\n1:{old}\n", f"2:{new}\n"
    root = tmp_path / "rotation"
    root.mkdir()
    (root / "cluster.key").write_text(step1)  # every node accepts both, sends with the old one
    with LocalCluster(root, 3, extra_args=ARGS) as cluster:

        def restart_with(index: int, keys_text: str) -> None:
            node = cluster.nodes[index]
            key_file = node.data_dir.parent / f"node-{index}.key"
            key_file.write_text(keys_text)
            node.args[node.args.index("--cluster-key-file") + 1] = str(key_file)
            assert cluster.stop_node(index) == 0
            cluster.restart_node(index)

        ids = {n.node_id for n in cluster.nodes}
        # Clients rotate like nodes: a node answers with the key it sends with, so a client
        # must accept that key too. Old-only and new-only clients mark the two ends.
        only_old, only_new = auth_for(f"1:{old}"), auth_for(f"2:{new}")
        client_step1, client_step2 = auth_for(step1), auth_for(step2)

        def serves(auth: Authenticator, index: int) -> Awaitable[bool]:
            return answers(auth, cluster, index)

        async def main() -> None:
            assert await crawl(cluster.seed, step1) == ids
            for i in range(3):  # step 1: the new key is accepted, the old one still answers
                assert await serves(only_old, i) and await serves(client_step2, i)
            # Step 2, node by node: the ring holds and replication crosses keys both ways.
            for i in range(3):
                restart_with(i, step2)
                assert await crawl(cluster.seed, step2) == ids
                assert await serves(only_new, i) and await serves(client_step1, i)
                assert not await serves(only_old, i)  # it cannot read the new key's answers
            pages = make_pages(30, tag=73)
            async with await DataPlaneClient.open(only_new) as client:
                put = await client.put_pages(cluster.nodes[0].address("data"), pages)
                assert set(put.status.values()) == {wire.PutStatus.STORED}

                async def replicated() -> bool:
                    held = await holders(client, cluster, [d for d, _ in pages], [0, 1, 2])
                    return all(nodes == {0, 1, 2} for nodes in held.values())

                await eventually(replicated, 30, "pages on all 3 nodes after step 2")
            # Step 3 on one node: it refuses the old key; the others still take it.
            restart_with(1, step3)
            assert await crawl(cluster.seed, step3) == ids
            assert not await serves(client_step1, 1) and await serves(only_new, 1)
            assert await serves(client_step1, 0) and await serves(only_new, 0)

        run(main())


def test_key_rotation_by_sighup_with_resolves_running(tmp_path: Path) -> None:
    """SECURITY.md's three steps as edits of the key file, each followed by SIGHUP to every
    node (what `systemctl reload` sends), while a client resolves pages the whole time: no
    resolve fails, and after step 3 the old key is refused. A bad file keeps the old keys."""
    old, new = secrets.token_hex(32), secrets.token_hex(32)
    steps = [f"1:{old}\n2:{new}\n", f"2:{new}\n1:{old}\n", f"2:{new}\n"]
    root = tmp_path / "sighup"
    root.mkdir()
    (root / "cluster.key").write_text(f"1:{old}\n")
    with LocalCluster(root, 3, extra_args=[*FAST_NODE_ARGS, "--log-level", "info"]) as cluster:

        def reloads(index: int, outcome: str) -> float:
            return metric(scrape(cluster, index), "tmdht_cluster_key_reloads_total",
                          outcome=outcome)

        async def until(check: Callable[[], bool], what: str) -> None:
            async def probe() -> bool:
                return check()

            await eventually(probe, 30, what)

        async def hup_all(text: str, step: int) -> None:
            atomic_write(cluster.key_file, text, durable=False)
            for node in cluster.nodes:
                assert node.proc is not None
                node.proc.send_signal(signal.SIGHUP)
            for i in range(3):
                await until(lambda i=i: reloads(i, "ok") >= step, f"reload {step}")

        def serves(auth: Authenticator, index: int) -> Awaitable[bool]:
            return answers(auth, cluster, index)

        async def main() -> None:
            # Before step 1 the client may only send with the old key; from step 1 it sends
            # with the new one (accepting both), as clients rotate with the nodes.
            async with TemplateStoreClient(
                seeds=[cluster.seed], cluster_key=f"1:{old}\n", cache_pages=0
            ) as publisher:
                await publisher.put_many(PAGES)
            await hup_all(steps[0], 1)
            resolved = 0
            stop = asyncio.Event()

            async def resolve_forever() -> None:
                nonlocal resolved
                async with TemplateStoreClient(
                    seeds=[cluster.seed], cluster_key=f"2:{new}\n1:{old}\n", cache_pages=0
                ) as store:
                    while not stop.is_set():
                        pages = await store.get_many(DIGESTS)
                        assert pages == [page for _, page in PAGES]
                        resolved += 1

            resolver = asyncio.create_task(resolve_forever())
            try:
                await until(lambda: resolved >= 3, "resolves under way")
                for step, text in enumerate(steps[1:], 2):
                    before = resolved
                    await hup_all(text, step)
                    await until(lambda before=before: resolved >= before + 3,
                                f"resolves after step {step}")
                # Step 3 done: the old key is refused, the new one served.
                only_old, only_new = auth_for(f"1:{old}"), auth_for(f"2:{new}")
                for i in range(3):
                    assert not await serves(only_old, i) and await serves(only_new, i)
                # A bad file changes nothing: the node logs why and keeps serving.
                atomic_write(cluster.key_file, "not a key\n", durable=False)
                cluster.nodes[0].proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
                await until(lambda: reloads(0, "failed") >= 1, "failed reload")
                assert await serves(only_new, 0) and not await serves(only_old, 0)
                before = resolved
                await until(lambda: resolved >= before + 3, "resolves after bad file")
            finally:
                stop.set()
                await resolver  # re-raises a failed resolve
            assert resolved >= 9

        run(main())
        log = cluster.nodes[0].log_path.read_text()
        assert "cluster key reload failed: cluster key file" in log
        assert "keeping key id 2 (accepting 2)" in log


def test_replayed_overlay_datagram_is_dropped_counted_and_changes_nothing(
    cluster: LocalCluster,
) -> None:
    """A stamped (version 2) overlay request answered once; the same bytes again are dropped
    and counted as replay; a fresh request sent after it is answered, so the replay was seen
    (datagrams on one loopback socket arrive in order) and got no answer."""
    keys = parse_cluster_keys(cluster.key_file.read_text())
    tag_key = derive_tag_key(keys[0].secret)
    target = cluster.nodes[1].address("kademlia")
    before = dropped(cluster, 1, "tmdht_overlay_bad_datagrams_total", "replay")

    def ping(msg_id: bytes, nonce: int) -> bytes:
        return encode_request(msg_id, "ping", [b""], tag_key, (int(time.time() * 1000), nonce))

    first = ping(b"a" * 20, 7)
    answers = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(10)
        sock.bind(("127.0.0.1", 0))
        sock.sendto(first, target)
        answers.append(decode_datagram(sock.recv(65536), tag_key))
        sock.sendto(first, target)  # the replay
        sock.sendto(ping(b"b" * 20, 8), target)
        answers.append(decode_datagram(sock.recv(65536), tag_key))
    assert [a.msg_id for a in answers] == [b"a" * 20, b"b" * 20]
    assert all(isinstance(a, Response) and a.stamped for a in answers)
    assert dropped(cluster, 1, "tmdht_overlay_bad_datagrams_total", "replay") - before == 1


def test_node_with_require_stamped_refuses_unstamped_overlay_datagrams(tmp_path: Path) -> None:
    """``--require-stamped`` (NodeConfig.require_stamped): an unstamped (version 1) ping gets no
    answer and is counted as a replay; a stamped one sent after it is answered, so the first
    was seen (one loopback socket keeps the order) and refused."""
    with LocalCluster(tmp_path / "strict", 1, extra_args=[*ARGS, "--require-stamped"]) as strict:
        tag_key = derive_tag_key(parse_cluster_keys(strict.key_file.read_text())[0].secret)
        target = strict.nodes[0].address("kademlia")
        before = dropped(strict, 0, "tmdht_overlay_bad_datagrams_total", "replay")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(10)
            sock.bind(("127.0.0.1", 0))
            sock.sendto(encode_request(b"u" * 20, "ping", [b""], tag_key), target)
            sock.sendto(encode_request(b"s" * 20, "ping", [b""], tag_key,
                                       (int(time.time() * 1000), 11)), target)
            answer = decode_datagram(sock.recv(65536), tag_key)
        assert isinstance(answer, Response) and answer.msg_id == b"s" * 20 and answer.stamped
        assert dropped(strict, 0, "tmdht_overlay_bad_datagrams_total", "replay") - before == 1
