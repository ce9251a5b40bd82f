"""The virtual switch of one vnet agent: forwarding and migration logic, sans-IO.

One :class:`VirtualSwitch` per agent. It owns the agent's *ports* (one per VM NIC, each in one
virtual network with one MAC), the forwarding table, the sequence numbering of frames and every
handover; it does no IO and reads no clock. The agent feeds it frames from its ports
(:meth:`port_frames`), datagrams from other agents (:meth:`receive`), the VM's run state
(:meth:`port_stopped`, :meth:`port_accounted`, :meth:`port_resumed`), directory answers
(:meth:`location_result`, :meth:`members_result`) and timers (:meth:`handle_timer` when
:meth:`next_timer` is due), and carries out the :data:`Action` objects :meth:`take_actions`
returns: write frames to a port, send a tunnel message, publish or look up a directory record.

Forwarding. A frame from a port gets the agent's next sequence number (``seq``: one counter for
everything the agent sends). Broadcast and multicast go to every local port of the network and
to every other agent of the network; unicast goes to the local port, or to the agent the
forwarding table names (learned from the directory, LOCATION messages and frames), or, if
unknown, to every agent of the network flagged FLOODED (only the hosting agent delivers it) while
the directory is asked. A port delivers a frame only if its ``seq`` is higher than the last one
it delivered from the same origin (:class:`tmdht.handover.FlowOrder`): within a flow there are
no duplicates and no reordering, whatever paths the frames took.

Migration (source S, destination D, VM with MAC M):

1. D's port for M is added as *incoming*; D asks the directory where M is and sends S PREPARE.
2. The VM stops at S (QMP STOP): S stops writing to it and holds M's frames. S's agent then
   accounts for the frames it had written that the VM never received (:meth:`port_accounted`:
   unread in the socket, or read by QEMU while it was stopping); they go before the held ones.
3. With D known and the accounting done, S sends D a BEGIN (M's flow marks and location
   version) and every held frame as a numbered, acknowledged, retransmitted HANDOVER_FRAME, and
   from then on every new frame for M too. D holds them. S keeps them all until D says its VM
   resumed; if S's VM resumes instead (the migration failed) S sends ABORT and delivers them
   itself.
4. The VM resumes at D (QMP RESUME): D delivers the held frames in flow order, claims M at a
   higher location version (directory record, LOCATION to every agent of the network and to S),
   announces M with a RARP frame, and acknowledges S with RESUMED. S's port becomes MOVED.
5. Agents still sending to S are forwarded by S and told the new location; each switches to D
   with a *fence* on its next frames (the last seq it sent via S): D delivers them only after
   that frame came through S, or after ``fence_timeout``.

Everything is bounded (hold buffers, handover windows, tables); what does not fit is dropped
and counted in :attr:`VirtualSwitch.stats`.
"""

from __future__ import annotations

import bisect
import collections
import enum
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Final, NamedTuple, TypeAlias

from tmdht import tunnel
from tmdht.errors import DecodeError, TmdhtError, UsageError
from tmdht.ethernet import (
    BROADCAST,
    MacAddress,
    format_mac,
    frame_addresses,
    is_group,
    rarp_announce,
)
from tmdht.ethernet import sender_ipv4 as snoop_ipv4
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
from tmdht.tunnel import FrameFlags, LocationFlags, PrepareStatus, Security

__all__ = [
    "Action",
    "EncryptPolicy",
    "Join",
    "Leave",
    "LocationRecord",
    "Lookup",
    "MemberRecord",
    "Notice",
    "PortFrame",
    "Publish",
    "Send",
    "SwitchConfig",
    "SwitchError",
    "SwitchStats",
    "VirtualSwitch",
    "WriteFrames",
]

_U64: Final = (1 << 64) - 1
_FLOODED: Final = int(FrameFlags.FLOODED)
_FORWARDED: Final = int(FrameFlags.FORWARDED)
_GOLDEN: Final = 0x9E3779B97F4A7C15


class SwitchError(TmdhtError):
    """A port operation the switch cannot do (unknown port, duplicate MAC...)."""


class EncryptPolicy(enum.Enum):
    """Which tunnel datagrams are encrypted."""

    WAN = "wan"
    """Those to agents of another site (and to agents whose site is not known yet)."""
    ALWAYS = "always"
    NEVER = "never"
    """Authenticate only (also what open mode, without a key, can do)."""


@dataclass(frozen=True, slots=True)
class SwitchConfig:
    """Settings of one switch; times in seconds."""

    agent_id: int
    """This agent's id (u64, not 0; random per agent process)."""
    host: str
    """Address other agents reach this agent's tunnel socket at."""
    port: int
    """UDP port of the tunnel socket."""
    site: str = "default"
    """This agent's site (data center): tunnels to other sites are encrypted."""
    encrypt: EncryptPolicy = EncryptPolicy.WAN
    can_encrypt: bool = True
    """False in open mode (no key): then nothing is encrypted or required to be."""
    hold_frames: int = 8192
    """Frames one port holds (or keeps for a handover) at most."""
    hold_bytes: int = 16 << 20
    """Bytes one port holds at most."""
    hold_timeout: float = 120.0
    """Held frames older than this are dropped (a VM paused for long, a destination that never
    resumes)."""
    handover_rto: float = 0.03
    """Least retransmission timeout of a handover item (it follows the acknowledgement time
    and doubles per retry, up to 1 s)."""
    ack_delay: float = 0.004
    """The destination acknowledges at most this long after a handover item arrived ..."""
    ack_every: int = 16
    """... or after this many items, whichever comes first."""
    gap_timeout: float = 3.0
    """A gap in a handover (an item lost for good: its source crashed) is skipped after this."""
    fence_timeout: float = 0.25
    """Longest wait of a fenced frame for the frames before it."""
    fence_period: float = 2.0
    """After a destination's location changes, frames to it carry a fence for this long."""
    accounting_timeout: float = 5.0
    """Longest wait after a stop for the stranded-frames accounting (then none is assumed)."""
    handover_wait: float = 2.0
    """How long a destination whose VM resumed waits for the handover its source accepted
    before delivering without it (the source crashed, or never finished stopping)."""
    claim_timeout: float = 2.0
    """A destination that resumed before the directory said the MAC's version claims it after
    this long without the answer (then with at least ``version_floor``)."""
    version_floor: int = 0
    """Lowest version this switch claims a location with. The agent passes its start time in
    milliseconds since the epoch: a restarted agent that finds no record of a MAC (its old
    location's lease expired) or no answer still outranks what earlier agents announced,
    rather than claiming a version the peers already hold for the old location."""
    prepare_retry: float = 0.2
    prepare_attempts: int = 50
    lookup_ttl: float = 60.0
    """How long a location from the directory is trusted without news."""
    negative_ttl: float = 0.5
    """How long to wait before asking the directory again about an unknown MAC."""
    redirect_interval: float = 0.2
    """At most one LOCATION per (agent, MAC) in this interval, to agents still sending to the
    old location."""
    inbound_ttl: float = 120.0
    """How long a finished handover keeps ordering frames after its last item."""
    flows_per_port: int = 4096
    fdb_capacity: int = 65536
    max_ports: int = 4096

    def __post_init__(self) -> None:
        if not 0 < self.agent_id <= _U64:
            raise UsageError("agent_id must be a non-zero u64")
        if not 0 < self.port < 65536:
            raise UsageError(f"tunnel port {self.port} out of range")
        if not 0 <= self.version_floor < _U64:
            raise UsageError("version_floor must be a u64 below the largest")
        if self.hold_frames < 1 or self.hold_bytes < 1:
            raise UsageError("hold_frames and hold_bytes must be >= 1")
        for name in ("hold_timeout", "handover_rto", "gap_timeout", "fence_timeout",
                     "accounting_timeout", "prepare_retry", "lookup_ttl", "negative_ttl"):
            if not getattr(self, name) > 0:
                raise UsageError(f"{name} must be > 0")


