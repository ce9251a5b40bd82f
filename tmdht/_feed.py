"""The byte buffer behind the incremental (sans-IO) decoders: feed bytes, take exact lengths.

A decoder reads items with :meth:`FeedBuffer.take`; when the bytes run out mid-item it raises
:class:`NeedMore`, and the decoder rewinds to the item's start (:attr:`FeedBuffer.pos`) and
waits for the next :meth:`FeedBuffer.feed`. Only the unparsed tail is ever copied (when an item
straddles two feeds); views handed out stay valid because they keep their buffer alive.
"""

from __future__ import annotations

from tmdht.pages import ByteView

__all__ = ["FeedBuffer", "NeedMore"]


class NeedMore(Exception):
    """The buffer ends inside an item: rewind and wait for more bytes."""


class FeedBuffer:
    """Bytes fed so far, a read position, and the absolute offset of the buffer's start."""

    __slots__ = ("base", "pos", "view")

    def __init__(self) -> None:
        self.view = memoryview(b"")
        self.pos = 0
        self.base = 0  # absolute stream offset of view[0]

    def feed(self, data: ByteView) -> None:
        """Append bytes (without copying them unless an item straddles the boundary)."""
        new = memoryview(data).cast("B")
        rest = self.view[self.pos :]
        self.base += self.pos
        self.pos = 0
        self.view = new if rest.nbytes == 0 else memoryview(bytes(rest) + bytes(new))

    @property
    def position(self) -> int:
        """Absolute offset of the next unread byte."""
        return self.base + self.pos

    @property
    def remaining(self) -> int:
        """Bytes fed but not read yet."""
        return self.view.nbytes - self.pos

    def take(self, n: int) -> memoryview:
        """The next ``n`` bytes (a view), or NeedMore."""
        end = self.pos + n
        if end > self.view.nbytes:
            raise NeedMore
        view = self.view[self.pos : end]
        self.pos = end
        return view

    def u8(self) -> int:
        """The next byte, or NeedMore."""
        if self.pos >= self.view.nbytes:
            raise NeedMore
        value = self.view[self.pos]
        self.pos += 1
        return value
