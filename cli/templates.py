"""``tmdht templates``: mine a catalog from memory images, show a catalog."""

from __future__ import annotations

import itertools
import os
import sys
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from tmdht.catalog import TemplateCatalog
from tmdht.cli.access import cluster_access, cluster_options
from tmdht.cli.jobs import mine_files, publish_files
from tmdht.cli.main import emit_json, human_bytes, parse_size, stderr, stdout
from tmdht.errors import UsageError
from tmdht.mining import ImageCoverage, MiningConfig
from tmdht.pages import PAGE_SIZE


@click.group()
def templates() -> None:
    """Template catalogs: mine, info, list, publish."""


@templates.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "-t", "--threshold", default=2, show_default=True, help="Occurrences that make a template."
)
@click.option(
    "-o", "--output", required=True, type=click.Path(path_type=Path), help="Catalog file to write."
)
@click.option(
    "--memory-budget",
    default="256MiB",
    show_default=True,
    help="Memory for counting; beyond it, spill to disk.",
)
@click.option(
    "--spill-dir", type=click.Path(path_type=Path, file_okay=False), help="Where spill files go."
)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def mine(
    images: tuple[Path, ...],
    threshold: int,
    output: Path,
    memory_budget: str,
    spill_dir: Path | None,
    as_json: bool,
) -> None:
    """Count page contents across IMAGES and write the templates to a catalog."""
    config = MiningConfig(threshold, parse_size(memory_budget), spill_dir)
    catalog, result, elapsed = mine_files(images, config)
    catalog.save(output)
    total_pages = result.totals.pages
    scanned = total_pages * PAGE_SIZE
    summary = {
        "catalog": str(output),
        "catalog_id": catalog.catalog_id.hex(),
        "threshold": threshold,
        "pages_scanned": total_pages,
        "zero_pages": result.totals.zero_pages,
        "distinct_contents": result.distinct_contents,
        "templates": result.template_count,
        "template_pages": result.totals.template_pages,
        "coverage": result.totals.coverage,
        "images": [_coverage_doc(i) for i in result.images],
        "seconds": elapsed,
        "gb_per_s": scanned / elapsed / 1e9 if elapsed else None,
        "partitions": result.partitions,
    }
    if as_json:
        emit_json(summary)
        return
    stdout.print(_coverage_table(result.images, result.totals, "Template coverage"))
    stdout.print(
        f"scanned {total_pages:,} pages ({human_bytes(scanned)}) in {elapsed:.2f} s "
        f"= {scanned / elapsed / 1e9:.2f} GB/s; {result.distinct_contents:,} distinct non-zero "
        f"contents; [bold]{result.template_count:,} templates[/] at threshold {threshold}"
    )
    stdout.print(
        f"wrote {output} (catalog {catalog.catalog_id.hex()[:16]}, "
        f"{human_bytes(output.stat().st_size)})"
    )


@templates.command()
@click.argument("catalog", type=click.Path(path_type=Path))
@click.option(
    "--digests",
    "digest_count",
    type=click.IntRange(min=0),
    default=0,
    help="Also list the first N template digests (as `tmdht templates list` does).",
)
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def info(catalog: Path, digest_count: int, as_json: bool) -> None:
    """Show what a catalog holds and what it was mined from."""
    cat = TemplateCatalog.load(catalog)
    doc: dict[str, Any] = {
        "catalog": str(catalog),
        "catalog_id": cat.catalog_id.hex(),
        "templates": len(cat),
        "threshold": cat.threshold,
        "template_bytes": len(cat) * PAGE_SIZE,
        "file_bytes": catalog.stat().st_size,
        "distinct_contents": cat.stats.distinct_contents,
        "images": [_coverage_doc(i) for i in cat.stats.images],
        "extra": cat.stats.extra,
    }
    if digest_count:
        doc["digests"] = [d.hex() for d in itertools.islice(cat, digest_count)]
    if as_json:
        emit_json(doc)
        return
    stdout.print(f"catalog {cat.catalog_id.hex()}")
    stdout.print(
        f"{len(cat):,} templates ({human_bytes(len(cat) * PAGE_SIZE)} of pages) at threshold "
        f"{cat.threshold}; file {human_bytes(doc['file_bytes'])}"
    )
    if cat.stats.images:
        totals = ImageCoverage(
            "total",
            sum(i.pages for i in cat.stats.images),
            sum(i.zero_pages for i in cat.stats.images),
            sum(i.template_pages for i in cat.stats.images),
        )
        stdout.print(_coverage_table(cat.stats.images, totals, "Mined from"))
    if digest_count:
        stdout.print(f"first {min(digest_count, len(cat)):,} of {len(cat):,} template digests:")
        for digest in doc["digests"]:
            stdout.print(digest)
    else:
        stdout.print(
            f"digests: tmdht templates list {catalog} (try one with tmdht get DIGEST --seed ...)"
        )


