"""The vnet agent: what ``tmdht vnet run`` runs on each host.

:class:`VnetAgent` is the asyncio skin of :class:`tmdht.vswitch.VirtualSwitch`. It owns, and
starts in this order: the MAC directory client (:mod:`tmdht.vnet.directory`, into the store
cluster's ring), the UDP tunnel socket (:mod:`tmdht.tunnel` datagrams to and from other agents),
the metrics/health HTTP server, the control socket (attach/detach), then re-attaches the ports
listed in ``<data dir>/ports.json``. Every input goes to the switch; the switch's actions are
carried out by :meth:`_pump` (write frames to a port, send datagrams, directory requests).

Each port has one task that handles its VM's QMP events in order: on STOP the port stops
writing and the switch holds; the port then accounts for the frames the VM did not receive;
on RESUME the switch releases (or, at a migration's destination, starts delivering).

Shutdown (SIGTERM/SIGINT or :meth:`stop`): stop taking datagrams and requests, close ports,
the directory and the sockets. Frames held at that moment are lost, and were counted as held.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import time
from collections.abc import Callable, Coroutine, Mapping
from pathlib import Path
from typing import Any

from tmdht import __version__, tunnel
from tmdht.aio.http import HealthServer
from tmdht.aio.service import reload_cluster_keys, stop_on_signals
from tmdht.aio.sockets import open_udp_socket
from tmdht.aio.system import notify_supervisor
from tmdht.aio.tasks import TaskSet
from tmdht.auth import AuthenticationError, ReplayError
from tmdht.errors import DecodeError, LimitExceededError, TmdhtError, UsageError
from tmdht.ethernet import MacAddress, format_mac, parse_mac
from tmdht.handover import PortState
from tmdht.net.credentials import CLUSTER_KEY_ENV, ClusterCredentials
from tmdht.vnet.control import ControlServer, PortSpec
from tmdht.vnet.directory import VnetDirectory
from tmdht.vnet.metrics import AgentCounters, VnetMetrics
from tmdht.vnet.ports import QemuPort, TapPort
from tmdht.vnet_config import VnetConfig
from tmdht.vswitch import (
    EncryptPolicy,
    Join,
    Leave,
    Lookup,
    Notice,
    Publish,
    Send,
    SwitchConfig,
    VirtualSwitch,
    Withdraw,
    WriteFrames,
)

__all__ = ["PORTS_FILE", "VnetAgent", "load_credentials"]

log = logging.getLogger("tmdht.vnet")

PORTS_FILE = "ports.json"
TUNNEL_SOCKET_BUFFER = 8 << 20
"""Bytes asked for the tunnel socket's kernel buffers: a burst of held frames at a handover."""


def load_credentials(config: VnetConfig, env: Mapping[str, str] | None = None
                     ) -> ClusterCredentials:
    """The cluster keys (``cluster_key_file`` or $TMDHT_CLUSTER_KEY); open mode only if
    ``insecure_open``."""
    return ClusterCredentials.load(
        key_file=config.cluster_key_file, env=os.environ if env is None else env,
        insecure_open=config.insecure_open,
        how=f"--cluster-key-file FILE (cluster_key_file in the config file) or "
            f"${CLUSTER_KEY_ENV}; for local development only, --insecure-open "
            "(insecure_open = true)")


class _Tunnel(asyncio.DatagramProtocol):
    def __init__(self, agent: VnetAgent) -> None:
        self._agent = agent

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self._agent._datagram(data, (addr[0], addr[1]))

    def error_received(self, exc: Exception) -> None:
        log.debug("tunnel send failed: %s", exc)


class _Port:
    """A port's IO object, spec and event task."""

    def __init__(self, spec: PortSpec, io: QemuPort | TapPort) -> None:
        self.spec = spec
        self.io = io
        self.events: asyncio.Queue[str] = asyncio.Queue()
        self.task: asyncio.Task[None] | None = None


