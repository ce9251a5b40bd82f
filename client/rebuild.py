"""Dedup stream files: an image encoded against a catalog, and the image rebuilt from a stream.

:func:`encode_image` writes a memory image as a dedup stream (:mod:`tmdht.dedup_stream`):
template pages as their digests. :func:`rebuild_stream` turns a stream back into raw memory,
taking the template pages from a :class:`PageSource` -- the store cluster
(:class:`ClusterPages`) or local memory images (:class:`ImagePages`) -- and checking every page
against its digest and the whole memory against the stream's memory digest. Both write their
output atomically: it appears only when complete.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final, Protocol

from tmdht.catalog import TemplateCatalog
from tmdht.dedup_stream import (
    DedupDecoder,
    DedupEncoder,
    FullPage,
    StreamEnd,
    StreamEvent,
    StreamStart,
    TemplatePage,
)
from tmdht.errors import CatalogMismatchError, DecodeError, UsageError
from tmdht.files import atomic_writer
from tmdht.images import ImageWriter, MemoryImage, open_image
from tmdht.pages import PAGE_SIZE, check_page, digest_page, is_zero_page

if TYPE_CHECKING:
    from tmdht.client.store import TemplateStoreClient

__all__ = [
    "RESOLVE_WINDOW",
    "ClusterPages",
    "EncodeSummary",
    "ImagePages",
    "PageSource",
    "RebuildSummary",
    "encode_image",
    "rebuild_stream",
    "stream_events",
]

ENCODE_BATCH: Final = 1024
"""Pages encoded per call into the encoder."""
READ_CHUNK: Final = 1 << 20
"""Bytes of a stream file read at a time."""
RESOLVE_WINDOW: Final = 8192
"""Template records resolved together: memory stays bounded whatever the stream's size."""

Progress = Callable[[int], None]
"""``on_progress(n)``: n more bytes of pages done."""


@dataclass(frozen=True, slots=True)
class EncodeSummary:
    """What :func:`encode_image` wrote."""

    image: str
    stream: str
    catalog_id: str
    """Hex id of the catalog the stream refers to."""
    pages: int
    full_pages: int
    zero_pages: int
    template_pages: int
    image_bytes: int
    stream_bytes: int
    ratio: float
    """Stream bytes per image byte."""
    template_share: float
    """Template pages among the non-zero pages."""
    seconds: float

    def to_json(self) -> dict[str, object]:
        """The summary as a JSON object."""
        return asdict(self)


@dataclass(frozen=True, slots=True)
class RebuildSummary:
    """What :func:`rebuild_stream` wrote."""

    stream: str
    output: str
    pages: int
    full_pages: int
    zero_pages: int
    template_pages: int
    distinct_templates: int
    bytes: int
    memory_digest: str
    """Hex digest over the whole memory, checked against the stream's."""
    seconds: float

    def to_json(self) -> dict[str, object]:
        """The summary as a JSON object."""
        return asdict(self)


def encode_image(
    image: Path,
    catalog: TemplateCatalog,
    output: Path,
    *,
    on_start: Callable[[str, int], None] | None = None,
    on_progress: Progress | None = None,
) -> EncodeSummary:
    """Encode an image file into a dedup stream file (atomically).

    ``on_start(image name, bytes of pages)`` is called once the image is open.
    """
    started = time.perf_counter()
    with open_image(image) as img:
        if on_start is not None:
            on_start(img.name, img.page_count * PAGE_SIZE)
        encoder = DedupEncoder(catalog.catalog_id, img.blocks, catalog.contains)
        with atomic_writer(output) as out:
            out.write(encoder.start())
            pages = img.iter_pages()
            while batch := list(itertools.islice(pages, ENCODE_BATCH)):
                out.write(encoder.encode_pages(batch))
                if on_progress is not None:
                    on_progress(len(batch) * PAGE_SIZE)
            del batch
            out.write(encoder.finish())
        image_bytes = img.size
    s = encoder.stats
    return EncodeSummary(
        image=str(image),
        stream=str(output),
        catalog_id=catalog.catalog_id.hex(),
        pages=s.pages,
        full_pages=s.full,
        zero_pages=s.zero,
        template_pages=s.template,
        image_bytes=image_bytes,
        stream_bytes=s.stream_bytes,
        ratio=s.stream_bytes / image_bytes,
        template_share=s.template / (s.pages - s.zero) if s.pages > s.zero else 0.0,
        seconds=time.perf_counter() - started,
    )


