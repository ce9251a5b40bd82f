"""The group commit's bounded wait for more PUTs (tmdht.node.groupcommit) and what it must not
change: every acknowledged page is durable, also across a SIGKILL of a real node process."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from support.cluster import cluster_auth, random_pages

from tmdht import wire
from tmdht.aio.dataplane import DataPlaneClient
from tmdht.errors import UsageError
from tmdht.node.groupcommit import CommitPacer, CommitPacing
from tmdht.node.local import LocalCluster

DELAY = 0.002


def streaming(pacer: CommitPacer, puts: int, gap: float, pages: int = 7) -> float:
    """Feed ``puts`` PUT arrivals ``gap`` apart; returns the time of the last."""
    now = 100.0
    for _ in range(puts):
        pacer.arrived(pages, now)
        now += gap
    return now - gap


def test_a_lone_put_or_a_trickle_commits_at_once() -> None:
    pacer = CommitPacer(CommitPacing(max_delay=DELAY))
    pacer.arrived(7, 100.0)
    assert pacer.start_at(7, 100.0, 100.0) == 100.0
    trickle = CommitPacer(CommitPacing(max_delay=DELAY))
    last = streaming(trickle, 50, gap=0.005)  # one PUT per 5 ms: none expected within 2 ms
    assert trickle.start_at(7, last, last) == last


def test_streaming_puts_wait_at_most_max_delay_after_the_oldest() -> None:
    pacer = CommitPacer(CommitPacing(max_delay=DELAY, target_pages=256))
    last = streaming(pacer, 50, gap=0.0005)  # 14k pages/s: a commit can gather more
    at = pacer.start_at(7, last, last)
    assert last < at <= last + DELAY
    # An older queued PUT bounds the wait from its arrival; one that waited long enough: now.
    assert pacer.start_at(7, last - 0.0015, last) <= last - 0.0015 + DELAY
    assert pacer.start_at(7, last - DELAY, last) == last


def test_a_full_target_or_no_delay_commits_at_once() -> None:
    pacer = CommitPacer(CommitPacing(max_delay=DELAY, target_pages=64))
    last = streaming(pacer, 50, gap=0.0001)
    assert pacer.start_at(64, last, last) == last
    for off in (CommitPacer(CommitPacing(max_delay=0)), CommitPacer()):  # off by default
        last = streaming(off, 50, gap=0.0001)
        assert off.start_at(7, last, last) == last


def test_the_wait_ends_when_the_target_is_expected() -> None:
    """At 70k pages/s, 256 pages are ~3.5 ms away: the max_delay of 10 ms is not used up."""
    pacer = CommitPacer(CommitPacing(max_delay=0.01, target_pages=256))
    last = streaming(pacer, 2000, gap=0.0001)  # 200 ms: 4 time constants of the rate
    at = pacer.start_at(7, last, last)
    assert last < at < last + 0.006


def test_a_pause_ends_the_waiting() -> None:
    pacer = CommitPacer(CommitPacing(max_delay=DELAY))
    last = streaming(pacer, 50, gap=0.0005)
    assert pacer.start_at(7, last, last) > last
    later = last + 0.1  # 100 ms of silence: the rate has decayed, a new PUT commits at once
    pacer.arrived(7, later)
    assert pacer.start_at(7, later, later) == later


@pytest.mark.parametrize("pacing", [{"max_delay": -0.1}, {"max_delay": 2}, {"target_pages": 0}])
def test_bad_pacing_is_refused(pacing: dict[str, float]) -> None:
    with pytest.raises(UsageError):
        CommitPacing(**pacing)  # type: ignore[arg-type]


# ------------------------------------------------------------------ a real node, SIGKILLed


def test_pages_acknowledged_under_the_commit_delay_survive_a_sigkill(tmp_path: Path) -> None:
    """Many PUTs in flight so the node's commits wait for each other (a long 50 ms bound); the
    node is killed mid-stream; restarted on its data dir it serves every acknowledged page."""
    with LocalCluster(tmp_path, 1, extra_args=["--commit-delay", "0.05"]) as cluster:
        acked = asyncio.run(asyncio.wait_for(publish_until_killed(cluster), 120))
        assert len(acked) >= 200
        cluster.restart_node(0)
        missing = asyncio.run(asyncio.wait_for(missing_pages(cluster, acked), 120))
        assert missing == []


async def publish_until_killed(cluster: LocalCluster) -> dict[bytes, bytes]:
    acked: dict[bytes, bytes] = {}
    address = cluster.nodes[0].address("data")
    async with await DataPlaneClient.open(cluster_auth(cluster), window=32, timeout=1.0) as client:

        async def put(batch: list[tuple[bytes, bytes]]) -> None:
            outcome = await client.put_pages(address, batch)
            for digest, status in outcome.status.items():
                if status in (wire.PutStatus.STORED, wire.PutStatus.PRESENT):
                    acked[digest] = dict(batch)[digest]

        for round_ in range(200):  # bounded: killed once enough pages were acknowledged
            batches = [random_pages(7) for _ in range(16)]
            await asyncio.gather(*(put(b) for b in batches))
            if len(acked) >= 300 or round_ == 199:
                # In flight at the kill: these may or may not be stored; never acknowledged.
                pending = asyncio.gather(*(put(random_pages(7)) for _ in range(16)))
                await asyncio.sleep(0)  # the datagrams go out (not synchronisation)
                cluster.kill_node(0)  # SIGKILL
                await pending
                break
    return acked


async def missing_pages(cluster: LocalCluster, acked: dict[bytes, bytes]) -> list[bytes]:
    address = cluster.nodes[0].address("data")
    async with await DataPlaneClient.open(cluster_auth(cluster), timeout=2.0) as client:
        got = await client.get_pages(address, list(acked))
    return [d for d in acked if got.pages.get(d) != acked[d]]
