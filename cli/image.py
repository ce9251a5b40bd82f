"""``tmdht image``: inspect memory images and export them as raw memory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from rich.table import Table

from tmdht.cli.main import emit_json, human_bytes, stdout
from tmdht.images import MemoryImage, dump_raw, open_image
from tmdht.pages import PAGE_SIZE, is_zero_page


@click.group()
def image() -> None:
    """Memory images (raw dumps, ELF cores, QEMU migration streams): info, dump."""


@image.command("info")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def image_info(path: Path, as_json: bool) -> None:
    """Show the format, RAM blocks and page counts of an image."""
    with open_image(path) as img:
        zeros = sum(1 for page in img.iter_pages() if is_zero_page(page))
        doc: dict[str, Any] = {
            "image": str(path),
            "format": img.format.value,
            "bytes": img.size,
            "pages": img.page_count,
            "zero_pages": zeros,
            "blocks": [
                {
                    "name": b.name,
                    "bytes": b.length,
                    "pages": b.page_count,
                    "partial_page_bytes": b.length % PAGE_SIZE,
                }
                for b in img.blocks
            ],
        }
        notes = partial_page_notes(img)
    if as_json:
        emit_json(doc)
        return
    table = Table(title=f"{path.name}: {doc['format']}, {human_bytes(doc['bytes'])}")
    table.add_column("block")
    table.add_column("bytes", justify="right")
    table.add_column("pages", justify="right")
    for b in doc["blocks"]:
        table.add_row(b["name"], f"{b['bytes']:,}", f"{b['pages']:,}")
    stdout.print(table)
    stdout.print(f"{doc['pages']:,} pages, {zeros:,} of them zero")
    for note in notes:
        stdout.print(f"[yellow]note: {note}[/]")


def partial_page_notes(img: MemoryImage) -> list[str]:
    """What happens to blocks whose size is not a whole number of pages (a raw file of odd
    size, say): their last page is read padded with zeros; dump and rebuild keep the size."""
    notes = []
    for b in img.blocks:
        tail = b.length % PAGE_SIZE
        if tail:
            notes.append(
                f"{b.name} is {b.length:,} bytes, not a whole number of {PAGE_SIZE}-byte pages: "
                f"its last page holds {tail:,} bytes and is read padded with "
                f"{PAGE_SIZE - tail:,} zero bytes (image dump and rebuild write {b.length:,} "
                "bytes back)"
            )
    return notes


@image.command("dump")
@click.argument("path", type=click.Path(path_type=Path))
@click.option(
    "-o", "--output", required=True, type=click.Path(path_type=Path), help="Raw file to write."
)
def image_dump(path: Path, output: Path) -> None:
    """Write the memory of an image as raw bytes (its blocks one after another)."""
    with open_image(path) as img:
        size = dump_raw(img, output)
    stdout.print(f"wrote {output} ({human_bytes(size)})")