class VnetAgent:
    """One host's agent. ``async with VnetAgent(config) as agent:`` or :meth:`run`."""

    def __init__(self, config: VnetConfig, *, env: Mapping[str, str] | None = None,
                 on_ready: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.config = config
        self.credentials = load_credentials(config, env)
        self.agent_id = secrets.randbits(64) or 1
        self.codec = tunnel.TunnelCodec(
            self.agent_id, None if self.credentials.is_open else self.credentials.keys)
        self.counters = AgentCounters(
            port_overflow=lambda: sum(p.io.overflow for p in self._ports.values()))
        self.switch: VirtualSwitch | None = None
        self.directory: VnetDirectory | None = None
        self.metrics = VnetMetrics(
            switch=lambda: self.switch.stats if self.switch else None,
            directory=lambda: self.directory.stats if self.directory else None,
            agent=self.counters,
            held=lambda: self.switch.held_frames() if self.switch else 0,
            ports=self._port_states, ready=lambda: self._ready)
        self._on_ready = on_ready
        self._transport: asyncio.DatagramTransport | None = None
        self._http: HealthServer | None = None
        self._control: ControlServer | None = None
        self._ports: dict[str, _Port] = {}
        self._tasks = TaskSet(log)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._pump_scheduled = False
        self._ready = False
        self._stopped = asyncio.Event()
        self._started_at = time.time()
        self.tunnel_address: tuple[str, int] = (config.host, config.tunnel_port)

    # -- life cycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> VnetAgent:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Start every part; on failure stop what was started and re-raise."""
        cfg = self.config
        if self.credentials.is_open:
            log.warning("RUNNING OPEN: tunnels are neither authenticated nor encrypted")
        try:
            cfg.data_dir.mkdir(parents=True, exist_ok=True)
            loop = asyncio.get_running_loop()
            sock, _ = open_udp_socket(cfg.host, cfg.tunnel_port, TUNNEL_SOCKET_BUFFER)
            try:
                self._transport, _ = await loop.create_datagram_endpoint(
                    lambda: _Tunnel(self), sock=sock)
            except BaseException:
                sock.close()
                raise
            port = self._transport.get_extra_info("sockname")[1]
            self.tunnel_address = (cfg.public_host, port)
            policy = EncryptPolicy(cfg.encrypt)
            self.switch = VirtualSwitch(SwitchConfig(
                agent_id=self.agent_id, host=cfg.public_host, port=port, site=cfg.site,
                encrypt=policy, can_encrypt=self.codec.can_encrypt,
                hold_frames=cfg.hold_frames, hold_bytes=cfg.hold_bytes,
                hold_timeout=cfg.hold_timeout, handover_rto=cfg.handover_rto,
                fence_timeout=cfg.fence_timeout, gap_timeout=cfg.gap_timeout,
                lookup_ttl=2 * cfg.lease, version_floor=int(time.time() * 1000)))
            self.directory = VnetDirectory(
                seeds=cfg.seeds, credentials=self.credentials, host=cfg.host, replicas=cfg.replicas,
                lease=cfg.lease, agent_id=self.agent_id, public_host=cfg.public_host,
                tunnel_port=port, site=cfg.site)
            await self.directory.start()
            self._http = HealthServer(cfg.host, cfg.metrics_port, self.metrics.registry,
                                      self._health)
            self._http.start()
            self._control = ControlServer(cfg.control_path, self._control_request)
            await self._control.start()
            self._spawn(self._renew_loop(), "renew")
            self._spawn(self._members_loop(), "members")
            for spec in self._load_specs():
                try:
                    await self.attach(spec, persist=False)
                except TmdhtError as exc:
                    log.error("port %s not re-attached: %s", spec.name, exc)
            self._persist()
            self._ready = True
            self._write_status()
            if self._on_ready is not None:
                self._on_ready(self.status())
            log.info("vnet agent %016x ready: tunnel %s:%d, metrics %d, site %s, %d ports",
                     self.agent_id, *self.tunnel_address, self._http.port, cfg.site,
                     len(self._ports))
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        """Shut down (idempotent)."""
        self._ready = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._transport is not None:
            self._transport.close()
            self._transport = None
        if self._control is not None:
            await self._control.close()
            self._control = None
        for entry in list(self._ports.values()):
            await self._close_port(entry)
        self._ports.clear()
        await self._tasks.cancel_all()
        if self.directory is not None:
            await self.directory.close()
            self.directory = None
        if self._http is not None:
            self._http.close()
            self._http = None
        self._stopped.set()

    async def run(self) -> None:
        """Start, serve until SIGTERM/SIGINT (or a fatal error), then stop."""
        with stop_on_signals(self._stopped, reload=self.reload_keys):
            try:
                await self.start()
                notify_supervisor(f"READY=1\nSTATUS=forwarding: {len(self._ports)} ports")
                await self._stopped.wait()
                log.info("shutting down")
                notify_supervisor("STOPPING=1\nSTATUS=handing over held frames and closing")
            finally:
                await self.stop()

    def reload_keys(self) -> bool:
        """Re-read the cluster key file (SIGHUP, ``systemctl reload``) and use its keys from now
        on for tunnels and the directory: a rotation step without a restart, in step with the
        store nodes'. A file that cannot be read or parsed changes nothing: the agent keeps its
        keys, logs why and returns False."""
        credentials = reload_cluster_keys(
            self.credentials, self.config.cluster_key_file, self._use_keys, log)
        outcome = "failed" if credentials is None else "ok"
        reloads = self.counters.key_reloads
        reloads[outcome] = reloads.get(outcome, 0) + 1
        if credentials is None:
            return False
        self.credentials = credentials
        return True

    def _use_keys(self, credentials: ClusterCredentials) -> None:
        self.codec.replace_keys(credentials.keys)
        if self.directory is not None:
            self.directory.replace_credentials(credentials)

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        return self._tasks.spawn(coro, f"tmdht-vnet-{name}")

    # -- the switch ---------------------------------------------------------------------------

    @staticmethod
    def _now() -> float:
        return time.monotonic()

    def _pump(self) -> None:
        """Carry out the switch's actions, then re-arm its timer."""
        switch = self.switch
        if switch is None:
            return
        for action in switch.take_actions():
            if isinstance(action, WriteFrames):
                entry = self._ports.get(action.port)
                if entry is not None:
                    entry.io.write(action.frames)
            elif isinstance(action, Send):
                self._send(action)
            elif isinstance(action, Publish):
                self._directory_call(self._publish(action), "publish")
            elif isinstance(action, Lookup):
                self._directory_call(self._lookup(action.vnet, action.mac), "lookup")
            elif isinstance(action, Join):
                self._directory_call(self._join(action.vnet), "join")
            elif isinstance(action, Withdraw):
                if self.directory is not None:
                    self.directory.withdraw(action.vnet, action.mac)
            elif isinstance(action, Leave):
                if self.directory is not None:
                    self.directory.leave(action.vnet)
            elif isinstance(action, Notice):
                if action.port == "-":
                    log.info("%s %s", action.event, action.detail)
                else:
                    log.info("port %s: %s %s", action.port, action.event, action.detail)
        self._arm_timer()

    def _pump_soon(self) -> None:
        """Pump once the loop has handed over every input that is ready (many datagrams or
        frames, one batch of writes to each port)."""
        if not self._pump_scheduled:
            self._pump_scheduled = True
            asyncio.get_running_loop().call_soon(self._scheduled_pump)

    def _scheduled_pump(self) -> None:
        self._pump_scheduled = False
        self._pump()

    def _arm_timer(self) -> None:
        switch = self.switch
        if switch is None:
            return
        due = switch.next_timer()
        if due is None or (self._timer_at is not None and self._timer_at <= due
                           and self._timer is not None):
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = due
        self._timer = asyncio.get_running_loop().call_later(max(0.0, due - self._now()),
                                                            self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        if self.switch is not None:
            self.switch.handle_timer(self._now())
            self._pump()

    def _send(self, action: Send) -> None:
        if self._transport is None:
            return
        encrypt = action.encrypt and self.codec.can_encrypt
        datagram = self.codec.encode(action.message, now=time.time(), encrypt=encrypt)
        self._transport.sendto(datagram, action.address)

    def _datagram(self, data: bytes, address: tuple[str, int]) -> None:
        if self.switch is None or not self._ready:
            return
        try:
            envelope = self.codec.decode(data, now=time.time())
        except DecodeError as exc:
            if isinstance(exc, AuthenticationError):
                reason = "auth"
            elif isinstance(exc, ReplayError):
                reason = "replay"
            elif isinstance(exc, LimitExceededError):
                reason = "oversize"
            else:
                reason = "malformed"
            self.counters.bad_datagrams[reason] = self.counters.bad_datagrams.get(reason, 0) + 1
            log.debug("dropped datagram from %s: %s", address, exc)
            return
        self.switch.receive(envelope, address, self._now())
        self._pump_soon()

    def _directory_call(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        self._spawn(coro, f"directory-{name}")

    async def _publish(self, action: Publish) -> None:
        if self.directory is not None:
            await self.directory.publish(action.vnet, action.mac, action.version,
                                         gone=action.gone)

    async def _lookup(self, vnet: int, mac: bytes) -> None:
        if self.directory is None:
            return
        record = await self.directory.lookup(vnet, mac)
        if self.switch is not None:
            self.switch.location_result(vnet, mac, record, self._now())
            self._pump()

    async def _join(self, vnet: int) -> None:
        if self.directory is None:
            return
        await self.directory.join(vnet)
        members = await self.directory.members(vnet)
        if self.switch is not None:
            self.switch.members_result(vnet, members, self._now())
            self._pump()

    async def _renew_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.lease / 3)
            if self.directory is not None:
                await self.directory.renew()

    async def _members_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.members_interval)
            if self.directory is None or self.switch is None:
                continue
            for vnet in self.directory.networks:
                members = await self.directory.members(vnet)
                if self.switch is not None:
                    self.switch.members_result(vnet, members, self._now())
            self._pump()

    # -- ports --------------------------------------------------------------------------------

    async def attach(self, spec: PortSpec, *, persist: bool = True) -> dict[str, Any]:
        """Attach a port (see :class:`tmdht.vnet.control.PortSpec`); returns its status."""
        if self.switch is None:
            raise TmdhtError("the agent is not running")
        if spec.name in self._ports:
            raise UsageError(f"port {spec.name!r} is attached already")
        name = spec.name
        io: QemuPort | TapPort
        if spec.kind == "qemu":
            assert spec.net_socket is not None and spec.qmp_socket is not None
            io = QemuPort(name, Path(spec.net_socket), Path(spec.qmp_socket), nic_id=spec.nic_id,
                          on_frames=lambda frames: self._port_frames(name, frames),
                          on_event=lambda event: self._port_event(name, event),
                          on_closed=lambda reason: self._port_closed(name, reason))
        else:
            assert spec.tap is not None
            io = TapPort(name, spec.tap,
                         on_frames=lambda frames: self._port_frames(name, frames),
                         on_closed=lambda reason: self._port_closed(name, reason))
        await io.open()
        try:
            mac = self._port_mac(spec, io.mac)
            entry = _Port(spec, io)
            self._ports[name] = entry
            incoming = io.run_state == "inmigrate"
            self.switch.add_port(name, spec.vnet, mac, now=self._now(), incoming=incoming,
                                 running=io.run_state == "running")
        except BaseException:
            self._ports.pop(name, None)
            await io.close()
            raise
        entry.task = self._spawn(self._port_events(entry), f"port-{name}")
        self._pump()
        if persist:
            self._persist()
        log.info("attached port %s (%s, vnet %d, %s, %s)", name, spec.kind, spec.vnet,
                 format_mac(mac), io.run_state)
        return self._port_status(name)

    @staticmethod
    def _port_mac(spec: PortSpec, reported: MacAddress | None) -> MacAddress:
        if spec.mac is not None:
            mac = parse_mac(spec.mac)
            if reported is not None and reported != mac:
                raise UsageError(f"port {spec.name}: --mac {spec.mac} but the NIC has "
                                 f"{format_mac(reported)}")
            return mac
        if reported is None:
            raise UsageError(f"port {spec.name}: say its MAC (--mac): the NIC does not tell")
        return reported

    async def detach(self, name: str, *, persist: bool = True) -> None:
        """Detach a port (its MAC is published as gone if it still lived here)."""
        entry = self._ports.pop(name, None)
        if entry is None:
            raise UsageError(f"no port {name!r}")
        await self._close_port(entry)
        if self.switch is not None:
            self.switch.remove_port(name, self._now())
            self._pump()
        if persist:
            self._persist()

    async def _close_port(self, entry: _Port) -> None:
        if entry.task is not None:
            entry.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await entry.task
        await entry.io.close()

    def _port_frames(self, name: str, frames: list[bytes]) -> None:
        if self.switch is not None and name in self._ports:
            self.switch.port_frames(name, frames, self._now())
            self._pump_soon()

    def _port_event(self, name: str, event: str) -> None:
        entry = self._ports.get(name)
        if entry is None:
            return
        if event == "STOP" and self.switch is not None:
            # At once (not via the queue): nothing more may be written to the stopped VM. Frames
            # the switch already meant for it go to the port first: they come back as unsent.
            self._pump()
            unsent = entry.io.stop_writing() if isinstance(entry.io, QemuPort) else []
            self.switch.port_stopped(name, unsent, self._now())
            self._pump()
        entry.events.put_nowait(event)

    def _port_closed(self, name: str, reason: str) -> None:
        if name not in self._ports:
            return
        log.info("port %s: %s; detaching it", name, reason)
        self.counters.ports_closed += 1
        self._spawn(self.detach(name), f"detach-{name}")

    async def _port_events(self, entry: _Port) -> None:
        """The port's QMP events, one at a time, in order."""
        io = entry.io
        name = entry.spec.name
        while True:
            event = await entry.events.get()
            switch = self.switch
            if switch is None or not isinstance(io, QemuPort):
                continue
            if event == "STOP":
                accounting = await io.account()
                mode = "exact" if accounting.exact else "socket_only"
                self.counters.accountings[mode] = self.counters.accountings.get(mode, 0) + 1
                switch.port_accounted(name, lost=accounting.lost, queued=accounting.queued,
                                      now=self._now())
                self._pump()
            elif event == "RESUME":
                if switch.port_state(name) is PortState.INCOMING:
                    await io.rebase()
                io.resume_writing()
                switch.port_resumed(name, self._now())
                self._pump()
            elif event == "RESET":
                io.reset()

    def _persist(self) -> None:
        path = self.config.data_dir / PORTS_FILE
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps([e.spec.to_json() for e in self._ports.values()], indent=2)
                       + "\n")
        tmp.replace(path)

    def _load_specs(self) -> list[PortSpec]:
        path = self.config.data_dir / PORTS_FILE
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            return []
        except (OSError, json.JSONDecodeError) as exc:
            log.error("%s unreadable (%s): no ports re-attached", path, exc)
            return []
        specs = []
        for item in doc if isinstance(doc, list) else []:
            try:
                specs.append(PortSpec.from_json(item))
            except UsageError as exc:
                log.error("%s: skipped an entry: %s", path, exc)
        return specs

    # -- control and views --------------------------------------------------------------------

    async def _control_request(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request.get("op")
        if op == "attach":
            return {"port": await self.attach(PortSpec.from_json(request))}
        if op == "detach":
            name = request.get("name")
            if not isinstance(name, str):
                raise UsageError("detach needs a port name")
            await self.detach(name)
            return {}
        if op == "status":
            return {"status": self.status()}
        raise UsageError(f"unknown op {op!r} (attach, detach, status)")

    def _port_states(self) -> dict[str, int]:
        counts = {state.value: 0 for state in PortState}
        if self.switch is not None:
            for name in self._ports:
                counts[self.switch.port_state(name).value] += 1
        return counts

    def _port_status(self, name: str) -> dict[str, Any]:
        entry = self._ports[name]
        assert self.switch is not None
        doc = entry.spec.to_json()
        doc["state"] = self.switch.port_state(name).value
        doc["frames_in"] = entry.io.frames_in
        doc["frames_out"] = entry.io.frames_out
        if entry.io.mac is not None:
            doc.setdefault("mac", format_mac(entry.io.mac))
        return doc

    def status(self) -> dict[str, Any]:
        """Identity, addresses, ports (also the status file and /healthz details)."""
        return {
            "agent": f"{self.agent_id:016x}", "pid": os.getpid(), "version": __version__,
            "site": self.config.site, "tunnel": list(self.tunnel_address),
            "metrics": [self.config.host, self._http.port if self._http else 0],
            "control": str(self.config.control_path),
            "ports": [self._port_status(name) for name in self._ports],
            "store_nodes": self.directory.nodes if self.directory else 0,
            "fdb": self.switch.status()["fdb"] if self.switch else [],
        }

    def _health(self) -> tuple[bool, dict[str, Any]]:
        details: dict[str, Any] = {"uptime_seconds": round(time.time() - self._started_at, 1)}
        if self._ready:
            details.update(self.status())
        return self._ready, details

    def _write_status(self) -> None:
        path = self.config.status_file
        if path is None:
            return
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self.status()) + "\n")
        tmp.replace(path)
