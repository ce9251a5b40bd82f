"""Live migrations of real QEMU/TCG guests through ``tmdht qemu send`` / ``receive``.

Source QEMU ``migrate "exec:tmdht qemu send ..."``, destination QEMU ``migrate-incoming
"exec:tmdht qemu receive ..."`` (the receiver announces its port 0 listener on a FIFO), a real
3-node store cluster holding templates mined from other guests.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from migration.helpers import (
    cmdline,
    descendants,
    differing_pages,
    load_report,
    make_fifo,
    read_ready,
    tmdht_command,
    wait_report,
)
from support.cluster import FAST_NODE_ARGS
from support.tls import ScratchCA, openssl_available

from tmdht.catalog import TemplateCatalog
from tmdht.client import TemplateStoreClient
from tmdht.client.publish import PublishSummary, publish_templates
from tmdht.images import open_image
from tmdht.lab import (
    Guest,
    GuestCapture,
    GuestSpec,
    GuestTimeoutError,
    HostTools,
    MigrationError,
    QmpError,
)
from tmdht.mining import MiningConfig, TemplateMiner
from tmdht.node.local import LocalCluster

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

SPEC = GuestSpec(name="traveller", workload="mixed", seed=21)


@pytest.fixture(scope="module")
def catalog_path(guest_captures: list[GuestCapture], tmp_path_factory: pytest.TempPathFactory
                 ) -> Path:
    """Templates mined from three other guests."""
    with TemplateMiner(MiningConfig()) as miner:
        for capture in guest_captures[:3]:
            with open_image(capture.stream_path) as image:
                miner.add_image(capture.name, image.iter_pages())
        catalog = TemplateCatalog.from_mining(miner.finish())
    path = tmp_path_factory.mktemp("catalog") / "templates.tmc"
    catalog.save(path)
    return path


@pytest.fixture(scope="module")
def cluster(catalog_path: Path, guest_captures: list[GuestCapture],
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A 3-node cluster holding the catalog's templates."""
    root = tmp_path_factory.mktemp("cluster")
    with LocalCluster(root, 3, extra_args=FAST_NODE_ARGS) as local:
        key = local.key_file.read_text().strip()

        async def publish() -> PublishSummary:
            async with TemplateStoreClient([local.seed], cluster_key=key) as store:
                return await publish_templates(store, TemplateCatalog.load(catalog_path),
                                               [c.stream_path for c in guest_captures[:3]])

        assert asyncio.run(publish()).not_found == 0
        yield local


def receiver_uri(cluster: LocalCluster, tmp: Path, catalog: Path) -> tuple[str, Path, Path]:
    fifo = make_fifo(tmp / "ready.fifo")
    report = tmp / "receive.json"
    host, port = cluster.nodes[0].address("kademlia")
    command = tmdht_command("qemu", "receive", "--listen", "127.0.0.1:0",
                            "--seed", f"{host}:{port}", "--cluster-key-file", cluster.key_file,
                            "--catalog", catalog, "--ready-file", fifo, "--report", report,
                            "--accept-timeout", "60")
    return f"exec:{command}", fifo, report


def sender_uri(catalog: Path, port: int, report: Path, *extra: str) -> str:
    return "exec:" + tmdht_command("qemu", "send", "--catalog", catalog, "--to",
                                   f"127.0.0.1:{port}", "--report", report, *extra)


def wait_transferred(guest: Guest, at_least: int, timeout: float) -> int:
    """Poll query-migrate (bounded) until the source put ``at_least`` bytes of RAM out."""
    deadline = time.monotonic() + timeout
    for _ in range(10_000):
        info = guest.query_migrate()
        done = int(info.get("ram", {}).get("transferred", 0))
        if done >= at_least or info.get("status") in ("completed", "failed"):
            return done
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)  # a poll interval: QEMU has no event for bytes transferred
    raise AssertionError(f"migration did not reach {at_least} bytes in {timeout} s")


def wait_exit(guest: Guest, timeout: float) -> int:
    """QEMU's exit status once it exited by itself (polled, bounded)."""
    deadline = time.monotonic() + timeout
    for _ in range(100_000):
        code = guest.returncode
        if code is not None:
            return code
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)  # a poll interval
    raise AssertionError(f"QEMU of {guest.spec.name} still runs after {timeout} s")


