"""``tmdht encode`` and ``tmdht rebuild``: images to dedup streams and back."""

from __future__ import annotations

from pathlib import Path

import click

from tmdht.catalog import TemplateCatalog
from tmdht.cli.access import cluster_access, cluster_options
from tmdht.cli.jobs import encode_file, rebuild_from_cluster, rebuild_from_images
from tmdht.cli.main import emit_json, human_bytes, stdout
from tmdht.errors import UsageError


@click.command()
@click.argument("image", type=click.Path(path_type=Path))
@click.option(
    "-c",
    "--catalog",
    "catalog_path",
    required=True,
    type=click.Path(path_type=Path),
    help="Template catalog.",
)
@click.option(
    "-o", "--output", required=True, type=click.Path(path_type=Path), help="Dedup stream to write."
)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def encode(image: Path, catalog_path: Path, output: Path, as_json: bool) -> None:
    """Encode IMAGE as a dedup stream: template pages become their digests."""
    doc = encode_file(image, TemplateCatalog.load(catalog_path), output)
    if as_json:
        emit_json(doc.to_json())
        return
    stdout.print(
        f"{doc.pages:,} pages: {doc.full_pages:,} full, {doc.zero_pages:,} zero, "
        f"[bold]{doc.template_pages:,} template[/] "
        f"({doc.template_share:.1%} of non-zero pages)"
    )
    stdout.print(
        f"image {human_bytes(doc.image_bytes)} -> stream {human_bytes(doc.stream_bytes)} "
        f"([bold]{1 - doc.ratio:.1%} smaller[/]) in {doc.seconds:.2f} s; wrote {output}"
    )


@click.command()
@click.argument("stream", type=click.Path(path_type=Path))
@click.option(
    "--pages-from",
    "pages_from",
    multiple=True,
    type=click.Path(path_type=Path),
    help="Memory image holding template pages (repeatable); or use --seed.",
)
@cluster_options
@click.option(
    "-c",
    "--catalog",
    "catalog_path",
    type=click.Path(path_type=Path),
    help="Refuse a stream encoded against another catalog.",
)
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(path_type=Path),
    help="Raw memory image to write.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def rebuild(
    stream: Path,
    pages_from: tuple[Path, ...],
    seeds: tuple[str, ...],
    cluster_key_file: Path | None,
    insecure_open: bool,
    catalog_path: Path | None,
    output: Path,
    as_json: bool,
) -> None:
    """Rebuild the raw memory of a dedup STREAM: template pages from the cluster or local images."""
    if bool(pages_from) == bool(seeds):
        raise UsageError(
            "say where template pages come from: --seed HOST:PORT or --pages-from IMAGE"
        )
    expected = TemplateCatalog.load(catalog_path).catalog_id if catalog_path else None
    if pages_from:
        summary = rebuild_from_images(stream, pages_from, output, expected)
        doc = summary.to_json()
    else:
        access = cluster_access(seeds, cluster_key_file, insecure_open)
        summary, cache_hits = rebuild_from_cluster(stream, output, access, expected)
        doc = {**summary.to_json(), "cache_hits": cache_hits}
    if as_json:
        emit_json(doc)
        return
    stdout.print(
        f"rebuilt {human_bytes(summary.bytes)} ({summary.pages:,} pages: "
        f"{summary.full_pages:,} full, {summary.zero_pages:,} zero, {summary.template_pages:,} "
        f"template) in {summary.seconds:.2f} s; memory digest verified; wrote {output}"
    )
