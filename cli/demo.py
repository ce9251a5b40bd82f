"""``tmdht demo``: the main job end to end on real guests.

Boots small busybox guests under QEMU/TCG (cached under the build directory), mines a template
catalog from three of them, encodes a fourth guest's memory — its QEMU migration stream and its
raw dump — against it, rebuilds both from the corpus images, checks the rebuilt memory byte for
byte, and prints what the templates saved.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from tmdht.cli.codec import encode_file, rebuild_from_images
from tmdht.cli.main import human_bytes, stderr, stdout
from tmdht.cli.templates import mine_files
from tmdht.errors import IntegrityError
from tmdht.images import ImageWriter, open_image
from tmdht.mining import MiningConfig
from tmdht.pages import ZERO_PAGE

CORPUS = ("idle-1", "files-2", "compute-3")
TARGET = "mixed-4"


def _dump_raw(image: Path, output: Path) -> None:
    with open_image(image) as img, ImageWriter(output, img.blocks) as writer:
        for index, page in enumerate(img.iter_pages()):
            if page != ZERO_PAGE:
                writer.write_page(index, page)
        writer.commit()


def _same_file(a: Path, b: Path) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    with a.open("rb") as fa, b.open("rb") as fb:
        while chunk := fa.read(1 << 20):
            if chunk != fb.read(len(chunk)):
                return False
    return True


@click.command()
@click.option(
    "--build-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=Path("build"),
    show_default=True,
    help="Where guest captures are cached and results written.",
)
@click.option("--threshold", default=2, show_default=True, help="Template threshold.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def demo(build_dir: Path, threshold: int, as_json: bool) -> None:
    """Mine templates from real guests, encode another guest, rebuild it exactly."""
    from tmdht.lab import capture_guests, default_specs  # noqa: PLC0415 - QEMU tooling, on demand

    started = time.perf_counter()
    specs = [s for s in default_specs() if s.name in (*CORPUS, TARGET)]
    stderr.print(f"capturing {len(specs)} guests under QEMU/TCG (cached in {build_dir}/guests) ...")
    captures = {c.name: c for c in capture_guests(build_dir, specs)}
    out = build_dir / "demo"
    out.mkdir(parents=True, exist_ok=True)

    corpus = [captures[name].stream_path for name in CORPUS]
    catalog, mined, mine_seconds = mine_files(corpus, MiningConfig(threshold=threshold))
    catalog.save(out / "catalog.tmc")

    target = captures[TARGET]
    rows: list[dict[str, Any]] = []
    for label, image in (("migration stream", target.stream_path), ("raw dump", target.dump_path)):
        stream = out / f"{TARGET}.{image.stem}.tmds"
        encoded = encode_file(image, catalog, stream)
        rebuilt = out / f"{TARGET}.{image.stem}.rebuilt"
        rebuild_from_images(stream, corpus, rebuilt, catalog.catalog_id)
        reference = out / f"{TARGET}.{image.stem}.raw"
        _dump_raw(image, reference)
        if not _same_file(rebuilt, reference):
            raise IntegrityError(f"rebuilt memory of {image} differs from the original")
        rows.append({"source": label, **encoded, "byte_identical": True})
        reference.unlink()

    doc = {
        "corpus": [captures[n].name for n in CORPUS],
        "target": TARGET,
        "catalog_id": catalog.catalog_id.hex(),
        "templates": len(catalog),
        "corpus_coverage": [
            {"image": c.name, "coverage": c.coverage, "nonzero_pages": c.nonzero_pages}
            for c in mined.images
        ],
        "mining_seconds": mine_seconds,
        "results": rows,
        "seconds": time.perf_counter() - started,
    }
    (out / "results.json").write_text(json.dumps(doc, indent=2) + "\n")
    if as_json:
        click.echo(json.dumps(doc, indent=2))
        return
    stdout.print(
        f"catalog: {len(catalog):,} templates mined from {', '.join(CORPUS)} "
        f"(coverage {', '.join(f'{c.coverage:.0%}' for c in mined.images)})"
    )
    table = Table(title=f"{TARGET}: encoded against the catalog, rebuilt, compared")
    for name in ("encoded", "pages", "zero", "template", "full", "bytes", "saved", "rebuilt"):
        table.add_column(name, justify="left" if name == "encoded" else "right")
    for r in rows:
        table.add_row(
            r["source"],
            f"{r['pages']:,}",
            f"{r['zero_pages']:,}",
            f"{r['template_pages']:,} ({r['template_share']:.0%})",
            f"{r['full_pages']:,}",
            f"{human_bytes(r['image_bytes'])} -> {human_bytes(r['stream_bytes'])}",
            f"{1 - r['ratio']:.1%}",
            "identical" if r["byte_identical"] else "DIFFERENT",
        )
    stdout.print(table)
    stdout.print(f"done in {doc['seconds']:.1f} s; results in {out / 'results.json'}")
