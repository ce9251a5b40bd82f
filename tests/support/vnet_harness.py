"""An in-memory network of virtual switches (sans-IO) with a fake clock and directory.

Every message really goes through :class:`tmdht.tunnel.TunnelCodec` (encode, decode), so the
format is exercised too; the network may drop, delay or reorder datagrams.
"""

from __future__ import annotations

import collections
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from tmdht import tunnel
from tmdht.auth import ClusterKey
from tmdht.ethernet import MacAddress
from tmdht.vswitch import (
    Join,
    Leave,
    LocationRecord,
    Lookup,
    MemberRecord,
    Notice,
    PortFrame,
    Publish,
    Send,
    SwitchConfig,
    VirtualSwitch,
    Withdraw,
    WriteFrames,
)

KEY = [ClusterKey(1, bytes(range(32)))]
ETHERTYPE_TEST = 0x88B5  # IEEE local experimental


def mac_of(n: int) -> MacAddress:
    return MacAddress(bytes([0x52, 0x54, 0, 0, 0, n]))


def frame(dst: bytes, src: bytes, number: int, size: int = 64) -> bytes:
    """A test frame carrying ``number`` (u64) after the header."""
    body = struct.pack(">Q", number).ljust(size - 14, b"\0")
    return dst + src + struct.pack(">H", ETHERTYPE_TEST) + body


def number_of(data: bytes) -> int:
    return int(struct.unpack_from(">Q", data, 14)[0])


@dataclass
class Vm:
    """A fake VM behind a port: what was written to it, what it really received."""

    written: list[PortFrame] = field(default_factory=list)
    received: list[bytes] = field(default_factory=list)
    running: bool = True


@dataclass
class Agent:
    name: str
    switch: VirtualSwitch
    codec: tunnel.TunnelCodec
    address: tuple[str, int]
    vms: dict[str, Vm] = field(default_factory=dict)
    notices: list[Notice] = field(default_factory=list)
    alive: bool = True


