"""An asyncio QMP client for the agent: commands, and the events a port follows.

The agent keeps its own QMP monitor per VM (``-qmp unix:PATH,server=on,wait=off``): QEMU sends
events (``STOP``, ``RESUME``, ``RESET``, ``SHUTDOWN``) to every monitor, and a command of the
agent does not interleave with the management's. QMP is line-delimited JSON; QEMU greets, the
client sends ``qmp_capabilities``, then ``{"execute", "arguments", "id"}`` per command.

Commands that need QEMU's big lock are answered only when QEMU's main loop gets it: during a
migration's switch-over that is after the device state was sent. The agent relies on that for
``x-query-virtio-queue-status`` (the count it answers is final: the VM stopped).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from tmdht.errors import TmdhtError

__all__ = ["QmpClosedError", "QmpCommandError", "QmpConnection", "QmpError"]

log = logging.getLogger("tmdht.vnet.qmp")

_MAX_LINE: Final = 1 << 20


class QmpError(TmdhtError):
    """The QMP conversation failed."""


class QmpClosedError(QmpError):
    """QEMU closed the monitor (it exited)."""


class QmpCommandError(QmpError):
    """QEMU answered a command with an error."""

    def __init__(self, command: str, error: dict[str, Any]) -> None:
        super().__init__(f"QMP {command}: {error.get('class')}: {error.get('desc')}")
        self.error_class = str(error.get("class"))


class QmpConnection:
    """One negotiated QMP session; events go to ``on_event(name, data)`` in arrival order."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 on_event: Callable[[str, dict[str, Any]], None]) -> None:
        self._reader = reader
        self._writer = writer
        self._on_event = on_event
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._task: asyncio.Task[None] | None = None
        self.closed = asyncio.Event()

    @classmethod
    async def connect(cls, path: Path, on_event: Callable[[str, dict[str, Any]], None], *,
                      timeout: float = 10.0) -> QmpConnection:
        """Connect to a QMP unix socket and negotiate; raises QmpError."""
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_unix_connection(str(path), limit=_MAX_LINE), timeout)
        except (OSError, TimeoutError) as exc:
            raise QmpError(f"cannot connect to QMP at {path}: {exc}") from None
        conn = cls(reader, writer, on_event)
        try:
            greeting = await asyncio.wait_for(conn._read(), timeout)
            if "QMP" not in greeting:
                raise QmpError(f"{path} is not a QMP monitor")
            conn._task = asyncio.get_running_loop().create_task(conn._pump())
            await conn.execute("qmp_capabilities", timeout=timeout)
        except BaseException:
            await conn.close()
            raise
        return conn

    async def _read(self) -> dict[str, Any]:
        try:
            line = await self._reader.readline()
        except (OSError, ValueError) as exc:  # ValueError: a line over the limit
            raise QmpClosedError(f"QMP read failed: {exc}") from None
        if not line:
            raise QmpClosedError("QEMU closed the QMP monitor")
        try:
            message = json.loads(line)
        except json.JSONDecodeError:
            raise QmpError(f"not JSON from QMP: {line[:200]!r}") from None
        if not isinstance(message, dict):
            raise QmpError("a QMP message is a JSON object")
        return message

    async def _pump(self) -> None:
        """Route answers to their commands and events to the callback, until QEMU closes."""
        try:
            while True:
                message = await self._read()
                if "event" in message:
                    data = message.get("data")
                    try:
                        self._on_event(str(message["event"]), data if isinstance(data, dict)
                                       else {})
                    except TmdhtError as exc:  # the agent's handler failed: keep the session
                        log.error("QMP event %s: %s", message["event"], exc)
                    continue
                ident = message.get("id")
                future = self._pending.pop(ident, None) if isinstance(ident, int) else None
                if future is not None and not future.done():
                    future.set_result(message)
        except QmpError as exc:
            error = exc
        finally:
            self.closed.set()
        for future in self._pending.values():
            if not future.done():
                future.set_exception(QmpClosedError(str(error)))
        self._pending.clear()

    async def execute(self, command: str, *, timeout: float = 30.0, **arguments: Any) -> Any:
        """Run a command; returns its ``return`` value; raises QmpCommandError / QmpError."""
        if self.closed.is_set():
            raise QmpClosedError("the QMP monitor is closed")
        ident = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[ident] = future
        request: dict[str, Any] = {"execute": command, "id": ident}
        if arguments:
            request["arguments"] = arguments
        try:
            self._writer.write(json.dumps(request).encode() + b"\n")
            await self._writer.drain()
            answer = await asyncio.wait_for(future, timeout)
        except (OSError, ConnectionError) as exc:
            raise QmpClosedError(f"QMP write failed: {exc}") from None
        except TimeoutError:
            raise QmpError(f"QMP {command}: no answer within {timeout} s") from None
        finally:
            self._pending.pop(ident, None)
        if "error" in answer:
            raise QmpCommandError(command, answer["error"])
        return answer.get("return")

    async def close(self) -> None:
        """Close the session (idempotent)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._writer.close()
        with contextlib.suppress(OSError, ConnectionError):
            await self._writer.wait_closed()
        self.closed.set()
