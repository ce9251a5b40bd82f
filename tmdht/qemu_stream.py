"""QEMU 7.2 precopy migration stream: a sans-IO incremental parser.

The layout (see shared/QEMU-STREAM.md, and QEMU's migration/savevm.c and migration/ram.c):

==========================  =============================================================
``QEVM`` be32 version 3      stream header
0x07 be32 len, name          CONFIGURATION (machine type), no footer
0x01 be32 id, u8 len, idstr  START section (+ be32 instance id, be32 version id)
0x02 / 0x03 be32 id          PART / END section
0x04 ...                     FULL section (device state; not length-prefixed)
0x7e be32 id                 footer after every section
0x00                         EOF, then VMDESCRIPTION (0x06 be32 len + JSON)
==========================  =============================================================

Inside START/PART/END of the ``ram`` section the payload is a run of RAM records, each starting
with be64 ``offset | flags`` and ended by an EOS record. Everything after END(ram)'s footer is
device state that cannot be parsed without each device's layout; it is handed out verbatim as
:class:`Passthrough` events.

The parser is fed bytes and hands out events, in the manner of h11 and aioquic; it never reads a
file or a socket. Events that carry page data hold zero-copy ``memoryview`` slices of the fed
buffers together with their absolute stream offset, so a reader that feeds one mmap of a whole
file gets the position of every page for free.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from enum import IntEnum, IntFlag
from typing import Final

from tmdht._feed import FeedBuffer, NeedMore
from tmdht.errors import DecodeError, LimitExceededError, UnsupportedStreamError
from tmdht.pages import PAGE_SIZE, ByteView

__all__ = [
    "QEMU_MAGIC",
    "QEMU_VERSION",
    "Configuration",
    "DeviceStateStart",
    "Event",
    "Passthrough",
    "QemuStreamParser",
    "QemuStreamWriter",
    "RamBlockInfo",
    "RamEos",
    "RamFlag",
    "RamMemSize",
    "RamPage",
    "RamZero",
    "SectionFooter",
    "SectionHeader",
    "SectionType",
    "StreamHeader",
    "looks_like_qemu_stream",
]

QEMU_MAGIC: Final = b"QEVM"
QEMU_VERSION: Final = 3
RAM_SECTION: Final = "ram"
MAX_IDSTR: Final = 255
MAX_CONFIG_NAME: Final = 256
MAX_RAM_BLOCKS: Final = 1024
MAX_RAM_BYTES: Final = 1 << 44  # 16 TiB: far above any guest this targets, below be64 garbage
_FLAGS_MASK: Final = PAGE_SIZE - 1


class SectionType(IntEnum):
    """Top-level section type bytes (QEMU_VM_*)."""

    EOF = 0x00
    START = 0x01
    PART = 0x02
    END = 0x03
    FULL = 0x04
    SUBSECTION = 0x05
    VMDESCRIPTION = 0x06
    CONFIGURATION = 0x07
    COMMAND = 0x08
    FOOTER = 0x7E


class RamFlag(IntFlag):
    """RAM_SAVE_FLAG_* bits in the low bits of a RAM record header."""

    ZERO = 0x02
    MEM_SIZE = 0x04
    PAGE = 0x08
    EOS = 0x10
    CONTINUE = 0x20
    XBZRLE = 0x40
    HOOK = 0x80
    COMPRESS_PAGE = 0x100
    MULTIFD_FLUSH = 0x200


# Plain ints for the per-record hot path: IntFlag arithmetic costs tens of microseconds a record.
_ZERO: Final = int(RamFlag.ZERO)
_MEM_SIZE: Final = int(RamFlag.MEM_SIZE)
_PAGE: Final = int(RamFlag.PAGE)
_EOS: Final = int(RamFlag.EOS)
_CONTINUE: Final = int(RamFlag.CONTINUE)
_UNSUPPORTED_FLAGS: Final = int(
    RamFlag.XBZRLE | RamFlag.HOOK | RamFlag.COMPRESS_PAGE | RamFlag.MULTIFD_FLUSH
)
_KIND_FLAGS: Final = _ZERO | _MEM_SIZE | _PAGE | _EOS


@dataclass(frozen=True, slots=True)
class StreamHeader:
    """The stream starts: magic and version were checked."""

    version: int
    """Stream format version (always 3 for QEMU 7.2)."""


@dataclass(frozen=True, slots=True)
class Configuration:
    """CONFIGURATION section."""

    machine: str
    """Machine type name, e.g. ``pc-q35-7.2``."""


@dataclass(frozen=True, slots=True)
class SectionHeader:
    """Header of a ``ram`` section (START, PART or END)."""

    kind: SectionType
    """START, PART or END."""
    section_id: int
    """QEMU's section id (not in stream order)."""
    idstr: str | None
    """Section name (START only)."""
    instance_id: int | None
    """Instance id (START only)."""
    version_id: int | None
    """Version id (START only)."""


