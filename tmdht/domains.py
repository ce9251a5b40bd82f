"""Failure domains: where a node can fail together with others (zone > rack > host); and the
default number of placement tokens per member.

Kept apart from :mod:`tmdht.placement` (which needs numpy) so configuration and membership can
check and carry domains without importing numpy: the migration sender's start-up reads the
configuration and must not pay for numpy before its first byte.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from tmdht.errors import UsageError

__all__ = ["MAX_LABEL_BYTES", "MAX_VIRTUAL_IDS", "VIRTUAL_IDS", "FailureDomain"]

MAX_LABEL_BYTES: Final = 64
"""Longest zone, rack or host label, in UTF-8 bytes."""
VIRTUAL_IDS: Final = 16
"""Default placement tokens per member (V, :mod:`tmdht.placement`): copies per node max/mean
about 1.28 (median of 20 draws) at 32 nodes in 8 hosts of 4, R=3, against about 2.0 with V = 1
(bench/README.md, "virtual IDs"). Every node and client of a cluster must use the same V: it
decides where every page lives. Here rather than in placement so configuration can name it
without importing numpy."""
MAX_VIRTUAL_IDS: Final = 256


@dataclass(frozen=True, slots=True, order=True)
class FailureDomain:
    """Where a node can fail together with others: a host in a rack in a zone.

    Labels are compared as given; a rack label means a rack of its zone, a host label a host of
    its rack. An empty label is a label like any other (every node that leaves it empty shares
    it), so a ring that only sets ``host`` spreads replicas over hosts.
    """

    zone: str = ""
    """A zone (data center room, availability zone): the widest domain."""
    rack: str = ""
    """A rack (or power/switch domain) within the zone."""
    host: str = ""
    """A machine within the rack; several node processes on one machine share it."""

    def __post_init__(self) -> None:
        for name in ("zone", "rack", "host"):
            label = getattr(self, name)
            if not isinstance(label, str):
                raise UsageError(f"a {name} label is a string, got {type(label).__name__}")
            if len(label.encode()) > MAX_LABEL_BYTES or not label.isprintable():
                raise UsageError(
                    f"a {name} label is at most {MAX_LABEL_BYTES} printable UTF-8 bytes, "
                    f"got {label!r:.80}"
                )

    @property
    def path(self) -> tuple[str, str, str]:
        """The labels from the widest domain to the narrowest."""
        return (self.zone, self.rack, self.host)

    def __str__(self) -> str:
        return "/".join(self.path)