class PortFrame(NamedTuple):
    """A frame for a port, with its origin and seq (the agent gives them back when it accounts
    for frames the VM did not receive)."""

    frame: bytes
    origin: int
    seq: int


@dataclass(frozen=True, slots=True)
class WriteFrames:
    """Write these frames to the port's VM, in order."""

    port: str
    frames: tuple[PortFrame, ...]


@dataclass(frozen=True, slots=True)
class Send:
    """Send a tunnel message to an agent (encrypted or not, as decided here)."""

    agent: int
    address: tuple[str, int]
    message: tunnel.Message
    encrypt: bool


@dataclass(frozen=True, slots=True)
class Publish:
    """Write (and keep renewing) the directory's location record of a MAC: this agent, at
    ``version``; ``gone``: the MAC is gone (written once, not renewed)."""

    vnet: int
    mac: bytes
    version: int
    gone: bool = False


@dataclass(frozen=True, slots=True)
class Withdraw:
    """Stop renewing the location record of a MAC (it moved away; the new host renews it)."""

    vnet: int
    mac: bytes


@dataclass(frozen=True, slots=True)
class Lookup:
    """Ask the directory where a MAC is (answer with :meth:`VirtualSwitch.location_result`)."""

    vnet: int
    mac: bytes


@dataclass(frozen=True, slots=True)
class Join:
    """This agent hosts ports of ``vnet``: publish membership, fetch the members."""

    vnet: int


@dataclass(frozen=True, slots=True)
class Leave:
    """This agent hosts no more ports of ``vnet``."""

    vnet: int


@dataclass(frozen=True, slots=True)
class Notice:
    """Something worth a log line."""

    port: str
    event: str
    detail: str = ""


Action: TypeAlias = WriteFrames | Send | Publish | Withdraw | Lookup | Join | Leave | Notice


@dataclass(frozen=True, slots=True)
class LocationRecord:
    """A directory answer: where a MAC is."""

    agent: int
    host: str
    port: int
    version: int
    gone: bool = False


@dataclass(frozen=True, slots=True)
class MemberRecord:
    """A directory answer: an agent hosting a network."""

    agent: int
    host: str
    port: int
    site: str


@dataclass
class SwitchStats:
    """Counters of one switch (exported as Prometheus metrics by the agent)."""

    frames_from_ports: int = 0
    frames_to_ports: int = 0
    frames_sent: int = 0
    frames_received: int = 0
    flooded: int = 0
    forwarded: int = 0
    held: int = 0
    released: int = 0
    handovers_started: int = 0
    handovers_completed: int = 0
    handovers_aborted: int = 0
    handover_frames_sent: int = 0
    handover_frames_received: int = 0
    handover_retransmissions: int = 0
    handover_frames_skipped: int = 0
    stranded_recovered: int = 0
    """Frames written to a VM that it never received, recovered at its stop."""
    fence_waits: int = 0
    fence_timeouts: int = 0
    lookups: int = 0
    redirects: int = 0
    mac_conflicts: int = 0
    """Another agent claimed a MAC whose VM runs here (a cloned VM, an operator error)."""
    dropped: dict[str, int] = field(default_factory=lambda: collections.defaultdict(int))
    """Frames dropped, by reason."""


@dataclass(slots=True)
class _Peer:
    agent: int
    address: tuple[str, int]
    site: str | None = None


@dataclass(slots=True)
class _Predecessor:
    """The destination side's view of a migration's source."""

    handover: int
    agent: int | None = None
    version: int = 0
    attempts: int = 0
    next_try: float = 0.0
    replied: bool = False
    accepted: bool = False
    """The source will hand the VM's frames over."""


@dataclass(slots=True)
class _Fence:
    """Frames of one origin waiting until that origin's frame ``fence`` was delivered."""

    fence: int
    since: float
    deadline: float
    frames: list[HeldFrame] = field(default_factory=list)
    """Ordered by seq."""


@dataclass(slots=True)
class _Port:
    name: str
    vnet: int
    mac: MacAddress
    state: PortState
    held: HoldBuffer
    flows: FlowOrder
    version: int = 0
    claimed: bool = False
    located: bool = False
    """The directory answered (or the source told) what version the MAC had."""
    claim_deadline: float | None = None
    gate_deadline: float | None = None
    """A destination that resumed before its handover began holds frames until it begins (the
    source's frames are older than anything arriving directly) or until this deadline."""
    lost: list[HeldFrame] = field(default_factory=list)
    queued: list[HeldFrame] = field(default_factory=list)
    accounted: bool = True
    accounting_deadline: float | None = None
    successor: tuple[int, int] | None = None  # (agent, handover id)
    out: OutboundHandover | None = None
    inbound: InboundHandover | None = None
    predecessor: _Predecessor | None = None
    parked: dict[int, _Fence] = field(default_factory=dict)
    moved_to: int | None = None
    ack_due: float | None = None
    ip: str | None = None


