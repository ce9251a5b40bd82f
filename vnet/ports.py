"""The agent's ports: a QEMU VM's NIC (``-netdev stream`` + its own QMP monitor), or a tap device.

:class:`QemuPort` connects to the unix socket QEMU listens on for the NIC's backend
(``-netdev stream,server=on,addr.type=unix,addr.path=...``; frames travel as a 4-byte big-endian
length and the frame) and to a QMP monitor of the VM (``-qmp unix:...,server=on,wait=off``) whose
``STOP``/``RESUME`` events say when the VM pauses and resumes.

When the VM stops, some frames the agent wrote never reach it, and the migration must carry
them. Two counts make that exact:

- the bytes QEMU has not read from the socket (:func:`tmdht.vnet.sockdiag.unread_by_peer`, read
  at once on STOP): those frames are *queued*: if the VM resumes here, QEMU delivers them itself;
- the frames the virtio NIC really delivered into the guest's receive ring (the used index of
  its receive queue, ``x-query-virtio-queue-status``, answered once QEMU finished stopping): the
  frames QEMU read but did not deliver are *lost* (QEMU 7.2 reads from its netdev while it
  stops the vCPUs, queues what it read because the VM no longer runs, then purges that queue).

Both are accounted oldest-last among the frames written, which the port keeps in a bounded log.
For the receive index to count every frame written, the port writes only frames the NIC accepts:
it mirrors the NIC's receive filter (``query-rx-filter``: unicast, multicast and broadcast
modes and tables, refreshed on ``NIC_RX_FILTER_CHANGED``) and drops the rest itself (the guest
would never see them). Without a virtio NIC (or if the counts disagree, e.g. a guest using
several receive buffers per frame) only the queued frames are known.

:class:`TapPort` attaches a Linux tap device (a host's own interface on the virtual network);
it never stops.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import itertools
import logging
import os
import socket
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from tmdht.errors import TmdhtError
from tmdht.ethernet import MAX_FRAME, MacAddress, parse_mac
from tmdht.vnet.qmp import QmpCommandError, QmpConnection, QmpError
from tmdht.vnet.sockdiag import SockDiagError, unread_by_peer
from tmdht.vswitch import PortFrame

__all__ = ["Accounting", "PortError", "QemuPort", "TapPort"]

log = logging.getLogger("tmdht.vnet.ports")

_LENGTH: Final = struct.Struct(">I")
_MAX_STREAM_FRAME: Final = 69632  # QEMU's NET_BUFSIZE: nothing longer comes from it
_READ_BYTES: Final = 1 << 18
_WRITE_BATCH: Final = 64
_LOG_FRAMES: Final = 16384
_LOG_BYTES: Final = 4 << 20
_SEND_BUFFER: Final = 1 << 20
MAX_QUEUED_FRAMES: Final = 4096
"""Frames a port queues for a VM that reads slower than they come (then it drops the newest,
as a NIC's full receive ring does; counted)."""
_U16: Final = 1 << 16
_TUNSETIFF: Final = 0x400454CA
_IFF_TAP: Final = 0x0002
_IFF_NO_PI: Final = 0x1000


class PortError(TmdhtError):
    """A port could not be attached (no such socket, not a QEMU, no tap)."""


@dataclass(frozen=True, slots=True)
class RxFilter:
    """A NIC's receive filter as ``query-rx-filter`` reports it (QEMU's virtio-net applies it
    before a frame reaches the guest's ring)."""

    promiscuous: bool = True
    unicast: str = "all"
    multicast: str = "all"
    main_mac: bytes = b""
    unicast_table: frozenset[bytes] = frozenset()
    multicast_table: frozenset[bytes] = frozenset()
    vlans: frozenset[int] | None = None
    """VLAN ids let through when tagged (None: every one)."""

    @classmethod
    def from_qmp(cls, info: dict[str, Any]) -> RxFilter:
        """From one element of ``query-rx-filter``'s answer."""
        def macs(key: str) -> frozenset[bytes]:
            return frozenset(parse_mac(str(m)) for m in info.get(key) or ())

        unicast = "all" if info.get("unicast-overflow") else str(info.get("unicast", "normal"))
        multicast = "all" if info.get("multicast-overflow") else str(
            info.get("multicast", "normal"))
        vlans = None if info.get("vlan", "all") == "all" else frozenset(
            int(v) for v in info.get("vlan-table") or ())
        return cls(promiscuous=bool(info.get("promiscuous")), unicast=unicast,
                   multicast=multicast, main_mac=parse_mac(str(info.get("main-mac"))),
                   unicast_table=macs("unicast-table"), multicast_table=macs("multicast-table"),
                   vlans=vlans)

    def accepts(self, frame: bytes) -> bool:
        """Whether QEMU hands ``frame`` to the guest.

        Broadcasts always pass: QEMU 7.2 reports ``broadcast-allowed`` inverted (it is
        virtio-net's ``nobcast``: false while broadcasts arrive), and guests do not turn them
        off.
        """
        if self.promiscuous:
            return True
        if self.vlans is not None and frame[12:14] == b"\x81\x00" and \
                int.from_bytes(frame[14:16], "big") & 0x0FFF not in self.vlans:
            return False
        dst = frame[:6]
        if dst == b"\xff\xff\xff\xff\xff\xff":
            return True
        if dst[0] & 1:
            return self.multicast == "all" or (
                self.multicast == "normal" and dst in self.multicast_table)
        if dst == self.main_mac:
            return True
        return self.unicast == "all" or (self.unicast == "normal" and dst in self.unicast_table)


@dataclass(frozen=True, slots=True)
class Accounting:
    """What a stopped VM did not receive of what was written to it (see the module docstring)."""

    lost: list[PortFrame]
    """Read by QEMU, never delivered: only a re-delivery brings them to the VM."""
    queued: list[PortFrame]
    """Unread in the socket: QEMU delivers them if the VM resumes where it stopped."""
    exact: bool
    """Both counts were available and consistent."""


class QemuPort:
    """A VM NIC's stream socket and the VM's QMP monitor.

    ``on_frames(frames)`` gets what the VM sends; ``on_event(name)`` gets ``STOP``, ``RESUME``,
    ``RESET``, ``SHUTDOWN``; ``on_closed(reason)`` is called once when QEMU goes away.
    """

    def __init__(self, name: str, net_socket: Path, qmp_socket: Path, *,
                 nic_id: str | None = None,
                 on_frames: Callable[[list[bytes]], None],
                 on_event: Callable[[str], None],
                 on_closed: Callable[[str], None]) -> None:
        self.name = name
        self.net_socket = net_socket
        self.qmp_socket = qmp_socket
        self.nic_id = nic_id
        self._on_frames = on_frames
        self._on_event = on_event
        self._on_closed = on_closed
        self._sock: socket.socket | None = None
        self._qmp: QmpConnection | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._in = bytearray()
        self._out: collections.deque[tuple[PortFrame, memoryview]] = collections.deque()
        self._writing = False
        self._stopped = False
        self._holding = False  # writes held for a moment (a quiet rebase)
        self._written_bytes = 0
        self._written_frames = 0
        self._log: collections.deque[tuple[int, PortFrame]] = collections.deque()
        self._log_bytes = 0
        self._unread_at_stop: int | None = None
        self._virtio_path: str | None = None
        self._rx_filter: RxFilter | None = None
        self._filter_task: asyncio.Task[None] | None = None
        self._used_at_stop: asyncio.Task[int | None] | None = None
        self._used_base: int | None = None
        self._closed = False
        self.run_state = "unknown"
        """QEMU's run state when attached (``running``, ``inmigrate``, ``paused``, ...)."""
        self.mac: MacAddress | None = None
        """The NIC's MAC as QEMU reports it (if it could tell)."""
        self.frames_in = 0
        self.frames_out = 0
        self.overflow = 0
        """Frames dropped because the VM did not read fast enough."""
        self.filtered = 0
        """Frames not written because the NIC's receive filter would drop them."""

    # -- life cycle ---------------------------------------------------------------------------

    async def open(self, *, timeout: float = 10.0) -> None:
        """Connect to QEMU's NIC socket and QMP monitor; learn the run state and the virtio
        receive queue. Raises PortError."""
        loop = self._loop = asyncio.get_running_loop()
        try:
            self._qmp = await QmpConnection.connect(self.qmp_socket, self._qmp_event,
                                                    timeout=timeout)
            status = await self._qmp.execute("query-status", timeout=timeout)
            self.run_state = str(status.get("status", "unknown"))
            await self._find_virtio(timeout)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SEND_BUFFER)
            try:
                await asyncio.wait_for(loop.sock_connect(sock, str(self.net_socket)), timeout)
            except BaseException:
                sock.close()
                raise
            self._sock = sock
            if self.run_state == "running":
                await self.rebase(timeout)
            loop.add_reader(sock.fileno(), self._readable)
        except (OSError, TimeoutError, QmpError) as exc:
            await self.close()
            raise PortError(f"port {self.name}: cannot attach to QEMU: {exc}") from None

    async def _find_virtio(self, timeout: float) -> None:
        assert self._qmp is not None
        try:
            devices = await self._qmp.execute("x-query-virtio", timeout=timeout)
        except QmpCommandError:
            return  # no virtio device at all, or an older QEMU
        nets = [d["path"] for d in devices or () if d.get("name") == "virtio-net"]
        if self.nic_id is not None:
            nets = [p for p in nets if p.split("/")[-2:-1] == [self.nic_id]]
        if len(nets) == 1:
            self._virtio_path = nets[0]
            with contextlib.suppress(QmpError, KeyError, TypeError, ValueError, TmdhtError):
                device = nets[0].rsplit("/", 1)[0]
                mac = await self._qmp.execute("qom-get", path=device, property="mac",
                                              timeout=timeout)
                self.mac = parse_mac(str(mac))
            await self._refresh_filter(timeout)
        elif len(nets) > 1:
            log.warning("port %s: %d virtio NICs, none chosen (give --nic-id): stranded frames "
                        "are counted from the socket only", self.name, len(nets))

    async def _refresh_filter(self, timeout: float = 30.0) -> None:
        """Read the NIC's receive filter (this also re-arms NIC_RX_FILTER_CHANGED)."""
        if self._qmp is None or self.mac is None:
            return
        try:
            nics = await self._qmp.execute("query-rx-filter", timeout=timeout)
            mine = [n for n in nics or () if parse_mac(str(n.get("main-mac"))) == self.mac]
            self._rx_filter = RxFilter.from_qmp(mine[0]) if len(mine) == 1 else None
        except (QmpError, TmdhtError, KeyError, TypeError, ValueError) as exc:
            log.warning("port %s: no receive filter (%s): every frame is written", self.name,
                        exc)
            self._rx_filter = None

    async def _filter_changed(self) -> None:
        """The guest changed its receive filter: mirror it, and count again from a quiet
        moment (frames written around the change may have been judged by the old filter)."""
        await self._refresh_filter()
        await self._quiet_rebase()

    async def _quiet_rebase(self, drain_polls: int = 50) -> None:
        """Hold writes until QEMU has read every byte written, then :meth:`rebase`."""
        if self._stopped or self._sock is None or self._used_base is None:
            return
        self._holding = True
        try:
            for _ in range(drain_polls):  # bounded: ~50 ms at most
                try:
                    if unread_by_peer(self._sock) == 0 and not self._partial():
                        break
                except SockDiagError:
                    break
                await asyncio.sleep(0.001)  # QEMU reads on its own schedule: poll briefly
            if not self._stopped:
                await self.rebase()
        finally:
            self._holding = False
            if not self._stopped:
                self._flush()

    async def _used_index(self, timeout: float = 30.0) -> int | None:
        if self._qmp is None or self._virtio_path is None:
            return None
        try:
            status = await self._qmp.execute("x-query-virtio-queue-status",
                                             path=self._virtio_path, queue=0, timeout=timeout)
            return int(status["used-idx"])
        except (QmpError, KeyError, TypeError, ValueError) as exc:
            log.warning("port %s: no virtio receive index: %s", self.name, exc)
            return None

    async def rebase(self, timeout: float = 30.0) -> None:
        """Take the virtio receive index as the count of frames delivered so far (call before
        writing to a VM that runs: at attach, and when a migration's destination resumes)."""
        used = await self._used_index(timeout)
        self._used_base = None if used is None else (used - self._written_frames) % _U16

    def reset(self) -> None:
        """The guest reset its NIC (QMP RESET): its receive ring starts over."""
        self._used_base = 0
        self._written_frames = 0

    async def close(self) -> None:
        """Disconnect (idempotent); ``on_closed`` is not called for a close asked for."""
        self._closed = True
        for task in (self._filter_task, self._used_at_stop):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._filter_task = self._used_at_stop = None
        if self._sock is not None and self._loop is not None:
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_reader(self._sock.fileno())
                self._loop.remove_writer(self._sock.fileno())
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._qmp is not None:
            await self._qmp.close()
            self._qmp = None

    def _gone(self, reason: str) -> None:
        if not self._closed:
            self._closed = True
            self._on_closed(reason)

    def _qmp_event(self, name: str, data: dict[str, Any]) -> None:
        if name == "STOP" and not self._stopped:
            self._freeze()
        if name == "NIC_RX_FILTER_CHANGED" and self._loop is not None and (
                self._filter_task is None or self._filter_task.done()):
            self._filter_task = self._loop.create_task(self._filter_changed())
            return
        self._on_event(name)

    # -- reading ------------------------------------------------------------------------------

    def _readable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        try:
            data = sock.recv(_READ_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._gone(f"read failed: {exc}")
            return
        if not data:
            self._gone("QEMU closed the NIC socket")
            return
        buf = self._in
        buf += data
        frames = []
        at = 0
        while len(buf) - at >= _LENGTH.size:
            (length,) = _LENGTH.unpack_from(buf, at)
            if length > _MAX_STREAM_FRAME:
                self._gone(f"frame length {length} from QEMU: not a netdev stream")
                return
            if len(buf) - at - _LENGTH.size < length:
                break
            start = at + _LENGTH.size
            frames.append(bytes(buf[start : start + length]))
            at = start + length
        del buf[:at]
        if frames:
            self.frames_in += len(frames)
            self._on_frames(frames)

    # -- writing ------------------------------------------------------------------------------

    def write(self, frames: Sequence[PortFrame]) -> None:
        """Queue frames for the VM and write what the socket takes."""
        rx_filter = self._rx_filter
        writing = not (self._stopped or self._holding)
        for item in frames:
            if rx_filter is not None and not rx_filter.accepts(item.frame):
                self.filtered += 1
                continue
            if len(self._out) >= MAX_QUEUED_FRAMES and not self._stopped:
                self.overflow += 1
                continue
            data = _LENGTH.pack(len(item.frame)) + item.frame
            self._out.append((item, memoryview(data)))
        if writing:
            self._flush()

    def _flush(self) -> None:
        sock = self._sock
        if sock is None:
            return
        out = self._out
        while out:
            if (self._stopped or self._holding) and not self._partial():
                break  # only the frame begun before the stop (or the hold) is finished
            batch = [out[0][1]] if self._stopped or self._holding else [
                view for _, view in itertools.islice(out, _WRITE_BATCH)]
            try:
                sent = sock.sendmsg(batch)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self._gone(f"write failed: {exc}")
                return
            self._written_bytes += sent
            while sent and out:
                item, view = out[0]
                if sent < len(view):
                    out[0] = (item, view[sent:])
                    sent = 0
                    break
                sent -= len(view)
                out.popleft()
                self._logged(item)
            if self._partial():
                break  # the socket is full
        want_writer = bool(out) and (not (self._stopped or self._holding) or self._partial())
        if want_writer != self._writing and self._loop is not None:
            if want_writer:
                self._loop.add_writer(sock.fileno(), self._flush)
            else:
                self._loop.remove_writer(sock.fileno())
            self._writing = want_writer

    def _partial(self) -> bool:
        """The first queued frame is partly written (it must be finished, stop or not)."""
        if not self._out:
            return False
        item, view = self._out[0]
        return len(view) < _LENGTH.size + len(item.frame)

    def _logged(self, item: PortFrame) -> None:
        self._written_frames += 1
        self.frames_out += 1
        self._log.append((self._written_bytes, item))
        self._log_bytes += len(item.frame)
        while len(self._log) > _LOG_FRAMES or self._log_bytes > _LOG_BYTES:
            self._log_bytes -= len(self._log.popleft()[1].frame)

    def _freeze(self) -> None:
        """On STOP, at once: stop writing, note what QEMU has not read."""
        self._stopped = True
        unread = 0
        if self._sock is not None:
            try:
                unread = unread_by_peer(self._sock)
            except SockDiagError as exc:
                log.warning("port %s: %s", self.name, exc)
                unread = 0
        if unread < 0:  # QEMU never accepted the connection: it read nothing
            unread = self._written_bytes
        if self._partial():
            unread += len(self._out[0][1])  # its remainder: written later, read by nobody running
        self._unread_at_stop = unread
        # Ask for the receive index at once: QEMU answers when it finished stopping (it needs
        # its big lock), and every frame it delivered is in the count by then.
        if self._loop is not None and self._virtio_path is not None:
            self._used_at_stop = self._loop.create_task(self._used_index())

    def stop_writing(self) -> list[PortFrame]:
        """The VM stopped: write nothing more (but the frame begun); return the frames not
        begun, oldest first (they are the agent's to hold)."""
        if not self._stopped:
            self._freeze()
        keep = 1 if self._partial() else 0
        unsent = [item for item, _ in list(self._out)[keep:]]
        while len(self._out) > keep:
            self._out.pop()
        self._flush()
        return unsent

    async def account(self) -> Accounting:
        """After a stop: which written frames the VM did not receive (see the module docs)."""
        unread = self._unread_at_stop or 0
        written_frames, written_bytes = self._written_frames, self._written_bytes
        if self._partial():
            written_frames += 1
            written_bytes += len(self._out[0][1])
        log_items = list(self._log)
        if self._partial():
            log_items.append((written_bytes, self._out[0][0]))
        consumed_bytes = written_bytes - unread
        queued = [item for end, item in log_items if end > consumed_bytes]
        task, self._used_at_stop = self._used_at_stop, None
        used = await task if task is not None else None
        if used is None or self._used_base is None:
            return Accounting([], queued, exact=False)
        delivered = (used - self._used_base) % _U16
        undelivered = (written_frames - delivered) % _U16
        if undelivered > len(log_items):
            log.warning("port %s: %d frames written, %d delivered: more undelivered than logged",
                        self.name, written_frames, delivered)
            return Accounting([], queued, exact=False)
        # The VM received everything but the last `undelivered` frames written. The socket's
        # count can only be higher if frames unread at the stop were delivered after all (they
        # were not: a stopped VM takes nothing): trust the smaller, never deliver twice.
        exact = undelivered >= len(queued)
        missing = [item for _, item in log_items[len(log_items) - undelivered:]]
        queued = missing[len(missing) - min(len(queued), len(missing)):]
        lost = missing[: len(missing) - len(queued)]
        return Accounting(lost, queued, exact=exact)

    def resume_writing(self) -> None:
        """The VM runs here again: write what comes (QEMU delivers its unread bytes itself)."""
        self._stopped = False
        self._unread_at_stop = None
        self._flush()


class TapPort:
    """A Linux tap device as a port (``IFF_TAP | IFF_NO_PI``: one frame per read/write)."""

    def __init__(self, name: str, ifname: str, *, on_frames: Callable[[list[bytes]], None],
                 on_closed: Callable[[str], None]) -> None:
        self.name = name
        self.ifname = ifname
        self._on_frames = on_frames
        self._on_closed = on_closed
        self._fd: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._out: collections.deque[bytes] = collections.deque()
        self._writing = False
        self.mac: MacAddress | None = None
        self.run_state = "running"
        self.frames_in = 0
        self.frames_out = 0
        self.overflow = 0

    async def open(self) -> None:
        """Open (or create) the tap device; raises PortError."""
        self._loop = asyncio.get_running_loop()
        try:
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise PortError(f"tap {self.ifname}: /dev/net/tun: {exc.strerror}") from None
        try:
            request = struct.pack("16sH", self.ifname.encode(), _IFF_TAP | _IFF_NO_PI)
            fcntl.ioctl(fd, _TUNSETIFF, request)
            address = Path(f"/sys/class/net/{self.ifname}/address").read_text().strip()
            self.mac = parse_mac(address)
        except (OSError, TmdhtError) as exc:
            os.close(fd)
            raise PortError(f"tap {self.ifname}: {exc}") from None
        self._fd = fd
        self._loop.add_reader(fd, self._readable)

    async def close(self) -> None:
        """Close the device (idempotent)."""
        if self._fd is not None and self._loop is not None:
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_reader(self._fd)
                self._loop.remove_writer(self._fd)
            os.close(self._fd)
            self._fd = None

    def _readable(self) -> None:
        frames = []
        for _ in range(256):
            if self._fd is None:
                return
            try:
                frame = os.read(self._fd, MAX_FRAME + 64)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self._on_closed(f"tap read failed: {exc}")
                return
            frames.append(frame)
        if frames:
            self.frames_in += len(frames)
            self._on_frames(frames)

    def write(self, frames: Sequence[PortFrame]) -> None:
        """Write frames to the device (queued while it is busy, up to a bound)."""
        for item in frames:
            if len(self._out) >= MAX_QUEUED_FRAMES:
                self.overflow += 1
            else:
                self._out.append(item.frame)
        self._flush()

    def _flush(self) -> None:
        fd = self._fd
        if fd is None:
            return
        while self._out:
            try:
                os.write(fd, self._out[0])
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                log.debug("tap %s: write failed: %s", self.ifname, exc)
            self._out.popleft()
            self.frames_out += 1
        want = bool(self._out)
        if want != self._writing and self._loop is not None:
            if want:
                self._loop.add_writer(fd, self._flush)
            else:
                self._loop.remove_writer(fd)
            self._writing = want
