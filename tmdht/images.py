"""Memory images: the guest memory that mining, encoding and rebuilding work on.

A memory image is an ordered list of RAM blocks; its pages are the pages of each block in turn
(a block whose length is not a multiple of 4096 ends in a zero-padded page). Three formats are
read, detected by content, never by file name:

- a QEMU migration stream (``migrate "exec:cat > FILE"``): the final content of every page of
  every RAM block (later copies win, never-sent pages are zero);
- an ELF core (``dump-guest-memory`` without paging): one block per PT_LOAD segment;
- a raw dump (``pmemsave``): one block, the whole file.

Files are mapped, not read: pages are zero-copy ``memoryview`` slices of the mapping. Reading
files is the one kind of IO this core does; it opens no sockets and runs no event loop.
"""

from __future__ import annotations

import bisect
import contextlib
import mmap
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from types import TracebackType
from typing import Final

import numpy as np
import numpy.typing as npt

from tmdht.errors import DecodeError, LimitExceededError, UnknownFormatError, UsageError
from tmdht.pages import PAGE_SIZE, ZERO_PAGE, is_zero_page
from tmdht.qemu_stream import (
    QEMU_MAGIC,
    QemuStreamParser,
    RamMemSize,
    RamPage,
    RamZero,
)

__all__ = [
    "ImageFormat",
    "ImageWriter",
    "MemoryImage",
    "RamBlock",
    "detect_format",
    "dump_raw",
    "open_image",
]

_ELF_MAGIC: Final = b"\x7fELF"
_PT_LOAD: Final = 1
_MAX_ELF_SEGMENTS: Final = 4096
# Files of our own formats, recognised so that a mix-up gets a clear message.
_OWN_FORMATS: Final = {
    b"TMDHTCAT": "a tmdht template catalog",
    b"TMDHTDS\x00": "a tmdht dedup stream",
}


class ImageFormat(Enum):
    """How a memory image is stored."""

    RAW = "raw"
    ELF = "elf"
    QEMU_STREAM = "qemu-stream"


