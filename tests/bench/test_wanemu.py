"""The WAN emulation of bench/migrate.py: the relay's delay line and wire accounting, and (as
root) two real namespaces joined through the relay process."""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import wanemu
from wanemu import VNET_HDR_LEN, DelayLine, Setting, Wan, wire_bytes


def tcp_packet(payload: int, gso_size: int = 0) -> bytes:
    """A vnet header and an IPv4/TCP packet (20 + 32 header bytes) with ``payload`` bytes."""
    vnet = struct.pack("<BBHHHH", 0, 1 if gso_size else 0, 52, gso_size, 34, 16)
    ip = bytes([0x45, 0]) + (52 + payload).to_bytes(2, "big") + bytes(5) + bytes([6]) + bytes(10)
    tcp = bytes(12) + bytes([8 << 4]) + bytes(19)
    return vnet + ip + tcp + bytes(payload)


def test_delay_line_releases_in_order_after_the_delay() -> None:
    line = DelayLine(delay=0.010, limit=1 << 20)
    first, second = tcp_packet(100), tcp_packet(200)
    assert line.push(first, now=1.000)
    assert line.push(second, now=1.004)
    assert line.next_due() == pytest.approx(1.010)
    assert line.pop_due(1.009) == []
    assert line.pop_due(1.010) == [first]
    assert line.pop_due(1.020) == [second]
    assert line.next_due() is None
    assert line.stats.packets == 2
    assert line.stats.bytes == len(first) + len(second) - 2 * VNET_HDR_LEN
    assert line.queued_bytes == 0


def test_delay_line_drops_what_does_not_fit_and_counts_it() -> None:
    packet = tcp_packet(1000)
    line = DelayLine(delay=1.0, limit=2 * len(packet) + 10)
    assert line.push(packet, 0.0) and line.push(packet, 0.0)
    assert not line.push(packet, 0.0)
    assert line.stats.dropped_packets == 1
    assert line.stats.dropped_bytes == len(packet) - VNET_HDR_LEN
    assert line.stats.max_queued_bytes == 2 * len(packet)
    assert len(line.pop_due(1.0)) == 2
    assert line.push(packet, 1.0)  # room again


def test_wire_bytes_cut_tso_packets_into_segments_with_their_headers() -> None:
    plain = tcp_packet(1000)
    assert wire_bytes(plain) == (len(plain) - VNET_HDR_LEN, 1)
    tso = tcp_packet(10_000, gso_size=1448)
    segments = -(-10_000 // 1448)
    assert wire_bytes(tso) == (10_052 + (segments - 1) * 52, segments)
    assert wire_bytes(b"\x00" * 4) == (0, 0)
    line = DelayLine(delay=0.0, limit=1 << 20)
    line.push(tso, 0.0)
    line.pop_due(0.0)
    assert line.stats.wire_packets == segments
    assert line.stats.packets == 1


def test_rates_and_settings_parse() -> None:
    assert wanemu.rate_bits("100mbit") == 100_000_000
    assert wanemu.rate_bits("1gbit") == 10**9
    assert wanemu.rate_bits("uncapped") is None
    assert wanemu.parse_settings("100mbit,uncapped", "0,80") == [
        Setting("100mbit", 0.0), Setting("100mbit", 80.0), Setting("uncapped", 0.0),
        Setting("uncapped", 80.0)]
    assert Setting("1gbit", 20).label == "1 Gbit/s, 20 ms"


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")


@needs_root
@pytest.mark.slow
def test_relay_adds_the_delay_caps_the_rate_and_cleans_up(tmp_path: Path) -> None:
    with Wan(tmp_path) as wan:
        namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                                    check=True).stdout
        assert wan.src in namespaces and wan.dst in namespaces
        wan.shape(Setting("100mbit", 20))
        check = wan.self_check(seconds=1.5, pings=10)
        assert 19.5 < check["rtt_ms_median"] < 30
        assert 40 < check["bulk_mbit_s"] < 101
        counters = wan.counters()
        assert counters["relay"]["up"]["bytes"] > 10 << 20
        assert counters["relay"]["up"]["wire_bytes"] >= counters["relay"]["up"]["bytes"]
        # the tun counts what it handed the relay: the same bytes, drops included
        dropped = counters["relay"]["up"]["dropped_bytes"]
        assert counters["interface"]["up"] == counters["relay"]["up"]["bytes"] + dropped
        assert counters["cpu"]["check"] > 0 and counters["cpu"]["relay"] > 0
        wan.shape(Setting("uncapped", 0))
        assert wan.self_check(seconds=1.0, pings=5)["rtt_ms_median"] < 5
        cgroup = wan.cgroup
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                                check=True).stdout
    assert wan.src not in namespaces and wan.dst not in namespaces
    assert not cgroup.exists()


@needs_root
def test_leftovers_of_a_dead_run_are_removed(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    name = f"{wanemu.PREFIX}src-{dead.pid}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        wanemu.remove_stale(log=io.StringIO())
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                                check=True).stdout.split()
        assert name not in listed
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