class VirtualSwitch:
    """See the module docstring."""

    def __init__(self, config: SwitchConfig) -> None:
        self.config = config
        self.agent_id = config.agent_id
        self.stats = SwitchStats()
        self.fdb = ForwardingTable(capacity=config.fdb_capacity, ttl=config.lookup_ttl)
        self._ports: dict[str, _Port] = {}
        self._by_mac: dict[tuple[int, bytes], _Port] = {}
        self._peers: dict[int, _Peer] = {}
        self._members: dict[int, set[int]] = {}
        self._seq = 0
        self._handovers = 0
        self._actions: list[Action] = []
        self._writes: dict[str, list[PortFrame]] = {}
        self._sent_seq: collections.OrderedDict[tuple[int, bytes], int] = (
            collections.OrderedDict())
        self._fences: dict[tuple[int, bytes], tuple[int, float]] = {}
        self._lookup_after: dict[tuple[int, bytes], float] = {}
        self._redirected: dict[tuple[int, int, bytes], float] = {}

    # -- outputs ------------------------------------------------------------------------------

    def take_actions(self) -> list[Action]:
        """What to do now, in order (port writes first); the queue is empty afterwards."""
        actions: list[Action] = [WriteFrames(port, tuple(frames))
                                 for port, frames in self._writes.items() if frames]
        self._writes.clear()
        actions += self._actions
        self._actions = []
        return actions

    def _send(self, agent: int, message: tunnel.Message) -> None:
        peer = self._peers.get(agent)
        if peer is None:
            self.stats.dropped["no_route"] += 1
            return
        self._actions.append(Send(agent, peer.address, message, self._encrypt_to(peer)))

    def _encrypt_to(self, peer: _Peer) -> bool:
        policy = self.config.encrypt
        if not self.config.can_encrypt or policy is EncryptPolicy.NEVER:
            return False
        return policy is EncryptPolicy.ALWAYS or peer.site != self.config.site

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    # -- ports --------------------------------------------------------------------------------

    def add_port(self, name: str, vnet: int, mac: bytes, *, now: float, incoming: bool = False,
                 running: bool = True) -> None:
        """Add a VM port. ``incoming``: a migration destination (held until it resumes);
        otherwise ``running`` says whether the VM runs now."""
        if name in self._ports:
            raise SwitchError(f"port {name!r} exists")
        if len(self._ports) >= self.config.max_ports:
            raise SwitchError(f"at most {self.config.max_ports} ports")
        if len(mac) != 6 or is_group(mac):
            raise SwitchError("a port's MAC must be a unicast address")
        key = (vnet, bytes(mac))
        if key in self._by_mac:
            raise SwitchError(f"MAC already attached in network {vnet} "
                              f"(port {self._by_mac[key].name})")
        state = PortState.INCOMING if incoming else (
            PortState.RUNNING if running else PortState.PAUSED)
        port = _Port(name, vnet, MacAddress(bytes(mac)), state,
                     HoldBuffer(max_frames=self.config.hold_frames,
                                max_bytes=self.config.hold_bytes),
                     FlowOrder(self.config.flows_per_port))
        if incoming:
            port.predecessor = _Predecessor(self._new_handover_id(),
                                            next_try=now + self.config.prepare_retry)
        first_in_network = not any(p.vnet == vnet for p in self._ports.values())
        self._ports[name] = port
        self._by_mac[key] = port
        if first_in_network:
            self._members.setdefault(vnet, set())
            self._actions.append(Join(vnet))
        self.stats.lookups += 1
        self._actions.append(Lookup(vnet, port.mac))
        self._actions.append(Notice(name, "attached", state.value))

    def remove_port(self, name: str, now: float) -> None:
        """Remove a port (its VM is gone, or detached). A MAC still owned here is published
        as gone; one that moved keeps a forwarding entry to its new host."""
        port = self._port(name)
        del self._ports[name]
        del self._by_mac[(port.vnet, port.mac)]
        if port.claimed and port.state in (PortState.RUNNING, PortState.PAUSED):
            self._actions.append(Publish(port.vnet, port.mac, port.version + 1, gone=True))
        else:
            self._actions.append(Withdraw(port.vnet, port.mac))
        if port.moved_to is not None:
            self.fdb.learn(port.vnet, port.mac, port.moved_to, port.version, now)
        if not any(p.vnet == port.vnet for p in self._ports.values()):
            self._actions.append(Leave(port.vnet))
            for agent in self._members.pop(port.vnet, set()):
                self._send(agent, self._hello(port.vnet, leaving=True))
        self._actions.append(Notice(name, "detached"))

    def _port(self, name: str) -> _Port:
        port = self._ports.get(name)
        if port is None:
            raise SwitchError(f"no port {name!r}")
        return port

    def port_state(self, name: str) -> PortState:
        """The state of a port."""
        return self._port(name).state

    def _new_handover_id(self) -> int:
        self._handovers += 1
        value = (self.agent_id ^ (self._handovers * _GOLDEN)) & _U64
        return value or 1

    def _event(self, port: _Port, event: PortEvent) -> bool:
        new = transition(port.state, event)
        if new is None:
            return False
        self._actions.append(Notice(port.name, event.value, f"{port.state.value} -> {new.value}"))
        port.state = new
        return True

    # -- frames from ports --------------------------------------------------------------------

    def port_frames(self, name: str, frames: Iterable[bytes], now: float) -> None:
        """Frames the port's VM sent."""
        port = self._port(name)
        for frame in frames:
            self.stats.frames_from_ports += 1
            try:
                dst, src = frame_addresses(frame)
            except DecodeError:
                self.stats.dropped["malformed"] += 1
                continue
            if src != port.mac:
                self.stats.dropped["source_mac"] += 1
                continue
            if port.ip is None:
                port.ip = snoop_ipv4(frame)
            self._forward_local_frame(port, dst, frame, now)

    def _forward_local_frame(self, port: _Port, dst: bytes, frame: bytes, now: float) -> None:
        seq = self._next_seq()
        vnet = port.vnet
        if is_group(dst):
            held = HeldFrame(self.agent_id, seq, 0, frame, 0, now)
            for other in list(self._ports.values()):
                if other is not port and other.vnet == vnet:
                    self._deliver(other, held, now)
            self._flood(vnet, seq, port.version, 0, frame, exclude=None)
            return
        key = (vnet, dst)
        fence = self._fence(key, now)
        self._sent(key, seq)
        local = self._by_mac.get(key)
        if local is not None and local.state not in (PortState.MOVED, PortState.INCOMING):
            self._deliver(local, HeldFrame(self.agent_id, seq, 0, frame, fence, now),
                          now)
            return
        entry = self.fdb.lookup(vnet, dst, now)
        if entry is not None and entry.agent != self.agent_id and entry.agent in self._peers:
            self._send(entry.agent, tunnel.Frame.trusted(
                vnet, self.agent_id, seq, port.version, fence, 0, frame))
            self.stats.frames_sent += 1
            return
        self._flood(vnet, seq, port.version, _FLOODED, frame, exclude=None)
        self._maybe_lookup(vnet, dst, now)

    def _flood(self, vnet: int, seq: int, src_version: int, flags: int, frame: bytes,
               *, exclude: int | None) -> None:
        members = self._members.get(vnet, ())
        if not members:
            return
        message = tunnel.Frame.trusted(vnet, self.agent_id, seq, src_version, 0, flags, frame)
        for agent in members:
            if agent != exclude:
                self._send(agent, message)
                self.stats.frames_sent += 1
        if flags & _FLOODED:
            self.stats.flooded += 1

    def _maybe_lookup(self, vnet: int, mac: bytes, now: float) -> None:
        key = (vnet, mac)
        if self._lookup_after.get(key, 0.0) > now:
            return
        if len(self._lookup_after) > 4 * self.config.fdb_capacity:
            self._lookup_after = {k: t for k, t in self._lookup_after.items() if t > now}
        self._lookup_after[key] = now + self.config.negative_ttl
        self.stats.lookups += 1
        self._actions.append(Lookup(vnet, MacAddress(bytes(mac))))

    def _sent(self, key: tuple[int, bytes], seq: int) -> None:
        self._sent_seq[key] = seq
        self._sent_seq.move_to_end(key)
        while len(self._sent_seq) > self.config.fdb_capacity:
            self._sent_seq.popitem(last=False)

    def _fence(self, key: tuple[int, bytes], now: float) -> int:
        fence = self._fences.get(key)
        if fence is None:
            return 0
        if fence[1] <= now:
            del self._fences[key]
            return 0
        return fence[0]

    def _location_changed(self, key: tuple[int, bytes], now: float) -> None:
        """Frames to ``key`` now take another path: fence them behind the last one sent."""
        last = self._sent_seq.get(key)
        if last is not None:
            self._fences[key] = (last, now + self.config.fence_period)

    # -- delivery to a local port -------------------------------------------------------------

    def _deliver(self, port: _Port, item: HeldFrame, now: float) -> None:
        state = port.state
        if state is PortState.RUNNING and port.gate_deadline is None:
            self._deliver_running(port, item, now)
        elif state in (PortState.RUNNING, PortState.PAUSED, PortState.INCOMING):
            # (RUNNING here: resumed, waiting for its handover to begin)
            if port.held.push(item):
                self.stats.held += 1
            else:
                self.stats.dropped["hold_overflow"] += 1
        elif state is PortState.HANDING_OVER or (
                state is PortState.MOVED and port.out is not None):
            self._hand_over(port, item, now)
        else:  # MOVED without a handover: pass it on as a plain frame
            self._forward_moved(port, item)

    def _deliver_running(self, port: _Port, item: HeldFrame, now: float) -> None:
        origin = item.origin
        if not port.flows.fresh(origin, item.seq):
            self.stats.dropped["late_or_duplicate"] += 1
            return
        fence = port.parked.get(origin)
        if fence is not None:
            if item.seq > fence.fence:
                if len(fence.frames) >= self.config.hold_frames:
                    self.stats.dropped["hold_overflow"] += 1
                    return
                bisect.insort(fence.frames, item, key=lambda f: f.seq)
                return
            self._write(port, item)  # one of the frames the fence waits for
            if port.flows.last(origin) >= fence.fence:
                self._release_parked(port, origin)
            return
        if (item.fence and port.inbound is not None
                and port.flows.last(origin) < item.fence):
            port.parked[origin] = _Fence(item.fence, now, now + self.config.fence_timeout,
                                         [item])
            self.stats.fence_waits += 1
            return
        self._write(port, item)

    def _write(self, port: _Port, item: HeldFrame) -> None:
        port.flows.delivered(item.origin, item.seq)
        self._writes.setdefault(port.name, []).append(PortFrame(item.frame, item.origin, item.seq))
        self.stats.frames_to_ports += 1

    def _release_parked(self, port: _Port, origin: int) -> None:
        fence = port.parked.pop(origin, None)
        if fence is None:
            return
        for item in fence.frames:
            if port.flows.fresh(origin, item.seq):
                self._write(port, item)
            else:
                self.stats.dropped["late_or_duplicate"] += 1

    def _release_held(self, port: _Port, now: float) -> None:
        items = in_flow_order(port.held.drain())
        self.stats.released += len(items)
        for item in items:
            self._deliver_running(port, item, now)

    # -- the VM's run state -------------------------------------------------------------------

    def port_stopped(self, name: str, unsent: Iterable[PortFrame], now: float) -> None:
        """The port's VM stopped; ``unsent``: frames given to the agent for it but not written
        to it yet (they are held, first)."""
        port = self._port(name)
        if not self._event(port, PortEvent.STOP):
            return
        items = [HeldFrame(f.origin, f.seq, 0, f.frame, 0, now) for f in unsent]
        port.flows.roll_back(items)
        dropped = port.held.push_front(items)
        self.stats.dropped["hold_overflow"] += dropped
        self.stats.held += len(items) - dropped
        port.lost, port.queued = [], []
        port.accounted = False
        port.accounting_deadline = now + self.config.accounting_timeout

    def port_accounted(self, name: str, *, lost: Iterable[PortFrame],
                       queued: Iterable[PortFrame], now: float) -> None:
        """Which frames written to the stopped VM it never received: ``lost`` (read by QEMU
        but dropped as it stopped: only a re-delivery brings them) and ``queued`` (still unread
        in the socket: QEMU delivers them if the VM resumes *here*), each oldest first."""
        port = self._port(name)
        if port.accounted or port.state not in (PortState.PAUSED, PortState.HANDING_OVER):
            port.accounting_deadline = None
            return
        port.lost = [HeldFrame(f.origin, f.seq, 0, f.frame, 0, now) for f in lost]
        port.queued = [HeldFrame(f.origin, f.seq, 0, f.frame, 0, now)
                       for f in queued]
        port.flows.roll_back(port.lost + port.queued)
        port.accounted = True
        port.accounting_deadline = None
        self._actions.append(Notice(name, "accounted",
                                    f"{len(port.lost)} lost, {len(port.queued)} unread"))
        self._maybe_start_handover(port, now)

    def port_resumed(self, name: str, now: float) -> None:
        """The port's VM runs (again, or for the first time as a migration's destination)."""
        port = self._port(name)
        previous = port.state
        if not self._event(port, PortEvent.RESUME):
            return
        if previous is PortState.INCOMING:
            self._resumed_as_destination(port, now)
            return
        if previous is PortState.HANDING_OVER or (
                previous is PortState.MOVED and port.out is not None):
            self._abort_handover(port, now)
        # The VM resumes here: QEMU delivers the frames still unread in its socket itself.
        for item in port.queued:
            port.flows.delivered(item.origin, item.seq)
        if port.lost and not port.queued:
            items, port.lost = port.lost, []
            dropped = port.held.push_front(items)
            self.stats.dropped["hold_overflow"] += dropped
        elif port.lost:
            # Re-writing them would put them after the unread ones: count them lost instead.
            self.stats.dropped["stranded_behind_unread"] += len(port.lost)
            port.lost = []
        port.queued = []
        port.accounted = True
        port.moved_to = None
        self._release_held(port, now)
        if not port.claimed:
            self._claim(port, port.version, now)

    def _maybe_start_handover(self, port: _Port, now: float) -> None:
        if port.state is not PortState.PAUSED or not port.accounted or port.successor is None:
            return
        agent, handover = port.successor
        self._event(port, PortEvent.SUCCESSOR)
        port.out = OutboundHandover(handover, agent, rto=self.config.handover_rto,
                                    max_items=self.config.hold_frames)
        self.stats.handovers_started += 1
        items = port.lost + port.queued + port.held.drain()
        self.stats.stranded_recovered += len(port.lost) + len(port.queued)
        port.lost, port.queued = [], []
        self._begin_handover(port, items, now)

    def _begin_handover(self, port: _Port, items: list[HeldFrame], now: float) -> None:
        out = port.out
        assert out is not None
        self._send(out.successor, self._begin_message(port))
        out.begin(now)
        for item in items:
            self._hand_over(port, item, now)
        self._actions.append(Notice(port.name, "handover", f"{len(items)} frames to agent "
                                    f"{out.successor:016x}"))

    def _begin_message(self, port: _Port) -> tunnel.HandoverBegin:
        assert port.out is not None
        return tunnel.HandoverBegin(handover=port.out.handover, vnet=port.vnet, mac=port.mac,
                                    version=port.version,
                                    flows=port.flows.snapshot(tunnel.MAX_FLOWS))

    def _hand_over(self, port: _Port, item: HeldFrame, now: float) -> None:
        out = port.out
        assert out is not None
        if out.full():
            self.stats.dropped["hold_overflow"] += 1
            return
        hseq = out.add(item, now)
        self._send(out.successor, self._handover_frame(out.handover, hseq, item))
        self.stats.handover_frames_sent += 1

    @staticmethod
    def _handover_frame(handover: int, hseq: int, item: HeldFrame) -> tunnel.HandoverFrame:
        return tunnel.HandoverFrame(handover=handover, hseq=hseq, origin=item.origin,
                                    seq=item.seq, flags=item.flags, frame=item.frame)

    def _abort_handover(self, port: _Port, now: float) -> None:
        out = port.out
        assert out is not None
        self._send(out.successor, tunnel.Abort(handover=out.handover))
        self.stats.handovers_aborted += 1
        retained = out.retained
        port.out = None
        port.successor = None
        for item in retained:
            if not port.held.push(item):
                self.stats.dropped["hold_overflow"] += 1
        self._actions.append(Notice(port.name, "handover_aborted",
                                    f"{len(retained)} frames delivered here"))

    def _resumed_as_destination(self, port: _Port, now: float) -> None:
        pred = port.predecessor
        base = port.version
        if pred is not None:
            base = max(base, pred.version)
        entry = self.fdb.lookup(port.vnet, port.mac, now)
        if entry is not None:
            base = max(base, entry.version)
        key = (port.vnet, port.mac)
        self._location_changed(key, now)
        if port.located or (pred is not None and pred.replied):
            self._claim(port, base, now)
        else:
            # Claiming now could reuse the version of the location it comes from (a restarted
            # agent knows nothing yet): ask, and claim on the answer or after a timeout.
            port.claim_deadline = now + self.config.claim_timeout
            self.stats.lookups += 1
            self._actions.append(Lookup(port.vnet, port.mac))
        if pred is not None and pred.accepted and port.inbound is None:
            port.gate_deadline = now + self.config.handover_wait
        else:
            self._release_held(port, now)
        if port.inbound is not None:
            self._ack(port, now)
        # Announce: every agent of the network (_claim told them) and the source learn the new
        # location, and every switch and guest on the way sees a frame from the VM's MAC.
        if pred is not None and pred.agent is not None and \
                pred.agent not in self._members.get(port.vnet, ()):
            self._send(pred.agent, self._location_message(port))
        announce = rarp_announce(port.mac)
        self._forward_local_frame(port, BROADCAST, announce, now)
        self._actions.append(Notice(port.name, "resumed_here", f"version {port.version}"))

    def _claim(self, port: _Port, base: int, now: float) -> None:
        """Make this agent the MAC's location at a version above ``base``: directory record,
        and a LOCATION to every agent of the network."""
        port.version = max(base + 1 if base >= port.version else port.version,
                           self.config.version_floor)
        port.claimed = True
        port.claim_deadline = None
        self.fdb.forget(port.vnet, port.mac)
        self._actions.append(Publish(port.vnet, port.mac, port.version))
        location = self._location_message(port)
        for agent in self._members.get(port.vnet, ()):
            self._send(agent, location)

    def _location_message(self, port: _Port) -> tunnel.Location:
        return tunnel.Location(vnet=port.vnet, mac=port.mac, agent=self.agent_id,
                               version=port.version, flags=LocationFlags(0),
                               host=self.config.host,
                               port=self.config.port)

    def _hello(self, vnet: int, *, leaving: bool = False) -> tunnel.Hello:
        return tunnel.Hello(vnet=vnet, leaving=leaving, host=self.config.host,
                            port=self.config.port, site=self.config.site)

    # -- datagrams from other agents ----------------------------------------------------------

    def receive(self, envelope: tunnel.Envelope, address: tuple[str, int], now: float) -> None:
        """A decoded datagram from another agent (``address``: where it came from)."""
        sender = envelope.sender
        if sender == self.agent_id:
            self.stats.dropped["own_datagram"] += 1
            return
        peer = self._peers.get(sender)
        if envelope.security is not Security.ENCRYPTED and self._needs_encryption(peer, envelope):
            self.stats.dropped["plaintext"] += 1
            return
        if peer is None:
            peer = self._peers[sender] = _Peer(sender, address)
        else:
            peer.address = address
        message = envelope.message
        handler = _HANDLERS.get(type(message))
        if handler is not None:
            handler(self, sender, message, now)

    def _needs_encryption(self, peer: _Peer | None, envelope: tunnel.Envelope) -> bool:
        if not self.config.can_encrypt or self.config.encrypt is EncryptPolicy.NEVER:
            return False
        if self.config.encrypt is EncryptPolicy.ALWAYS:
            return True
        site = peer.site if peer is not None else None
        message = envelope.message
        if site is None and isinstance(message, tunnel.Hello):
            site = message.site
        return site != self.config.site

    def _on_frame(self, sender: int, m: tunnel.Frame, now: float) -> None:
        self.stats.frames_received += 1
        try:
            dst, src = frame_addresses(m.frame)
        except DecodeError:
            self.stats.dropped["malformed"] += 1
            return
        members = self._members.get(m.vnet)
        if members is not None and sender not in members:
            members.add(sender)
        forwarded = bool(m.flags & _FORWARDED)
        if not forwarded and sender == m.origin and not is_group(src):
            local_src = self._by_mac.get((m.vnet, src))
            if local_src is not None and local_src.state is not PortState.INCOMING:
                self._foreign_claim(local_src, sender, m.src_version, now)
            elif self.fdb.learn(m.vnet, src, sender, m.src_version, now):
                self._location_changed((m.vnet, src), now)
        item = HeldFrame(m.origin, m.seq, m.flags, m.frame, m.fence, now)
        if is_group(dst):
            for member in list(self._ports.values()):
                if member.vnet == m.vnet:
                    self._deliver(member, item, now)
            return
        port = self._by_mac.get((m.vnet, dst))
        if port is not None:
            if m.flags & _FLOODED and port.state is PortState.MOVED:
                return  # its new host got a copy of the flood
            self._deliver(port, item, now)  # held when incoming; duplicates go at release
            if port.state in (PortState.MOVED, PortState.HANDING_OVER) and not \
                    m.flags & _FLOODED:
                self._redirect(m.origin, port, now)
            return
        if m.flags & _FLOODED:
            return
        entry = self.fdb.lookup(m.vnet, dst, now)
        if not forwarded and entry is not None and entry.agent not in (self.agent_id, sender):
            self._send(entry.agent, tunnel.Frame(
                vnet=m.vnet, origin=m.origin, seq=m.seq, src_version=m.src_version,
                fence=m.fence, flags=m.flags | _FORWARDED, frame=m.frame))
            self.stats.forwarded += 1
            self._redirect_to(m.origin, m.vnet, dst, entry.agent, entry.version, now)
            return
        self.stats.dropped["not_here"] += 1
        self._not_here(m.origin, m.vnet, dst, now)

    def _foreign_claim(self, port: _Port, agent: int, version: int, now: float) -> None:
        """Another agent sent a frame from one of our ports' MACs."""
        if version > port.version and port.state in (PortState.PAUSED, PortState.HANDING_OVER):
            port.moved_to = agent
            if port.out is None and not self._handover_pending(port, agent):
                self._moved_elsewhere(port)
                self._actions.append(Withdraw(port.vnet, port.mac))

    @staticmethod
    def _handover_pending(port: _Port, agent: int) -> bool:
        """The VM resumed at the successor while this port still accounts for its stop: the
        handover starts once the accounting is done (the successor waits for it)."""
        return port.successor is not None and port.successor[0] == agent and not port.accounted

    def _moved_elsewhere(self, port: _Port) -> None:
        """The VM resumed elsewhere without a handover from here (its destination never asked):
        what this port held goes after it, unacknowledged (better late than never)."""
        self._event(port, PortEvent.MOVED_ELSEWHERE)
        items = port.lost + port.queued + port.held.drain()
        port.lost, port.queued = [], []
        for item in items:
            self._forward_moved(port, item)

    def _forward_moved(self, port: _Port, item: HeldFrame) -> None:
        if port.moved_to is None or port.moved_to not in self._peers:
            self.stats.dropped["moved_no_route"] += 1
            return
        self._send(port.moved_to, tunnel.Frame(
            vnet=port.vnet, origin=item.origin, seq=item.seq, src_version=0, fence=item.fence,
            flags=item.flags | _FORWARDED, frame=item.frame))
        self.stats.forwarded += 1

    def _redirect(self, origin: int, port: _Port, now: float) -> None:
        if port.moved_to is not None:
            self._redirect_to(origin, port.vnet, port.mac, port.moved_to, 0, now)

    def _redirect_to(self, origin: int, vnet: int, mac: bytes, agent: int, version: int,
                     now: float) -> None:
        if origin == self.agent_id or origin not in self._peers or agent not in self._peers:
            return
        key = (origin, vnet, mac)
        if self._redirected.get(key, 0.0) > now:
            return
        if len(self._redirected) > 65536:
            self._redirected = {k: t for k, t in self._redirected.items() if t > now}
        self._redirected[key] = now + self.config.redirect_interval
        entry = self.fdb.lookup(vnet, mac, now)
        if entry is not None and entry.agent == agent:
            version = max(version, entry.version)
        target = self._peers[agent]
        self._send(origin, tunnel.Location(
            vnet=vnet, mac=mac, agent=agent, version=version, flags=LocationFlags(0),
            host=target.address[0], port=target.address[1]))
        self.stats.redirects += 1

    def _not_here(self, origin: int, vnet: int, mac: bytes, now: float) -> None:
        if origin == self.agent_id or origin not in self._peers:
            return
        key = (origin, vnet, mac)
        if self._redirected.get(key, 0.0) > now:
            return
        self._redirected[key] = now + self.config.redirect_interval
        self._send(origin, tunnel.Location(
            vnet=vnet, mac=mac, agent=self.agent_id, version=0, flags=LocationFlags.NOT_HERE,
            host=self.config.host, port=self.config.port))

    def _on_location(self, sender: int, m: tunnel.Location, now: float) -> None:
        key = (m.vnet, m.mac)
        if m.flags & LocationFlags.NOT_HERE:
            if self.fdb.forget(m.vnet, m.mac, agent=m.agent):
                self._lookup_after.pop(key, None)
                self._maybe_lookup(m.vnet, m.mac, now)
            return
        port = self._by_mac.get(key)
        if m.agent == self.agent_id:
            return
        if m.agent not in self._peers:
            self._peers[m.agent] = _Peer(m.agent, (m.host, m.port))
        if port is not None and port.state is PortState.INCOMING:
            port = None  # the VM still runs elsewhere: where is news for the forwarding table
        if port is not None:
            if m.version > port.version:
                if port.state in (PortState.PAUSED, PortState.HANDING_OVER, PortState.MOVED):
                    port.moved_to = m.agent
                    if port.out is None and port.state is PortState.PAUSED and not \
                            self._handover_pending(port, m.agent):
                        self._moved_elsewhere(port)
                    self._actions.append(Withdraw(port.vnet, port.mac))
                elif port.state is PortState.RUNNING:
                    self.stats.mac_conflicts += 1
                    self._actions.append(Notice(port.name, "mac_conflict",
                                                f"agent {m.agent:016x} claims version {m.version}"))
            return
        if m.flags & LocationFlags.GONE:
            self.fdb.forget(m.vnet, m.mac, up_to_version=m.version)
            return
        if self.fdb.learn(m.vnet, m.mac, m.agent, m.version, now):
            self._location_changed(key, now)
            self._actions.append(Notice("-", "location", f"vnet {m.vnet} {format_mac(m.mac)} "
                                        f"at agent {m.agent:016x} version {m.version}"))

    def _on_hello(self, sender: int, m: tunnel.Hello, now: float) -> None:
        peer = self._peers[sender]
        peer.site = m.site
        members = self._members.get(m.vnet)
        if members is None:
            return  # we host nothing in that network
        if m.leaving:
            members.discard(sender)
            return
        if sender not in members:
            self._new_member(m.vnet, sender)

    def _on_prepare(self, sender: int, m: tunnel.Prepare, now: float) -> None:
        port = self._by_mac.get((m.vnet, m.mac))
        if port is None or port.state in (PortState.INCOMING, PortState.MOVED):
            self._send(sender, tunnel.PrepareReply(handover=m.handover,
                                                   status=PrepareStatus.UNKNOWN_PORT, version=0))
            return
        self._send(sender, tunnel.PrepareReply(handover=m.handover,
                                               status=PrepareStatus.ACCEPTED,
                                               version=port.version))
        if port.successor == (sender, m.handover):
            return
        port.successor = (sender, m.handover)
        self._actions.append(Notice(port.name, "successor", f"agent {sender:016x}"))
        if port.out is not None and not port.out.resumed:
            # A new destination (the old one restarted): send it everything again.
            items = port.out.restart(m.handover, sender)
            self._begin_handover(port, items, now)
        else:
            self._maybe_start_handover(port, now)

    def _on_prepare_reply(self, sender: int, m: tunnel.PrepareReply, now: float) -> None:
        for port in self._ports.values():
            pred = port.predecessor
            if pred is not None and pred.handover == m.handover and pred.agent == sender:
                pred.replied = True
                if m.status is PrepareStatus.ACCEPTED:
                    pred.accepted = True
                    pred.version = max(pred.version, m.version)
                return

    def _on_begin(self, sender: int, m: tunnel.HandoverBegin, now: float) -> None:
        port = self._by_mac.get((m.vnet, m.mac))
        if port is None or port.predecessor is None or port.predecessor.handover != m.handover:
            self.stats.dropped["unknown_handover"] += 1
            return
        pred = port.predecessor
        pred.agent, pred.replied, pred.accepted = sender, True, True
        pred.version = max(pred.version, m.version)
        inbound = port.inbound
        if inbound is None or inbound.handover != m.handover or inbound.source != sender:
            inbound = port.inbound = InboundHandover(
                m.handover, sender, max_pending=self.config.hold_frames,
                gap_timeout=self.config.gap_timeout)
        port.flows.merge(m.flows)
        self._inbound_items(port, inbound.receive(0, None, now), now)
        if port.gate_deadline is not None:
            self._ungate(port, now)
        self._ack(port, now)

    def _on_handover_frame(self, sender: int, m: tunnel.HandoverFrame, now: float) -> None:
        port = self._inbound_port(sender, m.handover)
        if port is None:
            port = self._expecting(sender, m.handover)  # its BEGIN is late (lost, reordered)
        if port is None or port.inbound is None:
            self.stats.dropped["unknown_handover"] += 1
            return
        self.stats.handover_frames_received += 1
        item = HeldFrame(m.origin, m.seq, m.flags, m.frame, 0, now)
        ready = port.inbound.receive(m.hseq, item, now)
        self._inbound_items(port, ready, now)
        if not ready or port.inbound.unacked >= self.config.ack_every:
            self._ack(port, now)  # out of order (or many): tell the source at once
        elif port.ack_due is None:
            port.ack_due = now + self.config.ack_delay

    def _expecting(self, sender: int, handover: int) -> _Port | None:
        """The incoming port that asked ``sender`` for this handover, now set up to receive."""
        for port in self._ports.values():
            pred = port.predecessor
            if pred is not None and pred.handover == handover and pred.agent == sender and (
                    port.inbound is None or port.inbound.handover != handover):
                port.inbound = InboundHandover(handover, sender,
                                               max_pending=self.config.hold_frames,
                                               gap_timeout=self.config.gap_timeout)
                return port
        return None

    def _inbound_port(self, sender: int, handover: int) -> _Port | None:
        for port in self._ports.values():
            inbound = port.inbound
            if inbound is not None and inbound.handover == handover and inbound.source == sender:
                return port
        return None

    def _inbound_items(self, port: _Port, items: list[tuple[int, HeldFrame | None]],
                       now: float) -> None:
        for _hseq, item in items:
            if item is None:
                continue
            self._deliver(port, item, now)

    def _ungate(self, port: _Port, now: float) -> None:
        """The handover began (or will not): deliver what waited, in flow order."""
        port.gate_deadline = None
        self._release_held(port, now)

    def _ack(self, port: _Port, now: float) -> None:
        inbound = port.inbound
        if inbound is None:
            return
        inbound.unacked = 0
        port.ack_due = None
        resumed = port.state is PortState.RUNNING
        if inbound.acked < 0:
            return  # the BEGIN has not arrived: nothing to acknowledge yet
        self._send(inbound.source, tunnel.HandoverAck(
            handover=inbound.handover, acked=inbound.acked, resumed=resumed,
            version=port.version if resumed else 0,
            ranges=inbound.ranges(tunnel.MAX_SACK_RANGES)))

    def _on_ack(self, sender: int, m: tunnel.HandoverAck, now: float) -> None:
        for port in self._ports.values():
            out = port.out
            if out is None or out.handover != m.handover or out.successor != sender:
                continue
            out.acked_up_to(m.acked, m.resumed, m.ranges, now)
            if m.resumed and port.state is PortState.HANDING_OVER:
                port.moved_to = sender
                self._event(port, PortEvent.SUCCESSOR_RESUMED)
                self.stats.handovers_completed += 1
                self._actions.append(Withdraw(port.vnet, port.mac))
                if self.fdb.learn(port.vnet, port.mac, sender, m.version, now):
                    self._location_changed((port.vnet, port.mac), now)
            return

    def _on_abort(self, sender: int, m: tunnel.Abort, now: float) -> None:
        port = self._inbound_port(sender, m.handover)
        if port is None:
            return
        port.inbound = None
        if port.state is PortState.INCOMING:
            dropped = len(port.held.drain())
            self._actions.append(Notice(port.name, "handover_aborted_by_source",
                                        f"{dropped} held frames dropped"))

    # -- directory answers --------------------------------------------------------------------

    def location_result(self, vnet: int, mac: bytes, record: LocationRecord | None,
                        now: float) -> None:
        """The directory's answer to :class:`Lookup` (None: no record, or unreachable)."""
        key = (vnet, bytes(mac))
        port = self._by_mac.get(key)
        if record is not None and record.agent != self.agent_id and not record.gone:
            if record.agent not in self._peers:
                self._peers[record.agent] = _Peer(record.agent, (record.host, record.port))
            if (port is None or port.state is PortState.INCOMING) and \
                    self.fdb.learn(vnet, mac, record.agent, record.version, now):
                self._location_changed(key, now)
        if port is None:
            return
        port.located = True
        known = record.version if record is not None else 0
        if port.state is PortState.INCOMING:
            pred = port.predecessor
            if pred is not None:
                pred.version = max(pred.version, known)
                if record is not None and record.agent != self.agent_id and not record.gone \
                        and pred.agent is None:
                    pred.agent = record.agent
                    pred.next_try = now
                    self._prepare(port, now)
            return
        if port.claimed:
            return
        if port.state is PortState.RUNNING:
            self._claim(port, max(known, port.version), now)
        elif record is not None and record.agent == self.agent_id:
            port.version = max(port.version, record.version)

    def members_result(self, vnet: int, members: Iterable[MemberRecord], now: float) -> None:
        """The directory's list of the agents hosting ``vnet``."""
        known = self._members.get(vnet)
        if known is None:
            return
        for member in members:
            if member.agent == self.agent_id:
                continue
            peer = self._peers.get(member.agent)
            if peer is None:
                peer = self._peers[member.agent] = _Peer(member.agent,
                                                         (member.host, member.port))
            peer.site = member.site
            if member.agent not in known:
                self._new_member(vnet, member.agent)

    def _new_member(self, vnet: int, agent: int) -> None:
        """An agent joined one of our networks: greet it, tell it where our MACs are."""
        self._members[vnet].add(agent)
        self._send(agent, self._hello(vnet))
        for port in self._ports.values():
            if port.vnet == vnet and port.claimed and port.state is PortState.RUNNING:
                self._send(agent, self._location_message(port))

    # -- timers -------------------------------------------------------------------------------

    def _prepare(self, port: _Port, now: float) -> None:
        pred = port.predecessor
        if pred is None or pred.agent is None or pred.replied:
            return
        if pred.attempts >= self.config.prepare_attempts:
            return
        pred.attempts += 1
        pred.next_try = now + self.config.prepare_retry
        self._send(pred.agent, tunnel.Prepare(handover=pred.handover, vnet=port.vnet,
                                              mac=port.mac))

    def next_timer(self) -> float | None:
        """When :meth:`handle_timer` should run next (None: nothing scheduled)."""
        times: list[float] = []
        for port in self._ports.values():
            if port.out is not None:
                due = port.out.next_timer()
                if due is not None:
                    times.append(due)
            if port.inbound is not None:
                due = port.inbound.next_timer()
                if due is not None:
                    times.append(due)
            if port.ack_due is not None:
                times.append(port.ack_due)
            if port.accounting_deadline is not None:
                times.append(port.accounting_deadline)
            if port.claim_deadline is not None:
                times.append(port.claim_deadline)
            if port.gate_deadline is not None:
                times.append(port.gate_deadline)
            pred = port.predecessor
            if pred is not None and not pred.replied and port.state is PortState.INCOMING \
                    and pred.attempts < self.config.prepare_attempts:
                times.append(pred.next_try)
            for fence in port.parked.values():
                times.append(fence.deadline)
            if len(port.held):
                times.append(next(iter(port.held)).since + self.config.hold_timeout)
        return min(times) if times else None

    def handle_timer(self, now: float) -> None:
        """Run what is due: retransmissions, acknowledgements, fences, timeouts."""
        for port in list(self._ports.values()):
            out = port.out
            if out is not None:
                for hseq, item in out.due(now):
                    self.stats.handover_retransmissions += 1
                    if item is None:
                        self._send(out.successor, self._begin_message(port))
                    else:
                        self._send(out.successor, self._handover_frame(out.handover, hseq, item))
            inbound = port.inbound
            if inbound is not None:
                ready = inbound.give_up_gap(now)
                if ready:
                    self.stats.handover_frames_skipped = sum(
                        p.inbound.skipped for p in self._ports.values() if p.inbound is not None)
                    self._inbound_items(port, ready, now)
                    self._ack(port, now)
                if port.state is PortState.RUNNING and not inbound.next_timer() and \
                        now - inbound.last_activity > self.config.inbound_ttl:
                    port.inbound = None
            if port.ack_due is not None and port.ack_due <= now:
                self._ack(port, now)
            if port.gate_deadline is not None and port.gate_deadline <= now:
                self._actions.append(Notice(port.name, "handover_missing",
                                            f"delivering {len(port.held)} held frames without it"))
                self._ungate(port, now)
            if port.claim_deadline is not None and port.claim_deadline <= now:
                self._actions.append(Notice(port.name, "claim_without_directory"))
                entry = self.fdb.lookup(port.vnet, port.mac, now)
                self._claim(port, max(port.version, entry.version if entry else 0), now)
            if port.accounting_deadline is not None and port.accounting_deadline <= now:
                port.accounting_deadline = None
                self._actions.append(Notice(port.name, "accounting_timeout"))
                self.port_accounted(port.name, lost=(), queued=(), now=now)
            pred = port.predecessor
            if pred is not None and not pred.replied and port.state is PortState.INCOMING \
                    and pred.next_try <= now and pred.attempts < self.config.prepare_attempts:
                if pred.agent is None:
                    # Where the VM comes from is not in the directory yet: ask again.
                    pred.attempts += 1
                    pred.next_try = now + self.config.prepare_retry
                    self.stats.lookups += 1
                    self._actions.append(Lookup(port.vnet, port.mac))
                else:
                    self._prepare(port, now)
            for origin in [o for o, f in port.parked.items() if f.deadline <= now]:
                self._fence_due(port, origin, now)
            expired = port.held.expire(now - self.config.hold_timeout)
            if expired:
                self.stats.dropped["hold_timeout"] += expired

    def _fence_due(self, port: _Port, origin: int, now: float) -> None:
        """A fenced frame waited ``fence_timeout``. While the handover still brings items (or
        waits for a lost one to be resent) it waits on: a loaded source agent may be slow to
        pass the old path's frames on, and giving up early would drop them as late (up to
        ``hold_timeout``). Then it is delivered with what follows it."""
        fence = port.parked[origin]
        inbound = port.inbound
        progressing = inbound is not None and (
            inbound.next_timer() is not None
            or now - inbound.last_activity < self.config.fence_timeout)
        if progressing and now - fence.since < self.config.hold_timeout:
            fence.deadline = now + min(self.config.fence_timeout, 0.05)
            return
        self.stats.fence_timeouts += 1
        self._release_parked(port, origin)

    # -- views --------------------------------------------------------------------------------

    def held_frames(self) -> int:
        """Frames held or kept for handovers, across ports."""
        total = 0
        for port in self._ports.values():
            total += len(port.held) + len(port.lost) + len(port.queued)
            if port.out is not None:
                total += len(port.out.retained)
        return total

    def status(self) -> dict[str, object]:
        """A JSON-friendly view of the ports and peers."""
        return {
            "agent": f"{self.agent_id:016x}",
            "ports": [{
                "name": p.name, "vnet": p.vnet, "mac": format_mac(p.mac), "state": p.state.value,
                "version": p.version, "held": len(p.held),
                "handover": None if p.out is None else {
                    "to": f"{p.out.successor:016x}", "pending": p.out.pending,
                    "retained": len(p.out.retained), "resumed": p.out.resumed},
            } for p in self._ports.values()],
            "networks": {str(v): sorted(f"{a:016x}" for a in m) for v, m in self._members.items()},
            "fdb": [{"vnet": vnet, "mac": format_mac(mac), "agent": f"{entry.agent:016x}",
                     "version": entry.version} for vnet, mac, entry in self.fdb.entries()[-256:]],
        }


_HANDLERS: Final[dict[type, Callable[[VirtualSwitch, int, Any, float], None]]] = {
    tunnel.Frame: VirtualSwitch._on_frame,
    tunnel.Location: VirtualSwitch._on_location,
    tunnel.Hello: VirtualSwitch._on_hello,
    tunnel.Prepare: VirtualSwitch._on_prepare,
    tunnel.PrepareReply: VirtualSwitch._on_prepare_reply,
    tunnel.HandoverBegin: VirtualSwitch._on_begin,
    tunnel.HandoverFrame: VirtualSwitch._on_handover_frame,
    tunnel.HandoverAck: VirtualSwitch._on_ack,
    tunnel.Abort: VirtualSwitch._on_abort,
}
