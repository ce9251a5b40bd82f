"""``tmdht encode`` and ``tmdht rebuild``: images to dedup streams and back."""

from __future__ import annotations

import contextlib
import itertools
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from tmdht.catalog import TemplateCatalog
from tmdht.cli.access import cluster_options, store_kwargs
from tmdht.cli.main import emit_json, human_bytes, run_async, stdout
from tmdht.cli.progress import page_progress
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
from tmdht.images import ImageWriter, MemoryImage, open_image
from tmdht.pages import PAGE_SIZE, check_page, digest_page, is_zero_page

BATCH_PAGES = 1024
READ_CHUNK = 1 << 20
RESOLVE_WINDOW = 8192


@click.command()
@click.argument("image", type=click.Path(path_type=Path))
@click.option(
    "-c",
    "--catalog",
    "catalog_path",
    required=True,
    type=click.Path(path_type=Path),
    help="Template catalog.",
)
@click.option(
    "-o", "--output", required=True, type=click.Path(path_type=Path), help="Dedup stream to write."
)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def encode(image: Path, catalog_path: Path, output: Path, as_json: bool) -> None:
    """Encode IMAGE as a dedup stream: template pages become their digests."""
    doc = encode_file(image, TemplateCatalog.load(catalog_path), output)
    if as_json:
        emit_json(doc)
        return
    stdout.print(
        f"{doc['pages']:,} pages: {doc['full_pages']:,} full, {doc['zero_pages']:,} zero, "
        f"[bold]{doc['template_pages']:,} template[/] "
        f"({doc['template_share']:.1%} of non-zero pages)"
    )
    stdout.print(
        f"image {human_bytes(doc['image_bytes'])} -> stream {human_bytes(doc['stream_bytes'])} "
        f"([bold]{1 - doc['ratio']:.1%} smaller[/]) in {doc['seconds']:.2f} s; wrote {output}"
    )


def encode_file(image: Path, catalog: TemplateCatalog, output: Path) -> dict[str, Any]:
    """Encode an image file into a dedup stream file (atomically); returns the summary."""
    started = time.perf_counter()
    with open_image(image) as img:
        encoder = DedupEncoder(catalog.catalog_id, img.blocks, catalog.contains)
        tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
        try:
            with tmp.open("wb") as out, page_progress() as progress:
                task = progress.add_task(f"encoding {img.name}", total=img.page_count * PAGE_SIZE)
                out.write(encoder.start())
                pages = img.iter_pages()
                while batch := list(itertools.islice(pages, BATCH_PAGES)):
                    out.write(encoder.encode_pages(batch))
                    progress.advance(task, len(batch) * PAGE_SIZE)
                del batch
                out.write(encoder.finish())
                out.flush()
                os.fsync(out.fileno())
            tmp.replace(output)
        finally:
            tmp.unlink(missing_ok=True)
        image_bytes = img.size
    s = encoder.stats
    return {
        "image": str(image),
        "stream": str(output),
        "catalog_id": catalog.catalog_id.hex(),
        "pages": s.pages,
        "full_pages": s.full,
        "zero_pages": s.zero,
        "template_pages": s.template,
        "image_bytes": image_bytes,
        "stream_bytes": s.stream_bytes,
        "ratio": s.stream_bytes / image_bytes,
        "template_share": s.template / (s.pages - s.zero) if s.pages > s.zero else 0.0,
        "seconds": time.perf_counter() - started,
    }


def _stream_events(
    path: Path, *, verify: bool, expected_catalog_id: bytes | None
) -> Iterator[StreamEvent]:
    """Decode a dedup stream file, read in chunks."""
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


class PageSource:
    """Where a rebuild gets template pages from."""

    async def prepare(self, needed: set[bytes]) -> None:
        """Called once with every template digest of the stream (sources that must search)."""

    async def fetch(self, digests: list[bytes]) -> dict[bytes, bytes]:
        """Verified pages for ``digests``; raise if some cannot be had."""
        raise NotImplementedError

    needs_scan = False
    """True if :meth:`prepare` must see the digests first (an extra pass over the stream)."""


class ImagePages(PageSource):
    """Template pages found in local memory images (each read is verified)."""

    needs_scan = True

    def __init__(self, images: list[MemoryImage]) -> None:
        self.images = images
        self.located: dict[bytes, tuple[MemoryImage, int]] = {}

    async def prepare(self, needed: set[bytes]) -> None:
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
        out = {}
        for digest in digests:
            image, index = self.located[digest]
            page = image.page(index)
            check_page(digest, page)  # the image may have changed since the scan
            out[digest] = bytes(page)
        return out


