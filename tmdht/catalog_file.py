"""The template catalog's file format, read without numpy (this module owns the format).

====================  ========  ==================================================
field                 size      meaning
====================  ========  ==================================================
magic                 8         ``TMDHTCAT``
format version        u16       1
page size             u32       4096
digest algorithm      u8        1 = BLAKE3-256
digest size           u8        32
threshold             u32       mining threshold
template count        u64       n (at most MAX_TEMPLATES)
metadata length       u32       m (at most MAX_METADATA)
metadata              m         UTF-8 JSON: corpus statistics (see CorpusStats)
digests               n * 32    strictly ascending
counts                n * u64   occurrences of each template in the corpus
checksum              32        BLAKE3-256 of everything before it
====================  ========  ==================================================

All integers are big-endian. The *catalog id* is BLAKE3-256 of the digest list: a dedup stream
names the catalog it was encoded against by this id, so a receiver can tell.

:class:`tmdht.catalog.TemplateCatalog` is the catalog in memory (numpy arrays, membership by
binary search, mining statistics). The migration sender needs only the id and the digests, and
reads them with :func:`read_template_digests` before it forwards its first byte: numpy alone
takes longer to import than the sender's whole start-up budget.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from blake3 import blake3

from tmdht.errors import DecodeError, LimitExceededError, UnknownFormatError, UsageError
from tmdht.pages import DIGEST_SIZE, PAGE_SIZE, ZERO_DIGEST

__all__ = [
    "CATALOG_MAGIC",
    "CatalogFile",
    "TemplateDigests",
    "encode_catalog",
    "parse_catalog",
    "read_catalog_bytes",
    "read_template_digests",
]

CATALOG_MAGIC: Final = b"TMDHTCAT"
CATALOG_VERSION: Final = 1
ALGORITHM_BLAKE3: Final = 1
MAX_TEMPLATES: Final = 1 << 32
MAX_METADATA: Final = 16 << 20
HEADER = struct.Struct(">8sHIBBIQI")
CHECKSUM_SIZE: Final = 32


@dataclass(frozen=True, slots=True)
class CatalogFile:
    """A checked catalog file, its parts as views of the file's bytes."""

    threshold: int
    """Mining threshold."""
    count: int
    """Number of templates."""
    metadata: memoryview
    """UTF-8 JSON corpus statistics."""
    digests: memoryview
    """``count * 32`` bytes of digests (ascending in a well-formed file)."""
    counts: memoryview
    """``count`` big-endian u64 corpus counts."""


@dataclass(frozen=True, slots=True)
class TemplateDigests:
    """What a migration sender needs of a catalog: its id and its digests."""

    catalog_id: bytes
    """BLAKE3-256 of the digest list."""
    digests: bytes
    """``32 * n`` bytes: the template digests, ascending."""

    def __len__(self) -> int:
        return len(self.digests) // DIGEST_SIZE

    def as_set(self) -> frozenset[bytes]:
        """The digests as a set of bytes (the pure-Python path's membership test)."""
        raw = self.digests
        return frozenset(raw[i : i + DIGEST_SIZE] for i in range(0, len(raw), DIGEST_SIZE))


def encode_catalog(threshold: int, metadata: bytes, digests: bytes, counts_be: bytes) -> bytes:
    """The file's bytes (digests ascending, counts as big-endian u64, both checked by callers)."""
    if len(metadata) > MAX_METADATA:
        raise LimitExceededError("catalog metadata too large")
    n = len(digests) // DIGEST_SIZE
    header = HEADER.pack(CATALOG_MAGIC, CATALOG_VERSION, PAGE_SIZE, ALGORITHM_BLAKE3, DIGEST_SIZE,
                         threshold, n, len(metadata))
    body = b"".join((header, metadata, digests, counts_be))
    return body + blake3(body).digest()


def parse_catalog(data: bytes | memoryview) -> CatalogFile:
    """Check a catalog file's header, size and checksum; raises DecodeError (or a subclass)."""
    view = memoryview(data).cast("B")
    if view.nbytes < HEADER.size + CHECKSUM_SIZE:
        if bytes(view[:8]) == CATALOG_MAGIC:
            raise DecodeError("catalog file is truncated")
        raise UnknownFormatError("not a tmdht template catalog")
    magic, version, page_size, algorithm, digest_size, threshold, n, meta_len = (
        HEADER.unpack_from(view, 0)
    )
    if magic != CATALOG_MAGIC:
        raise UnknownFormatError("not a tmdht template catalog")
    if version != CATALOG_VERSION:
        raise DecodeError(f"catalog format version {version} is not supported (only 1)")
    if (page_size, algorithm, digest_size) != (PAGE_SIZE, ALGORITHM_BLAKE3, DIGEST_SIZE):
        raise DecodeError(
            f"catalog for page size {page_size}, algorithm {algorithm}, digest {digest_size}"
            " bytes: this build handles 4096-byte pages and BLAKE3-256 only"
        )
    if n > MAX_TEMPLATES:
        raise LimitExceededError(f"catalog claims {n} templates")
    if meta_len > MAX_METADATA:
        raise LimitExceededError(f"catalog metadata of {meta_len} bytes")
    if threshold < 2:
        raise DecodeError(f"catalog threshold {threshold}")
    expected = HEADER.size + meta_len + n * (DIGEST_SIZE + 8) + CHECKSUM_SIZE
    if view.nbytes != expected:
        raise DecodeError(
            f"catalog file is {view.nbytes} bytes, its header says {expected}"
            + (" (truncated)" if view.nbytes < expected else "")
        )
    body = view[: expected - CHECKSUM_SIZE]
    if blake3(body, max_threads=blake3.AUTO).digest() != bytes(view[-CHECKSUM_SIZE:]):
        raise DecodeError("catalog checksum mismatch: the file is damaged")
    at = HEADER.size
    metadata = view[at : at + meta_len]
    at += meta_len
    digests = view[at : at + n * DIGEST_SIZE]
    at += n * DIGEST_SIZE
    return CatalogFile(threshold, n, metadata, digests, view[at : at + n * 8])


def read_catalog_bytes(path: Path | str) -> bytes:
    """A catalog file's bytes; UsageError if it is missing, a directory or empty."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise UsageError(f"{path}: is a directory, not a catalog") from None
    if not data:
        raise UsageError(f"{path}: empty file, not a tmdht template catalog")
    return data


def read_template_digests(path: Path | str) -> TemplateDigests:
    """The id and digests of a catalog file, checked (header, size, checksum, no zero page),
    without numpy. UsageError if it is missing, DecodeError if damaged.

    The digests' order is not checked here (membership does not depend on it; the checksum
    already proves the file is what a catalog writer wrote); TemplateCatalog.load checks it."""
    try:
        digests = bytes(parse_catalog(read_catalog_bytes(path)).digests)
        at = digests.find(ZERO_DIGEST)
        while at >= 0:
            if at % DIGEST_SIZE == 0:
                raise DecodeError("the zero page cannot be a template")
            at = digests.find(ZERO_DIGEST, at + 1)
    except DecodeError as exc:
        raise type(exc)(f"{path}: {exc}") from None
    return TemplateDigests(blake3(digests).digest(), digests)
