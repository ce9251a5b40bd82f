"""WAN emulation for bench/migrate.py: two network namespaces joined by a user-space delay relay.

The kernel here has no sch_netem, so delay is added in user space, per packet, which keeps TCP
end to end: the sender's congestion control sees the real round-trip time (slow start, window
limits), as it would on a WAN. A split TCP proxy would hide both.

Topology (names prefixed ``wanbench-``; the namespaces also carry the owner's PID)::

    netns wanbench-src-PID                                       netns wanbench-dst-PID
    10.233.0.1 on tun wanbench0 ──▶ relay (one-way delay) ──▶ tun wanbench0 on 10.233.0.2
               (tbf rate on egress) ◀── relay (one-way delay) ◀── (tbf rate on egress)

Each tun has ``vnet_hdr`` and TSO/checksum offloads, so TCP hands the relay segments of up to
64 KiB while the MTU stays 1500 (segment sizes, windows and slow start are those of a 1500-byte
path). The relay reads a packet, holds it for the one-way delay in a bounded FIFO (tail drop
beyond ``--buffer`` bytes, like a router queue) and writes it into the other tun. It counts
packets and bytes both ways, also as they would be on a 1500-MTU wire (each TSO segment cut
into MSS-sized packets with their own IP and TCP headers). The rate limit is ``tbf`` on each
tun's egress (it counts segment bytes the same way); its queue is one bandwidth-delay product
(at least 256 KiB). TCP buffers in both namespaces may grow to ``tcp_buffer`` bytes (64 MiB by
default, as an operator tunes a WAN host: Linux's defaults cap one stream at about 200 Mbit/s at
80 ms).

Run ``python bench/wanemu.py check`` (root) for the emulation's self-check alone: round-trip
time and plain TCP bulk throughput through the relay at each setting, and the relay's CPU per
GB forwarded. The same module runs the relay itself (``relay``) and the self-check's small
programs (``echo``, ``ping``, ``sink``, ``source``) inside the namespaces.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import ctypes
import fcntl
import json
import os
import shlex
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

SRC_ADDR, DST_ADDR = "10.233.0.1", "10.233.0.2"
TUN = "wanbench0"
PREFIX = "wanbench-"
CPUACCT = Path("/sys/fs/cgroup/cpuacct")
DEFAULT_BUFFER = 64 << 20
DEFAULT_TCP_BUFFER = 64 << 20
SOURCE_CPU, DEST_CPU = 0, 1
RELAY_NICE = -10

_TUNSETIFF = 0x400454CA
_TUNSETOFFLOAD = 0x400454D0
_IFF_TUN, _IFF_NO_PI, _IFF_VNET_HDR = 0x0001, 0x1000, 0x4000
_TUN_F_CSUM, _TUN_F_TSO4, _TUN_F_TSO6, _TUN_F_TSO_ECN = 0x01, 0x02, 0x04, 0x08
_CLONE_NEWNET = 0x40000000
VNET_HDR_LEN = 10
"""``struct virtio_net_hdr``: flags, gso_type, hdr_len, gso_size, csum_start, csum_offset."""
_GSO_NONE = 0
_READ_SIZE = VNET_HDR_LEN + 65536 + 256
_READS_PER_WAKEUP = 128
_WIRE_MTU = 1500


# -- the relay's core (no IO) -----------------------------------------------------------------


def wire_bytes(packet: bytes | memoryview) -> tuple[int, int]:
    """(IP bytes, packets) a vnet-header packet takes on a 1500-MTU wire.

    A TSO packet (gso_type set) is cut into segments of ``gso_size`` payload bytes, each with
    its own copy of the headers; anything else is one packet of its own length.
    """
    if len(packet) < VNET_HDR_LEN:
        return 0, 0
    length = len(packet) - VNET_HDR_LEN
    gso_type, gso_size = packet[1], int.from_bytes(packet[4:6], "little")
    if gso_type == _GSO_NONE or gso_size == 0 or length <= _WIRE_MTU:
        return length, 1
    headers = _header_length(packet, VNET_HDR_LEN)
    if headers is None or headers >= length:
        return length, 1
    segments = -(-(length - headers) // gso_size)
    return length + (segments - 1) * headers, segments


def _header_length(packet: bytes | memoryview, at: int) -> int | None:
    """IP + TCP (or UDP) header bytes of the IPv4/IPv6 packet at ``packet[at:]`` (not copied:
    packets are up to 64 KiB), None if it is neither."""
    size = len(packet) - at
    if size < 1:
        return None
    version = packet[at] >> 4
    if version == 4 and size >= 20:
        ihl, proto = (packet[at] & 0x0F) * 4, packet[at + 9]
    elif version == 6 and size >= 40:
        ihl, proto = 40, packet[at + 6]
    else:
        return None
    if proto == 6 and size >= ihl + 20:
        return ihl + (packet[at + ihl + 12] >> 4) * 4
    if proto == 17:
        return ihl + 8
    return None


@dataclass
class DirectionStats:
    """What crossed one direction of the relay (or was dropped there)."""

    packets: int = 0
    """Packets forwarded (TSO packets count once)."""
    bytes: int = 0
    """IP bytes forwarded (TSO packets with their headers once)."""
    wire_packets: int = 0
    """Packets on a 1500-MTU wire (TSO packets cut into segments)."""
    wire_bytes: int = 0
    """IP bytes on a 1500-MTU wire (each segment with its headers)."""
    dropped_packets: int = 0
    """Packets dropped because the delay line was full (tail drop)."""
    dropped_bytes: int = 0
    """Their IP bytes."""
    max_queued_bytes: int = 0
    """The most IP bytes held in the delay line at once."""

    def to_json(self) -> dict[str, int]:
        """The counters as a JSON-ready dict."""
        return dict(self.__dict__)


@dataclass
class DelayLine:
    """A FIFO that releases each packet ``delay`` seconds after it arrived, holding at most
    ``limit`` bytes (a packet that does not fit is dropped, like a full router queue)."""

    delay: float
    """One-way delay in seconds."""
    limit: int
    """Bytes held at most."""
    stats: DirectionStats = field(default_factory=DirectionStats)
    """Counters of this direction."""
    _queue: collections.deque[tuple[float, bytes]] = field(default_factory=collections.deque)
    _queued: int = 0

    def push(self, packet: bytes, now: float) -> bool:
        """Accept ``packet`` (vnet header first) arriving at ``now``; False if dropped."""
        size = max(0, len(packet) - VNET_HDR_LEN)
        if self._queued + len(packet) > self.limit:
            self.stats.dropped_packets += 1
            self.stats.dropped_bytes += size
            return False
        self._queue.append((now + self.delay, packet))
        self._queued += len(packet)
        self.stats.max_queued_bytes = max(self.stats.max_queued_bytes, self._queued)
        return True

    def pop_due(self, now: float) -> list[bytes]:
        """The packets whose time has come (in arrival order), counted as forwarded."""
        out = []
        while self._queue and self._queue[0][0] <= now:
            _due, packet = self._queue.popleft()
            self._queued -= len(packet)
            self._count(packet)
            out.append(packet)
        return out

    def next_due(self) -> float | None:
        """When the oldest held packet is due, None if empty."""
        return self._queue[0][0] if self._queue else None

    @property
    def queued_bytes(self) -> int:
        """Bytes held now (vnet headers included)."""
        return self._queued

    def _count(self, packet: bytes) -> None:
        stats = self.stats
        stats.packets += 1
        stats.bytes += len(packet) - VNET_HDR_LEN
        on_wire, segments = wire_bytes(packet)
        stats.wire_bytes += on_wire
        stats.wire_packets += segments


# -- the relay process (asyncio skin) ---------------------------------------------------------


def _setns(path: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"setns({path}): {os.strerror(errno)}")
    finally:
        os.close(fd)


def open_tun(namespace: str, device: str) -> int:
    """Attach to the persistent vnet_hdr tun ``device`` of ``namespace`` (non-blocking fd)."""
    own = os.open("/proc/self/ns/net", os.O_RDONLY)
    try:
        _setns(f"/run/netns/{namespace}")
        try:
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
            try:
                fcntl.ioctl(fd, _TUNSETIFF, struct.pack(
                    "16sH", device.encode(), _IFF_TUN | _IFF_NO_PI | _IFF_VNET_HDR))
                fcntl.ioctl(fd, _TUNSETOFFLOAD,
                            _TUN_F_CSUM | _TUN_F_TSO4 | _TUN_F_TSO6 | _TUN_F_TSO_ECN)
            except OSError:
                os.close(fd)
                raise
        finally:
            _setns(f"/proc/self/fd/{own}")
    finally:
        os.close(own)
    return fd


class _Pipe:
    """One direction: read packets from ``src``, hold them in a delay line, write to ``dst``."""

    def __init__(self, loop: asyncio.AbstractEventLoop, src: int, dst: int,
                 line: DelayLine) -> None:
        self._loop, self._src, self._dst, self.line = loop, src, dst, line
        self._timer: asyncio.TimerHandle | None = None
        self.write_errors = 0

    def start(self) -> None:
        self._loop.add_reader(self._src, self._readable)

    def stop(self) -> None:
        self._loop.remove_reader(self._src)
        if self._timer is not None:
            self._timer.cancel()

    def _readable(self) -> None:
        for _ in range(_READS_PER_WAKEUP):
            try:
                packet = os.read(self._src, _READ_SIZE)
            except BlockingIOError:
                break
            if self.line.push(packet, time.monotonic()) and self.line.delay <= 0:
                self._flush()
        if self._timer is None and self.line.next_due() is not None:
            self._flush()

    def _flush(self) -> None:
        self._timer = None
        # timers fire with millisecond resolution: release what is due within half of one
        for packet in self.line.pop_due(time.monotonic() + 0.0005):
            try:
                os.write(self._dst, packet)
            except OSError:
                self.write_errors += 1  # the other side's stack refused it: a lost packet
        due = self.line.next_due()
        if due is not None:
            self._timer = self._loop.call_later(max(0.0, due - time.monotonic()), self._flush)


async def _relay(source_ns: str, dest_ns: str, device: str, delay_ms: float,
                 limit: int) -> None:
    loop = asyncio.get_running_loop()
    up_fd, down_fd = open_tun(source_ns, device), open_tun(dest_ns, device)
    pipes = {"up": _Pipe(loop, up_fd, down_fd, DelayLine(delay_ms / 1000, limit)),
             "down": _Pipe(loop, down_fd, up_fd, DelayLine(delay_ms / 1000, limit))}
    stopped: asyncio.Future[None] = loop.create_future()

    def stop(*_args: object) -> None:
        if not stopped.done():
            stopped.set_result(None)

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    for pipe in pipes.values():
        pipe.start()
    print(json.dumps({"ready": True, "pid": os.getpid()}), flush=True)

    async def control() -> None:
        """One command per stdin line: ``stats`` prints the counters as one JSON line;
        ``delay MS`` sets the one-way delay of packets arriving from now on."""
        while line := await reader.readline():
            words = line.decode().split()
            if words[:1] == ["delay"] and len(words) == 2:
                for pipe in pipes.values():
                    pipe.line.delay = float(words[1]) / 1000
            reply: dict[str, Any] = {name: {**pipe.line.stats.to_json(), "write_errors": pipe.write_errors,
                            "queued_bytes": pipe.line.queued_bytes}
                     for name, pipe in pipes.items()}
            reply["delay_ms"] = pipes["up"].line.delay * 1000
            print(json.dumps(reply), flush=True)

    task = loop.create_task(control())
    task.add_done_callback(stop)  # stdin closed: the bench is gone
    try:
        await stopped
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        for pipe in pipes.values():
            pipe.stop()
        os.close(up_fd)
        os.close(down_fd)


# -- the self-check's programs ----------------------------------------------------------------


def _listen(host: str) -> socket.socket:
    server = socket.socket()
    server.bind((host, 0))
    server.listen(1)
    print(f"READY {server.getsockname()[1]}", flush=True)
    return server


def _echo(host: str) -> None:
    with _listen(host) as server:
        server.settimeout(60)
        conn, _ = server.accept()
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while data := conn.recv(4096):
                conn.sendall(data)


def _ping(host: str, port: int, count: int) -> None:
    with socket.create_connection((host, port), timeout=30) as conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        samples = []
        for _ in range(count + 1):  # the first round trip warms up
            started = time.perf_counter()
            conn.sendall(b"x")
            if conn.recv(1) != b"x":
                raise OSError("echo server closed")
            samples.append((time.perf_counter() - started) * 1000)
    print(json.dumps({"rtt_ms": samples[1:]}), flush=True)


def _sink(host: str) -> None:
    with _listen(host) as server:
        server.settimeout(60)
        conn, _ = server.accept()
        total, first, last = 0, 0.0, 0.0
        with conn:
            conn.settimeout(60)
            while data := conn.recv(1 << 20):
                last = time.monotonic()
                if not total:
                    first = last
                total += len(data)
    print(json.dumps({"bytes": total, "seconds": last - first}), flush=True)


def _source(host: str, port: int, seconds: float) -> None:
    buf = os.urandom(1 << 20)
    with socket.create_connection((host, port), timeout=30) as conn:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            conn.sendall(buf)


# -- the orchestrator's side: namespaces, shaping, cgroups, wrappers ---------------------------


def run(*args: str, check: bool = True, timeout: float = 60) -> str:
    """Run a command, return its stdout; raise with its stderr if it fails."""
    done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    if check and done.returncode != 0:
        raise RuntimeError(f"{shlex.join(args)} failed: {done.stderr.strip()}")
    return done.stdout


def rate_bits(rate: str) -> int | None:
    """``100mbit`` → 100_000_000; ``0``, ``none`` or ``uncapped`` → None."""
    text = rate.strip().lower()
    if text in ("0", "none", "uncapped", ""):
        return None
    for unit, factor in (("kbit", 10**3), ("mbit", 10**6), ("gbit", 10**9), ("bit", 1)):
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def rate_label(rate: str) -> str:
    bits = rate_bits(rate)
    if bits is None:
        return "uncapped"
    return f"{bits / 1e9:g} Gbit/s" if bits >= 10**9 else f"{bits / 1e6:g} Mbit/s"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _owner(name: str) -> int | None:
    tail = name.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else None


def remove_stale(log: IO[str] = sys.stderr) -> None:
    """Remove namespaces, cgroups and /dev/shm folders ``wanbench-*PID`` whose PID no longer
    runs (a run that was SIGKILLed could not clean up); never touches a live owner's."""
    for name in run("ip", "netns", "list", check=False).split():
        owner = _owner(name)
        if name.startswith(PREFIX) and owner is not None and not _pid_alive(owner):
            _kill_namespace(name)
            run("ip", "netns", "del", name, check=False)
            print(f"removed stale namespace {name}", file=log)
    if CPUACCT.is_dir():
        for group in CPUACCT.glob(f"{PREFIX}*"):
            owner = _owner(group.name)
            if owner is not None and not _pid_alive(owner):
                _remove_cgroup(group)
                print(f"removed stale cgroup {group}", file=log)
    for folder in Path("/dev/shm").glob(f"{PREFIX}*"):  # bench/migrate.py's memory dumps
        owner = _owner(folder.name)
        if owner is not None and not _pid_alive(owner) and folder.is_dir():
            shutil.rmtree(folder, ignore_errors=True)
            print(f"removed stale {folder}", file=log)


