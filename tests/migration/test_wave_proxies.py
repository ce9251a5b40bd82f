"""`tmdht qemu send` / `receive --wave` as processes against a real 2-node cluster, on
synthetic QEMU streams of "guests" that share their application pages: the second guest of a
wave sends far fewer bodies; another wave's receiver refuses the stream; the rebuilt stream is
exactly what QEMU sent."""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.cli import Lines
from support.cluster import FAST_NODE_ARGS
from support.synthetic import qemu_stream

from tmdht import wire
from tmdht.catalog import TemplateCatalog
from tmdht.client.store import TemplateStoreClient
from tmdht.client.wave import open_wave_client
from tmdht.launch import tmdht_argv
from tmdht.node.local import LocalCluster
from tmdht.pages import PAGE_SIZE, digest_page
from tmdht.wave import WAVE_SECRET_ENV, WaveCredentials

SHARED = 1500  # application pages every guest of the wave holds
OWN = 300  # pages of each guest's own
TEMPLATES = 200


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, LocalCluster]]:
    root = tmp_path_factory.mktemp("waveproxies")
    rng = random.Random(5)
    shared = [rng.randbytes(PAGE_SIZE) for _ in range(SHARED)]
    templates = [rng.randbytes(PAGE_SIZE) for _ in range(TEMPLATES)]
    for guest in (1, 2):
        own_rng = random.Random(guest * 1000)
        own = [own_rng.randbytes(PAGE_SIZE) for _ in range(OWN)]
        pages = shared + templates + own
        stream, _ = qemu_stream([("pc.ram", len(pages) * PAGE_SIZE)],
                                [[("pc.ram", i, p) for i, p in enumerate(pages)]])
        (root / f"guest{guest}.bin").write_bytes(stream)
    TemplateCatalog.from_digests(sorted(digest_page(p) for p in templates)).save(root / "c.tmc")
    (root / "wave.key").write_text(bytes(range(7, 39)).hex() + "\n")
    with LocalCluster(root / "cluster", 2, extra_args=FAST_NODE_ARGS) as cluster:
        yield root, cluster


def migrate(root: Path, cluster: LocalCluster, guest: int, *wave: str, tag: str,
            env: dict[str, str] | None = None, receiver_wave: tuple[str, ...] | None = None
            ) -> tuple[int, dict[str, Any], dict[str, Any], list[str]]:
    """One migration; returns the receiver's exit code, both reports, stderr lines."""
    host, port = cluster.seed
    out = root / f"{tag}.out"
    receiver_args = wave if receiver_wave is None else receiver_wave
    with out.open("wb") as qemu_in:
        receiver = subprocess.Popen(
            tmdht_argv("qemu", "receive", "--listen", "127.0.0.1:0", "--seed",
                       f"{host}:{port}", "--cluster-key-file", cluster.key_file,
                       "--accept-timeout", "60", "--report", root / f"{tag}.recv.json",
                       *receiver_args),
            stdout=qemu_in, stderr=subprocess.PIPE, env=env)
        assert receiver.stderr is not None
        err = Lines(receiver.stderr)
        listen = err.wait_for("READY ", 60).split()[1]
        with (root / f"guest{guest}.bin").open("rb") as qemu_out:
            sender = subprocess.run(
                tmdht_argv("qemu", "send", "--catalog", root / "c.tmc", "--to", listen,
                           "--report", root / f"{tag}.send.json", *wave),
                stdin=qemu_out, capture_output=True, timeout=120, env=env, check=False)
        try:
            code = receiver.wait(timeout=120)
        finally:
            if receiver.poll() is None:
                receiver.kill()
                receiver.wait(timeout=10)
            rest = receiver.stderr.read().decode(errors="replace").splitlines()
            receiver.stderr.close()
    lines = [*err.seen, *rest, *sender.stderr.decode(errors="replace").splitlines()]
    if code == 0:
        assert out.read_bytes() == (root / f"guest{guest}.bin").read_bytes()
    reports = []
    for side in ("send", "recv"):
        path = root / f"{tag}.{side}.json"
        reports.append(json.loads(path.read_text()) if path.exists() else {})
    return code, reports[0], reports[1], lines


