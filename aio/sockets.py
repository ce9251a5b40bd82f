"""UDP sockets for the cluster: bound, non-blocking, with enlarged kernel buffers."""

from __future__ import annotations

import contextlib
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Final

__all__ = ["SOCKET_BUFFER", "SocketBuffers", "open_udp_socket", "tune_socket_buffers"]

SOCKET_BUFFER: Final = 16 << 20
"""Bytes asked for SO_RCVBUF/SO_SNDBUF of a data-plane socket."""
# Python 3.11's socket module lacks these names; the values are Linux's (asm-generic/socket.h).
_SO_RCVBUFFORCE: Final = getattr(socket, "SO_RCVBUFFORCE", 33 if sys.platform == "linux" else None)
_SO_SNDBUFFORCE: Final = getattr(socket, "SO_SNDBUFFORCE", 32 if sys.platform == "linux" else None)


@dataclass(frozen=True, slots=True)
class SocketBuffers:
    """Kernel buffer sizes of a socket (Linux reports twice what it grants)."""

    requested: int
    """Bytes asked for with SO_RCVBUF/SO_SNDBUF (0: defaults kept)."""
    receive: int
    """SO_RCVBUF as read back."""
    send: int
    """SO_SNDBUF as read back."""
    rmem_max: int | None
    """net.core.rmem_max, the cap for unprivileged processes (None: not Linux)."""

    @property
    def short(self) -> bool:
        """The kernel granted a smaller receive buffer than was asked for."""
        return bool(self.requested) and self.receive < self.requested


def tune_socket_buffers(sock: socket.socket, size: int = SOCKET_BUFFER) -> SocketBuffers:
    """Enlarge a UDP socket's buffers to ``size`` (0: keep the defaults); report what the kernel
    granted.

    As root, SO_RCVBUFFORCE/SO_SNDBUFFORCE go past net.core.rmem_max; otherwise the request is
    capped there (4 MiB on these machines). A burst of datagrams that overflows the receive
    buffer is dropped silently by the kernel, so this matters for pipelining.
    """
    if size:
        for force, plain in (
            (_SO_RCVBUFFORCE, socket.SO_RCVBUF),
            (_SO_SNDBUFFORCE, socket.SO_SNDBUF),
        ):
            done = False
            if force is not None and os.geteuid() == 0:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, force, size)
                    done = True
            if not done:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, plain, size)
    return SocketBuffers(
        requested=size,
        receive=sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF),
        send=sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF),
        rmem_max=_read_sysctl("/proc/sys/net/core/rmem_max"),
    )


def open_udp_socket(
    host: str, port: int = 0, buffer_size: int = SOCKET_BUFFER
) -> tuple[socket.socket, SocketBuffers]:
    """A non-blocking UDP socket bound to ``host:port`` (0: any free port), buffers tuned.

    Raises OSError if it cannot be bound (the socket is closed then).
    """
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    try:
        buffers = tune_socket_buffers(sock, buffer_size)
        sock.bind((host, port))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock, buffers


def _read_sysctl(path: str) -> int | None:
    try:
        return int(Path(path).read_text().strip())
    except (OSError, ValueError):
        return None
