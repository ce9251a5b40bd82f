"""The receiver's TLS connection, driven by the event loop without asyncio's SSL transport.

asyncio's SSL transport (and uvloop's, a port of it) runs OpenSSL over memory BIOs: every
received byte is read into a Python buffer, copied into the incoming BIO, decrypted into a new
bytes object, appended to the StreamReader's buffer and copied out of it again, with Python
code between every step (``bench/tls.py --profile`` shows where the time goes). Here a
non-blocking :class:`ssl.SSLSocket` reads the socket itself and decrypts each record straight
into one reused buffer: one copy out of it per :meth:`TlsStream.read`, which returns everything
the socket holds up to ``chunk`` bytes. The loop's reader and writer callbacks are registered
only while an operation waits (a persistent level-triggered reader would spin while the
receiver waits for QEMU's pipe).

It also makes a refusal reach the sender: when the handshake fails (the sender's certificate is
refused) OpenSSL writes its alert to the socket at once, and :meth:`TlsStream.accept` half-closes
and drains the connection before closing it, so the sender reads the alert (``our certificate
has expired``) instead of a reset. The transport closed without flushing it.

Imported by the receiver only, and only with TLS (it imports :mod:`ssl` and :mod:`asyncio`).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Callable
from typing import Any, Final

__all__ = ["TlsStream"]

_WRITE_SLICE: Final = 256 << 10
"""Most bytes handed to one ``SSL_write``: Python's ssl does not enable partial writes, so a
call returns only once all it was given is in the socket (the receiver's writes are small)."""

_DRAIN_ON_REFUSAL: Final = 5.0
"""Seconds a refused sender has to read our alert and close before we close anyway."""


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class TlsStream:
    """One TLS connection: :meth:`read`, :meth:`write`, :meth:`drain`, :meth:`close` (the parts
    of a StreamReader/StreamWriter pair the receiver uses)."""

    def __init__(self, sock: ssl.SSLSocket, chunk: int) -> None:
        self._sock = sock
        self._fd = sock.fileno()
        self._loop = asyncio.get_running_loop()
        self._buffer = bytearray(chunk)
        self._out = bytearray()
        self._flushing = False  # a writer callback is registered for the queued bytes
        self._drained: list[asyncio.Future[None]] = []
        self._error: BaseException | None = None
        self._reader: asyncio.Future[None] | None = None  # a read waiting for readability
        self._watching = False  # the reader callback is registered

    @classmethod
    async def accept(cls, conn: socket.socket, context: ssl.SSLContext, timeout: float,
                     chunk: int) -> TlsStream:
        """The server side of the handshake on the connected ``conn`` (within ``timeout``
        seconds: TimeoutError). On ssl.SSLError or OSError the alert is flushed to the peer and
        the connection closed before the error propagates."""
        conn.setblocking(False)
        sock = context.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
        stream = cls(sock, chunk)
        try:
            async with asyncio.timeout(timeout):
                await stream._retry(sock.do_handshake)
        except TimeoutError:  # a silent peer: nothing to flush
            stream.close()
            raise
        except (ssl.SSLError, OSError):
            await stream._linger()
            raise
        except BaseException:
            stream.close()
            raise
        return stream

    def getpeercert(self) -> dict[str, Any] | None:
        """The peer's certificate as :meth:`ssl.SSLSocket.getpeercert` returns it."""
        return self._sock.getpeercert()

    async def _wait(self, writable: bool) -> None:
        if not writable:
            await self._readable()
            return
        future: asyncio.Future[None] = self._loop.create_future()
        self._loop.add_writer(self._fd, _wake, future)
        try:
            await future
        finally:
            self._loop.remove_writer(self._fd)
            if self._flushing:  # the queue's callback was replaced meanwhile: restore it
                self._loop.add_writer(self._fd, self._flush)

    async def _readable(self) -> None:
        """Wait until the socket is readable. The reader callback stays registered from one
        wait to the next (the receiver reads again at once: no epoll_ctl and no uvloop poll
        handle per wait) and unregisters itself when it fires with nobody waiting (a
        level-triggered reader left on would spin while the receiver waits for QEMU)."""
        future: asyncio.Future[None] = self._loop.create_future()
        self._reader = future
        if not self._watching:
            self._loop.add_reader(self._fd, self._on_readable)
            self._watching = True
        try:
            await future
        finally:
            self._reader = None

    def _on_readable(self) -> None:
        reader = self._reader
        if reader is None:
            self._loop.remove_reader(self._fd)
            self._watching = False
        elif not reader.done():
            reader.set_result(None)

    async def _retry(self, operation: Callable[[], Any]) -> Any:
        """Run a non-blocking ssl operation until it completes, waiting as OpenSSL asks."""
        while True:
            try:
                return operation()
            except ssl.SSLWantReadError:
                await self._wait(writable=False)
            except ssl.SSLWantWriteError:
                await self._wait(writable=True)

    async def _linger(self) -> None:
        """Half-close, read until the peer closes (bounded), close: a close with unread bytes
        would reset the connection and the peer would never read our alert."""
        sock = self._sock
        with contextlib.suppress(OSError, TimeoutError):
            sock.shutdown(socket.SHUT_WR)  # the raw socket: the SSL object is broken already
            async with asyncio.timeout(_DRAIN_ON_REFUSAL):
                for _ in range(10_000):
                    await self._wait(writable=False)
                    if not socket.socket.recv(sock, len(self._buffer)):  # raw bytes, dropped
                        break
        self.close()

    async def read(self, limit: int) -> bytes:
        """Up to ``limit`` (at most ``chunk``) decrypted bytes, as many as have arrived; waits
        while none have. ``b""``: the peer closed the connection."""
        if self._error is not None:
            raise self._error
        view = memoryview(self._buffer)[:limit]
        filled = 0
        while True:
            try:
                while filled < limit:
                    got = self._sock.recv_into(view[filled:])
                    if not got:
                        break  # end of stream (close_notify, or the peer's FIN)
                    filled += got
            except ssl.SSLWantReadError:
                if not filled:
                    await self._wait(writable=False)
                    continue
            except ssl.SSLWantWriteError:  # a post-handshake message to answer first
                if not filled:
                    await self._wait(writable=True)
                    continue
            return bytes(view[:filled])

    def write(self, data: bytes) -> None:
        """Queue ``data`` and send what the socket takes now; errors surface in :meth:`drain`
        and :meth:`read`."""
        if self._error is not None or not data:
            return
        self._out += data
        if not self._flushing:
            self._flush()

    def _flush(self) -> None:
        try:
            while self._out:
                sent = self._sock.send(self._out[:_WRITE_SLICE])
                del self._out[:sent]
        except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError):
            if not self._flushing:
                self._flushing = True
                self._loop.add_writer(self._fd, self._flush)
            return
        except OSError as exc:  # ssl.SSLError included
            self._error = exc
            self._out.clear()
        if self._flushing:
            self._flushing = False
            self._loop.remove_writer(self._fd)
        for future in self._drained:
            _wake(future)
        self._drained.clear()

    async def drain(self) -> None:
        """Wait until every queued byte is in the socket; the write error if one failed."""
        if self._out and self._error is None:
            future: asyncio.Future[None] = self._loop.create_future()
            self._drained.append(future)
            await future
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        """Close the connection (queued bytes not yet sent are dropped: drain first)."""
        if self._watching:
            self._watching = False
            self._loop.remove_reader(self._fd)
        if self._flushing:
            self._flushing = False
            self._loop.remove_writer(self._fd)
        self._out.clear()
        for future in self._drained:
            _wake(future)
        self._drained.clear()
        self._sock.close()

    async def wait_closed(self) -> None:
        """For symmetry with asyncio.StreamWriter: :meth:`close` closes at once."""