@dataclass(frozen=True, slots=True)
class RamBlockInfo:
    """One RAM block announced by the MEM_SIZE record."""

    name: str
    """Block idstr, e.g. ``pc.ram``."""
    length: int
    """Used length in bytes."""


@dataclass(frozen=True, slots=True)
class RamMemSize:
    """MEM_SIZE record: total RAM and the list of blocks."""

    total: int
    """Sum of the block lengths."""
    blocks: tuple[RamBlockInfo, ...]
    """Blocks in stream order."""


@dataclass(frozen=True, slots=True)
class RamPage:
    """PAGE record: a full page of a RAM block."""

    block: str
    """Block idstr."""
    offset: int
    """Byte offset of the page in its block (page aligned)."""
    continued: bool
    """The record used CONTINUE (its block is the previous record's)."""
    data: memoryview
    """The 4096 bytes (a view into the fed buffer)."""
    stream_offset: int
    """Absolute position of ``data`` in the stream."""


@dataclass(frozen=True, slots=True)
class RamZero:
    """ZERO record: a page filled with one byte (QEMU sends 0)."""

    block: str
    """Block idstr."""
    offset: int
    """Byte offset of the page in its block."""
    continued: bool
    """The record used CONTINUE."""
    fill: int
    """The fill byte."""


@dataclass(frozen=True, slots=True)
class RamEos:
    """EOS record: the end of one RAM section payload."""


@dataclass(frozen=True, slots=True)
class SectionFooter:
    """Section footer (0x7e + section id)."""

    section_id: int
    """Id of the section it closes."""


@dataclass(frozen=True, slots=True)
class DeviceStateStart:
    """RAM is over: everything from here on is device state, handed out verbatim."""

    stream_offset: int
    """Absolute position where device state begins."""


@dataclass(frozen=True, slots=True)
class Passthrough:
    """Opaque bytes after the RAM part (device state, EOF, VM description)."""

    data: memoryview
    """The bytes, a view into the fed buffer."""


Event = (
    StreamHeader
    | Configuration
    | SectionHeader
    | RamMemSize
    | RamPage
    | RamZero
    | RamEos
    | SectionFooter
    | DeviceStateStart
    | Passthrough
)

_BE32 = struct.Struct(">I")
_BE64 = struct.Struct(">Q")
_HEADER = struct.Struct(">4sI")


class _State(IntEnum):
    HEADER = 0
    TOP = 1
    RAM = 2
    FOOTER = 3
    PASSTHROUGH = 4


def looks_like_qemu_stream(prefix: bytes) -> bool:
    """True if ``prefix`` starts like a QEMU migration stream."""
    return prefix[:4] == QEMU_MAGIC


