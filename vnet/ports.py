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
Without a virtio NIC (or if the counts disagree, e.g. a guest using several receive buffers per
frame) only the queued frames are known.

:class:`TapPort` attaches a Linux tap device (a host's own interface on the virtual network);
it never stops.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
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
_LOG_FRAMES: Final = 16384
_LOG_BYTES: Final = 4 << 20
_SEND_BUFFER: Final = 1 << 20
_U16: Final = 1 << 16
_TUNSETIFF: Final = 0x400454CA
_IFF_TAP: Final = 0x0002
_IFF_NO_PI: Final = 0x1000


class PortError(TmdhtError):
    """A port could not be attached (no such socket, not a QEMU, no tap)."""


@dataclass(frozen=True, slots=True)
class Accounting:
    """What a stopped VM did not receive of what was written to it (see the module docstring)."""

    lost: list[PortFrame]
    """Read by QEMU, never delivered: only a re-delivery brings them to the VM."""
    queued: list[PortFrame]
    """Unread in the socket: QEMU delivers them if the VM resumes where it stopped."""
    migration: bool
    """The stop was a migration's switch-over (QEMU's run state said so)."""
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
        self._written_bytes = 0
        self._written_frames = 0
        self._log: collections.deque[tuple[int, PortFrame]] = collections.deque()
        self._log_bytes = 0
        self._unread_at_stop: int | None = None
        self._virtio_path: str | None = None
        self._used_base: int | None = None
        self._closed = False
        self.run_state = "unknown"
        """QEMU's run state when attached (``running``, ``inmigrate``, ``paused``, ...)."""
        self.mac: MacAddress | None = None
        """The NIC's MAC as QEMU reports it (if it could tell)."""
        self.frames_in = 0
        self.frames_out = 0
        self.bytes_unsent = 0

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
            with contextlib.suppress(QmpError, KeyError, TypeError, ValueError):
                device = nets[0].rsplit("/", 1)[0]
                mac = await self._qmp.execute("qom-get", path=device, property="mac",
                                              timeout=timeout)
                self.mac = parse_mac(str(mac))
        elif len(nets) > 1:
            log.warning("port %s: %d virtio NICs, none chosen (give --nic-id): stranded frames "
                        "are counted from the socket only", self.name, len(nets))

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
        for item in frames:
            data = _LENGTH.pack(len(item.frame)) + item.frame
            self._out.append((item, memoryview(data)))
        if not self._stopped:
            self._flush()

    def _flush(self) -> None:
        sock = self._sock
        if sock is None:
            return
        out = self._out
        while out:
            item, view = out[0]
            try:
                sent = sock.send(view)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self._gone(f"write failed: {exc}")
                return
            self._written_bytes += sent
            if sent < len(view):
                out[0] = (item, view[sent:])
                break
            out.popleft()
            self._logged(item)
            if self._stopped:
                break  # only the frame begun before the stop is finished
        want_writer = bool(out) and (not self._stopped or self._partial())
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
        migration = False
        if self._qmp is not None:
            with contextlib.suppress(QmpError, AttributeError):
                status = await self._qmp.execute("query-status")
                migration = str(status.get("status")) in ("finish-migrate", "postmigrate")
        used = await self._used_index()
        if used is None or self._used_base is None:
            return Accounting([], queued, migration, exact=False)
        delivered = (used - self._used_base) % _U16
        undelivered = (written_frames - delivered) % _U16
        if undelivered > len(log_items):
            log.warning("port %s: %d frames written, %d delivered: more undelivered than logged",
                        self.name, written_frames, delivered)
            return Accounting([], queued, migration, exact=False)
        # The VM received everything but the last `undelivered` frames written. The socket's
        # count can only be higher if frames unread at the stop were delivered after all (they
        # were not: a stopped VM takes nothing): trust the smaller, never deliver twice.
        exact = undelivered >= len(queued)
        missing = [item for _, item in log_items[len(log_items) - undelivered:]]
        queued = missing[len(missing) - min(len(queued), len(missing)):]
        lost = missing[: len(missing) - len(queued)]
        return Accounting(lost, queued, migration, exact=exact)

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
        """Write frames to the device (queued while it is busy)."""
        self._out.extend(item.frame for item in frames)
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
