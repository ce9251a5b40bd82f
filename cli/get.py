"""``tmdht get``: fetch pages by digest from the cluster, for debugging."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from rich.table import Table

from tmdht.cli.access import cluster_access, cluster_options
from tmdht.cli.main import emit_json, run_async, stdout
from tmdht.errors import UsageError
from tmdht.pages import DIGEST_SIZE


@click.command()
@click.argument("digests", nargs=-1, required=True)
@cluster_options
@click.option(
    "-o", "--output", type=click.Path(path_type=Path, dir_okay=False), help="Write the pages here."
)
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def get(
    digests: tuple[str, ...],
    seeds: tuple[str, ...],
    cluster_key_file: Path | None,
    insecure_open: bool,
    output: Path | None,
    as_json: bool,
) -> None:
    """Resolve DIGESTs (64 hex characters each): which replicas hold them, and the pages."""
    from tmdht.client.store import (  # noqa: PLC0415 - IO stack on demand
        PagesUnavailable,
        TemplateStoreClient,
    )

    wanted = [_digest(d) for d in digests]

    async def main() -> tuple[list[dict[str, Any]], dict[bytes, bytes]]:
        async with TemplateStoreClient.connect(
            cluster_access(seeds, cluster_key_file, insecure_open)
        ) as store:
            found, _ = await store.resolve(wanted)
            rows = []
            for digest, replicas in zip(wanted, await store.replicas_holding(wanted), strict=True):
                rows.append(
                    {
                        "digest": digest.hex(),
                        "resolved": digest in found,
                        "replicas": [{"node_id": n.hex(), "holds": held} for n, held in replicas],
                    }
                )
            return rows, found

    rows, found = run_async(main())
    if output is not None:
        output.write_bytes(b"".join(found[d] for d in wanted if d in found))
    if as_json:
        emit_json({"pages": rows})
    else:
        table = Table(title="pages")
        for name in ("digest", "resolved", "replicas (closest first)"):
            table.add_column(name)
        for r in rows:
            holders = " ".join(
                f"{x['node_id'][:12]}{HOLDS_MARK[x['holds']]}" for x in r["replicas"]
            )
            table.add_row(
                r["digest"][:16], "yes (verified)" if r["resolved"] else "[red]no[/]", holders
            )
        stdout.print(table)
        stdout.print(REPLICA_LEGEND)
    missing = sum(1 for r in rows if not r["resolved"])
    if missing:
        raise PagesUnavailable(d for d in wanted if d not in found)


def _digest(text: str) -> bytes:
    try:
        digest = bytes.fromhex(text)
    except ValueError:
        digest = b""
    if len(digest) != DIGEST_SIZE:
        raise UsageError(f"{text!r} is not a digest (64 hex characters)")
    return digest


HOLDS_MARK = {True: "+", False: "-", None: "?"}
REPLICA_LEGEND = (
    "replicas: the nodes that should hold the page (its R closest by XOR distance over the "
    "nodes' placement tokens, in distinct failure domains), by node id "
    "prefix, closest first: + holds it, - does not, ? did not answer"
)
