"""Publishing a template catalog: its pages, read from memory images, into the store cluster."""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

from tmdht.catalog import TemplateCatalog
from tmdht.images import open_image
from tmdht.pages import PAGE_SIZE, digest_page, is_zero_page

if TYPE_CHECKING:
    from tmdht.client.store import TemplateStoreClient

__all__ = ["PUBLISH_BATCH", "PublishSummary", "publish_templates", "templates_in"]

PUBLISH_BATCH: Final = 2048
"""Image pages examined, and their templates stored, per step."""


@dataclass(frozen=True, slots=True)
class PublishSummary:
    """What :func:`publish_templates` did."""

    catalog_id: str
    templates: int
    """Templates in the catalog."""
    published: int
    """Templates found in the images and stored."""
    not_found: int
    """Templates in none of the images."""
    replica_writes: int
    stored: int
    """Replica writes of new pages."""
    present: int
    """Replica writes that found the page already there."""
    seconds: float
    pages_per_s: float

    def to_json(self) -> dict[str, object]:
        """The summary as a JSON object."""
        return asdict(self)


async def publish_templates(
    store: TemplateStoreClient,
    catalog: TemplateCatalog,
    images: Sequence[Path],
    *,
    on_start: Callable[[int], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> PublishSummary:
    """Find the catalog's template pages in the images and store each on its R replicas.

    Every image is opened (and checked) before any work; ``on_start(bytes of pages)`` then
    ``on_progress(n)`` for n more bytes of pages examined.
    """
    started = time.perf_counter()
    published: set[bytes] = set()
    stored = present = 0
    with contextlib.ExitStack() as stack:
        opened = [stack.enter_context(open_image(p)) for p in images]
        if on_start is not None:
            on_start(sum(i.page_count for i in opened) * PAGE_SIZE)
        for image in opened:
            pages = image.iter_pages()
            while batch := list(itertools.islice(pages, PUBLISH_BATCH)):
                if on_progress is not None:
                    on_progress(len(batch) * PAGE_SIZE)
                chosen = templates_in(batch, catalog, published)
                if chosen:
                    summary = await store.put_many(chosen)
                    stored += summary.stored
                    present += summary.present
                    published.update(d for d, _ in chosen)
            del batch, pages
    seconds = time.perf_counter() - started
    return PublishSummary(
        catalog_id=catalog.catalog_id.hex(),
        templates=len(catalog),
        published=len(published),
        not_found=len(catalog) - len(published),
        replica_writes=stored + present,
        stored=stored,
        present=present,
        seconds=seconds,
        pages_per_s=len(published) / seconds if seconds else 0.0,
    )


def templates_in(
    batch: Sequence[memoryview], catalog: TemplateCatalog, done: set[bytes]
) -> list[tuple[bytes, bytes]]:
    """(digest, page) of the batch's template pages not in ``done``."""
    candidates = [(digest_page(p), p) for p in batch if not is_zero_page(p)]
    if not candidates:
        return []
    member = catalog.contains_many([d for d, _ in candidates])
    chosen: dict[bytes, bytes] = {}
    for (digest, page), is_template in zip(candidates, member.tolist(), strict=True):
        if is_template and digest not in done:
            chosen[digest] = bytes(page)
    return list(chosen.items())
