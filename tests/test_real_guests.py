"""The core formats on real guest memory: QEMU/TCG busybox guests captured by the lab."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest

from tmdht.catalog import TemplateCatalog
from tmdht.client.rebuild import ImagePages, encode_image, rebuild_stream
from tmdht.images import ImageFormat, open_image
from tmdht.lab import GuestCapture
from tmdht.mining import MiningConfig, TemplateMiner
from tmdht.pages import PAGE_SIZE, ZERO_PAGE

pytestmark = pytest.mark.qemu

LOW_RAM_END = 0xA0000  # below: RAM; 0xa0000-0x100000: VGA window and ROM shadows; above 1 MiB: RAM


def test_stream_reader_agrees_with_the_memory_dump(guest_captures: list[GuestCapture]) -> None:
    capture = guest_captures[0]
    with open_image(capture.stream_path) as stream, open_image(capture.dump_path) as dump:
        assert stream.format is ImageFormat.QEMU_STREAM and dump.format is ImageFormat.RAW
        names = [b.name for b in stream.blocks]
        assert names[0] == "pc.ram" and "pc.bios" in names
        assert stream.blocks[0].length == capture.ram_bytes == dump.size
        ram = stream.page_count and [
            p
            for _, p in zip(
                range(capture.ram_bytes // PAGE_SIZE), stream.iter_pages(), strict=False
            )
        ]
        differing = [
            i
            for i, page in enumerate(ram)
            if not (LOW_RAM_END <= i * PAGE_SIZE < 0x100000) and bytes(page) != bytes(dump.page(i))
        ]
        del ram
        assert differing == [], f"{len(differing)} RAM pages differ, first at {differing[:5]}"


def test_mining_three_guests_finds_shared_pages(
    guest_captures: list[GuestCapture], tmp_path: Path
) -> None:
    corpus = guest_captures[:3]
    with TemplateMiner(MiningConfig()) as miner:
        for capture in corpus:
            with open_image(capture.stream_path) as img:
                miner.add_image(capture.name, img.iter_pages())
        result = miner.finish()
    catalog = TemplateCatalog.from_mining(result)
    catalog.save(tmp_path / "c.tmc")
    assert TemplateCatalog.load(tmp_path / "c.tmc").catalog_id == catalog.catalog_id
    for image in result.images:  # same kernel and busybox: a good share of pages recur
        assert 0.3 < image.coverage < 1.0, image
        assert image.zero_pages > 0
    assert 1000 < result.template_count < result.distinct_contents


def test_fourth_guest_encodes_smaller_and_rebuilds_exactly(
    guest_captures: list[GuestCapture], tmp_path: Path
) -> None:
    corpus = [c.stream_path for c in guest_captures[:3]]
    with TemplateMiner(MiningConfig()) as miner:
        for path in corpus:
            with open_image(path) as img:
                miner.add_image(path.name, img.iter_pages())
        catalog = TemplateCatalog.from_mining(miner.finish())
    target = guest_captures[3].dump_path
    doc = encode_image(target, catalog, tmp_path / "g4.tmds")
    assert doc.template_pages > 0.3 * (doc.pages - doc.zero_pages)
    # Smaller by about the template share: each template page costs 33 bytes instead of 4097.
    expected = doc.image_bytes - doc.template_pages * (PAGE_SIZE - 33) - doc.zero_pages * PAGE_SIZE
    assert doc.stream_bytes <= expected + 64 * 1024
    with contextlib.ExitStack() as stack:
        images = [stack.enter_context(open_image(p)) for p in corpus]
        rebuild = rebuild_stream(
            tmp_path / "g4.tmds", tmp_path / "g4.raw", ImagePages(images), catalog.catalog_id
        )
        asyncio.run(rebuild)
    assert _same(tmp_path / "g4.raw", target)


def _same(a: Path, b: Path) -> bool:
    with a.open("rb") as fa, b.open("rb") as fb:
        while True:
            x, y = fa.read(1 << 20), fb.read(1 << 20)
            if x != y:
                return False
            if not x:
                return True


def test_zero_pages_of_the_stream_are_zero_records(guest_captures: list[GuestCapture]) -> None:
    with open_image(guest_captures[1].stream_path) as img:
        zeros = sum(1 for p in img.iter_pages() if p == ZERO_PAGE)
    assert zeros > 1000


def test_elf_core_agrees_with_the_raw_dump(build_dir: Path, lab_tools: object) -> None:
    from tmdht.lab import capture_guests, default_specs

    spec = default_specs()[0]
    (capture,) = capture_guests(build_dir, [spec], with_elf=True, tools=lab_tools)  # type: ignore[arg-type]
    assert capture.elf_path is not None
    with open_image(capture.elf_path) as elf, open_image(capture.dump_path) as raw:
        assert elf.format is ImageFormat.ELF
        compared = 0
        index = 0
        for block in elf.blocks:
            base = int(block.name.removeprefix("phys@"), 16)
            for i in range(block.page_count):
                address = base + i * PAGE_SIZE
                if address + PAGE_SIZE <= raw.size and not (LOW_RAM_END <= address < 0x100000):
                    assert bytes(elf.page(index + i)) == bytes(raw.page(address // PAGE_SIZE)), hex(
                        address
                    )
                    compared += 1
            index += block.page_count
        assert compared > 30000  # all of RAM but the VGA/ROM window
