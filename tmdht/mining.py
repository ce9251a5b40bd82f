"""Template mining (TMDM): count page contents across a corpus and keep the frequent ones.

Every non-zero page of every image is hashed once (BLAKE3-256). Counting is sort-based on numpy
arrays of 36-byte rows (digest, image index), so memory stays bounded however large the corpus:

- while the rows fit in ``memory_budget`` they stay in memory;
- beyond that they are hash-partitioned by their first digest bits into spill files on disk
  (``spill_dir``), sized so that one partition fits the budget; partitions are then counted one
  at a time. Partition order is digest order, so the templates come out sorted.

Peak counting memory is about ``memory_budget`` (rows cost ~128 bytes each while a partition is
sorted: the rows, the sort permutation, the sorted copy and comparison masks), plus one chunk of
digests being hashed (2 MiB). The template list itself (32 bytes + a count per template) is kept
in memory: it becomes the catalog, which senders hold in memory anyway.
"""

from __future__ import annotations

import contextlib
import functools
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt
from blake3 import blake3

from tmdht.errors import UsageError
from tmdht.images import open_image
from tmdht.pages import DIGEST_SIZE, is_zero_page

__all__ = [
    "BYTES_PER_ROW",
    "ImageCoverage",
    "MiningConfig",
    "MiningResult",
    "TemplateMiner",
    "mine_images",
]

ROW_DTYPE: Final = np.dtype([("d", ">u8", (4,)), ("img", "<u4")])
"""A counted occurrence: the digest as four big-endian words, and which image it came from."""
BYTES_PER_ROW: Final = 128
"""Peak bytes one row costs while its partition is sorted and counted."""
CHUNK_PAGES: Final = 65536
"""Digests hashed between two flushes into numpy (2 MiB of digests)."""
MAX_PARTITIONS: Final = 1 << 16
MAX_IMAGES: Final = 1 << 31


@dataclass(frozen=True, slots=True)
class MiningConfig:
    """How to mine."""

    threshold: int = 2
    """A content becomes a template when it occurs at least this often in the corpus."""
    memory_budget: int = 256 << 20
    """Bytes the counting may use; beyond that, rows spill to disk."""
    spill_dir: Path | None = None
    """Where spill files go (default: the system temp dir). Needs ~36 bytes per non-zero page."""

    def __post_init__(self) -> None:
        if self.threshold < 2:
            raise UsageError("the template threshold must be at least 2")
        if self.memory_budget < 1 << 20:
            raise UsageError("the mining memory budget must be at least 1 MiB")


@dataclass(frozen=True, slots=True)
class ImageCoverage:
    """What mining found in one image."""

    name: str
    """Image name (file name)."""
    pages: int
    """Pages scanned."""
    zero_pages: int
    """All-zero pages (never templates)."""
    template_pages: int
    """Non-zero pages whose content is a template."""

    @property
    def nonzero_pages(self) -> int:
        """Pages that are not all zero."""
        return self.pages - self.zero_pages

    @property
    def coverage(self) -> float:
        """Share of the non-zero pages that are templates."""
        return self.template_pages / self.nonzero_pages if self.nonzero_pages else 0.0


@dataclass(frozen=True)
class MiningResult:
    """The templates of a corpus, sorted by digest, and the coverage they give."""

    threshold: int
    """The threshold used."""
    digests: npt.NDArray[np.uint8]
    """Template digests, shape (n, 32), strictly ascending."""
    counts: npt.NDArray[np.uint64]
    """Occurrences of each template in the corpus."""
    images: tuple[ImageCoverage, ...]
    """Per-image figures, in the order the images were added."""
    distinct_contents: int
    """Distinct non-zero page contents seen."""
    partitions: int = 1
    """Partitions counting used (1 = no spilling)."""
    spilled_bytes: int = field(default=0)
    """Bytes written to spill files."""

    @property
    def template_count(self) -> int:
        """Number of templates."""
        return len(self.counts)

    @property
    def totals(self) -> ImageCoverage:
        """The corpus as one image."""
        return ImageCoverage(
            "total",
            sum(i.pages for i in self.images),
            sum(i.zero_pages for i in self.images),
            sum(i.template_pages for i in self.images),
        )