def _kill_namespace(name: str) -> None:
    """SIGKILL every process inside our namespace ``name`` (only ours live there)."""
    for pid in run("ip", "netns", "pids", name, check=False).split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


def _remove_cgroup(group: Path) -> None:
    for child in [c for c in group.iterdir() if c.is_dir()]:
        if (child / "cgroup.procs").exists():
            _kill_cgroup(child)
            with contextlib.suppress(OSError):
                child.rmdir()
    _kill_cgroup(group)
    with contextlib.suppress(OSError):
        group.rmdir()


def _kill_cgroup(group: Path) -> None:
    with contextlib.suppress(OSError):
        for pid in (group / "cgroup.procs").read_text().split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
    for _ in range(50):  # the kernel moves killed tasks out shortly after they are reaped
        with contextlib.suppress(OSError):
            if not (group / "cgroup.procs").read_text().strip():
                return
        time.sleep(0.02)


@dataclass(frozen=True)
class Setting:
    """One WAN setting: rate limit (None: uncapped) and round-trip time added."""

    rate: str
    rtt_ms: float

    @property
    def label(self) -> str:
        return f"{rate_label(self.rate)}, {self.rtt_ms:g} ms"


class Wan:
    """The two namespaces, their tuns, the relay, CPU pinning and per-role CPU accounting.

    Roles (one cgroup each, for CPU seconds): ``src-qemu``, ``sender`` (source site, CPU 0);
    ``dst-qemu``, ``receiver``, ``nodes``, ``relay`` (destination site, CPU 1); ``check`` (the
    self-check's programs, both sites).
    """

    ROLES = ("src-qemu", "sender", "dst-qemu", "receiver", "nodes", "relay", "check")

    def __init__(self, work: Path, *, buffer: int = DEFAULT_BUFFER,
                 tcp_buffer: int = DEFAULT_TCP_BUFFER, python: str = sys.executable,
                 pin: bool = True) -> None:
        pid = os.getpid()
        self.src, self.dst = f"{PREFIX}src-{pid}", f"{PREFIX}dst-{pid}"
        self.cgroup = CPUACCT / f"{PREFIX}{pid}"
        self.work = work
        self.buffer = buffer
        self.tcp_buffer = tcp_buffer
        self.python = python
        self.pin = pin and (os.cpu_count() or 1) >= 2
        self._relay: subprocess.Popen[str] | None = None
        self.setting: Setting | None = None

    # life cycle

    def __enter__(self) -> Wan:
        remove_stale()
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _create(self) -> None:
        for ns, addr in ((self.src, SRC_ADDR), (self.dst, DST_ADDR)):
            run("ip", "netns", "add", ns)
            run("ip", "-n", ns, "link", "set", "lo", "up")
            run("ip", "-n", ns, "tuntap", "add", "dev", TUN, "mode", "tun", "vnet_hdr")
            run("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", TUN)
            run("ip", "-n", ns, "link", "set", TUN, "up")
            size = str(self.tcp_buffer)
            run("ip", "netns", "exec", ns, "sysctl", "-q", "-w",
                f"net.ipv4.tcp_rmem=4096 131072 {size}",
                f"net.ipv4.tcp_wmem=4096 16384 {size}")
        self.cgroup.mkdir()
        for role in self.ROLES:
            (self.cgroup / role).mkdir()
        self.wrappers = {
            "sender": self.wrapper("sender", self.src, SOURCE_CPU, "sender"),
            "receiver": self.wrapper("receiver", self.dst, DEST_CPU, "receiver"),
            "nodes": self.wrapper("nodes", self.dst, DEST_CPU, "nodes", self.python),
            # The relay is the network: it should not queue behind the site's processes (netem
            # runs in softirq context); niced up, it still sleeps while no packet moves.
            "relay": self.wrapper("relay", None, DEST_CPU, "relay", nice=RELAY_NICE),
            "check-src": self.wrapper("check-src", self.src, SOURCE_CPU, "check"),
            "check-dst": self.wrapper("check-dst", self.dst, DEST_CPU, "check"),
        }

    def close(self) -> None:
        """Stop the relay, kill what runs in our namespaces and cgroups, delete them."""
        self.stop_relay()
        for ns in (self.src, self.dst):
            _kill_namespace(ns)
        if self.cgroup.is_dir():
            _remove_cgroup(self.cgroup)
        for ns in (self.src, self.dst):
            run("ip", "netns", "del", ns, check=False)

    def wrapper(self, name: str, namespace: str | None, cpu: int, role: str,
                program: str | Path | None = None, *, nice: int = 0) -> Path:
        """A script that runs its arguments in ``namespace`` on ``cpu``, accounted to ``role``
        (every step execs: the program keeps the script's PID); ``program`` comes before the
        script's arguments when given. ``nsenter --net`` switches
        only the network namespace (``ip netns exec`` would also remount /sys, hiding the
        cgroups from the programs' own children, e.g. QEMU's ``exec:`` proxies)."""
        path = self.work / f"wrap-{name}"
        steps = []
        if namespace is not None:
            steps += ["nsenter", f"--net=/run/netns/{namespace}"]
        if self.pin:
            steps += ["taskset", "-c", str(cpu)]
        if nice:
            steps += ["nice", "-n", str(nice)]
        if program is not None:
            steps.append(str(program))
        path.write_text("#!/bin/sh\n"
                        f"echo $$ > {shlex.quote(str(self.cgroup / role / 'cgroup.procs'))}\n"
                        f"exec {shlex.join(steps)} \"$@\"\n")
        path.chmod(0o755)
        return path

    # CPU accounting

    def cpu_seconds(self) -> dict[str, float]:
        """CPU seconds used so far by each role (exited processes included)."""
        return {role: int((self.cgroup / role / "cpuacct.usage").read_text()) / 1e9
                for role in self.ROLES}

    def cpu_user_system(self, role: str) -> tuple[float, float]:
        """(user, system) CPU seconds of ``role`` so far. The relay's system time includes the
        destination kernel's receive path: a tun write runs it in the writer's context. The
        split is the kernel's approximation (cpuacct charges a whole slice to the mode it was
        in when charged): the two need not add up to ``cpu_seconds``, which is exact."""
        group = self.cgroup / role
        return (int((group / "cpuacct.usage_user").read_text()) / 1e9,
                int((group / "cpuacct.usage_sys").read_text()) / 1e9)

    # the relay and the shaping

    def start_relay(self, one_way_ms: float) -> None:
        """Start the relay process (destination CPU) if needed and set its delay."""
        if self._relay is None or self._relay.poll() is not None:
            self._relay = subprocess.Popen(
                [str(self.wrappers["relay"]), self.python, __file__, "relay", "--source-ns",
                 self.src, "--dest-ns", self.dst, "--delay-ms", str(one_way_ms), "--buffer",
                 str(self.buffer)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            assert self._relay.stdout is not None
            line = self._relay.stdout.readline()
            if not line.startswith("{"):
                raise RuntimeError(f"relay did not start (exit {self._relay.wait(10)})")
        self.relay_command(f"delay {one_way_ms}")

    def relay_command(self, command: str) -> dict[str, Any]:
        """Send one control line to the relay and return its JSON answer."""
        relay = self._relay
        if relay is None or relay.stdin is None or relay.stdout is None:
            raise RuntimeError("relay is not running")
        relay.stdin.write(command + "\n")
        relay.stdin.flush()
        line = relay.stdout.readline()
        if not line:
            raise RuntimeError(f"relay exited ({relay.poll()})")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def stop_relay(self) -> None:
        relay, self._relay = self._relay, None
        if relay is None:
            return
        if relay.poll() is None:
            relay.terminate()
            try:
                relay.wait(10)
            except subprocess.TimeoutExpired:
                relay.kill()
                relay.wait(10)
        for stream in (relay.stdin, relay.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()

    def shape(self, setting: Setting) -> None:
        """Rate limit both tuns' egress (tbf) and set the relay's one-way delay."""
        bits = rate_bits(setting.rate)
        for ns in (self.src, self.dst):
            run("ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", TUN, "root",
                check=False)
            if bits is None:
                continue
            byte_rate = bits // 8
            # burst: at least two 64 KiB TSO packets; queue: one bandwidth-delay product
            burst = max(128 << 10, byte_rate // 1000)
            limit = max(256 << 10, int(byte_rate * max(setting.rtt_ms, 10) / 1000))
            run("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", TUN, "root", "tbf",
                "rate", str(bits), "burst", str(burst), "limit", str(limit))
        self.start_relay(setting.rtt_ms / 2)
        self.setting = setting

    def interface_bytes(self) -> dict[str, int]:
        """Bytes each tun sent into the relay: ``up`` = source to destination, ``down``."""
        out = {}
        for name, ns in (("up", self.src), ("down", self.dst)):
            doc = json.loads(run("ip", "-n", ns, "-s", "-j", "link", "show", "dev", TUN))
            out[name] = int(doc[0]["stats64"]["tx"]["bytes"])
        return out

    def drops(self) -> dict[str, int]:
        """Packets lost so far at each end's egress: tbf queue overflows (``qdisc``) and the tun's
        own queue (``tun``: the relay did not read fast enough)."""
        out = {}
        for name, ns in (("up", self.src), ("down", self.dst)):
            link = json.loads(run("ip", "-n", ns, "-s", "-j", "link", "show", "dev", TUN))
            out[f"tun_{name}"] = int(link[0]["stats64"]["tx"]["dropped"])
            qdiscs = json.loads(run("ip", "netns", "exec", ns, "tc", "-s", "-j", "qdisc", "show",
                                    "dev", TUN))
            out[f"qdisc_{name}"] = sum(int(q.get("drops", 0)) for q in qdiscs)
        return out

    def counters(self) -> dict[str, Any]:
        """Relay, interface, drop and CPU counters in one snapshot."""
        return {"relay": self.relay_command("stats"), "interface": self.interface_bytes(),
                "drops": self.drops(), "cpu": self.cpu_seconds()}

    # the self-check

    def _start_server(self, mode: str) -> tuple[subprocess.Popen[str], int]:
        proc = subprocess.Popen([str(self.wrappers["check-dst"]), self.python, __file__, mode,
                                 "--host", DST_ADDR], stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("READY "):
            proc.kill()
            proc.wait(10)
            raise RuntimeError(f"self-check {mode} did not start")
        return proc, int(line.split()[1])

    def _client(self, *args: str, timeout: float) -> dict[str, Any]:
        done = subprocess.run([str(self.wrappers["check-src"]), self.python, __file__, *args],
                              capture_output=True, text=True, timeout=timeout, check=True)
        doc: dict[str, Any] = json.loads(done.stdout) if done.stdout.strip() else {}
        return doc

    def self_check(self, seconds: float = 4.0, pings: int = 20) -> dict[str, Any]:
        """Round-trip time (TCP ping-pong) and plain TCP bulk throughput through the current
        setting, and the relay's CPU seconds per GB forwarded during the bulk transfer."""
        echo, port = self._start_server("echo")
        try:
            rtts = self._client("ping", "--host", DST_ADDR, "--port", str(port),
                                "--count", str(pings), timeout=60)["rtt_ms"]
        finally:
            _reap(echo)
        sink, port = self._start_server("sink")
        before = self.counters()
        user0, sys0 = self.cpu_user_system("relay")
        try:
            self._client("source", "--host", DST_ADDR, "--port", str(port),
                         "--seconds", str(seconds), timeout=seconds + 60)
            assert sink.stdout is not None
            bulk = json.loads(sink.stdout.readline() or "{}")
        finally:
            _reap(sink)
        after = self.counters()
        user1, sys1 = self.cpu_user_system("relay")
        relay_cpu = after["cpu"]["relay"] - before["cpu"]["relay"]
        moved = sum(after["relay"][d]["bytes"] - before["relay"][d]["bytes"]
                    for d in ("up", "down"))
        dropped = sum(after["relay"][d]["dropped_packets"] - before["relay"][d]["dropped_packets"]
                      for d in ("up", "down"))
        dropped += sum(after["drops"][k] - before["drops"][k] for k in after["drops"])
        mbit = bulk["bytes"] * 8 / bulk["seconds"] / 1e6 if bulk.get("seconds") else 0.0
        return {
            "rtt_ms_min": min(rtts), "rtt_ms_median": statistics.median(rtts),
            "rtt_ms_max": max(rtts), "bulk_mbit_s": mbit, "bulk_bytes": bulk.get("bytes", 0),
            "bulk_seconds": bulk.get("seconds", 0.0), "dropped_packets": dropped,
            "relay_cpu_s": relay_cpu, "relay_user_s": user1 - user0,
            "relay_system_s": sys1 - sys0, "relay_bytes": moved,
            "relay_cpu_s_per_gb": relay_cpu / (moved / 1e9) if moved else None,
        }

    def pids(self, role: str) -> list[int]:
        """PIDs currently accounted to ``role``."""
        text = (self.cgroup / role / "cgroup.procs").read_text()
        return [int(pid) for pid in text.split()]


def _reap(proc: subprocess.Popen[str]) -> None:
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
    if proc.stdout is not None:
        proc.stdout.close()


@contextlib.contextmanager
def signals_raise() -> Iterator[None]:
    """SIGTERM and SIGHUP raise SystemExit (so ``finally`` blocks clean up) while inside."""
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}

    def stop(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    for signum in previous:
        signal.signal(signum, stop)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def parse_settings(rates: str, rtts: str) -> list[Setting]:
    return [Setting(rate.strip(), float(rtt)) for rate in rates.split(",") if rate.strip()
            for rtt in rtts.split(",") if rtt.strip()]


def check_table(rows: list[tuple[Setting, dict[str, Any]]]) -> str:
    """The self-check as a text table."""
    lines = [f"{'link':>12} {'RTT set':>8} {'RTT min':>8} {'median':>8} {'max':>8} "
             f"{'TCP bulk':>12} {'drops':>6} {'relay CPU s per GB':>19}",
             f"{'':>12} {'ms':>8} {'ms':>8} {'ms':>8} {'ms':>8} {'Mbit/s':>12} {'':>6} "
             f"{'all (user+sys~)':>19}"]
    for setting, check in rows:
        per_gb = check["relay_cpu_s_per_gb"]
        gb = check.get("relay_bytes", 0) / 1e9
        split = (f"({check['relay_user_s'] / gb:.2f}+{check['relay_system_s'] / gb:.2f})"
                 if gb and "relay_user_s" in check else "")
        lines.append(
            f"{rate_label(setting.rate):>12} {setting.rtt_ms:8g} {check['rtt_ms_min']:8.2f} "
            f"{check['rtt_ms_median']:8.2f} {check['rtt_ms_max']:8.2f} "
            f"{check['bulk_mbit_s']:12.0f} {check.get('dropped_packets', check.get('relay_dropped_packets', 0)):6d} "
            f"{per_gb if per_gb is not None else float('nan'):7.2f} {split:>11}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="self-check the emulation (root)")
    check.add_argument("--rates", default="100mbit,1gbit,uncapped")
    check.add_argument("--rtts", default="0,20,80", help="round-trip times to add, ms")
    check.add_argument("--seconds", type=float, default=4.0, help="bulk transfer duration")
    check.add_argument("--json", type=Path, help="also write the results here")
    relay = sub.add_parser("relay", help="run the relay (started by Wan)")
    relay.add_argument("--source-ns", required=True)
    relay.add_argument("--dest-ns", required=True)
    relay.add_argument("--device", default=TUN)
    relay.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay")
    relay.add_argument("--buffer", type=int, default=DEFAULT_BUFFER,
                       help="bytes held per direction at most")
    for mode in ("echo", "sink"):
        server = sub.add_parser(mode)
        server.add_argument("--host", default="0.0.0.0")
    for mode in ("ping", "source"):
        client = sub.add_parser(mode)
        client.add_argument("--host", required=True)
        client.add_argument("--port", type=int, required=True)
        client.add_argument("--count", type=int, default=20)
        client.add_argument("--seconds", type=float, default=4.0)
    args = parser.parse_args(argv)
    if args.command == "relay":
        import uvloop  # noqa: PLC0415

        uvloop.run(_relay(args.source_ns, args.dest_ns, args.device, args.delay_ms,
                          args.buffer))
    elif args.command == "echo":
        _echo(args.host)
    elif args.command == "sink":
        _sink(args.host)
    elif args.command == "ping":
        _ping(args.host, args.port, args.count)
    elif args.command == "source":
        _source(args.host, args.port, args.seconds)
    else:
        if os.geteuid() != 0:
            print("needs root (network namespaces)", file=sys.stderr)
            return 2
        rows = []
        with signals_raise(), contextlib.ExitStack() as stack:
            import tempfile  # noqa: PLC0415

            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=PREFIX)))
            wan = stack.enter_context(Wan(work))
            for setting in parse_settings(args.rates, args.rtts):
                wan.shape(setting)
                result = wan.self_check(args.seconds)
                print(f"{setting.label}: {json.dumps(result)}", file=sys.stderr, flush=True)
                rows.append((setting, result))
        print(check_table(rows))
        if args.json:
            args.json.write_text(json.dumps(
                [{"rate": s.rate, "rtt_ms": s.rtt_ms, **r} for s, r in rows], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
