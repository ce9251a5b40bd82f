"""Real processes: a store node (the MAC directory), three vnet agents on loopback, fake QEMUs.

The agents run as ``tmdht vnet run`` processes with their own sites (so the tunnels between them
are encrypted); fake VMs (``tests/support/fakeqemu.py``) speak QEMU's ``-netdev stream`` and QMP.
A peer at site C sends numbered frames to a VM at site A that migrates to site B; one test kills
the destination agent mid-migration, one the source agent.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.cluster import FAST_NODE_ARGS
from support.vnetproc import AgentProcess, FakeVm, wait_for

from tmdht.ethernet import parse_mac
from tmdht.node.local import LocalCluster

pytestmark = pytest.mark.slow

VNET = 7
M_MAC, P_MAC = "52:54:00:00:00:01", "52:54:00:00:00:09"


def frame(number: int) -> bytes:
    """A frame from the peer to M carrying ``number``."""
    return (parse_mac(M_MAC) + parse_mac(P_MAC) + b"\x88\xb5" + struct.pack(">Q", number)
            + bytes(42))


def numbers(frames: list[bytes]) -> list[int]:
    return [struct.unpack_from(">Q", f, 14)[0] for f in frames if f[12:14] == b"\x88\xb5"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with LocalCluster(tmp_path_factory.mktemp("vnet-cluster"), 1, replicas=1,
                      extra_args=FAST_NODE_ARGS) as local:
        yield local


class Sites:
    """Agents for sites A (source), B (destination), C (the peer) and their fake VMs."""

    def __init__(self, root: Path, cluster: LocalCluster) -> None:
        self.root = root
        self.cluster = cluster
        self.agents: dict[str, AgentProcess] = {}
        self.vms: list[FakeVm] = []

    def agent(self, site: str) -> AgentProcess:
        agent = AgentProcess(self.root / f"agent-{site}", seeds=[self.cluster.seed],
                             key_file=self.cluster.key_file, site=site).start()
        self.agents[site] = agent
        return agent

    def vm(self, name: str, mac: str, state: str = "running") -> FakeVm:
        vm = FakeVm(self.root / name, mac, state)
        self.vms.append(vm)
        return vm

    def close(self) -> None:
        for agent in self.agents.values():
            agent.close()
        for vm in self.vms:
            vm.close()


@pytest.fixture
def sites(tmp_path: Path, cluster: LocalCluster) -> Iterator[Sites]:
    s = Sites(tmp_path, cluster)
    try:
        yield s
    finally:
        s.close()


def setup_migration(sites: Sites) -> tuple[FakeVm, FakeVm, FakeVm]:
    a, b, c = sites.agent("a"), sites.agent("b"), sites.agent("c")
    peer, source = sites.vm("peer", P_MAC), sites.vm("source", M_MAC)
    dest = sites.vm("dest", M_MAC, state="inmigrate")
    c.attach("peer", VNET, peer)
    port = a.attach("m", VNET, source)
    assert port["state"] == "running" and port["mac"] == M_MAC
    assert b.attach("m", VNET, dest)["state"] == "incoming"
    wait_for(lambda: knows(sites.agents["c"], M_MAC, a), 10, "the peer's agent learns M")
    peer.send(frame(1))
    wait_for(lambda: numbers(source.received()) == [1], 10, "first frame at the source")
    return peer, source, dest


def knows(agent: AgentProcess, mac: str, where: AgentProcess) -> bool:
    """Whether ``agent`` forwards frames for ``mac`` to ``where``."""
    fdb = agent.request({"op": "status"})["status"]["fdb"]
    return any(e["mac"] == mac and e["agent"] == where.status["agent"] for e in fdb)


def send(peer: FakeVm, first: int, last: int) -> None:
    for n in range(first, last + 1):
        peer.send(frame(n))


def test_frames_follow_a_migrating_vm_once_and_in_order(sites: Sites) -> None:
    peer, source, dest = setup_migration(sites)
    send(peer, 2, 50)
    wait_for(lambda: len(numbers(source.received())) == 50, 10, "frames at the source")
    source.command("stop")  # the switch-over: QEMU stops the source VM
    send(peer, 51, 120)  # held by the source agent, handed over to the destination
    wait_for(lambda: sites.agents["b"].metrics().get(
        "tmdht_vnet_handover_frames_total{direction=received}", 0) >= 70, 10,
        "frames handed over")
    dest.command("resume")  # the destination VM runs
    send(peer, 121, 200)
    wait_for(lambda: len(numbers(dest.received())) == 150, 15, "frames at the destination")
    got = numbers(source.received()) + numbers(dest.received())
    assert got == list(range(1, 201))
    a, b = sites.agents["a"].metrics(), sites.agents["b"].metrics()
    assert a["tmdht_vnet_handovers_total{outcome=completed}"] == 1
    assert a.get("tmdht_vnet_stop_accountings_total{mode=exact}") == 1
    assert b["tmdht_vnet_held_frames"] == 0
    port = sites.agents["a"].request({"op": "status"})["status"]["ports"][0]
    assert port["state"] == "moved"
    # the peer's agent was told the new location and now sends to B directly
    c = sites.agents["c"].metrics()
    assert c["tmdht_vnet_frames_total{direction=sent}"] >= 199
    assert not any(k.startswith("tmdht_vnet_bad_datagrams") for k in (a | b | c))


def test_destination_agent_killed_mid_migration_loses_nothing(sites: Sites) -> None:
    """The source keeps every frame it handed over until the destination's VM runs: a
    destination agent that dies holding them is restarted, re-attaches its port from its data
    directory, asks again, and gets them all again."""
    peer, source, dest = setup_migration(sites)
    send(peer, 2, 30)
    source.command("stop")
    send(peer, 31, 80)
    b = sites.agents["b"]
    wait_for(lambda: b.metrics().get("tmdht_vnet_held_frames", 0) >= 50, 10, "held at B")
    held_at_kill = b.metrics()["tmdht_vnet_held_frames"]
    b.kill()  # SIGKILL: the frames it held are gone with it
    send(peer, 81, 100)
    b.start()  # same data directory: the port comes back (the VM is still incoming)
    wait_for(lambda: b.metrics().get("tmdht_vnet_held_frames", 0) >= 70, 15, "held again at B")
    dest.command("resume")
    send(peer, 101, 120)
    wait_for(lambda: len(numbers(dest.received())) >= 120 - len(numbers(source.received())),
             15, "frames at the destination")
    got = numbers(source.received()) + numbers(dest.received())
    assert held_at_kill >= 50
    assert got == list(range(1, 121))  # nothing lost, nothing twice, in order


def test_source_agent_killed_mid_migration_loses_at_most_what_it_held(sites: Sites) -> None:
    peer, source, dest = setup_migration(sites)
    send(peer, 2, 30)
    wait_for(lambda: len(numbers(source.received())) == 30, 10, "frames at the source")
    a = sites.agents["a"]
    # the destination is unreachable for a while: the source holds what arrives
    b = sites.agents["b"]
    b.kill()
    source.command("stop")
    send(peer, 31, 60)
    wait_for(lambda: a.metrics().get("tmdht_vnet_held_frames", 0) >= 30, 10, "held at A")
    held = a.metrics()["tmdht_vnet_held_frames"]
    a.kill()  # the source agent dies with 30 frames held
    b.start()
    dest.command("resume")
    # frames the peer sends to the dead source until it hears of the new location are lost
    # in the network like frames sent to a dead switch; wait for that, then send
    wait_for(lambda: knows(sites.agents["c"], M_MAC, b), 10, "the peer's agent learns M")
    send(peer, 61, 90)
    wait_for(lambda: numbers(dest.received())[-1:] == [90], 20, "frames at the destination")
    got = numbers(source.received()) + numbers(dest.received())
    lost = set(range(1, 91)) - set(got)
    assert got == sorted(set(got))  # in order, no duplicates
    assert lost <= set(range(31, 61)) and len(lost) <= held


def test_the_operator_commands(sites: Sites) -> None:
    """``tmdht vnet attach|status|detach`` as README.md shows them, against a running agent."""
    import json
    import subprocess
    import sys

    agent = sites.agent("a")
    vm = sites.vm("vm1", M_MAC)
    control = str(agent.control)

    def tmdht(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "tmdht.cli", "vnet", *args],
                              capture_output=True, text=True, timeout=60, check=False)

    done = tmdht("attach", "vm1", "--vnet", "42", "--net-socket", str(vm.net), "--qmp-socket",
                 str(vm.qmp), "--control-socket", control)
    assert done.returncode == 0, done.stderr
    assert "attached vm1: vnet 42, mac 52:54:00:00:00:01, running" in done.stdout
    status = json.loads(tmdht("status", "--control-socket", control, "--json").stdout)
    assert [(p["name"], p["state"]) for p in status["ports"]] == [("vm1", "running")]
    again = tmdht("attach", "vm1", "--vnet", "42", "--net-socket", str(vm.net), "--qmp-socket",
                  str(vm.qmp), "--control-socket", control)
    assert again.returncode == 1 and "attached already" in again.stderr
    assert tmdht("detach", "vm1", "--control-socket", control).returncode == 0
    assert json.loads(tmdht("status", "--control-socket", control, "--json").stdout)[
        "ports"] == []
    missing = tmdht("status", "--control-socket", str(sites.root / "nothing.sock"))
    assert missing.returncode == 2 and "no vnet agent" in missing.stderr
    assert json.loads((agent.data_dir / "ports.json").read_text()) == []


def test_the_directory_lives_in_the_store_ring(cluster: LocalCluster) -> None:
    """Records on the node: the newest location wins, an old one cannot come back, members
    of a network are listed, answers come from the node's RECORD_PUT/RECORD_GET."""
    import asyncio

    from tmdht.net.credentials import ClusterCredentials
    from tmdht.vnet.directory import VnetDirectory

    credentials = ClusterCredentials.from_file(cluster.key_file)
    mac = parse_mac("52:54:00:aa:bb:cc")

    def directory(agent: int, site: str) -> VnetDirectory:
        return VnetDirectory(seeds=[cluster.seed], credentials=credentials, host="127.0.0.1",
                             replicas=1,
                             lease=5.0, agent_id=agent, public_host="127.0.0.1",
                             tunnel_port=7000 + agent, site=site)

    async def main() -> None:
        a, b = directory(1, "a"), directory(2, "b")
        await a.start()
        await b.start()
        try:
            assert await a.lookup(99, mac) is None
            assert await a.publish(99, mac, 1)
            assert await b.publish(99, mac, 2)
            assert not await a.publish(99, mac, 1)  # stale: B's version 2 stays
            record = await a.lookup(99, mac)
            assert record is not None and (record.agent, record.version, record.port) == (
                2, 2, 7002)
            await a.join(99)
            await b.join(99)
            members = sorted((m.agent, m.site) for m in await a.members(99))
            assert members == [(1, "a"), (2, "b")]
            assert b.stats.puts >= 2 and a.stats.stale_puts == 1
        finally:
            await a.close()
            await b.close()

    asyncio.run(main())


