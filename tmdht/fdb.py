"""The virtual network's forwarding table: which agent hosts each MAC (sans-IO).

Entries are learned from the MAC directory, from LOCATION messages and from frames (a frame's
origin hosts its source MAC, at the version the origin stamped on it). Every entry carries the
*location version* of its MAC: a VM's location gets a higher version each time it moves, so the
rule "a higher version replaces a lower one" makes every agent converge on the newest location
whatever order the news arrives in. Equal versions from different agents (two claims that
raced) resolve to the higher agent id, the same everywhere. Version 0 means "unknown" (learned
without a version) and yields to anything versioned.

The table is bounded (least recently used entries go first) and entries expire; time is a
parameter (seconds, any monotonic origin).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Final

from tmdht.errors import UsageError

__all__ = ["DEFAULT_CAPACITY", "DEFAULT_TTL", "FdbEntry", "ForwardingTable"]

DEFAULT_CAPACITY: Final = 65536
DEFAULT_TTL: Final = 300.0


@dataclass(slots=True)
class FdbEntry:
    """Where one MAC is."""

    agent: int
    """The hosting agent's id."""
    version: int
    """The MAC's location version (0: unknown)."""
    expires: float
    """When the entry stops being trusted (then it is looked up again)."""


class ForwardingTable:
    """(network, MAC) -> :class:`FdbEntry`, bounded and versioned."""

    def __init__(self, *, capacity: int = DEFAULT_CAPACITY, ttl: float = DEFAULT_TTL) -> None:
        if capacity < 1 or ttl <= 0:
            raise UsageError("a forwarding table needs capacity >= 1 and ttl > 0")
        self.capacity = capacity
        self.ttl = ttl
        self._entries: collections.OrderedDict[tuple[int, bytes], FdbEntry] = (
            collections.OrderedDict())

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, vnet: int, mac: bytes, now: float) -> FdbEntry | None:
        """The live entry for ``mac`` in ``vnet``, or None (expired entries are dropped)."""
        key = (vnet, mac)
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.expires <= now:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return entry

    def learn(self, vnet: int, mac: bytes, agent: int, version: int, now: float,
              ttl: float | None = None) -> bool:
        """Record that ``agent`` hosts ``mac`` at ``version``; True if the location changed.

        Ignored (False) when the table holds a newer version, or an equal version from an
        agent with a higher id.
        """
        key = (vnet, mac)
        lifetime = self.ttl if ttl is None else ttl
        entry = self._entries.get(key)
        if entry is not None and entry.agent == agent and entry.version == version and \
                entry.expires - now > lifetime / 2:
            return False  # the same news again (every frame of a flow brings it): nothing to do
        expires = now + lifetime
        if entry is not None and entry.expires > now:
            if version < entry.version or (version == entry.version and agent < entry.agent):
                return False
            changed = entry.agent != agent
            entry.agent, entry.version = agent, version
            entry.expires = max(entry.expires, expires)
            self._entries.move_to_end(key)
            return changed
        self._entries[key] = FdbEntry(agent, version, expires)
        self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
        return True

    def forget(self, vnet: int, mac: bytes, *, agent: int | None = None,
               up_to_version: int | None = None) -> bool:
        """Drop the entry (only if it names ``agent`` / has at most ``up_to_version``)."""
        key = (vnet, mac)
        entry = self._entries.get(key)
        if entry is None:
            return False
        if agent is not None and entry.agent != agent:
            return False
        if up_to_version is not None and entry.version > up_to_version:
            return False
        del self._entries[key]
        return True

    def entries(self) -> list[tuple[int, bytes, FdbEntry]]:
        """A snapshot of every entry (for status pages)."""
        return [(vnet, mac, entry) for (vnet, mac), entry in self._entries.items()]
