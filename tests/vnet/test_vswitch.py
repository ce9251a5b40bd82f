"""The virtual switch (sans-IO): forwarding, holding, handing over, ordering; fake clock."""

from __future__ import annotations

import random

import pytest
from support.vnet_harness import Net, frame, mac_of, number_of

from tmdht import tunnel
from tmdht.ethernet import BROADCAST
from tmdht.handover import PortState
from tmdht.vswitch import SwitchError

VNET = 42
M = mac_of(1)  # the migrating VM
P = mac_of(9)  # the peer


def numbers(frames: list[bytes]) -> list[int]:
    return [number_of(f) for f in frames if f[12:14] == b"\x88\xb5"]


def three_sites(**config: object) -> tuple[Net, object, object, object]:
    net = Net(**config)
    peer, source, dest = net.add("peer", "c"), net.add("source", "a"), net.add("dest", "b")
    net.attach(peer, "p", VNET, P)
    net.attach(source, "m", VNET, M)
    # the peer knows where M is (as after a first directory lookup): no floods below
    peer.switch.location_result(VNET, M, net.directory[(VNET, M)], net.now)
    net.settle()
    return net, peer, source, dest


def test_broadcast_reaches_every_port_and_unicast_is_learned() -> None:
    net, peer, source, _dest = three_sites()
    net.send_from(peer, "p", frame(BROADCAST, P, 1))
    assert numbers(source.vms["m"].received) == [1]
    net.send_from(source, "m", frame(P, M, 2))  # the source learned P from the broadcast
    assert numbers(peer.vms["p"].received) == [2]
    floods = [m for _, _, m in net.sent if isinstance(m, tunnel.Frame)
              and m.flags & tunnel.FrameFlags.FLOODED]
    assert floods == []


def test_unknown_unicast_is_flooded_then_looked_up() -> None:
    net = Net()
    peer, source, other = net.add("peer", "c"), net.add("source", "a"), net.add("other", "b")
    net.drop = lambda a, b, m: isinstance(m, tunnel.Location)  # nobody announces itself
    net.attach(peer, "p", VNET, P)
    net.attach(source, "m", VNET, M)
    net.attach(other, "o", VNET, mac_of(3))
    net.send_from(peer, "p", frame(M, P, 1))  # M unknown at the peer: flooded, looked up
    assert numbers(source.vms["m"].received) == [1]
    assert numbers(other.vms["o"].received) == []
    assert peer.switch.stats.flooded == 1
    net.send_from(peer, "p", frame(M, P, 2))  # now sent to the source only
    assert numbers(source.vms["m"].received) == [1, 2]
    assert peer.switch.stats.flooded == 1


def test_frames_between_sites_are_encrypted_and_within_a_site_not() -> None:
    net = Net()
    a1, a2, b1 = net.add("a1", "a"), net.add("a2", "a"), net.add("b1", "b")
    for agent, n in ((a1, 1), (a2, 2), (b1, 3)):
        net.attach(agent, "x", VNET, mac_of(n))
    net.sent.clear()
    encrypted = []
    original = net._apply

    def spy(agent, action):  # type: ignore[no-untyped-def]
        if type(action).__name__ == "Send":
            encrypted.append((agent.name, net.by_address[action.address].name, action.encrypt))
        original(agent, action)

    net._apply = spy  # type: ignore[method-assign]
    net.send_from(a1, "x", frame(BROADCAST, mac_of(1), 1))
    assert sorted(encrypted) == [("a1", "a2", False), ("a1", "b1", True)]
    assert numbers(a2.vms["x"].received) == numbers(b1.vms["x"].received) == [1]


def migrate(net: Net, peer, source, dest, *, rate: int = 2000, before: float = 0.05,
            paused: float = 0.1, after: float = 0.1, lost: int = 1, queued: int = 2) -> int:
    """Peer sends numbered frames to M at ``rate``/s while M migrates source -> dest."""
    n = 0
    step = 1.0 / rate

    def run_for(seconds: float) -> None:
        nonlocal n
        end = net.now + seconds
        while net.now < end:
            n += 1
            net.send_from(peer, "p", frame(M, P, n))
            net.advance(step, step)

    net.attach(dest, "m", VNET, M, incoming=True)
    run_for(before)
    net.stop(source, "m", lost=lost, queued=queued)
    run_for(paused)
    net.resume(dest, "m")
    run_for(after)
    net.advance(1.0)
    return n


