"""The agent's control socket: ``tmdht vnet attach|detach|status`` talk to a running agent.

A unix stream socket (mode 0600: whoever may attach VMs may reroute their traffic), one JSON
request per line, one JSON answer per line::

    {"op": "attach", "name": "vm1", "vnet": 42, "kind": "qemu",
     "net_socket": "/run/vm1/net.sock", "qmp_socket": "/run/vm1/vnet-qmp.sock",
     "mac": "52:54:00:12:34:56", "nic_id": null}
    {"op": "attach", "name": "gw", "vnet": 42, "kind": "tap", "tap": "vnet-gw0"}
    {"op": "detach", "name": "vm1"}
    {"op": "status"}

Answers are ``{"ok": true, ...}`` or ``{"ok": false, "error": "..."}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from tmdht.errors import TmdhtError, UsageError

__all__ = ["ControlServer", "PortSpec", "control_request"]

log = logging.getLogger("tmdht.vnet.control")

_MAX_REQUEST: Final = 1 << 16
_MAX_VNET: Final = 0xFFFF_FFFF


@dataclass(frozen=True, slots=True)
class PortSpec:
    """What an operator attached (persisted in the agent's ``ports.json``)."""

    name: str
    vnet: int
    kind: str
    """``qemu`` or ``tap``."""
    net_socket: str | None = None
    qmp_socket: str | None = None
    mac: str | None = None
    nic_id: str | None = None
    tap: str | None = None

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> PortSpec:
        """Validate a request (or a persisted entry); raises UsageError."""
        name = doc.get("name")
        if not isinstance(name, str) or not name or len(name) > 64 or not name.isprintable():
            raise UsageError("a port needs a name (1-64 printable characters)")
        vnet = doc.get("vnet")
        if isinstance(vnet, bool) or not isinstance(vnet, int) or not 0 <= vnet <= _MAX_VNET:
            raise UsageError("vnet is a number 0..4294967295")
        kind = doc.get("kind", "qemu")
        fields: dict[str, str | None] = {}
        for key in ("net_socket", "qmp_socket", "mac", "nic_id", "tap"):
            value = doc.get(key)
            if value is not None and not isinstance(value, str):
                raise UsageError(f"{key} must be a string")
            fields[key] = value
        if kind == "qemu":
            if not fields["net_socket"] or not fields["qmp_socket"]:
                raise UsageError("a qemu port needs net_socket and qmp_socket")
        elif kind == "tap":
            if not fields["tap"] or len(fields["tap"]) > 15:
                raise UsageError("a tap port needs the device name (at most 15 characters)")
        else:
            raise UsageError(f"unknown port kind {kind!r} (qemu or tap)")
        return cls(name=name, vnet=vnet, kind=kind, **fields)

    def to_json(self) -> dict[str, Any]:
        """The persisted form."""
        return {k: v for k, v in (
            ("name", self.name), ("vnet", self.vnet), ("kind", self.kind),
            ("net_socket", self.net_socket), ("qmp_socket", self.qmp_socket), ("mac", self.mac),
            ("nic_id", self.nic_id), ("tap", self.tap)) if v is not None}


Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


class ControlServer:
    """Serves the control socket; ``handler(request)`` returns the answer's fields."""

    def __init__(self, path: Path, handler: Handler) -> None:
        self.path = path
        self._handler = handler
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        """Listen (a stale socket file from a crashed agent is replaced)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        old = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(self._serve, str(self.path),
                                                           limit=_MAX_REQUEST)
        finally:
            os.umask(old)

    async def close(self) -> None:
        """Stop listening and remove the socket file."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    line = await reader.readline()
                except ValueError:  # over the limit
                    break
                if not line:
                    break
                try:
                    request = json.loads(line)
                    if not isinstance(request, dict):
                        raise UsageError("a request is a JSON object")
                    answer = {"ok": True, **await self._handler(request)}
                except json.JSONDecodeError:
                    answer = {"ok": False, "error": "not JSON"}
                except TmdhtError as exc:
                    answer = {"ok": False, "error": str(exc)}
                writer.write(json.dumps(answer).encode() + b"\n")
                await writer.drain()
        except (OSError, ConnectionError) as exc:
            log.debug("control connection: %s", exc)
        finally:
            writer.close()
            with contextlib.suppress(OSError, ConnectionError):
                await writer.wait_closed()


def control_request(path: Path, request: dict[str, Any], timeout: float = 30.0
                    ) -> dict[str, Any]:
    """Send one request to an agent's control socket (blocking); returns the answer, raises
    UsageError (no agent there) or TmdhtError (the agent refused)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except OSError as exc:
            raise UsageError(f"no vnet agent at {path}: {exc.strerror or exc}") from None
        sock.sendall(json.dumps(request).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    try:
        answer = json.loads(data)
    except json.JSONDecodeError:
        raise TmdhtError(f"the agent at {path} answered {data[:200]!r}") from None
    if not isinstance(answer, dict) or not answer.get("ok"):
        error = answer.get("error") if isinstance(answer, dict) else answer
        raise TmdhtError(f"the agent refused: {error}")
    return answer
