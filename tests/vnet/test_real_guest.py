"""A real busybox guest with a virtio NIC live-migrates between two sites (network namespaces)
through the tmdht proxies while a peer at a third site streams numbered UDP datagrams to it and
pings it: with the vnet agents nothing is lost, reordered or duplicated (the guest's own counts
and the echoes), and the source agent accounted exactly for what the stopped VM did not get."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from tmdht.lab import HostTools, MigrationError
from tmdht.lab.netguest import ensure_net_initramfs
from tmdht.lab.netlab import Services
from tmdht.lab.netscenario import run_migration_scenario
from tmdht.node.local import read_ready_line
from tmdht.vnet.control import control_request

pytestmark = [pytest.mark.qemu, pytest.mark.slow]


ATTEMPTS = 3
"""Migrations tried before the test gives up on QEMU (see :func:`guest_wedged`)."""
ANNOUNCE_ROUNDS = 5
"""Frames QEMU itself sends from a migrated NIC (its self-announce rounds), not the guest."""


def guest_wedged(result: dict[str, Any]) -> bool:
    """The destination guest fell silent after a completed migration: its agent delivered the
    stream to the NIC's socket but nothing came back beyond QEMU's own announce frames, and the
    guest never sent its report. That is QEMU 7.2's TCG migration losing guest writes (fixed
    upstream in 9.0, 03bfc2188f; bench/README.md): a lost write to a virtio ring wedges the NIC.
    It is not the overlay's doing -- the frames reached QEMU -- so the test migrates again."""
    destination = result["agents"]["b"]
    return (
        result["migration"]["status"] == "completed"
        and result["stream"]["lost_to_guest"] is None
        and destination["tmdht_vnet_frames_total{direction=to_ports}"] > 0
        and destination["tmdht_vnet_frames_total{direction=from_ports}"] <= ANNOUNCE_ROUNDS
    )


def ring_write_lost(error: MigrationError) -> bool:
    """The destination QEMU refused the NIC's state because the guest's virtio ring in RAM
    disagrees with it: the same QEMU 7.2 TCG lost write as :func:`guest_wedged`, landing on the
    ring's index (QEMU checks it when it loads the device and exits)."""
    return "inconsistent with Host index" in str(error)


@pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")
def test_a_migrating_guest_loses_no_frame(tmp_path: Path, build_dir: Path,
                                          lab_tools: HostTools) -> None:
    initramfs = ensure_net_initramfs(build_dir / "lab", lab_tools)
    for attempt in range(ATTEMPTS):
        try:
            result = run_migration_scenario("vnet", lab_tools, initramfs,
                                            tmp_path / f"run{attempt}",
                                            Services(read_ready_line, control_request), rate=300,
                                            migrate_after=1.5, tail_seconds=2.0,
                                            latency_seconds=1.0, tag=f"t{attempt}")
        except MigrationError as exc:
            if not ring_write_lost(exc):
                raise
            continue
        if not guest_wedged(result):
            break
    else:
        pytest.fail(f"the destination guest fell silent after all {ATTEMPTS} migrations "
                    "(QEMU 7.2 TCG losing guest writes?)")
    stream = result["stream"]
    assert result["migration"]["status"] == "completed"
    assert stream["sent"] > 600 and stream["seq_at_stop"] is not None
    assert stream["lost_to_guest"] == 0, stream["missing"][:20]
    assert stream["guest_reordered"] == 0 and stream["guest_duplicates"] == 0
    assert stream["lost_round_trip"] == 0
    assert stream["echo_reordered"] == 0 and stream["echo_duplicates"] == 0
    assert stream["ping_replies"] == stream["pings_sent"]
    source = result["agents"]["a"]
    assert source["tmdht_vnet_handovers_total{outcome=completed}"] == 1
    assert source["tmdht_vnet_stop_accountings_total{mode=exact}"] == 1
    assert result["agents"]["b"]["tmdht_vnet_held_frames"] == 0