def test_migration_delivers_every_frame_once_in_order() -> None:
    net, peer, source, dest = three_sites()
    n = migrate(net, peer, source, dest)
    got = numbers(source.vms["m"].received) + numbers(dest.vms["m"].received)
    assert got == list(range(1, n + 1))
    assert source.switch.port_state("m") is PortState.MOVED
    assert dest.switch.port_state("m") is PortState.RUNNING
    assert source.switch.stats.stranded_recovered == 3
    assert source.switch.stats.handovers_completed == 1
    # everyone learned the new location at a higher version
    record = net.directory[(VNET, M)]
    assert record.agent == dest.switch.agent_id and record.version == 2
    assert peer.switch.fdb.lookup(VNET, M, net.now).agent == dest.switch.agent_id


@pytest.mark.parametrize("seed", range(4))
def test_migration_survives_a_lossy_reordering_wan(seed: int) -> None:
    """Handover items lost or delayed on the WAN are retransmitted and put back in order;
    direct frames after the switch wait (fence) for the forwarded ones."""
    rng = random.Random(seed)
    net, peer, source, dest = three_sites()

    def lossy(a, b, message) -> bool:  # type: ignore[no-untyped-def]
        return isinstance(message, tunnel.HandoverFrame | tunnel.HandoverAck) and \
            rng.random() < 0.2

    net.drop = lossy
    net.delay = lambda a, b, m: rng.uniform(0, 0.01) if a.name == "source" else 0.0
    n = migrate(net, peer, source, dest, paused=0.2, after=0.3)
    net.drop = lambda a, b, m: False
    net.advance(3.0)
    got = numbers(source.vms["m"].received) + numbers(dest.vms["m"].received)
    assert got == list(range(1, n + 1))
    assert source.switch.stats.handover_retransmissions > 0


def test_failed_migration_delivers_everything_at_the_source() -> None:
    net, peer, source, dest = three_sites()
    net.attach(dest, "m", VNET, M, incoming=True)
    for n in range(1, 11):
        net.send_from(peer, "p", frame(M, P, n))
    net.stop(source, "m", lost=1, queued=0)
    for n in range(11, 21):
        net.send_from(peer, "p", frame(M, P, n))
    assert source.switch.port_state("m") is PortState.HANDING_OVER
    net.resume(source, "m")  # the migration failed: the VM runs at the source again
    for n in range(21, 26):
        net.send_from(peer, "p", frame(M, P, n))
    net.advance(1.0)
    assert numbers(source.vms["m"].received) == list(range(1, 26))
    assert numbers(dest.vms["m"].received) == []
    assert source.switch.stats.handovers_aborted == 1
    assert len(dest.switch._ports["m"].held) == 0


def test_unread_frames_are_left_to_qemu_when_the_vm_resumes_where_it_stopped() -> None:
    net, peer, source, _dest = three_sites()
    for n in range(1, 6):
        net.send_from(peer, "p", frame(M, P, n))
    net.stop(source, "m", lost=0, queued=2)
    for n in range(6, 9):
        net.send_from(peer, "p", frame(M, P, n))
    vm = source.vms["m"]
    net.resume(source, "m")
    # QEMU itself delivers frames 4 and 5 from its socket; the agent writes only 6..8 again
    assert numbers(vm.received) == [1, 2, 3, 6, 7, 8]
    assert numbers([f.frame for f in vm.written]) == [1, 2, 3, 4, 5, 6, 7, 8]


def test_hold_buffer_overflow_is_counted() -> None:
    net, peer, source, _dest = three_sites(hold_frames=5)
    net.stop(source, "m", lost=0, queued=0)
    for n in range(1, 9):
        net.send_from(peer, "p", frame(M, P, n))
    assert source.switch.stats.dropped["hold_overflow"] == 3
    net.resume(source, "m")
    assert numbers(source.vms["m"].received) == [1, 2, 3, 4, 5]


def test_held_frames_expire_and_are_counted() -> None:
    net, peer, source, _dest = three_sites(hold_timeout=1.0)
    net.stop(source, "m", lost=0, queued=0)
    for n in range(1, 4):
        net.send_from(peer, "p", frame(M, P, n))
    net.advance(1.5, 0.1)
    assert source.switch.stats.dropped["hold_timeout"] == 3
    net.resume(source, "m")
    assert numbers(source.vms["m"].received) == []


def test_a_restarted_destination_gets_every_retained_frame_again() -> None:
    net, peer, source, dest = three_sites()
    net.attach(dest, "m", VNET, M, incoming=True)
    for n in range(1, 6):
        net.send_from(peer, "p", frame(M, P, n))
    net.stop(source, "m", lost=0, queued=1)
    for n in range(6, 11):
        net.send_from(peer, "p", frame(M, P, n))
    assert len(dest.switch._ports["m"].held) == 6
    dest = net.restart("dest")  # killed with 6 frames held; a new process takes over
    net.attach(dest, "m", VNET, M, incoming=True)
    for n in range(11, 14):
        net.send_from(peer, "p", frame(M, P, n))
    net.resume(dest, "m")
    net.advance(1.0)
    for n in range(14, 17):
        net.send_from(peer, "p", frame(M, P, n))
    got = numbers(source.vms["m"].received) + numbers(dest.vms["m"].received)
    assert got == list(range(1, 17))


