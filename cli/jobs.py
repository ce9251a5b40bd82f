"""The library calls the commands (and the demo) share, with progress bars on stderr.

Each runs one library operation -- mining (:func:`tmdht.mining.mine_images`), publishing
(:mod:`tmdht.client.publish`), encoding and rebuilding (:mod:`tmdht.client.rebuild`) -- and
shows its progress; none holds logic of its own.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

from tmdht import __version__
from tmdht.catalog import TemplateCatalog
from tmdht.cli.main import run_async
from tmdht.cli.progress import page_progress
from tmdht.client.publish import PublishSummary, publish_templates
from tmdht.client.rebuild import (
    ClusterPages,
    EncodeSummary,
    ImagePages,
    RebuildSummary,
    encode_image,
    rebuild_stream,
)
from tmdht.images import open_image
from tmdht.mining import MiningConfig, MiningResult, mine_images
from tmdht.net.credentials import ClusterAccess
from tmdht.pages import PAGE_SIZE

CACHE_PAGES = 65536
"""Pages the client caches during a rebuild from the cluster (repeated templates)."""


def mine_files(
    images: tuple[Path, ...] | list[Path],
    config: MiningConfig,
    names: dict[Path, str] | None = None,
) -> tuple[TemplateCatalog, MiningResult, float]:
    """Mine a catalog from image files, with a progress bar; returns it, the result, seconds.

    Each image is recorded in the catalog under ``names[path]``, else under its path as given.
    """
    started = time.perf_counter()
    with page_progress() as progress:
        task = progress.add_task("mining")

        def advance(image: str, pages: int) -> None:
            progress.update(task, description=f"mining {image}", advance=pages * PAGE_SIZE)

        result = mine_images(
            images,
            config,
            names=[(names or {}).get(p) for p in images],
            on_start=lambda pages: progress.update(task, total=pages * PAGE_SIZE),
            on_progress=advance,
        )
    elapsed = time.perf_counter() - started
    catalog = TemplateCatalog.from_mining(result, {"tool": f"tmdht {__version__}"})
    return catalog, result, elapsed


def publish_files(
    catalog: TemplateCatalog, images: tuple[Path, ...] | list[Path], access: ClusterAccess
) -> PublishSummary:
    """Find the catalog's template pages in the images and put them into the cluster."""
    from tmdht.client.store import TemplateStoreClient  # noqa: PLC0415 - IO stack on demand

    async def main() -> PublishSummary:
        async with TemplateStoreClient.connect(access) as store:
            with page_progress() as progress:
                task = progress.add_task("publishing")
                return await publish_templates(
                    store,
                    catalog,
                    images,
                    on_start=lambda total: progress.update(task, total=total),
                    on_progress=lambda n: progress.advance(task, n),
                )

    return run_async(main())


def encode_file(image: Path, catalog: TemplateCatalog, output: Path) -> EncodeSummary:
    """Encode an image file into a dedup stream file, with a progress bar."""
    with page_progress() as progress:
        task = progress.add_task("encoding")
        return encode_image(
            image,
            catalog,
            output,
            on_start=lambda name, total: progress.update(
                task, description=f"encoding {name}", total=total
            ),
            on_progress=lambda n: progress.advance(task, n),
        )


def rebuild_from_images(
    stream: Path,
    pages_from: tuple[Path, ...] | list[Path],
    output: Path,
    expected_catalog_id: bytes | None = None,
) -> RebuildSummary:
    """Rebuild with template pages from local images."""
    with contextlib.ExitStack() as stack:
        images = [stack.enter_context(open_image(p)) for p in pages_from]
        return run_async(rebuild_stream(stream, output, ImagePages(images), expected_catalog_id))


def rebuild_from_cluster(
    stream: Path, output: Path, access: ClusterAccess, expected_catalog_id: bytes | None = None
) -> tuple[RebuildSummary, float]:
    """Rebuild with template pages resolved through a store cluster; also the cache hits."""
    from tmdht.client.store import TemplateStoreClient  # noqa: PLC0415 - IO stack on demand

    async def main() -> tuple[RebuildSummary, float]:
        async with TemplateStoreClient.connect(access, cache_pages=CACHE_PAGES) as store:
            summary = await rebuild_stream(stream, output, ClusterPages(store), expected_catalog_id)
            hits = store.metrics.registry.get_sample_value("tmdht_client_cache_hits_total")
            return summary, hits or 0.0

    return run_async(main())