def test_guest_continues_at_the_destination_with_identical_memory(
        lab_tools: HostTools, lab_initramfs: Path, cluster: LocalCluster, catalog_path: Path,
        tmp_path: Path) -> None:
    with Guest(SPEC, tools=lab_tools, initramfs=lab_initramfs) as source, \
            Guest(SPEC, incoming="defer", tools=lab_tools, initramfs=lab_initramfs,
                  extra_args=("-S",)) as dest:
        source.wait_counter(3, timeout=60)
        uri, fifo, receive_report = receiver_uri(cluster, tmp_path, catalog_path)
        dest.migrate_incoming(uri)
        _host, port = read_ready(fifo, timeout=30)
        send_report = tmp_path / "send.json"
        source.set_migration_parameters(max_bandwidth=1 << 30, downtime_limit=300)
        source.migrate(sender_uri(catalog_path, port, send_report))
        stats = source.wait_migration(timeout=120)
        assert stats.status == "completed"
        assert dest.wait_migration(timeout=60).status == "completed"
        assert dest.status() == "paused"  # -S: memory as it arrived, before the guest runs
        source.pmemsave(tmp_path / "source.raw")
        dest.pmemsave(tmp_path / "dest.raw")
        assert differing_pages(tmp_path / "source.raw", tmp_path / "dest.raw") == []
        last = source.counter
        assert last is not None
        dest.cont()
        assert dest.wait_counter(last + 2, timeout=60) >= last + 2
        assert dest.console.first_counter is not None
        assert last < dest.console.first_counter <= last + 3
        received = load_report(receive_report)  # written before QEMU got the device state
        sent = wait_report(send_report, timeout=30)
        assert received["ok"] and sent["ok"]
        assert sent["counts"] == received["counts"]
        counts = received["counts"]
        assert counts["template_pages"] > 1000
        assert received["cluster_pages"] == counts["template_pages"]
        assert received["fallback_pages"] == 0
        assert counts["qemu_bytes"] > 16 << 20
        assert sent["wan_bytes"] < 0.6 * counts["qemu_bytes"]


WEDGE_ATTEMPTS = 2
"""Migrations tried when the destination guest falls silent (see :func:`nodes_die_mid_migration`)."""


def nodes_die_mid_migration(lab_tools: HostTools, lab_initramfs: Path, cluster: LocalCluster,
                            catalog_path: Path, tmp_path: Path) -> dict[str, Any] | None:
    """One migration during which every store node is SIGKILLed; the receiver's report, or None
    when the destination guest fell silent after a completed migration whose stream the receiver
    verified: QEMU 7.2's TCG migration losing guest writes (bench/README.md), which tmdht's
    end-to-end digest cannot see because the lost page never enters QEMU's stream."""
    with Guest(SPEC, tools=lab_tools, initramfs=lab_initramfs) as source, \
            Guest(SPEC, incoming="defer", tools=lab_tools, initramfs=lab_initramfs) as dest:
        source.wait_counter(2, timeout=60)
        uri, fifo, receive_report = receiver_uri(cluster, tmp_path, catalog_path)
        dest.migrate_incoming(uri)
        _host, port = read_ready(fifo, timeout=30)
        source.set_migration_parameters(max_bandwidth=24 << 20, downtime_limit=300)
        source.migrate(sender_uri(catalog_path, port, tmp_path / "send.json"))
        wait_transferred(source, 8 << 20, timeout=60)
        for index in range(len(cluster.nodes)):
            cluster.kill_node(index)
        source.set_migration_parameters(max_bandwidth=1 << 30)
        assert source.wait_migration(timeout=120).status == "completed"
        assert dest.wait_migration(timeout=60).status == "completed"
        last = source.counter
        assert last is not None
        received = load_report(receive_report)
        assert received["ok"]
        try:
            assert dest.wait_counter(last + 2, timeout=60) >= last + 2
        except GuestTimeoutError:
            return None
        return received


def test_migration_completes_when_every_store_node_dies(
        lab_tools: HostTools, lab_initramfs: Path, cluster: LocalCluster, catalog_path: Path,
        tmp_path: Path) -> None:
    for attempt in range(WEDGE_ATTEMPTS):
        if attempt:
            for index in range(len(cluster.nodes)):
                cluster.restart_node(index)
        run = tmp_path / f"run{attempt}"
        run.mkdir()
        received = nodes_die_mid_migration(lab_tools, lab_initramfs, cluster, catalog_path, run)
        if received is not None:
            break
    else:
        pytest.fail(f"the destination guest fell silent after all {WEDGE_ATTEMPTS} migrations "
                    "(QEMU 7.2 TCG losing guest writes?)")
    assert received["fallback_pages"] > 0
    assert received["cluster_pages"] + received["fallback_pages"] == \
        received["counts"]["template_pages"]


