"""The tmdht client library for migration receivers and template publishers.

``from tmdht.client import TemplateStoreClient`` (see README "The client library"). The names are
loaded on first use: the QEMU proxies import :mod:`tmdht.client.migration` on a migration's
critical path and must not pay for the store client's imports before they need them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tmdht.client.probe import ClusterUnreachable
    from tmdht.client.store import (
        BlockingTemplateStoreClient,
        PagesUnavailable,
        PublishFailed,
        PutSummary,
        TemplateStoreClient,
    )

__all__ = [
    "BlockingTemplateStoreClient",
    "ClusterUnreachable",
    "PagesUnavailable",
    "PublishFailed",
    "PutSummary",
    "TemplateStoreClient",
]

_HOMES = {name: "tmdht.client.store" for name in __all__} | {
    "ClusterUnreachable": "tmdht.client.probe"
}


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