class Net:
    """Agents, a directory, and a datagram network between them."""

    def __init__(self, **config: object) -> None:
        self.now = 1_700_000_000.0
        self.agents: dict[str, Agent] = {}
        self.by_address: dict[tuple[str, int], Agent] = {}
        self.directory: dict[tuple[int, bytes], LocationRecord] = {}
        self.members: dict[int, dict[int, MemberRecord]] = collections.defaultdict(dict)
        self.in_flight: collections.deque[tuple[float, tuple[str, int], tuple[str, int], bytes]] \
            = collections.deque()
        self.drop: Callable[[Agent, Agent, tunnel.Message], bool] = lambda a, b, m: False
        self.delay: Callable[[Agent, Agent, tunnel.Message], float] = lambda a, b, m: 0.0
        self.directory_up = True
        self.config = config
        self.sent: list[tuple[str, str, tunnel.Message]] = []
        self._ids = iter(range(0x1000, 0x2000))

    def add(self, name: str, site: str = "a", agent_id: int | None = None) -> Agent:
        address = (f"10.0.0.{len(self.agents) + 1}", 7000)
        agent_id = agent_id if agent_id is not None else next(self._ids)
        config = SwitchConfig(agent_id=agent_id, host=address[0], port=address[1], site=site,
                              **self.config)  # type: ignore[arg-type]
        agent = Agent(name, VirtualSwitch(config), tunnel.TunnelCodec(agent_id, KEY), address)
        self.agents[name] = agent
        self.by_address[address] = agent
        return agent

    def restart(self, name: str, agent_id: int | None = None) -> Agent:
        """The agent process died and a new one (new id, empty state) took its address."""
        old = self.agents[name]
        old.alive = False
        del self.by_address[old.address]
        agent_id = agent_id if agent_id is not None else next(self._ids)
        config = SwitchConfig(agent_id=agent_id, host=old.address[0], port=old.address[1],
                              site=old.switch.config.site, version_floor=int(self.now * 1000),
                              **self.config)  # type: ignore[arg-type]
        agent = Agent(name, VirtualSwitch(config), tunnel.TunnelCodec(agent_id, KEY), old.address,
                      vms=old.vms)
        self.agents[name] = agent
        self.by_address[old.address] = agent
        for members in self.members.values():
            members.pop(old.switch.agent_id, None)
        return agent

    # -- driving -------------------------------------------------------------------------------

    def attach(self, agent: Agent, port: str, vnet: int, mac: bytes, *,
               incoming: bool = False) -> Vm:
        vm = agent.vms.setdefault(port, Vm(running=not incoming))
        agent.switch.add_port(port, vnet, mac, now=self.now, incoming=incoming,
                              running=vm.running)
        self.settle()
        return vm

    def send_from(self, agent: Agent, port: str, data: bytes) -> None:
        agent.switch.port_frames(port, [data], self.now)
        self.settle()

    def stop(self, agent: Agent, port: str, *, lost: int = 0, queued: int = 0) -> None:
        """The VM stops: the last ``lost + queued`` frames written never reached it."""
        vm = agent.vms[port]
        vm.running = False
        agent.switch.port_stopped(port, [], self.now)
        self.settle()
        stranded = vm.written[len(vm.written) - lost - queued:] if lost + queued else []
        for item in stranded:
            vm.received.remove(item.frame)
        agent.switch.port_accounted(port, lost=stranded[:lost], queued=stranded[lost:],
                                    now=self.now)
        self.settle()

    def resume(self, agent: Agent, port: str) -> None:
        agent.vms[port].running = True
        agent.switch.port_resumed(port, self.now)
        self.settle()

    def advance(self, seconds: float, step: float = 0.001) -> None:
        end = self.now + seconds
        while self.now < end:
            self.now = min(end, self.now + step)
            for agent in list(self.agents.values()):
                due = agent.switch.next_timer()
                if due is not None and due <= self.now:
                    agent.switch.handle_timer(self.now)
            self.settle()

    def settle(self, rounds: int = 10000) -> None:
        for _ in range(rounds):
            progressed = False
            for agent in list(self.agents.values()):
                actions = agent.switch.take_actions()
                progressed |= bool(actions)
                for action in actions:
                    self._apply(agent, action)
            while self.in_flight and self.in_flight[0][0] <= self.now:
                _, src, dst, datagram = self.in_flight.popleft()
                receiver = self.by_address.get(dst)
                if receiver is None:
                    continue
                envelope = receiver.codec.decode(datagram, now=self.now)
                receiver.switch.receive(envelope, src, self.now)
                progressed = True
            if not progressed:
                return
        raise AssertionError("the network did not settle")

    def _apply(self, agent: Agent, action: object) -> None:
        sw = agent.switch
        if isinstance(action, WriteFrames):
            vm = agent.vms[action.port]
            vm.written.extend(action.frames)
            vm.received.extend(f.frame for f in action.frames)
        elif isinstance(action, Send):
            target = self.by_address.get(action.address)
            self.sent.append((agent.name, target.name if target else "?", action.message))
            if target is None or self.drop(agent, target, action.message):
                return
            datagram = agent.codec.encode(action.message, now=self.now, encrypt=action.encrypt)
            at = self.now + self.delay(agent, target, action.message)
            self.in_flight.append((at, agent.address, action.address, datagram))
            self.in_flight = collections.deque(sorted(self.in_flight, key=lambda x: x[0]))
        elif isinstance(action, Publish):
            key = (action.vnet, bytes(action.mac))
            old = self.directory.get(key)
            if old is None or action.version >= old.version:
                self.directory[key] = LocationRecord(sw.agent_id, agent.address[0],
                                                     agent.address[1], action.version,
                                                     action.gone)
        elif isinstance(action, Lookup):
            record = self.directory.get((action.vnet, bytes(action.mac))) \
                if self.directory_up else None
            sw.location_result(action.vnet, action.mac, record, self.now)
        elif isinstance(action, Join):
            self.members[action.vnet][sw.agent_id] = MemberRecord(
                sw.agent_id, agent.address[0], agent.address[1], sw.config.site)
            sw.members_result(action.vnet, list(self.members[action.vnet].values()), self.now)
        elif isinstance(action, Leave):
            self.members[action.vnet].pop(sw.agent_id, None)
        elif isinstance(action, Notice):
            agent.notices.append(action)
        elif isinstance(action, Withdraw):
            pass
        else:
            raise AssertionError(f"unexpected action {action!r}")