class TemplateMiner:
    """Counts page contents over images added one after another, then selects templates.

    ``expected_pages`` (the corpus page count, known from the image sizes) lets the miner pick
    its partitioning up front; a wrong guess costs memory or speed, never correctness.
    """

    def __init__(self, config: MiningConfig | None = None, *, expected_pages: int = 0) -> None:
        self.config = config or MiningConfig()
        self._expected_rows = expected_pages
        self._max_rows = self.config.memory_budget // BYTES_PER_ROW
        self._in_memory: list[npt.NDArray[np.void]] = []
        self._in_memory_rows = 0
        self._partitions = 1
        self._spill: tempfile.TemporaryDirectory[str] | None = None
        self._spilled_bytes = 0
        self._names: list[str] = []
        self._pages: list[int] = []
        self._zeros: list[int] = []
        self._finished = False

    def __enter__(self) -> TemplateMiner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Remove spill files."""
        if self._spill is not None:
            self._spill.cleanup()
            self._spill = None

    def add_image(
        self,
        name: str,
        pages: Iterable[memoryview],
        on_progress: Callable[[int], None] | None = None,
    ) -> None:
        """Hash and count every page of one image. ``on_progress(n)`` reports n more pages."""
        if self._finished:
            raise UsageError("the miner has finished; start a new one")
        if len(self._names) >= MAX_IMAGES:
            raise UsageError("too many images")
        index = len(self._names)
        self._names.append(name)
        digests = bytearray()
        pending = hashed = zeros = reported = 0
        hash_page = blake3
        for page in pages:
            # The hot loop: a zero check, one BLAKE3 call, an append.
            if is_zero_page(page):
                zeros += 1
                continue
            digests += hash_page(page).digest()
            pending += 1
            if pending == CHUNK_PAGES:
                self._add_rows(digests, index)
                digests.clear()
                hashed += pending
                pending = 0
                if on_progress is not None:
                    on_progress(hashed + zeros - reported)
                    reported = hashed + zeros
        if pending:
            self._add_rows(digests, index)
            hashed += pending
        self._pages.append(hashed + zeros)
        self._zeros.append(zeros)
        if on_progress is not None:
            on_progress(hashed + zeros - reported)

    def finish(self) -> MiningResult:
        """Count, select the templates and compute coverage. Spill files are removed."""
        if self._finished:
            raise UsageError("finish() was already called")
        self._finished = True
        n_images = len(self._names)
        per_image = np.zeros(n_images, dtype=np.int64)
        parts_digests: list[npt.NDArray[np.uint8]] = []
        parts_counts: list[npt.NDArray[np.uint64]] = []
        distinct = 0
        try:
            for rows in self._partitions_rows():
                d, c, covered, n_distinct = _count_rows(rows, self.config.threshold, n_images)
                parts_digests.append(d)
                parts_counts.append(c)
                per_image += covered
                distinct += n_distinct
        finally:
            self.close()
        digests = (
            np.concatenate(parts_digests)
            if parts_digests
            else np.empty((0, DIGEST_SIZE), dtype=np.uint8)
        )
        counts = np.concatenate(parts_counts) if parts_counts else np.empty(0, dtype=np.uint64)
        images = tuple(
            ImageCoverage(name, pages, zeros, int(covered))
            for name, pages, zeros, covered in zip(
                self._names, self._pages, self._zeros, per_image, strict=True
            )
        )
        return MiningResult(
            self.config.threshold,
            digests,
            counts,
            images,
            distinct,
            self._partitions,
            self._spilled_bytes,
        )

    # -- internals ---------------------------------------------------------------------------

    def _add_rows(self, digests: bytearray, index: int) -> None:
        words = np.frombuffer(bytes(digests), dtype=">u8").reshape(-1, 4)
        rows = np.empty(len(words), dtype=ROW_DTYPE)
        rows["d"] = words
        rows["img"] = index
        if self._spill is None:
            self._in_memory.append(rows)
            self._in_memory_rows += len(rows)
            if self._in_memory_rows > self._max_rows:
                self._start_spilling()
        else:
            self._write_partitions(rows)

    def _start_spilling(self) -> None:
        expected = max(self._expected_rows, 2 * self._in_memory_rows)
        wanted = -(-expected // self._max_rows)
        self._partitions = min(MAX_PARTITIONS, 1 << max(1, (wanted - 1).bit_length()))
        spill_dir = self.config.spill_dir
        self._spill = tempfile.TemporaryDirectory(prefix="tmdht-mine-", dir=spill_dir)
        held, self._in_memory, self._in_memory_rows = self._in_memory, [], 0
        for rows in held:
            self._write_partitions(rows)

    def _partition_path(self, part: int) -> Path:
        assert self._spill is not None
        return Path(self._spill.name) / f"part-{part:05d}.rows"

    def _write_partitions(self, rows: npt.NDArray[np.void]) -> None:
        shift = 64 - (self._partitions.bit_length() - 1)
        part_of = rows["d"][:, 0] >> np.uint64(shift)
        order = np.argsort(part_of, kind="stable")
        rows, part_of = rows[order], part_of[order]
        bounds = np.searchsorted(part_of, np.arange(self._partitions + 1, dtype=np.uint64))
        for part in np.flatnonzero(np.diff(bounds)).tolist():
            chunk = rows[bounds[part] : bounds[part + 1]]
            with self._partition_path(part).open("ab") as f:
                chunk.tofile(f)
            self._spilled_bytes += chunk.nbytes

    def _partitions_rows(self) -> Iterable[npt.NDArray[np.void]]:
        if self._spill is None:
            if self._in_memory:
                rows = np.concatenate(self._in_memory)
                self._in_memory = []
                yield rows
            return
        for part in range(self._partitions):
            path = self._partition_path(part)
            if path.exists():
                rows = np.fromfile(path, dtype=ROW_DTYPE)
                path.unlink()
                yield rows


def mine_images(
    paths: Sequence[Path | str],
    config: MiningConfig | None = None,
    *,
    names: Sequence[str | None] | None = None,
    on_start: Callable[[int], None] | None = None,
    on_progress: Callable[[str, int], None] | None = None,
) -> MiningResult:
    """Mine memory image files (any format :func:`tmdht.images.open_image` reads).

    Each image is recorded under ``names[i]``, else under its path as given
    (``build/guests/idle-1/stream.bin``, not only ``stream.bin``). Every file is opened, and its
    format checked, before any work; ``on_start(pages)`` then says how many pages there are, and
    ``on_progress(image name, n)`` reports n more pages of that image counted.
    """
    labels = list(names or ())
    labels += [None] * (len(paths) - len(labels))
    with contextlib.ExitStack() as stack:
        opened = [stack.enter_context(open_image(p)) for p in paths]
        total = sum(i.page_count for i in opened)
        if on_start is not None:
            on_start(total)
        miner = stack.enter_context(TemplateMiner(config, expected_pages=total))
        for path, label, image in zip(paths, labels, opened, strict=True):
            report = None if on_progress is None else functools.partial(on_progress, image.name)
            miner.add_image(label or str(path), image.iter_pages(), report)
        return miner.finish()


def _count_rows(
    rows: npt.NDArray[np.void], threshold: int, n_images: int
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint64], npt.NDArray[np.int64], int]:
    """Sort one partition's rows by digest; return its templates, counts and per-image hits."""
    words = rows["d"]
    # Sort by the first 64 bits only (a fast integer sort); fall back to a full lexicographic
    # sort only if two different digests share those bits, which practically never happens.
    order = np.argsort(words[:, 0].astype(np.uint64), kind="stable")
    words = words[order]
    same_prefix = words[1:, 0] == words[:-1, 0]
    same = same_prefix & (words[1:, 1:] == words[:-1, 1:]).all(axis=1)
    if np.any(same_prefix & ~same):
        native = words.astype(np.uint64)
        resort = np.lexsort((native[:, 3], native[:, 2], native[:, 1], native[:, 0]))
        order, words = order[resort], words[resort]
        same = (words[1:] == words[:-1]).all(axis=1)
    starts = np.flatnonzero(np.concatenate(([True], ~same)))
    counts = np.diff(np.append(starts, len(words))).astype(np.uint64)
    is_template = counts >= threshold
    row_is_template = np.repeat(is_template, counts.astype(np.int64))
    images = rows["img"][order]
    covered = np.bincount(images[row_is_template], minlength=n_images).astype(np.int64)
    template_words = np.ascontiguousarray(words[starts[is_template]], dtype=">u8")
    digests = template_words.view(np.uint8).reshape(-1, DIGEST_SIZE)
    return digests, counts[is_template], covered, len(starts)