def test_a_restarted_destination_outranks_a_location_whose_record_expired() -> None:
    """Source and destination agents die; the destination's restarts after the source's record
    expired: it finds no record, and its claim still wins at the peer that knew the old
    location (its version floor)."""
    net, peer, source, dest = three_sites()
    net.attach(dest, "m", VNET, M, incoming=True)
    net.send_from(peer, "p", frame(M, P, 1))
    net.stop(source, "m", lost=0, queued=0)
    net.agents["source"].alive = False  # both agents die
    del net.by_address[source.address]
    dest = net.restart("dest", agent_id=1)  # ids are random: a lower one loses version ties
    net.directory.pop((VNET, bytes(M)))  # the source's lease ran out meanwhile
    net.attach(dest, "m", VNET, M, incoming=True)
    net.resume(dest, "m")
    net.advance(3.0)
    net.send_from(peer, "p", frame(M, P, 2))
    net.advance(1.0)
    assert numbers(dest.vms["m"].received)[-1:] == [2]
    assert net.directory[(VNET, bytes(M))].agent == dest.switch.agent_id


def test_a_dead_source_loses_only_what_it_held() -> None:
    net, peer, source, dest = three_sites(gap_timeout=0.2)
    net.attach(dest, "m", VNET, M, incoming=True)
    for n in range(1, 6):
        net.send_from(peer, "p", frame(M, P, n))
    net.drop = lambda a, b, m: isinstance(m, tunnel.HandoverFrame) and number_of(m.frame) == 7
    net.stop(source, "m", lost=0, queued=0)
    for n in range(6, 11):
        net.send_from(peer, "p", frame(M, P, n))
    net.agents["source"].alive = False
    del net.by_address[source.address]  # the source agent dies: 7 was never resent
    net.resume(dest, "m")
    net.advance(1.0)
    assert numbers(dest.vms["m"].received) == [6, 8, 9, 10]
    assert dest.switch._ports["m"].inbound is None or dest.switch._ports["m"].inbound.skipped == 1


def test_fence_waits_for_frames_still_coming_through_the_old_location() -> None:
    net, peer, source, dest = three_sites(fence_timeout=0.5)
    net.attach(dest, "m", VNET, M, incoming=True)
    net.stop(source, "m", lost=0, queued=0)
    # frames the peer sends via the source are slow to get through (WAN)
    net.delay = lambda a, b, m: 0.2 if isinstance(m, tunnel.HandoverFrame) else 0.0
    for n in range(1, 4):
        net.send_from(peer, "p", frame(M, P, n))
    net.resume(dest, "m")  # the peer now learns the new location and sends directly
    for n in range(4, 7):
        net.send_from(peer, "p", frame(M, P, n))
    assert numbers(dest.vms["m"].received) == []  # 4..6 wait behind 1..3
    net.advance(0.3)
    assert numbers(dest.vms["m"].received) == [1, 2, 3, 4, 5, 6]
    assert dest.switch.stats.fence_waits == 1 and dest.switch.stats.fence_timeouts == 0


def test_fence_gives_up_after_its_timeout() -> None:
    net, peer, source, dest = three_sites(fence_timeout=0.1)
    net.attach(dest, "m", VNET, M, incoming=True)
    net.stop(source, "m", lost=0, queued=0)
    net.drop = lambda a, b, m: isinstance(m, tunnel.Frame) and b.name == "source"
    for n in range(1, 3):
        net.send_from(peer, "p", frame(M, P, n))  # lost on the way to the old location
    net.drop = lambda a, b, m: False
    net.resume(dest, "m")
    net.send_from(peer, "p", frame(M, P, 3))
    assert numbers(dest.vms["m"].received) == []
    net.advance(0.2)
    assert numbers(dest.vms["m"].received) == [3]
    assert dest.switch.stats.fence_timeouts == 1


def test_duplicates_and_late_frames_are_dropped() -> None:
    net, peer, source, _dest = three_sites()
    net.send_from(peer, "p", frame(M, P, 1))
    datagram = [m for _, _, m in net.sent if isinstance(m, tunnel.Frame)][-1]
    later = tunnel.Frame(vnet=VNET, origin=datagram.origin, seq=datagram.seq + 5,
                         src_version=0, fence=0, flags=tunnel.FrameFlags(0),
                         frame=frame(M, P, 2))
    sw = source.switch
    sw.receive(tunnel.Envelope(datagram.origin, tunnel.Security.ENCRYPTED, later),
               peer.address, net.now)
    sw.receive(tunnel.Envelope(datagram.origin, tunnel.Security.ENCRYPTED, datagram),
               peer.address, net.now)
    net.settle()
    assert numbers(source.vms["m"].received) == [1, 2]
    assert sw.stats.dropped["late_or_duplicate"] == 1