class QemuStreamParser:
    """Incremental parser of a precopy migration stream.

    ``feed(data)`` adds bytes; iterating ``events()`` hands out what could be parsed; ``close()``
    says the input ended and raises :class:`DecodeError` if it ended inside the RAM part. Record
    order is kept: a page sent several times appears several times, and the last copy wins.
    """

    def __init__(self) -> None:
        self._in = FeedBuffer()
        self._state = _State.HEADER
        self._ram_section_id: int | None = None
        self._block: str | None = None  # CONTINUE carries across sections
        self._blocks: dict[str, int] = {}
        self._ram_done = False
        self._closed = False

    @property
    def blocks(self) -> dict[str, int]:
        """RAM blocks announced so far: name -> used length."""
        return dict(self._blocks)

    @property
    def in_passthrough(self) -> bool:
        """True once the RAM part is over and only device state follows."""
        return self._state is _State.PASSTHROUGH

    @property
    def position(self) -> int:
        """Absolute stream offset of the next unparsed byte."""
        return self._in.position

    def feed(self, data: ByteView) -> None:
        """Add bytes. A view of ``data`` may be kept (no copy) until its events are dropped."""
        if self._closed:
            raise DecodeError("data fed after the stream was closed")
        self._in.feed(data)

    def close(self) -> None:
        """Say the input ended. Raises DecodeError if it ended before the RAM part was over."""
        self._closed = True
        if self._state is not _State.PASSTHROUGH:
            raise DecodeError(
                f"migration stream truncated at byte {self.position}"
                + ("" if self._ram_done else " (inside the RAM part)")
            )

    def events(self) -> Iterator[Event]:
        """Parse as much of the fed data as possible."""
        while True:
            if self._state is _State.PASSTHROUGH:
                if self._in.remaining:
                    yield Passthrough(self._in.take(self._in.remaining))
                return
            start = self._in.pos
            try:
                event = self._next()
            except NeedMore:
                self._in.pos = start
                return
            except (struct.error, UnicodeDecodeError, ValueError) as exc:  # defensive: bad bytes
                raise DecodeError(
                    f"malformed migration stream at byte {self._in.base + start}"
                ) from exc
            yield event

    # -- reading primitives ------------------------------------------------------------------

    def _take(self, n: int) -> memoryview:
        return self._in.take(n)

    def _u8(self) -> int:
        return self._in.u8()

    def _be32(self) -> int:
        value: int = _BE32.unpack(self._take(4))[0]
        return value

    def _be64(self) -> int:
        value: int = _BE64.unpack(self._take(8))[0]
        return value

    def _idstr(self) -> str:
        length = self._u8()
        return bytes(self._take(length)).decode("ascii")

    # -- the grammar ---------------------------------------------------------------------------

    def _next(self) -> Event:
        if self._state is _State.HEADER:
            magic, version = _HEADER.unpack(self._take(_HEADER.size))
            if magic != QEMU_MAGIC:
                raise DecodeError("not a QEMU migration stream (no QEVM magic)")
            if version != QEMU_VERSION:
                raise UnsupportedStreamError(f"QEMU stream version {version} (only 3 is known)")
            self._state = _State.TOP
            return StreamHeader(version)
        if self._state is _State.RAM:
            return self._ram_record()
        if self._state is _State.FOOTER:
            return self._footer()
        return self._section()

    def _section(self) -> Event:
        at = self._in.position
        kind = self._u8()
        if kind == SectionType.CONFIGURATION:
            length = self._be32()
            if length > MAX_CONFIG_NAME:
                raise LimitExceededError(f"configuration name of {length} bytes")
            return Configuration(bytes(self._take(length)).decode("ascii"))
        if kind in (SectionType.START, SectionType.FULL):
            section_id = self._be32()
            idstr = self._idstr()
            instance_id = self._be32()
            version_id = self._be32()
            if idstr == RAM_SECTION and kind == SectionType.START:
                if self._ram_section_id is not None:
                    raise DecodeError("a second START(ram) section")
                self._ram_section_id = section_id
                self._state = _State.RAM
                return SectionHeader(SectionType.START, section_id, idstr, instance_id, version_id)
            if kind == SectionType.START:
                raise UnsupportedStreamError(f"iterative section {idstr!r} besides ram")
            return self._device_state(at)
        if kind in (SectionType.PART, SectionType.END):
            section_id = self._be32()
            if section_id != self._ram_section_id:
                raise UnsupportedStreamError(f"PART/END of section {section_id}, not of ram")
            self._state = _State.RAM
            if kind == SectionType.END:
                self._ram_done = True
            return SectionHeader(SectionType(kind), section_id, None, None, None)
        if kind == SectionType.EOF:
            return self._device_state(at)
        if kind == SectionType.COMMAND:
            raise UnsupportedStreamError("QEMU_VM_COMMAND in the stream (postcopy or return path)")
        raise DecodeError(f"unknown section type {kind:#04x} at byte {at}")

    def _device_state(self, at: int) -> Event:
        if self._ram_section_id is None:
            raise UnsupportedStreamError("device state before any RAM section")
        if not self._ram_done:
            raise UnsupportedStreamError("device state before END(ram)")
        self._in.pos = at - self._in.base  # hand the section byte itself out verbatim
        self._state = _State.PASSTHROUGH
        return DeviceStateStart(at)

    def _footer(self) -> Event:
        marker = self._u8()
        if marker != SectionType.FOOTER:
            raise DecodeError(f"expected a section footer, found {marker:#04x}")
        section_id = self._be32()
        if section_id != self._ram_section_id:
            raise DecodeError(f"footer names section {section_id}, expected {self._ram_section_id}")
        self._state = _State.TOP
        return SectionFooter(section_id)

    def _ram_record(self) -> Event:
        header = self._be64()
        flags = header & _FLAGS_MASK
        addr = header & ~_FLAGS_MASK
        if flags & _UNSUPPORTED_FLAGS:
            raise UnsupportedStreamError(f"RAM record flags {RamFlag(flags)!r} (disable them)")
        kind = flags & _KIND_FLAGS
        if flags & ~(_KIND_FLAGS | _CONTINUE) or kind.bit_count() != 1:
            raise DecodeError(f"RAM record with flags {flags:#x}")
        if kind == _EOS:
            self._state = _State.FOOTER
            return RamEos()
        if kind == _MEM_SIZE:
            return self._mem_size(addr)
        block = self._block_of(flags)
        if addr >= self._blocks[block]:
            raise DecodeError(f"page offset {addr:#x} beyond block {block!r}")
        continued = bool(flags & _CONTINUE)
        if kind == _PAGE:
            at = self._in.position
            return RamPage(block, addr, continued, self._take(PAGE_SIZE), at)
        return RamZero(block, addr, continued, self._u8())

    def _block_of(self, flags: int) -> str:
        if flags & _CONTINUE:
            if self._block is None:
                raise DecodeError("CONTINUE record with no previous block")
            return self._block
        name = self._idstr()
        if name not in self._blocks:
            raise DecodeError(f"page of unknown RAM block {name!r}")
        self._block = name
        return name

    def _mem_size(self, total: int) -> Event:
        if self._blocks:
            raise DecodeError("a second MEM_SIZE record")
        if total > MAX_RAM_BYTES:
            raise LimitExceededError(f"{total} bytes of RAM")
        if total == 0:
            raise DecodeError("MEM_SIZE of zero bytes")
        blocks: list[RamBlockInfo] = []
        remaining = total
        while remaining > 0:
            if len(blocks) >= MAX_RAM_BLOCKS:
                raise LimitExceededError(f"more than {MAX_RAM_BLOCKS} RAM blocks")
            name = self._idstr()
            length = self._be64()
            if length > remaining or length == 0:
                raise DecodeError(f"RAM block {name!r} of {length} bytes does not fit MEM_SIZE")
            if any(b.name == name for b in blocks):
                raise DecodeError(f"RAM block {name!r} announced twice")
            if not name:  # a page record could not name it (its idstr length byte would be 0)
                raise DecodeError("RAM block with an empty name")
            blocks.append(RamBlockInfo(name, length))
            remaining -= length
        self._blocks = {b.name: b.length for b in blocks}
        return RamMemSize(total, tuple(blocks))