@templates.command("list")
@click.argument("catalog", type=click.Path(path_type=Path))
@click.option("-n", "--limit", type=click.IntRange(min=1), help="Only the first N digests.")
def list_digests(catalog: Path, limit: int | None) -> None:
    """Print the catalog's template digests, one hex digest a line (for `tmdht get`)."""
    cat = TemplateCatalog.load(catalog)
    try:
        for digest in itertools.islice(cat, limit):
            sys.stdout.write(digest.hex() + "\n")
        sys.stdout.flush()
    except BrokenPipeError:  # the reader had enough (`| head`): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # for the exit flush


def _coverage_doc(c: ImageCoverage) -> dict[str, object]:
    return {
        "name": c.name,
        "pages": c.pages,
        "zero_pages": c.zero_pages,
        "nonzero_pages": c.nonzero_pages,
        "template_pages": c.template_pages,
        "coverage": c.coverage,
    }


def _coverage_table(rows: tuple[ImageCoverage, ...], totals: ImageCoverage, title: str) -> Table:
    table = Table(title=title)
    for name in ("image", "pages", "zero", "non-zero", "template pages", "of non-zero"):
        table.add_column(name, justify="left" if name == "image" else "right")
    for c in (*rows, totals):
        table.add_row(
            f"[bold]{c.name}[/]" if c is totals else c.name,
            f"{c.pages:,}",
            f"{c.zero_pages:,}",
            f"{c.nonzero_pages:,}",
            f"{c.template_pages:,}",
            f"{c.coverage:.1%}",
        )
    return table


@templates.command()
@click.argument("catalog_path", metavar="CATALOG", type=click.Path(path_type=Path))
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@cluster_options
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def publish(
    catalog_path: Path,
    images: tuple[Path, ...],
    seeds: tuple[str, ...],
    cluster_key_file: Path | None,
    insecure_open: bool,
    as_json: bool,
) -> None:
    """Store the template pages of CATALOG, read from IMAGES, in the cluster."""
    catalog = TemplateCatalog.load(catalog_path)
    doc = publish_files(catalog, images, cluster_access(seeds, cluster_key_file, insecure_open))
    if doc.templates and not doc.published:
        raise UsageError(
            f"published nothing: none of the {doc.templates:,} templates of {catalog_path} "
            "is in these images (publish from the images the catalog was mined from)"
        )
    if as_json:
        emit_json(doc.to_json())
    else:
        stdout.print(
            f"published {doc.published:,} of {doc.templates:,} templates "
            f"({doc.replica_writes:,} replica writes: {doc.stored:,} new, "
            f"{doc.present:,} already there) in {doc.seconds:.1f} s = "
            f"{doc.pages_per_s:,.0f} pages/s"
        )
    if doc.not_found:
        stderr.print(
            f"[yellow]warning: {doc.not_found:,} of {doc.templates:,} templates are in "
            "none of the images: not published[/]"
        )
