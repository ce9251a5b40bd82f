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
from rich.table import Table

from tmdht.cli.jobs import encode_file, mine_files, publish_files, rebuild_from_cluster
from tmdht.cli.main import human_bytes, stderr, stdout
from tmdht.errors import IntegrityError
from tmdht.images import dump_raw, open_image
from tmdht.lab.guest import GuestSpec
from tmdht.mining import MiningConfig
from tmdht.net.credentials import ClusterAccess, ClusterCredentials

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
    catalog, mined, mine_seconds = mine_files(corpus, MiningConfig(threshold=threshold))
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
        f"(coverage {', '.join(f'{c.coverage:.0%}' for c in mined.images)}) in {mine_seconds:.1f} s"
    )
    stdout.print(
        f"cluster: {nodes} nodes, R=3; published {published.published:,} templates "
        f"({published.replica_writes:,} replica writes) in {published.seconds:.1f} s"
    )
    table = Table(
        title=f"{TARGET}: encoded against the catalog, rebuilt through the cluster, compared"
    )
    for name in (
        "encoded",
        "pages",
        "zero",
        "template",
        "full",
        "bytes",
        "saved",
        "rebuild",
        "result",
    ):
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
            f"{r['rebuild_seconds']:.2f} s",
            "identical" if r["byte_identical"] else "DIFFERENT",
        )
    stdout.print(table)
    stdout.print(_migration_table(doc["migrations"]))
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


def _migration_doc(m: Any) -> dict[str, Any]:
    received = m.receive_report or {}
    counts = received.get("counts", {})
    return {
        "method": m.method,
        "qemu_bytes": m.qemu_bytes,
        "wire_bytes": m.wire_bytes,
        "total_ms": m.stats.total_time_ms,
        "downtime_ms": m.stats.downtime_ms,
        "pages": counts.get("pages"),
        "template_pages": counts.get("template_pages"),
        "fallback_pages": received.get("fallback_pages"),
        "resumed": m.resumed_counter > m.last_source_counter,
    }


def _migration_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(
        title=f"live migration of a running guest ({TRAVELLER.workload}, not in the corpus)"
    )
    for name in (
        "method",
        "QEMU bytes",
        "bytes on the wire",
        "total time",
        "downtime",
        "template hits",
        "resumed",
    ):
        table.add_column(name, justify="left" if name == "method" else "right")
    plain = rows[0]["wire_bytes"] or 1
    for r in rows:
        hits = "-"
        if r["template_pages"] is not None:
            share = r["template_pages"] / max(1, r["pages"])
            hits = f"{r['template_pages']:,} of {r['pages']:,} ({share:.0%})"
        table.add_row(
            "plain QEMU (tcp)" if r["method"] == "plain" else "tmdht proxies",
            human_bytes(r["qemu_bytes"]),
            f"{human_bytes(r['wire_bytes'])} ({r['wire_bytes'] / plain:.2f}x)",
            f"{r['total_ms']} ms",
            f"{r['downtime_ms']} ms",
            hits,
            "yes" if r["resumed"] else "NO",
        )
    return table
