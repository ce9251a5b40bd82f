"""``tmdht demo``: the main job end to end on real guests.

Boots small busybox guests under QEMU/TCG (cached under the build directory), mines a template
catalog from three of them, starts a local store cluster (separate node processes), publishes the
template pages into it, encodes a fourth guest's memory — its QEMU migration stream and its raw
dump — against the catalog, rebuilds both through the cluster, checks the rebuilt memory byte
for byte, and prints what the templates saved.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import click
from rich import box
from rich.table import Table

from tmdht.cli.jobs import encode_file, mine_files, publish_files, rebuild_from_cluster
from tmdht.cli.main import human_bytes, stderr, stdout
from tmdht.errors import IntegrityError
from tmdht.images import dump_raw, open_image
from tmdht.lab.guest import GuestSpec
from tmdht.mining import MiningConfig
from tmdht.net.credentials import ClusterAccess, ClusterCredentials
from tmdht.pages import PAGE_SIZE

CORPUS = ("idle-1", "files-2", "compute-3")
TARGET = "mixed-4"
TRAVELLER = GuestSpec(name="traveller", workload="mixed", seed=21)
"""The guest live-migrated by the demo: booted fresh, its workload not in the corpus."""


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
@click.option("--nodes", default=4, show_default=True, help="Store nodes in the local cluster.")
@click.option("--threshold", default=2, show_default=True, help="Template threshold.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def demo(build_dir: Path, nodes: int, threshold: int, as_json: bool) -> None:
    """Real guests end to end: mine, start a cluster, publish, encode, rebuild through the ring."""
    from tmdht.lab import capture_guests, default_specs  # noqa: PLC0415 - QEMU tooling, on demand
    from tmdht.node.local import LocalCluster  # noqa: PLC0415

    started = time.perf_counter()
    specs = [s for s in default_specs() if s.name in (*CORPUS, TARGET)]
    stderr.print(f"capturing {len(specs)} guests under QEMU/TCG (cached in {build_dir}/guests) ...")
    captures = {c.name: c for c in capture_guests(build_dir, specs)}
    out = build_dir / "demo"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)

    corpus = [captures[name].stream_path for name in CORPUS]
    catalog, mined, mine_seconds = mine_files(
        corpus, MiningConfig(threshold=threshold), names=dict(zip(corpus, CORPUS, strict=True))
    )
    catalog.save(out / "catalog.tmc")

    stderr.print(f"starting a {nodes}-node store cluster in {out / 'cluster'} ...")
    with LocalCluster(out / "cluster", nodes, extra_args=["--log-format", "text"]) as cluster:
        access = ClusterAccess(
            (cluster.seed,), ClusterCredentials.from_file(cluster.key_file)
        )
        published = publish_files(catalog, corpus, access)
        target = captures[TARGET]
        rows: list[dict[str, Any]] = []
        for label, image in (
            ("migration stream", target.stream_path),
            ("raw dump", target.dump_path),
        ):
            stream = out / f"{TARGET}.{image.stem}.tmds"
            encoded = encode_file(image, catalog, stream).to_json()
            rebuilt = out / f"{TARGET}.{image.stem}.rebuilt"
            result, _ = rebuild_from_cluster(stream, rebuilt, access, catalog.catalog_id)
            reference = out / f"{TARGET}.{image.stem}.raw"
            with open_image(image) as img:
                dump_raw(img, reference)
            if not _same_file(rebuilt, reference):
                raise IntegrityError(f"rebuilt memory of {image} differs from the original")
            rows.append(
                {
                    "source": label,
                    **encoded,
                    "distinct_templates": result.distinct_templates,
                    "rebuild_seconds": result.seconds,
                    "byte_identical": True,
                }
            )
            reference.unlink()
            rebuilt.unlink()
        stderr.print(
            "live-migrating a running guest: plain QEMU, then through the tmdht proxies ..."
        )
        from tmdht.lab import HostTools  # noqa: PLC0415
        from tmdht.lab.initramfs import ensure_initramfs  # noqa: PLC0415
        from tmdht.lab.migrate import migrate_guest  # noqa: PLC0415

        tools = HostTools.discover()
        initramfs = ensure_initramfs(build_dir / "lab", tools.busybox, tools.cpio)
        migrations = [
            migrate_guest(TRAVELLER, tools=tools, initramfs=initramfs, method="plain"),
            migrate_guest(
                TRAVELLER,
                tools=tools,
                initramfs=initramfs,
                method="tmdht",
                seed=cluster.seed,
                key_file=cluster.key_file,
                catalog=out / "catalog.tmc",
            ),
        ]
        nodes_info = [
            {
                "node_id": n.status["node_id"],
                "metrics": "http://{}:{}/metrics".format(*n.address("metrics")),
            }
            for n in cluster.nodes
        ]

    doc: dict[str, Any] = {
        "corpus": list(CORPUS),
        "target": TARGET,
        "catalog_id": catalog.catalog_id.hex(),
        "templates": len(catalog),
        "corpus_coverage": [
            {"image": c.name, "coverage": c.coverage, "nonzero_pages": c.nonzero_pages}
            for c in mined.images
        ],
        "mining_seconds": mine_seconds,
        "publish": published.to_json(),
        "cluster": nodes_info,
        "results": rows,
        "migrations": [_migration_doc(m) for m in migrations],
        "seconds": time.perf_counter() - started,
    }
    (out / "results.json").write_text(json.dumps(doc, indent=2) + "\n")
    if as_json:
        click.echo(json.dumps(doc, indent=2))
        return
    stdout.print(
        f"catalog: {len(catalog):,} templates mined from {', '.join(CORPUS)} "
        f"in {mine_seconds:.1f} s; they cover "
        f"{', '.join(f'{c.coverage:.0%}' for c in mined.images)} of those guests' non-zero pages"
    )
    stdout.print(
        f"cluster: {nodes} nodes, R=3; published {published.published:,} templates "
        f"({published.replica_writes:,} replica writes) in {published.seconds:.1f} s"
    )
    stdout.print(_encode_table(rows))
    for line in _encode_legend(rows):
        stdout.print(line, soft_wrap=True)
    stdout.print(_migration_table(doc["migrations"]))
    for line in _migration_legend(doc["migrations"], rows[0]):
        stdout.print(line, soft_wrap=True)
    stdout.print(
        "(loopback, no WAN emulation: the times are not a WAN comparison; bench/migrate.py "
        "measures 100 Mbit/s, 1 Gbit/s and uncapped links with 0-80 ms RTT, one core per site)"
    )
    stdout.print(
        "store nodes export Prometheus metrics at /metrics on their metrics ports "
        "(`tmdht cluster up` prints them); the proxies with --metrics-port; "
        "deploy/prometheus and deploy/grafana hold the scrape config, alerts and dashboard"
    )
    stdout.print(f"done in {doc['seconds']:.1f} s; results in {out / 'results.json'}")


def _share(part: int, whole: int) -> str:
    return f"{part / whole:.0%}" if whole else "-"


def _encode_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(
        title=f"{TARGET}: encoded against the catalog, rebuilt through the cluster, compared",
        box=box.SIMPLE_HEAD,
        padding=(0, 0, 0, 1),
    )
    for name in ("encoded", "pages", "zero", "non-zero", "template", "distinct", "full",
                 "image -> stream", "saved"):  # fmt: skip
        table.add_column(name, justify="left" if name == "encoded" else "right")
    for r in rows:
        nonzero = r["pages"] - r["zero_pages"]
        table.add_row(
            r["source"],
            f"{r['pages']:,}",
            f"{r['zero_pages']:,}",
            f"{nonzero:,}",
            f"{r['template_pages']:,} ({_share(r['template_pages'], nonzero)})",
            f"{r['distinct_templates']:,}",
            f"{r['full_pages']:,} ({_share(r['full_pages'], nonzero)})",
            f"{human_bytes(r['image_bytes'])} -> {human_bytes(r['stream_bytes'])}",
            f"{1 - r['ratio']:.1%}",
        )
    return table


def _encode_legend(rows: list[dict[str, Any]]) -> list[str]:
    r = rows[0]
    full = r["full_pages"] * PAGE_SIZE
    rebuilt = ", ".join(
        f"{x['source']} {x['rebuild_seconds']:.2f} s"
        + ("" if x["byte_identical"] else " [bold red]DIFFERENT[/]")
        for x in rows
    )
    return [
        f"  rebuilt through the cluster and compared with the original: byte-identical ({rebuilt})"
        if all(x["byte_identical"] for x in rows)
        else f"  rebuilt: {rebuilt}",
        "  template, full: shares of the non-zero pages (zero pages are never stored: they "
        "travel as runs of a few bytes); distinct: different contents among the template pages",
        f"  stream = full pages {r['full_pages']:,} x 4 KiB = {human_bytes(full)}, + 32-byte "
        f"digests of {r['template_pages']:,} template pages, zero runs and headers = "
        f"{human_bytes(r['stream_bytes'] - full)}: {human_bytes(r['stream_bytes'])} "
        f"({r['source']})",
    ]


def _migration_doc(m: Any) -> dict[str, Any]:
    received = m.receive_report or {}
    counts = (m.send_report or {}).get("counts", {})
    plain = m.method == "plain"
    return {
        "method": m.method,
        "qemu_bytes": m.qemu_bytes,
        "wire_bytes": m.wire_bytes,
        "total_ms": m.stats.total_time_ms,
        "downtime_ms": m.stats.downtime_ms,
        "rounds": m.stats.dirty_sync_count,
        "pages": m.stats.normal_pages if plain else counts.get("pages"),
        "zero_pages": m.stats.zero_pages if plain else counts.get("zero_pages"),
        "template_pages": None if plain else counts.get("template_pages"),
        "backref_pages": None if plain else counts.get("backref_pages"),
        "full_pages": m.stats.normal_pages if plain else counts.get("full_pages"),
        "compressed_pages": None if plain else counts.get("compressed_pages"),
        "fallback_pages": received.get("fallback_pages"),
        "resumed": m.resumed_counter > m.last_source_counter,
    }


def _migration_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(
        title=f"live migration of a running guest ({TRAVELLER.workload}, not in the corpus)",
        box=box.SIMPLE_HEAD,
        padding=(0, 0, 0, 1),
    )
    for name in ("method", "QEMU bytes", "pages sent", "as digest", "as back-ref", "in full",
                 "wire bytes", "total / downtime"):  # fmt: skip
        table.add_column(name, justify="left" if name == "method" else "right")
    plain = rows[0]["wire_bytes"] or 1

    def count(r: dict[str, Any], key: str) -> str:
        value = r.get(key)
        if value is None:
            return "-"
        if key == "pages":
            return f"{value:,}"
        return f"{value:,} ({_share(value, r['pages'] or 0)})"

    for r in rows:
        table.add_row(
            "plain QEMU" if r["method"] == "plain" else "tmdht",
            human_bytes(r["qemu_bytes"]),
            count(r, "pages"),
            count(r, "template_pages"),
            count(r, "backref_pages"),
            count(r, "full_pages"),
            f"{human_bytes(r['wire_bytes'])} ({r['wire_bytes'] / plain:.2f}x)",
            f"{r['total_ms']} / {r['downtime_ms']} ms",
        )
    return table


def _migration_legend(rows: list[dict[str, Any]], encoded: dict[str, Any]) -> list[str]:
    tm = rows[-1]
    pages, hits = tm["pages"] or 0, tm["template_pages"] or 0
    nonzero = encoded["pages"] - encoded["zero_pages"]
    full = (tm["full_pages"] or 0) * PAGE_SIZE
    rounds = f" ({tm['rounds']} rounds here)" if tm.get("rounds") else ""
    resumed = all(r["resumed"] for r in rows)
    zeros = " and ".join(f"{r['zero_pages']:,}" for r in rows if r["zero_pages"] is not None)
    lines = [
        "  both guests resumed at the destination and ran on"
        if resumed
        else "  [bold red]a guest did NOT resume at the destination[/]",
        "  pages sent: the non-zero guest pages QEMU sent (PAGE records), a page the guest "
        f"dirtied after it was sent counting again{rounds}; shares are of pages sent; zero "
        f"pages go as ZERO records of a few bytes in both methods ({zeros})",
        f"  template hits {_share(hits, pages)} vs {_share(encoded['template_pages'], nonzero)} "
        f"offline: a page equal to one sent earlier in the migration goes as a back-reference "
        f"even when it is a template, so each template content counts once as a digest "
        f"({hits:,} here; the offline stream of {TARGET} holds {encoded['distinct_templates']:,} "
        f"distinct template contents in {encoded['template_pages']:,} template pages); the "
        "guest is a fresh boot of the same kind of workload, not the captured one",
    ]
    if tm["wire_bytes"] and tm["full_pages"] is not None:
        lines.append(
            f"  wire bytes (tmdht, both directions) = pages in full {tm['full_pages']:,} x 4 KiB = "
            f"{human_bytes(full)}, + digests, back-references, zero records, device state and "
            f"the receiver's acknowledgements = {human_bytes(tm['wire_bytes'] - full)}: "
            f"{human_bytes(tm['wire_bytes'])}"
        )
    return lines
