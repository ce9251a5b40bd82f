"""The template catalog in memory: which page contents are templates.

The file format is owned by :mod:`tmdht.catalog_file` (readable without numpy, for the migration
sender's start-up). The *catalog id* is BLAKE3-256 of the digest list: a dedup stream names the
catalog it was encoded against by this id, so a receiver can tell.

Membership tests (what a sender asks for every page) are a binary search of the first 64 bits of
the digest in a numpy array, confirmed on the whole digest.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from blake3 import blake3

from tmdht.catalog_file import (
    CATALOG_MAGIC,
    MAX_TEMPLATES,
    encode_catalog,
    parse_catalog,
    read_catalog_bytes,
)
from tmdht.errors import DecodeError, LimitExceededError, UsageError
from tmdht.files import atomic_write
from tmdht.mining import ImageCoverage, MiningResult
from tmdht.pages import DIGEST_SIZE, ZERO_DIGEST

__all__ = [
    "CATALOG_MAGIC",
    "CorpusStats",
    "TemplateCatalog",
]


@dataclass(frozen=True)
class CorpusStats:
    """What the catalog was mined from (kept in the file as JSON)."""

    images: tuple[ImageCoverage, ...] = ()
    """Per-image coverage at mining time."""
    distinct_contents: int = 0
    """Distinct non-zero page contents in the corpus."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form facts (tool version, creation time) for humans."""

    def to_json(self) -> bytes:
        """Encode as UTF-8 JSON."""
        doc = {
            "images": [asdict(i) for i in self.images],
            "distinct_contents": self.distinct_contents,
            "extra": self.extra,
        }
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> CorpusStats:
        """Decode; raises DecodeError on anything malformed."""
        try:
            doc = json.loads(raw.decode("utf-8"))
            images = tuple(
                ImageCoverage(
                    str(i["name"]), int(i["pages"]), int(i["zero_pages"]), int(i["template_pages"])
                )
                for i in doc["images"]
            )
            extra = doc.get("extra", {})
            if not isinstance(extra, dict):
                raise TypeError("extra is not an object")
            return cls(images, int(doc["distinct_contents"]), extra)
        except (UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
            raise DecodeError(f"catalog metadata is malformed: {exc}") from None


class TemplateCatalog:
    """A sorted set of template digests with their corpus counts."""

    def __init__(
        self,
        digests: npt.NDArray[np.uint8],
        counts: npt.NDArray[np.uint64] | None = None,
        *,
        threshold: int = 2,
        stats: CorpusStats | None = None,
    ) -> None:
        digests = np.ascontiguousarray(digests, dtype=np.uint8).reshape(-1, DIGEST_SIZE)
        if counts is None:
            counts = np.full(len(digests), threshold, dtype=np.uint64)
        counts = np.ascontiguousarray(counts, dtype=np.uint64)
        if len(counts) != len(digests):
            raise UsageError("one count per digest")
        if len(digests) > MAX_TEMPLATES:
            raise LimitExceededError(f"{len(digests)} templates")
        words = digests.view(">u8").reshape(-1, 4)
        if not _strictly_ascending(words):
            raise DecodeError("catalog digests are not strictly ascending")
        self.digests = digests
        self.counts = counts
        self.threshold = threshold
        self.stats = stats or CorpusStats()
        self._prefixes = words[:, 0].astype(np.uint64)
        self._id = blake3(digests.tobytes()).digest()
        if len(digests) and self.contains(ZERO_DIGEST):
            raise DecodeError("the zero page cannot be a template")

    @classmethod
    def from_mining(
        cls, result: MiningResult, extra: dict[str, Any] | None = None
    ) -> TemplateCatalog:
        """The catalog of a mining run."""
        stats = CorpusStats(result.images, result.distinct_contents, dict(extra or {}))
        return cls(result.digests, result.counts, threshold=result.threshold, stats=stats)

    @classmethod
    def from_digests(cls, digests: Sequence[bytes], threshold: int = 2) -> TemplateCatalog:
        """A catalog of arbitrary digests (sorted and de-duplicated here); for tests and tools."""
        unique = sorted(set(digests))
        if any(len(d) != DIGEST_SIZE for d in unique):
            raise UsageError("digests are 32 bytes")
        raw = np.frombuffer(b"".join(unique), dtype=np.uint8).reshape(-1, DIGEST_SIZE)
        return cls(raw, threshold=threshold)

    # -- identity and membership -------------------------------------------------------------

    @property
    def catalog_id(self) -> bytes:
        """BLAKE3-256 of the digest list."""
        return self._id

    def __len__(self) -> int:
        return len(self.counts)

    def __contains__(self, digest: object) -> bool:
        return isinstance(digest, bytes | bytearray | memoryview) and self.contains(bytes(digest))

    def contains(self, digest: bytes) -> bool:
        """True if the page with this digest is a template."""
        prefix = int.from_bytes(digest[:8], "big")
        i = int(np.searchsorted(self._prefixes, prefix))
        n = len(self._prefixes)
        while i < n and self._prefixes[i] == prefix:  # equal prefixes: practically never > 1
            if self.digests[i].tobytes() == digest:
                return True
            i += 1
        return False

    def contains_many(
        self, digests: npt.NDArray[np.uint8] | Sequence[bytes]
    ) -> npt.NDArray[np.bool_]:
        """Membership of many digests at once (vectorised)."""
        if not isinstance(digests, np.ndarray):
            digests = np.frombuffer(b"".join(digests), dtype=np.uint8)
        query = np.ascontiguousarray(digests, dtype=np.uint8).reshape(-1, DIGEST_SIZE)
        if len(self._prefixes) == 0 or len(query) == 0:
            return np.zeros(len(query), dtype=np.bool_)
        prefixes = query.view(">u8")[:, 0].astype(np.uint64)
        idx = np.searchsorted(self._prefixes, prefixes)
        found = np.zeros(len(query), dtype=np.bool_)
        inside = idx < len(self._prefixes)
        cand = idx[inside]
        found[inside] = (self.digests[cand] == query[inside]).all(axis=1)
        # A miss whose prefix is present could hide behind an equal prefix; check those singly.
        suspects = np.flatnonzero(inside & ~found)
        for i in suspects[self._prefixes[idx[suspects]] == prefixes[suspects]].tolist():
            found[i] = self.contains(query[i].tobytes())
        return found

    def __iter__(self) -> Any:
        for row in self.digests:
            yield row.tobytes()

    # -- the file format ---------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """Encode the catalog file."""
        return encode_catalog(self.threshold, self.stats.to_json(), self.digests.tobytes(),
                              self.counts.astype(">u8").tobytes())

    @classmethod
    def from_bytes(cls, data: bytes | memoryview) -> TemplateCatalog:
        """Decode a catalog file; raises DecodeError (or a subclass) on any bad input."""
        parsed = parse_catalog(data)
        stats = CorpusStats.from_json(bytes(parsed.metadata))
        digests = np.frombuffer(parsed.digests, dtype=np.uint8)
        counts = np.frombuffer(parsed.counts, dtype=">u8").astype(np.uint64)
        return cls(
            digests.reshape(-1, DIGEST_SIZE).copy(), counts, threshold=parsed.threshold,
            stats=stats,
        )

    def save(self, path: Path | str) -> None:
        """Write the catalog atomically (temp file, fsync, rename)."""
        atomic_write(path, self.to_bytes())

    @classmethod
    def load(cls, path: Path | str) -> TemplateCatalog:
        """Read a catalog file. Raises UsageError if it is missing, DecodeError if damaged."""
        data = read_catalog_bytes(path)
        try:
            return cls.from_bytes(data)
        except DecodeError as exc:
            raise type(exc)(f"{path}: {exc}") from None


def _strictly_ascending(words: npt.NDArray[Any]) -> bool:
    """Rows of four big-endian words in strictly ascending lexicographic order."""
    if len(words) < 2:
        return True
    a = words[:-1].astype(np.uint64)
    b = words[1:].astype(np.uint64)
    greater = b > a
    equal = b == a
    ok = greater[:, 3]
    for col in (2, 1, 0):
        ok = greater[:, col] | (equal[:, col] & ok)
    return bool(ok.all())
