"""Type stub of the Rust extension module ``tmdht._native`` (crate in native/).

Use it through :mod:`tmdht.native`, which picks it or the pure-Python reference and wraps it in
the reference's interface. Buffers are anything with the buffer protocol (bytes, bytearray,
memoryview, mmap), C-contiguous; do not resize one while a call that received it runs.
"""

from collections.abc import Callable, Sequence
from typing import Any, Final

from typing_extensions import Buffer

PAGE_SIZE: Final[int]

def build_info() -> dict[str, str]:
    """Versions of the crate and the libraries inside it, and the build profile."""

def decode_pages_burst(
    datagrams: Sequence[Buffer], max_datagram: int, keys: Sequence[tuple[int, bytes]] | None
) -> list[tuple[Any, ...] | None]:
    """Decode and verify the PAGES and PUT_RESULT datagrams of a burst (see tmdht.net.burst):
    per datagram None (another type), (1, class, message), (0, key id, timestamp ms, nonce,
    request id, part, parts, pages, corrupt, missing), (4, key id, timestamp ms, nonce, request
    id, part, parts, digests, status bytes) or (3, key id, timestamp ms, nonce, request id, type,
    code, reason)."""

def encode_pages_answer(
    request_id: int, digests: Sequence[bytes], views: Sequence[Buffer | None], *,
    max_datagram: int, key_id: int, tag_key: bytes | None, timestamp_ms: int,
    nonce: Callable[[], int],
) -> tuple[list[list[Buffer]], int]:
    """A GET's answer as sealed PAGES datagrams ([head, page view, ...] each), pages found."""

def decode_put_pages(
    data: Buffer, max_datagram: int, keys: Sequence[tuple[int, bytes]] | None
) -> tuple[Any, ...] | None:
    """Decode one PUT_PAGES request (see tmdht.net.burst.decode_request_native): None (another
    type), (1, class, message), (0, key id, timestamp ms, nonce, request id, pages) or (3, key
    id, timestamp ms, nonce, request id, type, code, reason)."""

def encode_put_results(
    answers: Sequence[tuple[int, Sequence[bytes], bytes]], *, max_datagram: int, key_id: int,
    tag_key: bytes | None, timestamp_ms: int, nonce: Callable[[], int],
) -> list[list[bytes]]:
    """A committed group's PUT answers, sealed: per (request id, digests, status bytes) its
    PUT_RESULT datagrams."""

def encode_put_requests(
    requests: Sequence[tuple[int, Sequence[Buffer], Sequence[Buffer]]], *, max_datagram: int,
    key_id: int, tag_key: bytes | None, timestamp_ms: int, nonce: Callable[[], int],
) -> list[bytes]:
    """A window of PUT_PAGES requests, sealed: per (request id, digests, pages) one datagram.
    ValueError for a field out of range, OverflowError for a datagram above max_datagram."""

def digest_pages(pages: Sequence[Buffer], *, threads: bool = True) -> list[bytes]:
    """BLAKE3 digests, GIL released, across cores (rayon) when ``threads``."""

def pages_match(digests: Sequence[bytes], pages: Sequence[Buffer], *,
                threads: bool = True) -> list[bool]:
    """Whether each page's BLAKE3 digest is its digest (GIL released)."""

class Sender:
    """The sender's core: QEMU stream chunks in, forward-stream records out."""

    def __init__(self, catalog_id: bytes, templates: Buffer, *, compress: bool,
                 backref_window: int, flow_window: int, flags: int) -> None: ...
    def start(self) -> bytes: ...
    def feed(self, data: Buffer) -> bytes: ...
    def finish(self) -> bytes: ...
    def acknowledge(self, index: int, qemu_bytes: int) -> None: ...
    def fallback(self, indices: Sequence[int]) -> bytes: ...
    @property
    def counts(self) -> tuple[int, int, int, int, int, int, int]: ...
    @property
    def unacknowledged(self) -> int: ...
    @property
    def window_open(self) -> bool: ...
    @property
    def retained(self) -> int: ...
    @property
    def ram_bytes(self) -> int: ...

class Receiver:
    """The receiver's core: forward-stream bytes in, QEMU stream out."""

    def __init__(self, expected_catalog_id: bytes | None = None) -> None: ...
    def feed(self, data: Buffer) -> None: ...
    def close(self) -> None: ...
    @property
    def hello(self) -> tuple[bytes, int, int, int] | None: ...
    @property
    def queued_bytes(self) -> int: ...
    @property
    def end_seen(self) -> bool: ...
    @property
    def waiting(self) -> int: ...
    @property
    def to_resolve(self) -> int: ...
    @property
    def verified(self) -> bool: ...
    @property
    def stats(self) -> tuple[int, int, int, int, int, int, int, int,
                             tuple[int, int, int, int, int, int, int]]: ...
    def wanted(self, limit: int) -> tuple[list[int], bytes]: ...
    def supply(self, indices: Sequence[int], pages: Buffer | Sequence[Buffer]) -> None: ...
    def unavailable(self, indices: Sequence[int]) -> None: ...
    def requests(self) -> bytes: ...
    def ack(self, every: int = ...) -> bytes: ...
    def output(self) -> list[bytes]: ...