def test_plaintext_from_another_site_is_refused() -> None:
    net, peer, source, _dest = three_sites()
    message = tunnel.Frame(vnet=VNET, origin=peer.switch.agent_id, seq=99, src_version=0,
                           fence=0, flags=tunnel.FrameFlags(0), frame=frame(M, P, 1))
    source.switch.receive(tunnel.Envelope(peer.switch.agent_id, tunnel.Security.AUTHENTICATED,
                                          message), peer.address, net.now)
    net.settle()
    assert source.switch.stats.dropped["plaintext"] == 1
    assert numbers(source.vms["m"].received) == []


def test_spoofed_source_mac_is_dropped() -> None:
    net, peer, source, _dest = three_sites()
    net.send_from(peer, "p", frame(M, mac_of(77), 1))
    assert peer.switch.stats.dropped["source_mac"] == 1
    assert source.vms["m"].received == []


def test_duplicate_mac_and_unknown_port_are_refused() -> None:
    net, _peer, source, _dest = three_sites()
    with pytest.raises(SwitchError):
        source.switch.add_port("again", VNET, M, now=net.now)
    with pytest.raises(SwitchError):
        source.switch.port_resumed("nope", net.now)
    with pytest.raises(SwitchError):
        source.switch.add_port("bcast", VNET, BROADCAST, now=net.now)


def test_a_destination_resumed_before_the_source_accounted_waits_for_the_handover() -> None:
    """QEMU answers the source's receive-index query only once it finished stopping, and the
    destination may resume first: it holds everything until the handover begins, so the
    source's older frames still come first."""
    net, peer, source, dest = three_sites()
    net.attach(dest, "m", VNET, M, incoming=True)
    for n in range(1, 11):
        net.send_from(peer, "p", frame(M, P, n))
    vm = source.vms["m"]
    vm.running = False
    source.switch.port_stopped("m", [], net.now)  # stopped, not accounted for yet
    net.settle()
    for n in range(11, 21):
        net.send_from(peer, "p", frame(M, P, n))
    net.resume(dest, "m")  # the peer learns the new location and sends there directly
    for n in range(21, 31):
        net.send_from(peer, "p", frame(M, P, n))
    assert numbers(dest.vms["m"].received) == []
    assert source.switch.port_state("m") is PortState.PAUSED
    stranded = vm.written[-2:]  # QEMU read 9 and 10 while it stopped: lost
    for item in stranded:
        vm.received.remove(item.frame)
    source.switch.port_accounted("m", lost=stranded, queued=[], now=net.now)
    net.settle()
    net.advance(1.0)
    assert numbers(vm.received) + numbers(dest.vms["m"].received) == list(range(1, 31))
    assert source.switch.port_state("m") is PortState.MOVED


def test_a_destination_gives_up_waiting_for_a_handover_that_never_comes() -> None:
    net, peer, source, dest = three_sites(handover_wait=0.5)
    net.attach(dest, "m", VNET, M, incoming=True)
    source.switch.port_stopped("m", [], net.now)
    net.settle()
    del net.by_address[source.address]  # the source agent dies before it accounted
    net.resume(dest, "m")
    net.send_from(peer, "p", frame(M, P, 1))
    assert numbers(dest.vms["m"].received) == []
    net.advance(1.0, 0.05)
    assert numbers(dest.vms["m"].received) == [1]
    assert any(n.event == "handover_missing" for n in dest.notices)


def test_frames_from_the_destination_site_reach_the_vm_at_the_source_until_it_moves() -> None:
    """A port waiting for an incoming VM does not capture frames for that MAC: the VM still
    runs at the source, and the destination's other ports reach it there."""
    net, _peer, source, dest = three_sites()
    net.attach(dest, "g", VNET, mac_of(3))
    net.attach(dest, "m", VNET, M, incoming=True)
    net.send_from(dest, "g", frame(M, mac_of(3), 1))
    assert numbers(source.vms["m"].received) == [1]
    net.stop(source, "m")
    net.send_from(dest, "g", frame(M, mac_of(3), 2))  # to the source, handed back over
    net.resume(dest, "m")
    net.send_from(dest, "g", frame(M, mac_of(3), 3))  # local now
    net.advance(1.0)
    assert numbers(dest.vms["m"].received) == [2, 3]
