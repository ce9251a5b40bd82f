"""Looking at a running cluster from the host: health endpoints, ``tmdht cluster status``,
publishing and resolving pages with the client library, metrics."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from deploy_engines.host import run
from deploy_engines.report import CheckFailed
from tmdht.client.store import TemplateStoreClient
from tmdht.pages import digest_page

__all__ = ["cluster_status", "make_pages", "metric_samples", "publish", "readyz", "resolve"]

TMDHT = Path(sys.executable).with_name("tmdht")


def readyz(host: str, port: int) -> dict[str, Any] | None:
    """The node's /readyz document if it answers 200 (ready), else None."""
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/readyz", timeout=3) as response:
            doc: dict[str, Any] = json.loads(response.read())
            return doc
    except (urllib.error.URLError, OSError, ValueError):
        return None


def metric_samples(host: str, port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a node's /metrics: (name, sorted labels) -> value."""
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def cluster_status(seed: str, key_file: Path, netns_of: int | None = None) -> list[dict[str, Any]]:
    """``tmdht cluster status --json`` from the host (inside the network namespace of process
    ``netns_of`` when given): the members it lists."""
    argv: list[str | Path] = [TMDHT, "cluster", "status", "--seed", seed,
                              "--cluster-key-file", key_file, "--json"]  # fmt: skip
    if netns_of is not None:
        argv = ["nsenter", "-t", str(netns_of), "-n", *argv]
    env = {k: v for k, v in os.environ.items() if not k.startswith("TMDHT_")}
    proc = run(argv, timeout=60, env=env)
    members: list[dict[str, Any]] = json.loads(proc.stdout)["members"]
    return members


def make_pages(count: int, tag: int) -> list[tuple[bytes, bytes]]:
    """``count`` distinct non-zero pages with their digests."""
    pages = []
    for i in range(count):
        page = (b"tmdht-deploy" + tag.to_bytes(4, "big") + i.to_bytes(4, "big")) * 204
        page += b"\xa5" * (4096 - len(page))
        pages.append((digest_page(page), page))
    return pages


def publish(seed: tuple[str, int], key_text: str, pages: list[tuple[bytes, bytes]]) -> int:
    """Store ``pages`` through the cluster (each on its R replicas); page copies stored."""

    async def main() -> int:
        async with TemplateStoreClient([seed], cluster_key=key_text) as store:
            summary = await store.put_many(pages)
            return summary.stored + summary.present

    return asyncio.run(main())


def resolve(seed: tuple[str, int], key_text: str, pages: list[tuple[bytes, bytes]]) -> None:
    """Resolve every page through the cluster; fail unless each comes back byte for byte."""

    async def main() -> None:
        async with TemplateStoreClient([seed], cluster_key=key_text) as store:
            found, unavailable = await store.resolve([d for d, _ in pages])
            if unavailable:
                raise CheckFailed(f"{len(unavailable)} of {len(pages)} pages unavailable")
            wrong = [d for d, page in pages if found.get(d) != page]
            if wrong:
                raise CheckFailed(f"{len(wrong)} pages came back different")

    asyncio.run(main())
