"""What a service process (store node, vnet agent) asks of its host and tells its supervisor.

- :func:`raise_open_files_limit`: lift the soft RLIMIT_NOFILE towards what a service wants, within
  the hard limit it was given. A supervisor that cannot grant the number (systemd clamps
  ``LimitNOFILE=`` to its own hard limit without a word, dockerd's hard limit may be below what a
  compose file asks) must not stop the node from starting: the node runs with what it got and the
  caller warns.
- :func:`notify_supervisor`: systemd's readiness protocol (``Type=notify``): one datagram of
  ``KEY=VALUE`` lines to the socket named by ``$NOTIFY_SOCKET``; nothing when it is unset
  (containers, tests, a shell).
- :func:`granted_buffer`: what a socket buffer request really got.
"""

from __future__ import annotations

import logging
import os
import resource
import socket
import sys
from dataclasses import dataclass
from typing import Final

__all__ = [
    "NOTIFY_SOCKET_ENV",
    "OPEN_FILES_WANTED",
    "BufferGrant",
    "buffer_grants",
    "granted_buffer",
    "notify_supervisor",
    "raise_open_files_limit",
    "read_sysctl",
]

log = logging.getLogger("tmdht.service")

OPEN_FILES_WANTED: Final = 65536
"""Open files a node asks for: sockets, LMDB, scrapes, with room for many peers and clients."""
NOTIFY_SOCKET_ENV: Final = "NOTIFY_SOCKET"


def raise_open_files_limit(wanted: int = OPEN_FILES_WANTED) -> tuple[int, int]:
    """Raise the soft open-files limit to ``wanted`` or the hard limit, whichever is lower.

    Returns the (soft, hard) limits in force afterwards; never raises (a limit that cannot be
    raised leaves the process as it was). ``resource.RLIM_INFINITY`` stands for no limit.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (OSError, ValueError) as exc:
            log.debug("cannot raise RLIMIT_NOFILE to %d: %s", target, exc)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft, hard


def notify_supervisor(state: str, env: dict[str, str] | None = None) -> bool:
    """Send ``state`` (``READY=1``, ``STOPPING=1``, ``STATUS=...``, newline-separated) to systemd.

    Returns whether a supervisor was told. ``$NOTIFY_SOCKET`` is a path or, starting with ``@``,
    an abstract socket name. A failure to send is logged, not raised: the node keeps serving and
    systemd reports the start as timed out, which names the problem.
    """
    address = (os.environ if env is None else env).get(NOTIFY_SOCKET_ENV, "")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    elif not address.startswith("/"):
        log.warning("ignoring $%s=%r: not a socket path", NOTIFY_SOCKET_ENV, address)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as exc:
        log.warning("cannot notify the supervisor at $%s: %s", NOTIFY_SOCKET_ENV, exc)
        return False
    return True


def granted_buffer(reported: int) -> int:
    """The size a SO_RCVBUF/SO_SNDBUF request was granted, from what getsockopt reports.

    Linux doubles the value it stores (room for its bookkeeping) and caps the request at
    net.core.rmem_max/wmem_max unless the caller may force it: asking 16 MiB under a 4 MiB
    rmem_max reports 8 MiB, a grant of 4 MiB.
    """
    return reported // 2 if sys.platform == "linux" else reported


@dataclass(frozen=True, slots=True)
class BufferGrant:
    """One socket buffer: what was asked and what the kernel granted."""

    socket: str
    """Which socket (``kademlia``, ``data``, ``replication``)."""
    direction: str
    """``receive`` or ``send``."""
    requested: int
    """Bytes asked for (0: the kernel's default was kept)."""
    granted: int
    """Bytes granted (:func:`granted_buffer` of what getsockopt reports)."""

    @property
    def short(self) -> bool:
        """Granted less than asked: bursts beyond the grant are dropped."""
        return bool(self.requested) and self.granted < self.requested


def buffer_grants(socket_name: str, requested: int, reported: tuple[int, int]) -> list[BufferGrant]:
    """The receive and send grants of one socket from its getsockopt (SO_RCVBUF, SO_SNDBUF)."""
    return [
        BufferGrant(socket_name, direction, requested, granted_buffer(value))
        for direction, value in zip(("receive", "send"), reported, strict=True)
    ]


def read_sysctl(name: str) -> str | None:
    """A sysctl's value (``net.core.rmem_max``), or None where it cannot be read."""
    try:
        with open("/proc/sys/" + name.replace(".", "/")) as f:
            return f.read().strip()
    except OSError:
        return None