@dataclass(frozen=True, slots=True)
class RamBlock:
    """One contiguous range of guest memory."""

    name: str
    """Block name (QEMU idstr, ``phys@0x...`` for ELF segments, ``ram`` for raw dumps)."""
    length: int
    """Length in bytes."""

    @property
    def page_count(self) -> int:
        """Pages in the block, counting a partial last page."""
        return -(-self.length // PAGE_SIZE)


class _Block:
    """A block and where its pages live in the mapping."""

    __slots__ = ("data_end", "info", "offsets", "start")

    def __init__(
        self,
        info: RamBlock,
        *,
        start: int = 0,
        data_end: int = 0,
        offsets: npt.NDArray[np.int64] | None = None,
    ) -> None:
        self.info = info
        self.start = start  # contiguous blocks: file offset of the block's first byte
        self.data_end = data_end  # contiguous blocks: bytes present in the file (rest is zero)
        self.offsets = offsets  # stream blocks: file offset of each page, -1 = zero page


class MemoryImage:
    """A memory image opened read-only. Use :func:`open_image`."""

    def __init__(self, path: Path, fmt: ImageFormat, mapping: mmap.mmap, blocks: list[_Block]):
        self.path = path
        self.format = fmt
        self._mmap = mapping
        self._view = memoryview(mapping)
        self._blocks = blocks
        self.blocks: tuple[RamBlock, ...] = tuple(b.info for b in blocks)
        self.page_count = sum(b.page_count for b in self.blocks)
        self.size = sum(b.length for b in self.blocks)

    @property
    def name(self) -> str:
        """File name, for reports."""
        return self.path.name

    def __enter__(self) -> MemoryImage:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Release the mapping.

        Page views handed out earlier keep the mapping alive: if any are still referenced, the
        mapping is unmapped when the last of them is dropped instead of now.
        """
        self._view.release()
        # If page views remain exported, the mmap closes itself when they are collected.
        with contextlib.suppress(BufferError):
            self._mmap.close()

    def iter_pages(self) -> Iterator[memoryview]:
        """Every page in order: zero-copy views of the file, or of a shared zero page."""
        zero = memoryview(ZERO_PAGE)
        for block in self._blocks:
            if block.offsets is None:
                yield from self._contiguous_pages(block)
                continue
            view = self._view
            for off in block.offsets.tolist():
                yield zero if off < 0 else view[off : off + PAGE_SIZE]

    def _contiguous_pages(self, block: _Block) -> Iterator[memoryview]:
        view = self._view
        zero = memoryview(ZERO_PAGE)
        full_end = block.start + (block.data_end // PAGE_SIZE) * PAGE_SIZE
        for off in range(block.start, full_end, PAGE_SIZE):
            yield view[off : off + PAGE_SIZE]
        if block.data_end % PAGE_SIZE:  # a partial page at the end of the file data
            tail = bytes(view[full_end : block.start + block.data_end])
            yield memoryview(tail + bytes(PAGE_SIZE - len(tail)))
        for _ in range(block.info.page_count - -(-block.data_end // PAGE_SIZE)):
            yield zero

    def page(self, index: int) -> memoryview:
        """The page at a global page index (random access, for rebuilding from images)."""
        if index < 0:
            raise IndexError(index)
        for block in self._blocks:
            count = block.info.page_count
            if index >= count:
                index -= count
                continue
            if block.offsets is not None:
                off = int(block.offsets[index])
                return memoryview(ZERO_PAGE) if off < 0 else self._view[off : off + PAGE_SIZE]
            rel = index * PAGE_SIZE
            if rel + PAGE_SIZE <= block.data_end:
                return self._view[block.start + rel : block.start + rel + PAGE_SIZE]
            if rel >= block.data_end:
                return memoryview(ZERO_PAGE)
            tail = bytes(self._view[block.start + rel : block.start + block.data_end])
            return memoryview(tail + bytes(PAGE_SIZE - len(tail)))
        raise IndexError(index)


def detect_format(prefix: bytes) -> ImageFormat:
    """Tell the format of an image from its first bytes."""
    if prefix[:4] == QEMU_MAGIC:
        return ImageFormat.QEMU_STREAM
    if prefix[:4] == _ELF_MAGIC:
        return ImageFormat.ELF
    for magic, what in _OWN_FORMATS.items():
        if prefix.startswith(magic):
            raise UnknownFormatError(f"this is {what}, not a memory image")
    return ImageFormat.RAW


def open_image(path: Path | str) -> MemoryImage:
    """Open a memory image, detecting its format by content.

    Raises UsageError for a missing or empty file and DecodeError for a damaged one.
    """
    path = Path(path)
    try:
        with path.open("rb") as f:
            size = f.seek(0, 2)
            if size == 0:
                raise UsageError(f"{path}: empty file, not a memory image")
            mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise UsageError(f"{path}: is a directory, not a memory image") from None
    except PermissionError:
        raise UsageError(f"{path}: permission denied") from None
    failure: DecodeError | None = None
    try:
        fmt = detect_format(mapping[:16])
        if fmt is ImageFormat.QEMU_STREAM:
            blocks = _stream_blocks(mapping)
        elif fmt is ImageFormat.ELF:
            blocks = _elf_blocks(mapping)
        else:
            blocks = [_Block(RamBlock("ram", size), start=0, data_end=size)]
    except DecodeError as exc:
        # A fresh error: the original's traceback would pin views of the mapping.
        failure = type(exc)(f"{path}: {exc}")
    if failure is not None:
        mapping.close()
        raise failure
    return MemoryImage(path, fmt, mapping, blocks)


def _stream_blocks(mapping: mmap.mmap) -> list[_Block]:
    """Replay the RAM records of a saved stream; remember where each page's last copy is."""
    view = memoryview(mapping)
    failure: DecodeError | None = None
    try:
        order, tables = _replay_ram(view)
    except DecodeError as exc:
        failure = type(exc)(str(exc))  # a fresh error: the traceback would pin views of the file
    view.release()
    if failure is not None:
        raise failure
    return [_Block(info, offsets=tables[info.name]) for info in order]


def _replay_ram(view: memoryview) -> tuple[list[RamBlock], dict[str, npt.NDArray[np.int64]]]:
    parser = QemuStreamParser()
    tables: dict[str, npt.NDArray[np.int64]] = {}
    order: list[RamBlock] = []
    parser.feed(view)
    for event in parser.events():
        if isinstance(event, RamPage):
            tables[event.block][event.offset // PAGE_SIZE] = event.stream_offset
        elif isinstance(event, RamZero):
            if event.fill:
                raise DecodeError(  # QEMU only sends fill 0; anything else is not QEMU's
                    f"ZERO record with fill byte {event.fill:#x} in block {event.block!r}"
                )
            tables[event.block][event.offset // PAGE_SIZE] = -1
        elif isinstance(event, RamMemSize):
            for b in event.blocks:
                info = RamBlock(b.name, b.length)
                order.append(info)
                tables[b.name] = np.full(info.page_count, -1, dtype=np.int64)
        if parser.in_passthrough:
            break  # device state follows; it holds no guest RAM pages
    parser.close()
    return order, tables


_ELF_IDENT = struct.Struct("<4sBBB9x")
_ELF64_HEADER = struct.Struct("<HHIQQQIHHHHHH")
_ELF64_PHDR = struct.Struct("<IIQQQQQQ")


def _elf_blocks(mapping: mmap.mmap) -> list[_Block]:
    """PT_LOAD segments of an ELF64 little-endian core file."""
    size = len(mapping)
    if size < _ELF_IDENT.size + _ELF64_HEADER.size:
        raise DecodeError("ELF file too short")
    _, klass, data, _ = _ELF_IDENT.unpack_from(mapping, 0)
    if klass != 2 or data != 1:
        raise UnknownFormatError("only little-endian ELF64 cores are read")
    fields = _ELF64_HEADER.unpack_from(mapping, _ELF_IDENT.size)
    phoff, phentsize, phnum = fields[4], fields[8], fields[9]
    if phnum > _MAX_ELF_SEGMENTS:
        raise LimitExceededError(f"{phnum} ELF program headers")
    if phentsize != _ELF64_PHDR.size or phoff + phnum * phentsize > size:
        raise DecodeError("ELF program header table out of bounds")
    blocks: list[_Block] = []
    for i in range(phnum):
        p_type, _, p_offset, _, p_paddr, p_filesz, p_memsz, _ = _ELF64_PHDR.unpack_from(
            mapping, phoff + i * phentsize
        )
        if p_type != _PT_LOAD or p_memsz == 0:
            continue
        if p_offset + p_filesz > size or p_filesz > p_memsz:
            raise DecodeError(f"ELF segment {i} out of bounds (file is truncated?)")
        info = RamBlock(f"phys@{p_paddr:#x}", p_memsz)
        blocks.append(_Block(info, start=p_offset, data_end=p_filesz))
    if not blocks:
        raise DecodeError("ELF file has no PT_LOAD segment (not a memory dump)")
    return blocks


class ImageWriter:
    """Writes a memory image as raw bytes (the blocks one after another), page by page.

    The file is created under a temporary name, pre-sized (sparse, so zero pages cost nothing)
    and renamed into place only by :meth:`commit`: an interrupted or failed rebuild never leaves a
    file that looks complete.
    """

    def __init__(self, path: Path | str, blocks: tuple[RamBlock, ...] | list[RamBlock]) -> None:
        self.path = Path(path)
        self.blocks = tuple(blocks)
        self.size = sum(b.length for b in self.blocks)
        self._page_starts: list[int] = []  # global index of each block's first page
        self._byte_starts: list[int] = []
        pages = offset = 0
        for block in self.blocks:
            self._page_starts.append(pages)
            self._byte_starts.append(offset)
            pages += block.page_count
            offset += block.length
        self.page_count = pages
        self._tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        try:
            self._fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        except FileNotFoundError:
            raise UsageError(f"{self.path.parent}: no such directory") from None
        try:
            os.ftruncate(self._fd, self.size)
        except OSError:
            self.abort()
            raise
        self._done = False

    def __enter__(self) -> ImageWriter:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        if not self._done:
            self.abort()

    def write_page(self, index: int, page: bytes | memoryview) -> None:
        """Write the page with this global index (a partial last page is cut to its block)."""
        b = bisect.bisect_right(self._page_starts, index) - 1
        if b < 0 or index >= self.page_count:
            raise IndexError(index)
        rel = (index - self._page_starts[b]) * PAGE_SIZE
        length = min(PAGE_SIZE, self.blocks[b].length - rel)
        view = memoryview(page)
        os.pwrite(
            self._fd, view if length == PAGE_SIZE else view[:length], self._byte_starts[b] + rel
        )

    def commit(self) -> None:
        """Flush to disk and move the file into place."""
        os.fsync(self._fd)
        os.close(self._fd)
        self._done = True
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        """Drop the partial file."""
        if not self._done:
            self._done = True
            os.close(self._fd)
            self._tmp.unlink(missing_ok=True)


def dump_raw(image: MemoryImage, path: Path | str) -> int:
    """Write an image's memory as raw bytes (blocks in order, sparse); returns the size."""
    with ImageWriter(path, image.blocks) as writer:
        for index, page in enumerate(image.iter_pages()):
            if not is_zero_page(page):  # the file is sparse: zero pages need no write
                writer.write_page(index, page)
        writer.commit()
    return writer.size
