"""The tmdht client library for migration receivers and template publishers.

- :class:`TemplateStoreClient` (and :class:`BlockingTemplateStoreClient`) — resolve and publish
  pages through a store cluster (:mod:`tmdht.client.store`);
- :mod:`tmdht.client.rebuild` — dedup streams from memory images and back, template pages from
  the cluster or from local images; :mod:`tmdht.client.publish` — a catalog's templates into the
  cluster;
- :mod:`tmdht.client.migration` — the QEMU migration proxies;
- :mod:`tmdht.client.metrics`, :mod:`tmdht.client.errors`.

It stands on the core's cluster layer (:mod:`tmdht.net`) and its asyncio skins
(:mod:`tmdht.aio`); it never imports the store node (:mod:`tmdht.node`).

The names below load on first use: ``tmdht qemu send`` imports :mod:`tmdht.client.migration`
as QEMU's migration command, and every module imported before it reads its stdin adds to the
migration's time.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from tmdht.client.errors import ClusterUnreachable, MigrationFailed, PagesUnavailable, PublishFailed
from tmdht.net.credentials import ClusterAccess, ClusterCredentials

if TYPE_CHECKING:
    from tmdht.client.metrics import ClientMetrics
    from tmdht.client.store import (
        BlockingTemplateStoreClient,
        MemberStatus,
        PutSummary,
        TemplateStoreClient,
    )

__all__ = [
    "BlockingTemplateStoreClient",
    "ClientMetrics",
    "ClusterAccess",
    "ClusterCredentials",
    "ClusterUnreachable",
    "MemberStatus",
    "MigrationFailed",
    "PagesUnavailable",
    "PublishFailed",
    "PutSummary",
    "TemplateStoreClient",
]

_LAZY = {
    "BlockingTemplateStoreClient": "tmdht.client.store",
    "ClientMetrics": "tmdht.client.metrics",
    "MemberStatus": "tmdht.client.store",
    "PutSummary": "tmdht.client.store",
    "TemplateStoreClient": "tmdht.client.store",
}


def __getattr__(name: str) -> object:
    """Load the store client on first use (see the module docstring)."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