def stream_events(
    path: Path, *, verify: bool = True, expected_catalog_id: bytes | None = None
) -> Iterator[StreamEvent]:
    """Decode a dedup stream file, read in chunks. UsageError if it is missing, a directory or
    empty; a DecodeError or CatalogMismatchError names the file."""
    decoder = DedupDecoder(expected_catalog_id=expected_catalog_id, verify=verify)
    try:
        f = path.open("rb")
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise UsageError(f"{path}: is a directory, not a tmdht dedup stream") from None
    with f:
        if f.seek(0, os.SEEK_END) == 0:
            raise UsageError(f"{path}: empty file, not a tmdht dedup stream")
        f.seek(0)
        try:
            while chunk := f.read(READ_CHUNK):
                decoder.feed(chunk)
                yield from decoder.events()
            decoder.close()
        except (DecodeError, CatalogMismatchError) as exc:
            raise type(exc)(f"{path}: {exc}") from None  # say which file


class PageSource(Protocol):
    """Where a rebuild gets template pages from."""

    needs_scan: bool
    """True if :meth:`prepare` must see the digests first (an extra pass over the stream)."""

    async def prepare(self, needed: set[bytes]) -> None:
        """Called once with every template digest of the stream (sources that must search)."""

    async def fetch(self, digests: list[bytes]) -> dict[bytes, bytes]:
        """Verified pages for ``digests``; raise if some cannot be had."""
        ...


class ImagePages:
    """Template pages found in local memory images (each read is verified)."""

    needs_scan = True

    def __init__(self, images: Sequence[MemoryImage]) -> None:
        self.images = images
        self.located: dict[bytes, tuple[MemoryImage, int]] = {}

    async def prepare(self, needed: set[bytes]) -> None:
        """Find every needed page in the images; UsageError names one that is in none."""
        for image in self.images:
            for index, page in enumerate(image.iter_pages()):
                if is_zero_page(page):
                    continue
                digest = digest_page(page)
                if digest in needed and digest not in self.located:
                    self.located[digest] = (image, index)
                    if len(self.located) == len(needed):
                        return
        missing = sorted(needed - self.located.keys())
        if missing:
            raise UsageError(
                f"{len(missing)} template pages are in none of the --pages-from images "
                f"(first: {missing[0].hex()})"
            )

    async def fetch(self, digests: list[bytes]) -> dict[bytes, bytes]:
        """The pages, read again and checked (the image may have changed since the scan)."""
        out = {}
        for digest in digests:
            image, index = self.located[digest]
            page = image.page(index)
            check_page(digest, page)
            out[digest] = bytes(page)
        return out


class ClusterPages:
    """Template pages resolved through a store cluster (verified by the client)."""

    needs_scan = False

    def __init__(self, store: TemplateStoreClient) -> None:
        self.store = store

    async def prepare(self, needed: set[bytes]) -> None:
        """Nothing to find first: the ring places every digest."""

    async def fetch(self, digests: list[bytes]) -> dict[bytes, bytes]:
        """The pages; PagesUnavailable names any no replica could serve."""
        return dict(zip(digests, await self.store.get_many(digests), strict=True))


async def rebuild_stream(
    stream: Path, output: Path, source: PageSource, expected_catalog_id: bytes | None = None
) -> RebuildSummary:
    """Rebuild a stream's raw memory into ``output`` (atomically), templates from ``source``.

    Template records are resolved in windows of :data:`RESOLVE_WINDOW` digests, so memory stays
    bounded whatever the stream's size; the memory digest is checked at the end.
    """
    started = time.perf_counter()
    distinct: set[bytes] = set()
    if source.needs_scan:
        for event in stream_events(stream, verify=False, expected_catalog_id=expected_catalog_id):
            if isinstance(event, TemplatePage):
                distinct.add(event.digest)
        await source.prepare(distinct)
    end: StreamEnd | None = None
    with contextlib.ExitStack() as stack:
        writer: ImageWriter | None = None  # aborted by the exit stack unless committed
        window: list[TemplatePage] = []

        async def flush() -> None:
            assert writer is not None
            pages = await source.fetch(list(dict.fromkeys(t.digest for t in window)))
            for t in window:
                writer.write_page(t.index, pages[t.digest])
            distinct.update(pages)
            window.clear()

        for event in stream_events(stream, verify=True, expected_catalog_id=expected_catalog_id):
            if isinstance(event, FullPage):
                assert writer is not None
                writer.write_page(event.index, event.data)
            elif isinstance(event, TemplatePage):
                window.append(event)
                if len(window) >= RESOLVE_WINDOW:
                    await flush()
            elif isinstance(event, StreamEnd):
                end = event
            elif isinstance(event, StreamStart):
                writer = stack.enter_context(ImageWriter(output, event.blocks))
            # ZeroRun: nothing to write, the output file is sparse
        if window:
            await flush()
        assert writer is not None and end is not None
        writer.commit()
    return RebuildSummary(
        stream=str(stream),
        output=str(output),
        pages=end.pages,
        full_pages=end.full,
        zero_pages=end.zero,
        template_pages=end.template,
        distinct_templates=len(distinct),
        bytes=writer.size,
        memory_digest=end.memory_digest.hex(),
        seconds=time.perf_counter() - started,
    )
