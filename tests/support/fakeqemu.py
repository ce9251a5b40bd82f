"""A stand-in for a QEMU VM's NIC backend and QMP monitor, as a separate process (tests only).

    python tests/support/fakeqemu.py NET_SOCKET QMP_SOCKET MAC STATE

It listens on NET_SOCKET like ``-netdev stream,server=on`` (4-byte big-endian length, frame)
and on QMP_SOCKET like ``-qmp unix:...,server=on`` (greeting, ``qmp_capabilities``,
``query-status``, ``x-query-virtio``, ``x-query-virtio-queue-status``, ``qom-get``). While
``running`` it reads frames and "delivers" them (the virtio used index counts them); while
stopped it reads nothing. Commands come on stdin, one per line, each answered with one JSON line
on stdout: ``send HEX`` (the VM sends a frame), ``stop`` (STOP event), ``cont`` / ``resume``
(RESUME event; ``resume`` also ends an incoming migration), ``received`` (the frames delivered so
far, hex), ``state``.
"""

from __future__ import annotations

import asyncio
import json
import struct
import sys
from pathlib import Path
from typing import Any

_LENGTH = struct.Struct(">I")


class FakeQemu:
    def __init__(self, net: Path, qmp: Path, mac: str, state: str) -> None:
        self.net_path, self.qmp_path, self.mac, self.state = net, qmp, mac, state
        self.received: list[bytes] = []
        self.used = 0
        self.net_writer: asyncio.StreamWriter | None = None
        self.qmp_writer: asyncio.StreamWriter | None = None
        self.can_read = asyncio.Event()
        if state == "running":
            self.can_read.set()

    async def main(self) -> None:
        await asyncio.start_unix_server(self.serve_net, str(self.net_path))
        await asyncio.start_unix_server(self.serve_qmp, str(self.qmp_path))
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        print(json.dumps({"ready": True}), flush=True)
        while line := await reader.readline():
            answer = await self.command(line.decode().split())
            print(json.dumps(answer), flush=True)

    async def command(self, words: list[str]) -> dict[str, Any]:
        op = words[0] if words else ""
        if op == "send" and self.net_writer is not None:
            frame = bytes.fromhex(words[1])
            self.net_writer.write(_LENGTH.pack(len(frame)) + frame)
            await self.net_writer.drain()
            return {"ok": True}
        if op == "stop":
            self.state = "paused"
            self.can_read.clear()
            self.event("STOP")
            return {"ok": True}
        if op in ("cont", "resume"):
            self.state = "running"
            self.can_read.set()
            self.event("RESUME")
            return {"ok": True}
        if op == "received":
            return {"ok": True, "frames": [f.hex() for f in self.received]}
        if op == "state":
            return {"ok": True, "state": self.state, "connected": self.net_writer is not None}
        return {"ok": False, "error": f"unknown command {words!r}"}

    def event(self, name: str) -> None:
        if self.qmp_writer is not None:
            message = {"event": name, "data": {}, "timestamp": {"seconds": 0, "microseconds": 0}}
            self.qmp_writer.write(json.dumps(message).encode() + b"\r\n")

    async def serve_net(self, reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter) -> None:
        self.net_writer = writer
        try:
            while True:
                await self.can_read.wait()
                head = await reader.readexactly(_LENGTH.size)
                frame = await reader.readexactly(_LENGTH.unpack(head)[0])
                # Like QEMU: a frame read while the VM stops waits in QEMU's queue (delivered if
                # the VM resumes here, gone if it migrated): never delivered while stopped.
                await self.can_read.wait()
                self.received.append(frame)
                self.used = (self.used + 1) & 0xFFFF
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            if self.net_writer is writer:
                self.net_writer = None

    async def serve_qmp(self, reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter) -> None:
        self.qmp_writer = writer
        writer.write(b'{"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}}, '
                     b'"capabilities": []}}\r\n')
        try:
            while line := await reader.readline():
                request = json.loads(line)
                writer.write(json.dumps(self.qmp(request)).encode() + b"\r\n")
                await writer.drain()
        except ConnectionError:
            pass

    def qmp(self, request: dict[str, Any]) -> dict[str, Any]:
        command, ident = request.get("execute"), request.get("id")
        args = request.get("arguments", {})
        result: Any
        if command == "qmp_capabilities":
            result = {}
        elif command == "query-status":
            result = {"status": self.state, "running": self.state == "running"}
        elif command == "x-query-virtio":
            result = [{"path": "/machine/peripheral/nic0/virtio-backend", "name": "virtio-net"}]
        elif command == "x-query-virtio-queue-status" and args.get("queue") == 0:
            result = {"used-idx": self.used, "name": "virtio-net", "queue-index": 0}
        elif command == "qom-get" and args.get("property") == "mac":
            result = self.mac
        else:
            return {"error": {"class": "CommandNotFound", "desc": str(command)}, "id": ident}
        return {"return": result, "id": ident}


if __name__ == "__main__":
    net_socket, qmp_socket, mac_text, initial = sys.argv[1:5]
    asyncio.run(FakeQemu(Path(net_socket), Path(qmp_socket), mac_text, initial).main())
