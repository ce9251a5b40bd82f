"""The client library's errors (all :class:`~tmdht.errors.TmdhtError`)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from tmdht.errors import TmdhtError

if TYPE_CHECKING:
    from tmdht.client.migration import MigrationReport

__all__ = ["ClusterUnreachable", "MigrationFailed", "PagesUnavailable", "PublishFailed"]


class ClusterUnreachable(TmdhtError):
    """No store node answered at any of the seeds (nothing there, unreachable, or a node with
    another cluster key: it drops our datagrams silently)."""

    def __init__(self, seeds: Iterable[tuple[str, int]], reason: str | None = None) -> None:
        """``reason``: the whole message, when probes found out why
        (:func:`tmdht.client.probe.explain_silence`)."""
        self.seeds = tuple(seeds)
        where = ", ".join(f"{host}:{port}" for host, port in self.seeds)
        super().__init__(reason or f"no store node answered at {where}")


class PagesUnavailable(TmdhtError):
    """No replica could serve these digests (every replica down, or the page missing)."""

    def __init__(self, digests: Iterable[bytes]) -> None:
        self.digests = frozenset(digests)
        first = min(self.digests).hex()[:16] if self.digests else "-"
        super().__init__(
            f"{len(self.digests)} pages unavailable from every replica (first {first})"
        )


class PublishFailed(TmdhtError):
    """Some pages could not be stored on any replica."""

    def __init__(self, digests: Iterable[bytes], reason: str) -> None:
        self.digests = frozenset(digests)
        super().__init__(f"{len(self.digests)} pages not stored: {reason}")


class MigrationFailed(TmdhtError):
    """The migration through the proxies failed (the other side, the stream, or verification)."""

    def __init__(self, message: str, report: MigrationReport | None = None) -> None:
        super().__init__(message)
        self.report = report
