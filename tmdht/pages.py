"""Pages, page digests and DHT keys: the contracts every other module relies on.

A page is 4096 bytes. Its digest is BLAKE3-256 of those bytes; its DHT key is the first 160 bits
of the digest (the ID space of the kademlia package). The all-zero page is never a template: it
travels as a ZERO record.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Final, NewType

from blake3 import blake3

from tmdht.errors import DecodeError, IntegrityError

__all__ = [
    "DIGEST_SIZE",
    "KEY_SIZE",
    "PAGE_SIZE",
    "ZERO_DIGEST",
    "ZERO_PAGE",
    "ByteView",
    "PageDigest",
    "check_page",
    "dht_key",
    "digest_page",
    "is_zero_page",
    "iter_page_views",
    "page_digest",
    "page_matches",
]

PAGE_SIZE: Final = 4096
"""Bytes in a page (x86 base page size; the unit of dedup)."""
DIGEST_SIZE: Final = 32
"""Bytes in a page digest (BLAKE3-256)."""
KEY_SIZE: Final = 20
"""Bytes in a DHT key (160 bits, the kademlia package's ID space)."""

PageDigest = NewType("PageDigest", bytes)
"""BLAKE3-256 of a 4096-byte page: 32 bytes."""

ByteView = bytes | bytearray | memoryview
"""Anything whose bytes can be viewed without copying (typing.Buffer arrives with 3.12)."""

ZERO_PAGE: Final = bytes(PAGE_SIZE)
ZERO_DIGEST: Final = PageDigest(blake3(ZERO_PAGE).digest())


def digest_page(page: ByteView) -> PageDigest:
    """BLAKE3-256 of one page. The caller guarantees the length (hot path: no check)."""
    return PageDigest(blake3(page).digest())


def page_digest(raw: bytes) -> PageDigest:
    """Validate 32 bytes from outside as a page digest."""
    if len(raw) != DIGEST_SIZE:
        raise DecodeError(f"a page digest is {DIGEST_SIZE} bytes, got {len(raw)}")
    return PageDigest(bytes(raw))


def dht_key(digest: bytes) -> bytes:
    """The DHT key of a page: the first 160 bits of its digest."""
    return digest[:KEY_SIZE]


_ZERO_HEAD: Final = bytes(16)


def is_zero_page(page: ByteView) -> bool:
    """True if every byte of the page is zero (about 0.2 us a page).

    Not ``memoryview(page) == ZERO_PAGE``: memoryview equality compares item by item, 15 us for
    a zero page. A 16-byte prefix settles most non-zero pages; the rest get one memcmp.
    """
    if isinstance(page, bytes):
        return page == ZERO_PAGE
    view = memoryview(page)
    return view[:16] == _ZERO_HEAD and view.tobytes() == ZERO_PAGE


def page_matches(digest: bytes, page: ByteView) -> bool:
    """True if ``page``'s BLAKE3 digest is ``digest`` (the check every received page passes)."""
    return blake3(page).digest() == digest


def check_page(digest: bytes, page: ByteView) -> None:
    """Raise IntegrityError unless ``page`` is 4096 bytes whose digest is ``digest``."""
    view = memoryview(page)
    if view.nbytes != PAGE_SIZE:
        raise IntegrityError(
            f"page for {digest.hex()[:16]} is {view.nbytes} bytes, not {PAGE_SIZE}"
        )
    if not page_matches(digest, view):
        raise IntegrityError(f"page content does not match digest {digest.hex()[:16]}")


def iter_page_views(buffer: ByteView) -> Iterator[memoryview]:
    """Yield zero-copy views of consecutive pages of a page-aligned buffer (e.g. an mmap)."""
    view = memoryview(buffer).cast("B")
    if view.nbytes % PAGE_SIZE:
        raise DecodeError(f"buffer of {view.nbytes} bytes is not a whole number of pages")
    for start in range(0, view.nbytes, PAGE_SIZE):
        yield view[start : start + PAGE_SIZE]
