"""The guest's serial console, read from a connected stream socket with timeouts.

The lab's ``/init`` prints ``tmdht-ready ...`` once and ``tmdht-counter N`` every second, and
``tmdht-error ...`` when it gives up. :class:`SerialConsole` splits the output into lines, tracks
the last counter value and keeps a bounded transcript for error messages.
"""

from __future__ import annotations

import re
import socket
import time
from typing import Final

__all__ = [
    "COUNTER_PATTERN",
    "SerialConsole",
]

COUNTER_PATTERN: Final = re.compile(rb"tmdht-counter (\d+)")
"""A counter line of the lab's ``/init``."""
_ERROR_PATTERN: Final = re.compile(rb"tmdht-error .*")
_READY_PATTERN: Final = re.compile(rb"tmdht-ready .*")
_RECV_BYTES: Final = 1 << 14
_MAX_LINE_BYTES: Final = 1 << 14
_MAX_READS_PER_PUMP: Final = 1 << 16


class SerialConsole:
    """Line-oriented reader of a guest console socket (the console owns the socket)."""

    def __init__(self, sock: socket.socket, *, transcript_bytes: int = 1 << 16) -> None:
        self._sock = sock
        self._partial = bytearray()
        self._transcript = bytearray()
        self._transcript_bytes = transcript_bytes
        self._closed = False
        self.eof = False
        """Whether the other end (QEMU) closed the console."""
        self.counter: int | None = None
        """The last ``tmdht-counter`` value seen, ``None`` before the first."""
        self.first_counter: int | None = None
        """The first ``tmdht-counter`` value seen on this console."""
        self.ready_line: str | None = None
        """The ``tmdht-ready ...`` line, once seen."""
        self.error_line: str | None = None
        """The first ``tmdht-error ...`` line, if the guest printed one."""

    def close(self) -> None:
        """Close the socket (idempotent)."""
        if not self._closed:
            self._closed = True
            self._sock.close()

    def send_line(self, line: str) -> None:
        """Write one line to the guest's console input (the net guests read commands there)."""
        self._sock.settimeout(5.0)
        self._sock.sendall(line.encode() + b"\n")

    @property
    def transcript(self) -> str:
        """The last output of the console (bounded), decoded leniently."""
        return self._transcript.decode("utf-8", errors="replace")

    def tail(self, lines: int = 15) -> str:
        """The last ``lines`` lines of the transcript, for error messages."""
        return "\n".join(self.transcript.replace("\r", "").splitlines()[-lines:])

    def pump(self, timeout: float) -> int:
        """Read what arrives within ``timeout`` seconds (0: only what is already there).

        Returns the number of bytes read. Returns early at end of file (:attr:`eof` is set) and
        as soon as some output arrived and nothing more is immediately available.
        """
        if self._closed or self.eof:
            return 0
        end = time.monotonic() + timeout
        total = 0
        for _read in range(_MAX_READS_PER_PUMP):
            remaining = end - time.monotonic()
            # Once something arrived, only take what is already buffered.
            self._sock.settimeout(0.0 if total else max(remaining, 0.0))
            try:
                chunk = self._sock.recv(_RECV_BYTES)
            except (TimeoutError, BlockingIOError, InterruptedError):
                return total
            except OSError:
                self.eof = True
                return total
            if not chunk:
                self.eof = True
                return total
            total += len(chunk)
            self._feed(chunk)
        return total

    def _feed(self, chunk: bytes) -> None:
        self._transcript += chunk
        if len(self._transcript) > self._transcript_bytes:
            del self._transcript[:len(self._transcript) - self._transcript_bytes]
        self._partial += chunk
        *lines, rest = self._partial.split(b"\n")
        self._partial = bytearray(rest[-_MAX_LINE_BYTES:])
        for line in lines:
            self._line(bytes(line))

    def _line(self, line: bytes) -> None:
        match = COUNTER_PATTERN.search(line)
        if match is not None:
            self.counter = int(match.group(1))
            if self.first_counter is None:
                self.first_counter = self.counter
            return
        error = _ERROR_PATTERN.search(line)
        if error is not None and self.error_line is None:
            self.error_line = error.group(0).decode("utf-8", errors="replace").strip()
            return
        ready = _READY_PATTERN.search(line)
        if ready is not None:
            self.ready_line = ready.group(0).decode("utf-8", errors="replace").strip()
