"""A small synchronous QMP client (QEMU Machine Protocol) over a unix socket.

QMP is line-delimited JSON: QEMU greets, the client negotiates with ``qmp_capabilities``, then
sends ``{"execute": ..., "arguments": ..., "id": n}`` and gets ``{"return": ...}`` or
``{"error": {"class": ..., "desc": ...}}`` back with the same id. Asynchronous events
(``{"event": ..., "data": ..., "timestamp": ...}``) may arrive at any time; they are queued in
arrival order (bounded) until :meth:`QmpClient.wait_event` takes them.

Every read blocks on the socket with a timeout derived from the caller's deadline; nothing sleeps
to wait for QEMU.
"""

from __future__ import annotations

import collections
import json
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Final

from tmdht.lab.errors import QmpCommandError, QmpError, QmpTimeoutError

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "QmpClient",
    "QmpEvent",
]

DEFAULT_TIMEOUT_S: Final = 30.0
_MAX_MESSAGE_BYTES: Final = 16 << 20
_MAX_QUEUED_EVENTS: Final = 4096
_RECV_BYTES: Final = 1 << 16
_MAX_READS_PER_MESSAGE: Final = 1 << 16
_MAX_MESSAGES_PER_WAIT: Final = 1 << 20
_CONNECT_ATTEMPTS: Final = 200
_CONNECT_BACKOFF_S: Final = (0.01, 0.2)


@dataclass(frozen=True, slots=True)
class QmpEvent:
    """One asynchronous QMP event."""

    name: str
    """Event name, e.g. ``MIGRATION``, ``STOP``, ``RESUME``."""
    data: dict[str, Any] = field(default_factory=dict)
    """The event's ``data`` member (empty when QEMU sends none)."""
    timestamp: float = 0.0
    """QEMU's timestamp, in seconds since the epoch."""