class QemuStreamWriter:
    """Emits the byte form of stream items: the inverse of :class:`QemuStreamParser`.

    Stateless but for the CONTINUE rule, which it applies itself: a RAM record names its block
    only when the block differs from the previous record's.
    """

    def __init__(self) -> None:
        self._block: str | None = None

    @staticmethod
    def header() -> bytes:
        """QEVM magic and version."""
        return _HEADER.pack(QEMU_MAGIC, QEMU_VERSION)

    @staticmethod
    def configuration(machine: str) -> bytes:
        """A CONFIGURATION section."""
        name = machine.encode("ascii")
        return bytes((SectionType.CONFIGURATION,)) + _BE32.pack(len(name)) + name

    @staticmethod
    def section_start(section_id: int, idstr: str, instance_id: int, version_id: int) -> bytes:
        """A START section header."""
        name = idstr.encode("ascii")
        return (
            bytes((SectionType.START,))
            + _BE32.pack(section_id)
            + bytes((len(name),))
            + name
            + _BE32.pack(instance_id)
            + _BE32.pack(version_id)
        )

    @staticmethod
    def section_part(section_id: int, *, end: bool = False) -> bytes:
        """A PART (or END) section header."""
        kind = SectionType.END if end else SectionType.PART
        return bytes((kind,)) + _BE32.pack(section_id)

    @staticmethod
    def footer(section_id: int) -> bytes:
        """A section footer."""
        return bytes((SectionType.FOOTER,)) + _BE32.pack(section_id)

    @staticmethod
    def mem_size(blocks: tuple[RamBlockInfo, ...] | list[RamBlockInfo]) -> bytes:
        """The MEM_SIZE record announcing the RAM blocks."""
        total = sum(b.length for b in blocks)
        parts = [_BE64.pack(total | RamFlag.MEM_SIZE)]
        for b in blocks:
            name = b.name.encode("ascii")
            parts += [bytes((len(name),)), name, _BE64.pack(b.length)]
        return b"".join(parts)

    def _record(self, block: str, offset: int, flag: int) -> bytes:
        if block == self._block:
            return _BE64.pack(offset | flag | RamFlag.CONTINUE)
        self._block = block
        name = block.encode("ascii")
        return _BE64.pack(offset | flag) + bytes((len(name),)) + name

    def page(self, block: str, offset: int, data: ByteView) -> bytes:
        """A PAGE record."""
        return self._record(block, offset, RamFlag.PAGE) + bytes(data)

    def zero(self, block: str, offset: int, fill: int = 0) -> bytes:
        """A ZERO record."""
        return self._record(block, offset, RamFlag.ZERO) + bytes((fill,))

    @staticmethod
    def eos() -> bytes:
        """The EOS record ending a RAM section payload."""
        return _BE64.pack(RamFlag.EOS)