class ClusterPages(PageSource):
    """Template pages resolved through a store cluster (verified by the client)."""

    def __init__(self, store: Any) -> None:
        self.store = store

    async def fetch(self, digests: list[bytes]) -> dict[bytes, bytes]:
        pages: dict[bytes, bytes] = dict(
            zip(digests, await self.store.get_many(digests), strict=True)
        )
        return pages


async def rebuild_stream(
    stream: Path, output: Path, source: PageSource, expected_catalog_id: bytes | None = None
) -> dict[str, Any]:
    """Rebuild a stream's raw memory into ``output`` (atomically), templates from ``source``.

    Template records are resolved in windows of :data:`RESOLVE_WINDOW` digests, so memory stays
    bounded whatever the stream's size; the memory digest is checked at the end.
    """
    started = time.perf_counter()
    distinct: set[bytes] = set()
    if source.needs_scan:
        for event in _stream_events(stream, verify=False, expected_catalog_id=expected_catalog_id):
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

        for event in _stream_events(stream, verify=True, expected_catalog_id=expected_catalog_id):
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
    return {
        "stream": str(stream),
        "output": str(output),
        "pages": end.pages,
        "full_pages": end.full,
        "zero_pages": end.zero,
        "template_pages": end.template,
        "distinct_templates": len(distinct),
        "bytes": writer.size,
        "memory_digest": end.memory_digest.hex(),
        "seconds": time.perf_counter() - started,
    }


@click.command()
@click.argument("stream", type=click.Path(path_type=Path))
@click.option(
    "--pages-from",
    "pages_from",
    multiple=True,
    type=click.Path(path_type=Path),
    help="Memory image holding template pages (repeatable); or use --seed.",
)
@cluster_options
@click.option(
    "-c",
    "--catalog",
    "catalog_path",
    type=click.Path(path_type=Path),
    help="Refuse a stream encoded against another catalog.",
)
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(path_type=Path),
    help="Raw memory image to write.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def rebuild(
    stream: Path,
    pages_from: tuple[Path, ...],
    seeds: tuple[str, ...],
    cluster_key_file: Path | None,
    insecure_open: bool,
    catalog_path: Path | None,
    output: Path,
    as_json: bool,
) -> None:
    """Rebuild the raw memory of a dedup STREAM: template pages from the cluster or local images."""
    if bool(pages_from) == bool(seeds):
        raise UsageError(
            "say where template pages come from: --seed HOST:PORT or --pages-from IMAGE"
        )
    expected = TemplateCatalog.load(catalog_path).catalog_id if catalog_path else None
    if pages_from:
        doc = rebuild_from_images(stream, pages_from, output, expected)
    else:
        doc = rebuild_from_cluster(
            stream, output, store_kwargs(seeds, cluster_key_file, insecure_open), expected
        )
    if as_json:
        emit_json(doc)
        return
    stdout.print(
        f"rebuilt {human_bytes(doc['bytes'])} ({doc['pages']:,} pages: {doc['full_pages']:,} "
        f"full, {doc['zero_pages']:,} zero, {doc['template_pages']:,} template) in "
        f"{doc['seconds']:.2f} s; memory digest verified; wrote {output}"
    )


def rebuild_from_images(
    stream: Path,
    pages_from: tuple[Path, ...] | list[Path],
    output: Path,
    expected_catalog_id: bytes | None = None,
) -> dict[str, Any]:
    """Rebuild with template pages from local images."""
    with contextlib.ExitStack() as stack:
        images = [stack.enter_context(open_image(p)) for p in pages_from]
        return run_async(rebuild_stream(stream, output, ImagePages(images), expected_catalog_id))


def rebuild_from_cluster(
    stream: Path, output: Path, store_args: dict[str, Any], expected_catalog_id: bytes | None = None
) -> dict[str, Any]:
    """Rebuild with template pages resolved through a store cluster."""
    from tmdht.client.store import TemplateStoreClient  # noqa: PLC0415 - IO stack on demand

    async def main() -> dict[str, Any]:
        async with TemplateStoreClient(**store_args, cache_pages=65536) as store:
            doc = await rebuild_stream(stream, output, ClusterPages(store), expected_catalog_id)
            doc["cache_hits"] = store.metrics.registry.get_sample_value(
                "tmdht_client_cache_hits_total"
            )
            return doc

    return run_async(main())