class _Deadline:
    """A point in monotonic time with the remaining time as a socket timeout."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._end = time.monotonic() + timeout

    def remaining(self) -> float:
        return self._end - time.monotonic()


class QmpClient:
    """A negotiated QMP session on a connected stream socket (the client owns the socket).

    Use :meth:`connect` to reach a QEMU listening on a unix socket (``-qmp unix:P,server=on``),
    or pass an already connected socket, e.g. one QEMU connected to (``-qmp unix:P`` client mode,
    which the lab's :class:`~tmdht.lab.guest.Guest` uses to avoid waiting for the socket file).
    """

    def __init__(self, sock: socket.socket, *, timeout: float = DEFAULT_TIMEOUT_S,
                 max_events: int = _MAX_QUEUED_EVENTS) -> None:
        """Read QEMU's greeting and enter command mode, within ``timeout`` seconds."""
        self._sock = sock
        self._buffer = bytearray()
        self._next_id = 0
        self._closed = False
        self._events: collections.deque[QmpEvent] = collections.deque(maxlen=max_events)
        try:
            deadline = _Deadline(timeout)
            greeting = self._read_message(deadline, "the QMP greeting")
            if "QMP" not in greeting:
                raise QmpError(f"not a QMP greeting: {greeting!r}")
            self.greeting: dict[str, Any] = greeting["QMP"]
            self.execute("qmp_capabilities", timeout=max(deadline.remaining(), 0.001))
        except BaseException:
            self.close()
            raise

    @classmethod
    def connect(cls, path: Path | str, *, timeout: float = DEFAULT_TIMEOUT_S) -> QmpClient:
        """Connect to QEMU's QMP unix socket at ``path`` and negotiate.

        Retries (bounded in count and time, backing off) while the socket does not exist yet or
        refuses connections, as when QEMU has just been started.
        """
        deadline = _Deadline(timeout)
        last_error: OSError | None = None
        delay = _CONNECT_BACKOFF_S[0]
        for _attempt in range(_CONNECT_ATTEMPTS):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(max(deadline.remaining(), 0.001))
                sock.connect(str(path))
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                sock.close()
                last_error = exc
            except OSError as exc:
                sock.close()
                raise QmpError(f"cannot connect to QMP socket {path}: {exc}") from exc
            else:
                return cls(sock, timeout=max(deadline.remaining(), 0.001))
            if deadline.remaining() <= 0:
                break
            # Nothing to block on while the socket file does not exist: back off, bounded.
            time.sleep(min(delay, max(deadline.remaining(), 0.0)))
            delay = min(delay * 2, _CONNECT_BACKOFF_S[1])
        raise QmpTimeoutError(f"no QMP server at {path} within {timeout:.1f} s ({last_error})")

    # -- context manager -------------------------------------------------------------------

    def __enter__(self) -> QmpClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Close the socket (idempotent)."""
        if not self._closed:
            self._closed = True
            self._sock.close()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    # -- commands --------------------------------------------------------------------------

    def execute(self, command: str, /, *, timeout: float = DEFAULT_TIMEOUT_S,
                **arguments: Any) -> Any:
        """Run QMP ``command`` with ``arguments`` and return its ``return`` member.

        Hyphenated argument names are passed as ``**{"max-bandwidth": n}``. Raises
        :class:`QmpCommandError` (a :class:`QmpError`) with QEMU's description when QEMU answers
        with an error, :class:`QmpTimeoutError` when it does not answer within ``timeout``.
        Events arriving meanwhile are queued.
        """
        if self._closed:
            raise QmpError(f"QMP client is closed (command {command!r})")
        self._next_id += 1
        request_id = self._next_id
        request: dict[str, Any] = {"execute": command, "id": request_id}
        if arguments:
            request["arguments"] = arguments
        try:
            self._sock.sendall(json.dumps(request).encode() + b"\r\n")
        except OSError as exc:
            raise QmpError(f"cannot send QMP command {command!r}: {exc}") from exc
        deadline = _Deadline(timeout)
        for _message in range(_MAX_MESSAGES_PER_WAIT):
            message = self._read_message(deadline, f"the answer to {command!r}")
            if "event" in message:
                self._queue_event(message)
                continue
            answer_id = message.get("id")
            if isinstance(answer_id, int) and answer_id < request_id:
                continue  # the late answer to a command that timed out earlier
            if answer_id != request_id:
                raise QmpError(f"unexpected QMP message while waiting for {command!r}: "
                               f"{message!r}")
            if "error" in message:
                error = message["error"]
                raise QmpCommandError(command, str(error.get("class", "?")),
                                      str(error.get("desc", "")))
            if "return" not in message:
                raise QmpError(f"QMP answer to {command!r} has no return: {message!r}")
            return message["return"]
        raise QmpError(f"too many QMP messages while waiting for {command!r}")

    # -- events ----------------------------------------------------------------------------

    def wait_event(self, name: str, timeout: float,
                   predicate: Callable[[QmpEvent], bool] | None = None) -> QmpEvent:
        """Take and return the first queued or arriving event ``name`` accepted by ``predicate``.

        Already queued events are looked at first (so an event that arrived during a command is
        not missed). Raises :class:`QmpTimeoutError` when none arrives within ``timeout``.
        """
        accept = predicate if predicate is not None else (lambda _event: True)
        for event in list(self._events):
            if event.name == name and accept(event):
                self._events.remove(event)
                return event
        deadline = _Deadline(timeout)
        for _message in range(_MAX_MESSAGES_PER_WAIT):
            message = self._read_message(deadline, f"event {name}")
            if "event" not in message:
                continue  # a late answer to a command that timed out
            event = self._event_from(message)
            if event.name == name and accept(event):
                return event
            self._events.append(event)
        raise QmpError(f"too many QMP messages while waiting for event {name}")

    def take_events(self, name: str | None = None) -> list[QmpEvent]:
        """Remove and return the queued events (all, or only those called ``name``)."""
        if name is None:
            taken = list(self._events)
            self._events.clear()
            return taken
        taken = [event for event in self._events if event.name == name]
        kept = [event for event in self._events if event.name != name]
        self._events.clear()
        self._events.extend(kept)
        return taken

    def poll_events(self, timeout: float = 0.0) -> None:
        """Read and queue whatever events QEMU sends within ``timeout`` seconds."""
        deadline = _Deadline(timeout)
        for _message in range(_MAX_MESSAGES_PER_WAIT):
            try:
                message = self._read_message(deadline, "events")
            except QmpTimeoutError:
                return
            if "event" in message:
                self._queue_event(message)

    # -- reading ---------------------------------------------------------------------------

    def _queue_event(self, message: dict[str, Any]) -> None:
        self._events.append(self._event_from(message))

    @staticmethod
    def _event_from(message: dict[str, Any]) -> QmpEvent:
        stamp = message.get("timestamp") or {}
        seconds = float(stamp.get("seconds", 0)) + float(stamp.get("microseconds", 0)) / 1e6
        data = message.get("data")
        return QmpEvent(name=str(message["event"]),
                        data=data if isinstance(data, dict) else {}, timestamp=seconds)

    def _read_message(self, deadline: _Deadline, what: str) -> dict[str, Any]:
        """Read one JSON message, blocking on the socket no longer than the deadline."""
        for _read in range(_MAX_READS_PER_MESSAGE):
            newline = self._buffer.find(b"\n")
            if newline >= 0:
                line = bytes(self._buffer[:newline]).strip()
                del self._buffer[:newline + 1]
                if not line:
                    continue
                try:
                    message = json.loads(line)
                except ValueError as exc:
                    raise QmpError(f"QEMU sent invalid JSON: {line[:200]!r}") from exc
                if not isinstance(message, dict):
                    raise QmpError(f"QEMU sent a non-object message: {line[:200]!r}")
                return message
            if len(self._buffer) > _MAX_MESSAGE_BYTES:
                raise QmpError(f"QMP message longer than {_MAX_MESSAGE_BYTES} bytes")
            if self._closed:
                raise QmpError(f"QMP client is closed (waiting for {what})")
            # Past the deadline, still take what has already arrived (a non-blocking read).
            self._sock.settimeout(max(deadline.remaining(), 0.0))
            try:
                chunk = self._sock.recv(_RECV_BYTES)
            except (TimeoutError, BlockingIOError):
                if deadline.remaining() <= 0:
                    raise QmpTimeoutError(
                        f"no {what} from QEMU within {deadline.timeout:.1f} s") from None
                continue
            except OSError as exc:
                raise QmpError(f"QMP connection failed waiting for {what}: {exc}") from exc
            if not chunk:
                raise QmpError(f"QEMU closed the QMP connection (waiting for {what})")
            self._buffer += chunk
        raise QmpError(f"QMP message too fragmented (waiting for {what})")