def start_receiver(dest: Guest, tmp_path: Path, *extra: object) -> int:
    """A receiver without a cluster under the destination QEMU; its port."""
    fifo = make_fifo(tmp_path / "ready.fifo")
    dest.migrate_incoming("exec:" + tmdht_command(
        "qemu", "receive", "--listen", "127.0.0.1:0", "--no-cluster", "--ready-file", fifo,
        "--accept-timeout", "60", *extra))
    return read_ready(fifo, timeout=30)[1]


def assert_source_failed_and_runs(source: Guest) -> None:
    """The source's migration failed and its guest runs on."""
    with pytest.raises(MigrationError):
        source.wait_migration(timeout=60)
    assert source.status() == "running"
    before = source.wait_counter(0, timeout=5)
    assert source.wait_counter(before + 2, timeout=30) >= before + 2


def test_killed_sender_fails_the_migration_and_the_source_keeps_running(
        lab_tools: HostTools, lab_initramfs: Path, catalog_path: Path, tmp_path: Path) -> None:
    with Guest(SPEC, tools=lab_tools, initramfs=lab_initramfs) as source, \
            Guest(SPEC, incoming="defer", tools=lab_tools, initramfs=lab_initramfs) as dest:
        source.wait_counter(2, timeout=60)
        port = start_receiver(dest, tmp_path)
        source.set_migration_parameters(max_bandwidth=8 << 20, downtime_limit=300)
        source.migrate(sender_uri(catalog_path, port, tmp_path / "send.json"))
        wait_transferred(source, 4 << 20, timeout=60)
        senders = [p for p in descendants(source.pid) if "qemu send" in cmdline(p)]
        assert senders, "no sender process under the source QEMU"
        for pid in senders:
            os.kill(pid, signal.SIGKILL)
        assert_source_failed_and_runs(source)
        with pytest.raises((MigrationError, QmpError)):  # failed, or QEMU already exited
            dest.wait_migration(timeout=60)
        assert wait_exit(dest, timeout=30) != 0
        assert dest.console.first_counter is None  # the destination never ran the guest


@pytest.fixture(scope="module")
def refused_tls(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """(receiver, sender) credential directories of handshakes that must fail."""
    root = tmp_path_factory.mktemp("pki")
    ca, other = ScratchCA(root / "ca"), ScratchCA(root / "other", name="another CA")
    receiver = ca.creds(root / "receiver",
                        server=ca.issue("server", "/O=tmdht/CN=receiver", server=True))
    client = ca.issue("client", "/O=tmdht/CN=sender", server=False)
    return {
        "wrong-ca": (receiver, ca.creds(root / "wrong-ca", client=client, ca=other.cert)),
        "foreign-client-cert": (receiver, ca.creds(
            root / "foreign", client=other.issue("client", "/O=tmdht/CN=sender", server=False))),
    }


@pytest.mark.skipif(not openssl_available(), reason="no openssl command")
@pytest.mark.parametrize("case", ["wrong-ca", "foreign-client-cert"])
def test_refused_tls_handshake_fails_the_migration_and_the_source_keeps_running(
        case: str, refused_tls: dict[str, tuple[Path, Path]], lab_tools: HostTools,
        lab_initramfs: Path, catalog_path: Path, tmp_path: Path) -> None:
    receiver_creds, sender_creds = refused_tls[case]
    with Guest(SPEC, tools=lab_tools, initramfs=lab_initramfs) as source, \
            Guest(SPEC, incoming="defer", tools=lab_tools, initramfs=lab_initramfs) as dest:
        source.wait_counter(2, timeout=60)
        port = start_receiver(dest, tmp_path, "--tls-creds", receiver_creds,
                              "--report", tmp_path / "receive.json")
        source.migrate(sender_uri(catalog_path, port, tmp_path / "send.json",
                                  "--tls-creds", str(sender_creds)))
        assert_source_failed_and_runs(source)
        # The receiver exited without writing a byte: QEMU 7.2's incoming exec: channel waits
        # for data and never sees the bare hang-up, so the destination stays in "inmigrate",
        # holding no guest state, until the operator stops it.
        sent = wait_report(tmp_path / "send.json", timeout=30)
        received = wait_report(tmp_path / "receive.json", timeout=30)
        assert dest.status() == "inmigrate"
        assert dest.query_migrate().get("status") in (None, "none", "setup")
        assert dest.console.first_counter is None  # the destination never ran the guest
        assert not sent["ok"] and "TLS handshake" in sent["error"]
        assert sent["counts"]["qemu_bytes"] == 0  # refused before a byte of QEMU's stream
        assert not received["ok"] and received["counts"]["pages"] == 0