def test_the_second_guest_of_a_wave_sends_far_fewer_bodies(
    lab: tuple[Path, LocalCluster],
) -> None:
    root, cluster = lab
    wave = ("--wave", "w1", "--wave-secret-file", str(root / "wave.key"))
    code, send1, recv1, lines = migrate(root, cluster, 1, *wave, tag="first")
    assert code == 0, lines
    # A cold wave: every offer is a body, and once the sender has heard of a few it sends
    # pages whole instead (adaptive offering; how many depends on timing); the receiver
    # stores them all for the wave.
    sent = send1["wave_offers"] + send1["wave_sent_whole"] + send1["wave_window_full"]
    assert sent >= SHARED + OWN - 10
    assert send1["wave_bodies"] == send1["wave_offers"]
    assert recv1["wave_stored"] == sent
    assert send1["wave_busy_seen"] == recv1["wave_busy_seen"] == 0  # no other VM migrates
    assert any("wave w1: offers" in line for line in lines), lines
    code, send2, recv2, lines = migrate(root, cluster, 2, *wave, tag="second")
    assert code == 0, lines
    assert recv2["wave_hits"] >= SHARED
    assert send2["wave_bodies"] <= OWN + 10
    assert send2["wan_sent_bytes"] < 0.4 * send1["wan_sent_bytes"]


def test_wave_secret_from_the_environment_and_another_waves_receiver(
    lab: tuple[Path, LocalCluster],
) -> None:
    root, cluster = lab
    env = {**os.environ, WAVE_SECRET_ENV: bytes(range(9, 41)).hex()}
    # A receiver with another wave id refuses the sender before any page is written.
    code, _send, _recv, lines = migrate(root, cluster, 1, "--wave", "w2", tag="other",
                                        env=env, receiver_wave=("--wave", "w3"))
    assert code != 0
    assert any("another wave" in line for line in lines), lines
    # The same secret from the environment on both sides works, and a fresh wave finds
    # nothing of wave w1 (another secret): every body crosses.
    code, send, recv, lines = migrate(root, cluster, 2, "--wave", "w2", tag="env", env=env)
    assert code == 0, lines
    assert recv["wave_hits"] == 0 and send["wave_bodies"] == send["wave_offers"] > 0


def test_without_a_wave_nothing_is_offered(lab: tuple[Path, LocalCluster]) -> None:
    root, cluster = lab
    code, send, recv, lines = migrate(root, cluster, 1, tag="plain")
    assert code == 0, lines
    assert send["wave"] is None and send["wave_offers"] == 0 and recv["wave_hits"] == 0
    assert send["counts"]["full_pages"] >= SHARED + OWN - 10
    assert not any("wave" in line for line in lines), lines


