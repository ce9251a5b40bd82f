"""The switch's parts (forwarding table, hold buffer, flow order, handover windows), the agent's
configuration, the NIC receive-filter mirror and the unread-bytes query."""

from __future__ import annotations

import socket

import pytest

from tmdht.errors import ConfigError
from tmdht.ethernet import parse_mac, rarp_announce
from tmdht.fdb import ForwardingTable
from tmdht.handover import (
    FlowOrder,
    HeldFrame,
    HoldBuffer,
    InboundHandover,
    OutboundHandover,
    PortEvent,
    PortState,
    in_flow_order,
    transition,
)
from tmdht.vnet.ports import RxFilter
from tmdht.vnet.sockdiag import unread_by_peer
from tmdht.vnet_config import VnetConfig

M = parse_mac("52:54:00:00:00:01")


def held(origin: int, seq: int, size: int = 60) -> HeldFrame:
    return HeldFrame(origin, seq, 0, bytes(size))


def test_forwarding_table_takes_the_newest_version_whatever_the_order() -> None:
    fdb = ForwardingTable(ttl=10)
    assert fdb.learn(1, M, agent=5, version=2, now=0)
    assert not fdb.learn(1, M, agent=6, version=1, now=1)  # older news
    assert fdb.lookup(1, M, 1).agent == 5  # type: ignore[union-attr]
    assert not fdb.learn(1, M, agent=4, version=2, now=1)  # a tie: the higher agent id stays
    assert fdb.learn(1, M, agent=7, version=2, now=1)
    assert fdb.learn(1, M, agent=8, version=3, now=2)
    assert fdb.lookup(1, M, 11.9).agent == 8  # type: ignore[union-attr]
    assert fdb.lookup(1, M, 13) is None  # expired
    assert fdb.learn(1, M, agent=1, version=0, now=13)  # unknown version, nothing better known


def test_forwarding_table_is_bounded() -> None:
    fdb = ForwardingTable(capacity=3)
    for n in range(5):
        fdb.learn(1, bytes([0, 0, 0, 0, 0, n]), n + 1, 1, now=0)
    assert len(fdb) == 3
    assert fdb.lookup(1, bytes(6), 0) is None  # the oldest went first


def test_port_state_transitions_are_a_table() -> None:
    assert transition(PortState.RUNNING, PortEvent.STOP) is PortState.PAUSED
    assert transition(PortState.PAUSED, PortEvent.SUCCESSOR) is PortState.HANDING_OVER
    assert transition(PortState.HANDING_OVER, PortEvent.SUCCESSOR_RESUMED) is PortState.MOVED
    assert transition(PortState.HANDING_OVER, PortEvent.RESUME) is PortState.RUNNING
    assert transition(PortState.INCOMING, PortEvent.RESUME) is PortState.RUNNING
    assert transition(PortState.RUNNING, PortEvent.RESUME) is None
    assert transition(PortState.INCOMING, PortEvent.STOP) is None


def test_hold_buffer_bounds_count_and_bytes_and_keeps_older_frames() -> None:
    buffer = HoldBuffer(max_frames=3, max_bytes=200)
    assert buffer.push(held(1, 1)) and buffer.push(held(1, 2)) and buffer.push(held(1, 3))
    assert not buffer.push(held(1, 4))
    assert buffer.push_front([held(1, 0)]) == 1  # the newest held one made room
    assert [f.seq for f in buffer.drain()] == [0, 1, 2]
    small = HoldBuffer(max_frames=10, max_bytes=100)
    assert small.push(held(1, 1, 60)) and not small.push(held(1, 2, 60))


def test_flow_order_refuses_late_frames_and_rolls_back_stranded_ones() -> None:
    flows = FlowOrder()
    for seq in (1, 5, 9):
        assert flows.fresh(7, seq)
        flows.delivered(7, seq)
    assert not flows.fresh(7, 9) and not flows.fresh(7, 6)
    flows.roll_back([held(7, 5), held(7, 9)])
    assert flows.last(7) == 4 and flows.fresh(7, 5)
    flows.merge([(7, 3), (8, 2)])
    assert flows.last(7) == 4 and flows.last(8) == 2


def test_in_flow_order_sorts_each_origin_keeps_interleaving_drops_repeats() -> None:
    items = [held(1, 3), held(2, 10), held(1, 1), held(2, 9), held(1, 3), held(1, 2)]
    ordered = in_flow_order(items)
    assert [(f.origin, f.seq) for f in ordered] == [(1, 1), (2, 9), (1, 2), (2, 10), (1, 3)]


def test_outbound_handover_retains_until_resumed_and_honours_selective_acks() -> None:
    out = OutboundHandover(handover=1, successor=2, rto=0.03, max_items=4)
    out.begin(0.0)
    for seq in range(1, 4):
        out.add(held(9, seq), 0.0)
    assert out.full() is False and out.pending == 4
    out.acked_up_to(0, False, [(2, 3)])  # BEGIN, and items 2..3
    assert [h for h, _ in out.due(0.05)] == [1]  # only item 1 is resent
    out.acked_up_to(3, False)
    assert out.pending == 0 and len(out.retained) == 3  # kept in case the migration fails
    out.acked_up_to(3, True)
    assert out.retained == []
    restarted = OutboundHandover(handover=1, successor=2, rto=0.03, max_items=10)
    restarted.begin(0.0)
    restarted.add(held(9, 1), 0.0)
    assert [f.seq for f in restarted.restart(5, 6)] == [1] and restarted.next_hseq == 1