def test_key_rotation_by_sighup_keeps_frames_flowing(tmp_path: Path) -> None:
    """SECURITY.md's three rotation steps as edits of the key file, each followed by SIGHUP to
    the store node and both agents (what `systemctl reload` sends): frames between the agents'
    VMs keep arriving after every step, the directory answers with the new key, and a bad file
    keeps the keys, counted as a failed reload."""
    import secrets
    import signal

    from tmdht.files import atomic_write

    old, new = secrets.token_hex(32), secrets.token_hex(32)
    steps = [f"1:{old}\n2:{new}\n", f"2:{new}\n1:{old}\n", f"2:{new}\n"]
    root = tmp_path / "rotation"
    root.mkdir()
    (root / "cluster.key").write_text(f"1:{old}\n")
    with LocalCluster(root, 1, replicas=1, extra_args=FAST_NODE_ARGS) as local:
        s = Sites(tmp_path, local)
        try:
            a, c = s.agent("a"), s.agent("c")
            peer, vm = s.vm("peer", P_MAC), s.vm("vm", M_MAC)
            c.attach("peer", VNET, peer)
            a.attach("m", VNET, vm)
            wait_for(lambda: knows(c, M_MAC, a), 10, "the peer's agent learns M")

            def reloads(agent: AgentProcess, outcome: str) -> float:
                return agent.metrics().get(
                    f"tmdht_cluster_key_reloads_total{{outcome={outcome}}}", 0.0)

            sent = 0
            for step, text in enumerate([*steps, "not a key\n"], 1):
                atomic_write(local.key_file, text, durable=False)
                node = local.nodes[0].proc
                assert node is not None
                node.send_signal(signal.SIGHUP)
                for agent in (a, c):
                    assert agent.proc is not None
                    agent.proc.send_signal(signal.SIGHUP)
                outcome, count = ("ok", step) if step <= len(steps) else ("failed", 1)
                for agent in (a, c):
                    wait_for(lambda agent=agent, outcome=outcome, count=count:
                             reloads(agent, outcome) >= count, 10,
                             f"agent {agent.status['agent']} reload {step}")
                peer.send(frame(sent + 1))
                peer.send(frame(sent + 2))
                sent += 2
                wait_for(lambda sent=sent: numbers(vm.received()) == list(range(1, sent + 1)), 10,
                         f"frames after step {step}")
            # The directory works with the new key alone: a VM attached now is found.
            other = s.vm("other", "52:54:00:00:00:02")
            a.attach("other", VNET, other)
            wait_for(lambda: knows(c, "52:54:00:00:00:02", a), 10,
                     "the peer's agent learns a VM attached after the rotation")
            log = (a.data_dir / "agent.log").read_text()
            assert "cluster key reload failed: cluster key file" in log
            assert "keeping key id 2 (accepting 2)" in log
        finally:
            s.close()
