"""Which implementation runs the migration pipeline's per-page loops, and the factories the
proxies build their cores with.

Two implementations of one interface, in the manner of msgpack: the Rust extension module
:mod:`tmdht._native` (crate in ``native/``), and the pure-Python reference in
:mod:`tmdht.migration_stream`, which is the spec and the fallback. The package uses the native
module when it was built and imports, and the reference when it is missing or when
``TMDHT_NATIVE=0`` is set (tests run both; the equivalence tests hold them byte for byte and
error for error). ``tmdht --version`` names the active one.

:class:`NativeSender` and :class:`NativeReceiver` wrap the extension in the reference's
interface (:class:`~tmdht.migration_stream.SenderRewriter`,
:class:`~tmdht.migration_stream.ReceiverRebuilder`), so callers and tests use either. Both also
take work in batches for the proxies — :meth:`~NativeReceiver.wanted_batch` hands the digests to
resolve as one buffer of 32-byte digests and :meth:`~NativeReceiver.supply_batch` takes their
pages in one call — and :class:`ReferenceReceiver` gives the reference the same two methods.

Importing this module is cheap (no numpy, no asyncio): the sender proxy builds its core with it
before it forwards its first byte.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from types import ModuleType
from typing import Final, Protocol

from blake3 import blake3

from tmdht.catalog_file import TemplateDigests
from tmdht.migration_stream import (
    FLAG_COMPRESS,
    Ack,
    Hello,
    MigrationCounts,
    Need,
    OfferPolicy,
    RebuildStats,
    ReceiverRebuilder,
    SenderRewriter,
    encode,
)
from tmdht.pages import DIGEST_SIZE, PAGE_SIZE, ByteView

__all__ = [
    "NATIVE_ENV",
    "MigrationReceiver",
    "MigrationSender",
    "NativeReceiver",
    "NativeSender",
    "ReferenceReceiver",
    "describe",
    "digest_pages",
    "implementation",
    "make_receiver",
    "make_sender",
    "native_module",
    "pages_match",
    "tune_allocator",
]

NATIVE_ENV: Final = "TMDHT_NATIVE"
"""Set to 0 (or false, no, off) to force the pure-Python reference."""


def _load() -> tuple[ModuleType | None, str]:
    if os.environ.get(NATIVE_ENV, "").strip().lower() in ("0", "false", "no", "off"):
        return None, f"{NATIVE_ENV}=0"
    try:
        from tmdht import _native  # noqa: PLC0415 - optional extension
    except ImportError as exc:
        return None, f"tmdht._native is not built ({exc})"
    return _native, ""


_NATIVE, _WHY_NOT = _load()


def native_module() -> ModuleType | None:
    """The extension module, or None where the reference is in use."""
    return _NATIVE


def implementation() -> str:
    """``"native"`` or ``"reference"``: which path the migration proxies use."""
    return "native" if _NATIVE is not None else "reference"


def describe() -> str:
    """One line for ``tmdht --version``: the active path and why."""
    if _NATIVE is not None:
        info = _NATIVE.build_info()
        return (f"migration pipeline: native (tmdht._native {info['crate']}, {info['profile']}, "
                f"zstd {info['zstd']}; {NATIVE_ENV}=0 forces the pure-Python reference)")
    return f"migration pipeline: pure-Python reference ({_WHY_NOT})"


def tune_allocator() -> bool:
    """Native path: keep freed heap memory for reuse (the proxies allocate and free buffers of
    a chunk's size all the time, and each would page-fault anew). Process-wide; a no-op on the
    reference path. Returns whether it applied."""
    return bool(_NATIVE.tune_allocator()) if _NATIVE is not None else False


# -- bulk hashing ------------------------------------------------------------------------------


def digest_pages(pages: Sequence[ByteView], *, threads: bool = True) -> list[bytes]:
    """BLAKE3 digests of ``pages`` in order. Native: one call, the GIL released, across cores
    (rayon) when ``threads`` and there are 64 pages or more; reference: one blake3 per page."""
    if _NATIVE is not None:
        out: list[bytes] = _NATIVE.digest_pages(pages, threads=threads)
        return out
    return [blake3(page).digest() for page in pages]


def pages_match(
    digests: Sequence[bytes], pages: Sequence[ByteView], *, threads: bool = True
) -> list[bool]:
    """For each pair, whether the page's BLAKE3 digest is the digest (as :func:`digest_pages`)."""
    if len(digests) != len(pages):
        raise ValueError("one page per digest")
    if _NATIVE is not None:
        out: list[bool] = _NATIVE.pages_match(digests, pages, threads=threads)
        return out
    return [blake3(page).digest() == digest for digest, page in zip(digests, pages, strict=True)]


# -- what the proxies use ----------------------------------------------------------------------


class MigrationSender(Protocol):
    """The sender core's interface (SenderRewriter and NativeSender)."""

    hello: Hello

    @property
    def counts(self) -> MigrationCounts: ...
    @property
    def unacknowledged(self) -> int: ...
    @property
    def window_open(self) -> bool: ...
    @property
    def retained(self) -> int: ...
    @property
    def ram_bytes(self) -> int: ...
    def start(self) -> bytes: ...
    def feed(self, data: ByteView) -> bytes: ...
    def finish(self) -> bytes: ...
    def acknowledge(self, ack: Ack) -> None: ...
    def fallback(self, need: Need) -> bytes: ...


class MigrationReceiver(Protocol):
    """The receiver core's interface as the proxy uses it (ReferenceReceiver, NativeReceiver)."""

    @property
    def verified(self) -> bool: ...
    @property
    def hello(self) -> Hello | None: ...
    @property
    def stats(self) -> RebuildStats: ...
    @property
    def end_seen(self) -> bool: ...
    @property
    def queued_bytes(self) -> int: ...
    @property
    def to_resolve(self) -> int: ...
    def feed(self, data: ByteView) -> None: ...
    def close(self) -> None: ...
    def wanted_batch(self, limit: int) -> tuple[list[int], bytes]: ...
    def supply_batch(self, indices: Sequence[int], pages: Sequence[ByteView]) -> None: ...
    def unavailable(self, indices: Sequence[int]) -> None: ...
    def requests(self) -> bytes: ...
    def ack(self, every: int = ...) -> bytes: ...
    def output(self) -> list[bytes]: ...


def make_sender(templates: TemplateDigests, *, compress: bool = False,
                backref_window: int = 32768, flow_window: int = 64 << 20,
                wave_tag: bytes | None = None, offer_window: int = 64 << 20,
                adaptive_offers: bool = True, offer_ahead: int = 4 << 20) -> MigrationSender:
    """The sender core of the active implementation, replacing pages in ``templates``.
    In a wave (``wave_tag``) always the reference: the native core has no OFFER yet."""
    if wave_tag is not None:
        members = templates.as_set()
        return SenderRewriter(templates.catalog_id, lambda ds: [d in members for d in ds],
                              compress=compress, backref_window=backref_window,
                              flow_window=flow_window, wave_tag=wave_tag,
                              offer_window=offer_window,
                              offer_policy=OfferPolicy() if adaptive_offers else None,
                              offer_ahead=offer_ahead)
    if _NATIVE is not None:
        return NativeSender(templates, compress=compress, backref_window=backref_window,
                            flow_window=flow_window)
    members = templates.as_set()
    return SenderRewriter(templates.catalog_id, lambda ds: [d in members for d in ds],
                          compress=compress, backref_window=backref_window,
                          flow_window=flow_window)


def make_receiver(expected_catalog_id: bytes | None = None, *,
                  wave_tag: bytes | None = None) -> MigrationReceiver:
    """The receiver core of the active implementation (in a wave always the reference)."""
    if wave_tag is not None:
        return ReferenceReceiver(expected_catalog_id, wave_tag=wave_tag)
    if _NATIVE is not None:
        return NativeReceiver(expected_catalog_id)
    return ReferenceReceiver(expected_catalog_id)


# -- the native cores in the reference's interface ---------------------------------------------


class NativeSender:
    """:class:`~tmdht.migration_stream.SenderRewriter` in Rust; catalog membership is a native
    hash set built once from the catalog's digests."""

    def __init__(self, templates: TemplateDigests, *, compress: bool = False,
                 backref_window: int = 32768, flow_window: int = 64 << 20,
                 native: ModuleType | None = None) -> None:
        module = native or _NATIVE
        if module is None:
            raise ImportError(f"tmdht._native is not available ({_WHY_NOT})")
        self.hello = Hello(templates.catalog_id, backref_window, flow_window,
                           FLAG_COMPRESS if compress else 0)
        self._hello = encode(self.hello)  # validates, as the reference does
        self._core = module.Sender(templates.catalog_id, templates.digests, compress=compress,
                                   backref_window=backref_window, flow_window=flow_window,
                                   flags=self.hello.flags)

    @property
    def counts(self) -> MigrationCounts:
        """Totals so far."""
        return MigrationCounts(*self._core.counts)

    @property
    def unacknowledged(self) -> int:
        """QEMU bytes sent but not yet acknowledged."""
        return int(self._core.unacknowledged)

    @property
    def window_open(self) -> bool:
        """True while the sender may read more of QEMU's stream."""
        return bool(self._core.window_open)

    @property
    def retained(self) -> int:
        """TEMPLATE pages kept for possible fallback."""
        return int(self._core.retained)

    @property
    def ram_bytes(self) -> int:
        """Total RAM announced by QEMU (0 until its MEM_SIZE record)."""
        return int(self._core.ram_bytes)

    def start(self) -> bytes:
        """The hello."""
        return self._hello

    def feed(self, data: ByteView) -> bytes:
        """Wire bytes for the next piece of QEMU's stream (DecodeError if it is malformed)."""
        out: bytes = self._core.feed(data)
        return out

    def finish(self) -> bytes:
        """QEMU's stream ended: the END record (DecodeError if it ended too early)."""
        out: bytes = self._core.finish()
        return out

    def acknowledge(self, ack: Ack) -> None:
        """Drop kept pages the receiver rebuilt; open the flow window."""
        self._core.acknowledge(ack.index, ack.qemu_bytes)

    def fallback(self, need: Need) -> bytes:
        """FALLBACK records for the pages of TEMPLATE records the receiver could not resolve."""
        out: bytes = self._core.fallback(need.indices)
        return out


class ReferenceReceiver(ReceiverRebuilder):
    """The reference receiver with the proxy's batch calls."""

    @property
    def to_resolve(self) -> int:
        """Template slots not yet handed out by :meth:`wanted` (some may be filled already)."""
        return len(self._to_resolve)

    def wanted_batch(self, limit: int) -> tuple[list[int], bytes]:
        """Like :meth:`wanted`: (body indices, their digests as one buffer of 32 bytes each)."""
        batch = self.wanted(limit)
        return [i for i, _ in batch], b"".join(d for _, d in batch)

    def supply_batch(self, indices: Sequence[int], pages: Sequence[ByteView]) -> None:
        """:meth:`supply` for many slots: ``pages[i]`` is the page of ``indices[i]``."""
        for index, page in zip(indices, pages, strict=True):
            self.supply(index, bytes(page))


class NativeReceiver:
    """:class:`~tmdht.migration_stream.ReceiverRebuilder` in Rust."""

    def __init__(self, expected_catalog_id: bytes | None = None, *,
                 native: ModuleType | None = None) -> None:
        module = native or _NATIVE
        if module is None:
            raise ImportError(f"tmdht._native is not available ({_WHY_NOT})")
        self._core = module.Receiver(expected_catalog_id)
        self._hello: Hello | None = None

    @property
    def hello(self) -> Hello | None:
        """The sender's hello, once it arrived."""
        if self._hello is None:
            raw = self._core.hello
            if raw is not None:
                catalog_id, backref, flow, flags = raw
                self._hello = Hello(catalog_id, backref, flow, flags)
        return self._hello

    @property
    def verified(self) -> bool:
        """END arrived and everything before it matched."""
        return bool(self._core.verified)

    @property
    def stats(self) -> RebuildStats:
        """What the receiver did so far."""
        pages, template, backref, full, compressed, cluster, fallback, qemu_bytes, end = (
            self._core.stats)
        return RebuildStats(pages, template, backref, full, compressed, cluster, fallback,
                            qemu_bytes, MigrationCounts(*end))

    @property
    def queued_bytes(self) -> int:
        """QEMU bytes decoded but not yet written (bounded by the sender's flow window)."""
        return int(self._core.queued_bytes)

    @property
    def end_seen(self) -> bool:
        """END arrived."""
        return bool(self._core.end_seen)

    @property
    def waiting(self) -> int:
        """Template pages decoded but not yet filled."""
        return int(self._core.waiting)

    @property
    def to_resolve(self) -> int:
        """Template slots not yet handed out by :meth:`wanted` (some may be filled already)."""
        return int(self._core.to_resolve)

    def feed(self, data: ByteView) -> None:
        """Decode wire bytes (DecodeError if they break the format or the flow window)."""
        self._core.feed(data)

    def close(self) -> None:
        """The connection ended (DecodeError if inside a record)."""
        self._core.close()

    def wanted(self, limit: int) -> list[tuple[int, bytes]]:
        """Up to ``limit`` (body index, digest) of template pages not yet asked for, in order."""
        indices, digests = self._core.wanted(limit)
        return [(index, digests[DIGEST_SIZE * i : DIGEST_SIZE * (i + 1)])
                for i, index in enumerate(indices)]

    def wanted_batch(self, limit: int) -> tuple[list[int], bytes]:
        """(body indices, their digests as one buffer of 32 bytes each)."""
        indices, digests = self._core.wanted(limit)
        return indices, digests

    def supply(self, index: int, page: bytes) -> None:
        """The page of a template slot, already checked against its digest (by the client)."""
        self.supply_batch([index], [page])

    def supply_batch(self, indices: Sequence[int], pages: Sequence[ByteView] | ByteView) -> None:
        """Pages of template slots, checked by the caller: one per index, as a sequence of page
        buffers or one buffer of ``4096 * len(indices)`` bytes."""
        if isinstance(pages, bytes | bytearray | memoryview) \
                and memoryview(pages).nbytes != PAGE_SIZE * len(indices):
            raise ValueError("one page per index")
        self._core.supply(indices, pages)

    def unavailable(self, indices: Sequence[int]) -> None:
        """The cluster could not serve these slots: ask the sender (see :meth:`requests`)."""
        self._core.unavailable(indices)

    def requests(self) -> bytes:
        """NEED records for the pages to take from the sender (empty if none)."""
        out: bytes = self._core.requests()
        return out

    def ack(self, every: int = 1 << 20) -> bytes:
        """An ACK record if at least ``every`` QEMU bytes were written since the last one, or
        everything decoded is written; else empty."""
        out: bytes = self._core.ack(every)
        return out

    def output(self) -> list[bytes]:
        """QEMU bytes ready to write, in order (DigestMismatchError at a bad END)."""
        out: list[bytes] = self._core.output()
        return out