def test_inbound_handover_orders_items_and_skips_a_gap_after_its_timeout() -> None:
    inbound = InboundHandover(1, 2, max_pending=100, gap_timeout=0.5)
    assert inbound.receive(0, None, 0.0) == [(0, None)]
    assert inbound.receive(2, held(9, 2), 0.0) == []
    assert inbound.ranges(16) == ((2, 2),)
    assert inbound.receive(2, held(9, 2), 0.1) == [] and inbound.duplicates == 1
    assert inbound.give_up_gap(0.4) == []
    ready = inbound.give_up_gap(0.6)
    assert [h for h, _ in ready] == [2] and inbound.skipped == 1 and inbound.acked == 2


def test_config_from_file_environment_and_flags() -> None:
    toml = '[vnet]\ndata_dir = "/var/lib/x"\nseeds = ["10.0.0.1:7400"]\nsite = "dc1"\n'
    config = VnetConfig.from_sources(
        toml_text=toml, env={"TMDHT_VNET_HOLD_FRAMES": "100", "TMDHT_VNET_CONFIG": "ignored"},
        flags={"encrypt": "always", "tunnel_port": None})
    assert config.site == "dc1" and config.hold_frames == 100 and config.encrypt == "always"
    assert config.seeds == (("10.0.0.1", 7400),) and config.tunnel_port == 7410
    assert str(config.control_path) == "/var/lib/x/control.sock"
    for values, message in (
            ({"data_dir": "/x"}, "seeds are required"),
            ({"seeds": "h:1"}, "data_dir is required"),
            ({"data_dir": "/x", "seeds": "h:1", "site": ""}, "site"),
            ({"data_dir": "/x", "seeds": "h:1", "encrypt": "maybe"}, "encrypt"),
            ({"data_dir": "/x", "seeds": "h:1", "nonsense": 1}, "unknown setting")):
        with pytest.raises(ConfigError, match=message):
            VnetConfig.build(values)


def test_receive_filter_mirror_follows_qemus_rules() -> None:
    info = {"promiscuous": False, "main-mac": "52:54:00:00:00:01", "unicast": "normal",
            "multicast": "normal", "multicast-table": ["33:33:00:00:00:01"],
            "unicast-table": [], "vlan": "all", "broadcast-allowed": False}
    rx = RxFilter.from_qmp(info)
    frame = bytes(14)
    assert rx.accepts(M + M + b"\x08\x00")
    assert not rx.accepts(parse_mac("52:54:00:00:00:02") + M + b"\x08\x00")
    assert rx.accepts(rarp_announce(parse_mac("52:54:00:00:00:02")))  # broadcast (see docs)
    assert rx.accepts(parse_mac("33:33:00:00:00:01") + frame[6:])
    assert not rx.accepts(parse_mac("33:33:00:00:00:02") + frame[6:])
    assert RxFilter.from_qmp({**info, "multicast-overflow": True}).accepts(
        parse_mac("33:33:00:00:00:02") + frame[6:])
    assert RxFilter.from_qmp({**info, "promiscuous": True}).accepts(
        parse_mac("52:54:00:00:00:02") + frame[6:])
    tagged = M + M + b"\x81\x00" + (5).to_bytes(2, "big") + b"\x08\x00"
    assert not RxFilter.from_qmp({**info, "vlan": "none", "vlan-table": [7]}).accepts(tagged)
    assert RxFilter.from_qmp({**info, "vlan": "none", "vlan-table": [5]}).accepts(tagged)


def test_unread_bytes_of_the_peer() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        assert unread_by_peer(ours) == 0
        ours.sendall(b"x" * 1000)
        assert unread_by_peer(ours) == 1000
        theirs.recv(300)
        assert unread_by_peer(ours) == 700


def test_the_retransmission_timeout_follows_the_acknowledgement_time() -> None:
    out = OutboundHandover(handover=1, successor=2, rto=0.03, max_items=100)
    out.begin(0.0)
    for hseq in range(1, 6):
        out.add(held(9, hseq), 0.1 * hseq)
        out.acked_up_to(hseq, False, now=0.1 * hseq + 0.4)  # a slow destination: 400 ms
    assert 0.4 < out.rto <= 1.0
    out.add(held(9, 6), 1.0)
    assert out.due(1.2) == []  # no spurious resend at the old 30 ms
    assert [h for h, _ in out.due(1.0 + out.rto + 0.001)] == [6]


def test_a_busy_destination_gets_one_probe_not_the_whole_window_again() -> None:
    out = OutboundHandover(handover=1, successor=2, rto=0.03, max_items=100)
    out.begin(0.0)
    for hseq in range(1, 11):
        out.add(held(9, hseq), 0.0)
    out.acked_up_to(2, False, [(5, 5)], now=0.01)  # 3 and 4 are gaps, 6..10 may be queued
    assert [h for h, _ in out.due(0.05)] == [3, 4, 6]
