"""Memory image readers and the raw image writer."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from support.synthetic import page_pool, qemu_stream, write_raw

from tmdht.errors import DecodeError, UnknownFormatError, UsageError
from tmdht.images import ImageFormat, ImageWriter, RamBlock, open_image
from tmdht.pages import PAGE_SIZE, ZERO_PAGE

POOL = page_pool(6, seed=2)


def test_raw_image_pages_are_the_file(tmp_path: Path) -> None:
    pages = [POOL[0], ZERO_PAGE, POOL[1], POOL[0]]
    path = write_raw(tmp_path / "mem.raw", pages)
    with open_image(path) as img:
        assert img.format is ImageFormat.RAW
        assert img.blocks == (RamBlock("ram", 4 * PAGE_SIZE),)
        assert [bytes(p) for p in img.iter_pages()] == pages
        assert [bytes(img.page(i)) for i in range(4)] == pages


def test_partial_last_page_is_zero_padded(tmp_path: Path) -> None:
    path = tmp_path / "odd.raw"
    path.write_bytes(POOL[0] + POOL[1][:100])
    with open_image(path) as img:
        assert img.page_count == 2
        last = bytes(list(img.iter_pages())[1])
        assert last == POOL[1][:100] + bytes(PAGE_SIZE - 100)
        assert bytes(img.page(1)) == last


def test_qemu_stream_image_keeps_the_last_copy(tmp_path: Path) -> None:
    blocks = [("pc.ram", 8 * PAGE_SIZE), ("pc.bios", 2 * PAGE_SIZE)]
    rounds = [
        [("pc.ram", i, POOL[i % 6]) for i in range(6)] + [("pc.bios", 0, POOL[5])],
        [("pc.ram", 2, POOL[3]), ("pc.ram", 3, None)],
    ]
    data, memory = qemu_stream(blocks, rounds)
    path = tmp_path / "guest.stream"
    path.write_bytes(data)
    with open_image(path) as img:
        assert img.format is ImageFormat.QEMU_STREAM
        assert [b.name for b in img.blocks] == ["pc.ram", "pc.bios"]
        got = b"".join(bytes(p) for p in img.iter_pages())
        assert got == memory["pc.ram"] + memory["pc.bios"]
        assert bytes(img.page(2)) == POOL[3] and bytes(img.page(3)) == ZERO_PAGE


def _elf_core(segments: list[tuple[int, bytes, int]]) -> bytes:
    """A minimal ELF64 core with PT_LOAD segments (paddr, file bytes, memsz)."""
    ehdr_size, phdr_size = 64, 56
    offset = ehdr_size + phdr_size * (len(segments) + 1)
    phdrs = [struct.pack("<IIQQQQQQ", 4, 0, offset, 0, 0, 0, 0, 1)]  # a PT_NOTE, ignored
    body = b""
    for paddr, data, memsz in segments:
        phdrs.append(
            struct.pack("<IIQQQQQQ", 1, 7, offset + len(body), paddr, paddr, len(data), memsz, 1)
        )
        body += data
    ident = b"\x7fELF" + bytes((2, 1, 1)) + bytes(9)
    ehdr = ident + struct.pack(
        "<HHIQQQIHHHHHH", 4, 62, 1, 0, ehdr_size, 0, 0, ehdr_size, phdr_size, len(phdrs), 0, 0, 0
    )
    return ehdr + b"".join(phdrs) + body


def test_elf_core_segments_become_blocks(tmp_path: Path) -> None:
    path = tmp_path / "core.elf"
    path.write_bytes(
        _elf_core([(0, POOL[0] + POOL[1], 2 * PAGE_SIZE), (0x100000, POOL[2], 3 * PAGE_SIZE)])
    )
    with open_image(path) as img:
        assert img.format is ImageFormat.ELF
        assert [b.name for b in img.blocks] == ["phys@0x0", "phys@0x100000"]
        assert [bytes(p) for p in img.iter_pages()] == [
            POOL[0],
            POOL[1],
            POOL[2],
            ZERO_PAGE,
            ZERO_PAGE,
        ]


def test_damaged_elf_is_a_decode_error(tmp_path: Path) -> None:
    path = tmp_path / "core.elf"
    path.write_bytes(_elf_core([(0, POOL[0] + POOL[1], 2 * PAGE_SIZE)])[:-5000])
    with pytest.raises(DecodeError, match="out of bounds"):
        open_image(path)


def test_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no such file"):
        open_image(tmp_path / "missing")
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(UsageError, match="empty"):
        open_image(tmp_path / "empty")
    (tmp_path / "cat").write_bytes(b"TMDHTCAT" + bytes(100))
    with pytest.raises(UnknownFormatError, match="catalog"):
        open_image(tmp_path / "cat")
    data, _ = qemu_stream([("pc.ram", 4 * PAGE_SIZE)], [[("pc.ram", 0, POOL[0])]])
    (tmp_path / "cut.stream").write_bytes(data[: len(data) // 2])
    with pytest.raises(DecodeError, match=r"cut\.stream: .*truncated"):
        open_image(tmp_path / "cut.stream")


def test_writer_rebuilds_exact_bytes_and_is_atomic(tmp_path: Path) -> None:
    blocks = (RamBlock("a", 2 * PAGE_SIZE + 10), RamBlock("b", PAGE_SIZE))
    out = tmp_path / "out.raw"
    with ImageWriter(out, blocks) as w:
        w.write_page(0, POOL[0])
        w.write_page(2, POOL[1])  # partial page: cut to 10 bytes
        w.write_page(3, POOL[2])
        assert not out.exists()  # nothing visible before commit
        w.commit()
    assert out.read_bytes() == POOL[0] + bytes(PAGE_SIZE) + POOL[1][:10] + POOL[2]
    with pytest.raises(RuntimeError), ImageWriter(tmp_path / "failed.raw", blocks) as w:
        w.write_page(0, POOL[0])
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == [out]  # no partial file left behind