def test_wrong_pages_in_the_wave_store_are_never_written(lab: tuple[Path, LocalCluster]) -> None:
    """What a receiver killed mid-wave (or anyone with the cluster key) may leave under a wave's
    keys is checked against the offered digests: wrong pages come from the sender instead and
    the rebuilt stream is still exactly QEMU's."""
    root, cluster = lab
    secret = root / "poisoned.key"
    secret.write_text(bytes(range(11, 43)).hex() + "\n")
    wave = WaveCredentials("poisoned", bytes(range(11, 43)))
    guest = (root / "guest1.bin").read_bytes()
    rng = random.Random(5)
    shared = [rng.randbytes(PAGE_SIZE) for _ in range(SHARED)]
    assert shared[0] in guest

    async def poison() -> None:
        async with TemplateStoreClient([cluster.seed], cluster_key=cluster.key_file.read_text(),
                                       replicas=2) as store:
            waves = await open_wave_client(store, wave)
            try:
                # Under the right keys, the wrong content (a half-written page, another page).
                wrong = [(digest_page(p), bytes(PAGE_SIZE // 2) + p[PAGE_SIZE // 2:])
                         for p in shared]
                assert await waves.store(wrong) == SHARED
            finally:
                waves.close()

    asyncio.run(asyncio.wait_for(poison(), 60))
    code, send, recv, lines = migrate(root, cluster, 1, "--wave", "poisoned",
                                      "--wave-secret-file", str(secret), tag="poisoned")
    assert code == 0, lines  # and migrate() checked the output byte for byte
    assert recv["wave_hits"] == 0
    assert send["wave_bodies"] == send["wave_offers"]


def test_wave_metrics_count_pages_sent_whole() -> None:
    from tmdht.client.migration import MigrationMetrics, MigrationReport, _finish_metrics

    metrics = MigrationMetrics()
    report = MigrationReport("send", ok=True, wave="w", wave_offers=5, wave_sent_whole=7)
    _finish_metrics(metrics, report)
    value = metrics.registry.get_sample_value
    assert value("tmdht_migration_wave_sent_whole_total") == 7
    assert value("tmdht_migration_wave_offers_total") == 5
    received = MigrationReport("receive", ok=True, wave="w", wave_claimed=3, wave_waited=4,
                               wave_waited_found=2)
    assert "claimed 3, waited for 4 (then found 2)" in received.summary()
    _finish_metrics(metrics, received)
    assert value("tmdht_migration_wave_claimed_total") == 3
    assert value("tmdht_migration_wave_waited_total") == 4
    assert value("tmdht_migration_wave_waited_found_total") == 2


def _shared_pages() -> list[bytes]:
    rng = random.Random(5)
    return [rng.randbytes(PAGE_SIZE) for _ in range(SHARED)]


async def _with_wave_client(cluster: LocalCluster, wave: WaveCredentials, body: Any) -> Any:
    async with TemplateStoreClient([cluster.seed], cluster_key=cluster.key_file.read_text(),
                                   replicas=2) as store:
        waves = await open_wave_client(store, wave)
        try:
            return await body(waves)
        finally:
            waves.close()


def test_a_claimer_that_never_stores_costs_the_waiter_only_the_bound(
    lab: tuple[Path, LocalCluster],
) -> None:
    """Another receiver of the wave claimed the shared pages and died: this receiver waits for
    them at most --wave-claim-wait (re-asking), then takes them from its sender; the rebuilt
    stream is exactly QEMU's (migrate() compares it byte for byte)."""
    root, cluster = lab
    secret = root / "dead-claimer.key"
    secret.write_text(bytes(range(13, 45)).hex() + "\n")
    wave = WaveCredentials("dead-claimer", bytes(range(13, 45)))
    digests = [digest_page(p) for p in _shared_pages()]

    async def claim(waves: Any) -> None:
        statuses = await waves.claim(digests, ttl=60)  # capped at the node's 30 s
        assert set(statuses) == {wire.WaveClaimStatus.CLAIMED}

    asyncio.run(asyncio.wait_for(_with_wave_client(cluster, wave, claim), 60))
    args = ("--wave", "dead-claimer", "--wave-secret-file", str(secret))
    code, send, recv, lines = migrate(root, cluster, 1, *args, tag="dead-claimer",
                                      receiver_wave=(*args, "--wave-claim-wait", "1"))
    assert code == 0, lines
    assert recv["wave_waited"] >= SHARED - 10  # it waited for the claimed pages ...
    assert recv["wave_waited_found"] == 0 and recv["wave_hits"] == 0  # ... in vain
    assert send["wave_bodies"] == send["wave_offers"]  # then every body crossed
    # Another receiver's claims: other VMs migrate now, so the sender was told (WAVE_BUSY).
    assert recv["wave_busy_seen"] == send["wave_busy_seen"] == 1
    assert recv["duration_s"] < 30  # the bound, not the claims' 30 s


def test_a_page_another_receiver_claimed_is_taken_from_the_wave_store_once_stored(
    lab: tuple[Path, LocalCluster],
) -> None:
    """The shared pages are claimed by another receiver of the wave, which stores them while
    this one migrates: this one waits for them instead of asking its sender."""
    root, cluster = lab
    secret = root / "live-claimer.key"
    secret.write_text(bytes(range(17, 49)).hex() + "\n")
    wave = WaveCredentials("live-claimer", bytes(range(17, 49)))
    shared = _shared_pages()
    digests = [digest_page(p) for p in shared]
    args = ("--wave", "live-claimer", "--wave-secret-file", str(secret))

    async def claim_then_store(waves: Any) -> tuple[int, dict[str, Any], dict[str, Any],
                                                        list[str]]:
        assert set(await waves.claim(digests, ttl=60)) == {wire.WaveClaimStatus.CLAIMED}
        migration = asyncio.create_task(asyncio.to_thread(
            migrate, root, cluster, 2, *args, tag="live-claimer",
            receiver_wave=(*args, "--wave-claim-wait", "60")))
        # The claimer's pages arrive while the other receiver runs (it waits for them, or
        # finds them at its first look if it is slower than this).
        assert await waves.store(list(zip(digests, shared, strict=True))) == SHARED
        return await migration

    code, send, recv, lines = asyncio.run(asyncio.wait_for(
        _with_wave_client(cluster, wave, claim_then_store), 180))
    assert code == 0, lines
    assert recv["wave_hits"] >= SHARED
    assert send["wave_bodies"] <= OWN + 10  # only the guest's own pages crossed
    assert recv["wave_waited_found"] == recv["wave_waited"]
