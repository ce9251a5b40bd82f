"""The agent's side of the MAC directory: records in the store cluster's ring.

The agent joins the store cluster's Kademlia overlay as a *client* (it crawls the ring and
follows membership, never becoming a member), places each record key on R nodes by the ring's
placement rule (:class:`tmdht.placement.Ring`: the closest nodes in distinct failure domains, as
for pages) and asks their data planes RECORD_PUT/RECORD_GET through the
shared request engine (:class:`tmdht.aio.dataplane.DataPlaneClient`: retries and adaptive
timeouts are its). Writes go to every replica; reads ask every replica and keep the newest
version. Records the agent owns are renewed every lease / 3 (a restarted node is refilled, a
node that took over a key range gets them); a crashed agent's records expire with their lease.
Nothing here blocks forwarding: the switch floods while a lookup is on its way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from tmdht import wire
from tmdht.aio.dataplane import DataPlaneClient
from tmdht.aio.overlay import MembershipSubscription, Overlay
from tmdht.aio.service import use_cluster_keys
from tmdht.aio.tasks import TaskSet
from tmdht.errors import DecodeError, TmdhtError
from tmdht.net.credentials import ClusterCredentials
from tmdht.net.membership import ClusterRule, Member, MembershipEventKind
from tmdht.net.overlay import OverlayConfig
from tmdht.placement import VIRTUAL_IDS, Ring
from tmdht.records import RecordStatus
from tmdht.vdirectory import (
    LOCATION_ENTRY,
    decode_member,
    encode_location,
    encode_member,
    location_key,
    network_key,
    newest_location,
)
from tmdht.vswitch import LocationRecord, MemberRecord

__all__ = ["DirectoryError", "DirectoryStats", "VnetDirectory"]

log = logging.getLogger("tmdht.vnet.directory")


class DirectoryError(TmdhtError):
    """No store node answered."""


@dataclass
class DirectoryStats:
    """Counters (exported as metrics)."""

    puts: int = 0
    put_failures: int = 0
    stale_puts: int = 0
    gets: int = 0
    get_failures: int = 0


class VnetDirectory:
    """Location and member records of one agent (see the module docstring)."""

    def __init__(self, *, seeds: Sequence[tuple[str, int]], credentials: ClusterCredentials,
                 host: str, replicas: int, lease: float, agent_id: int, public_host: str,
                 tunnel_port: int, site: str, timeout: float = 0.3, attempts: int = 3) -> None:
        """``timeout`` and ``attempts`` are the request engine's (seconds to a node's first
        answer, the floor of its adaptive timeout; times a request is sent)."""
        self.seeds = tuple(seeds)
        self.credentials = credentials
        self.host = host
        self.replicas = replicas
        self.lease = lease
        self.agent_id = agent_id
        self.public_host = public_host
        self.tunnel_port = tunnel_port
        self.site = site
        self.timeout = timeout
        self.attempts = attempts
        self.stats = DirectoryStats()
        self._overlay: Overlay | None = None
        self._client: DataPlaneClient | None = None
        self._members: list[Member] = []
        self._ring = Ring([])
        self._owned: dict[tuple[int, bytes], int] = {}  # (vnet, mac) -> version renewed
        self._networks: set[int] = set()
        self._tasks = TaskSet(log)
        self._auth = credentials.authenticator()

    def replace_credentials(self, credentials: ClusterCredentials) -> None:
        """Use ``credentials`` (a re-read key file) from now on, on the data plane and the
        overlay. UsageError, changing nothing, if this directory or they are open."""
        use_cluster_keys(self._auth, self._overlay, credentials)
        self.credentials = credentials

    # -- life cycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the socket, crawl the ring; raises DirectoryError if no node answers."""
        try:
            self._client = await DataPlaneClient.open(
                self._auth, host=self.host, timeout=self.timeout,
                attempts=self.attempts)
            credentials = self.credentials
            self._overlay = await Overlay.start(OverlayConfig(
                data_port=0, join=False, host=self.host, seeds=self.seeds,
                cluster_key=credentials.overlay_key,
                accepted_cluster_keys=credentials.accepted_overlay_keys))
            await self.refresh()
            if not self._members:
                raise DirectoryError("no store node answered at "
                                     + ", ".join(f"{h}:{p}" for h, p in self.seeds))
            self._tasks.spawn(self._follow(self._overlay.subscribe(replay=False)),
                              "tmdht-vnet-directory-membership")
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Stop renewing and close (idempotent)."""
        await self._tasks.cancel_all()
        if self._overlay is not None:
            await self._overlay.stop()
            self._overlay = None
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def refresh(self) -> None:
        """Crawl the ring again."""
        if self._overlay is not None:
            self._set_members(await self._overlay.crawl())

    async def _follow(self, subscription: MembershipSubscription) -> None:
        try:
            async for event in subscription:
                if event.kind in (MembershipEventKind.JOINED, MembershipEventKind.LEFT,
                                  MembershipEventKind.UPDATED) and self._overlay is not None:
                    self._set_members(self._overlay.members())
        finally:
            subscription.close()

    @property
    def nodes(self) -> int:
        """Store nodes in the view."""
        return len(self._members)

    def _set_members(self, members: Iterable[Member]) -> None:
        self._members = sorted(members, key=lambda m: m.node_id)
        # Records are placed like pages: with the V (tokens per node) the store nodes advertise.
        rule = ClusterRule.of(self._members)
        self._ring = Ring([m.node_id for m in self._members], [m.domain for m in self._members],
                          virtual_ids=rule.virtual_ids or VIRTUAL_IDS)

    def _replicas(self, key: bytes) -> list[Member]:
        if not self._members:
            return []
        return [self._members[i] for i in self._ring.place(key, self.replicas)]

    # -- requests -----------------------------------------------------------------------------

    async def put(self, key: bytes, entry_id: int, version: int, value: bytes) -> bool:
        """Write an entry on every replica; True if at least one stored or renewed it."""
        self.stats.puts += 1
        client = self._client
        if client is None:  # closed: nothing is written
            self.stats.put_failures += 1
            return False
        entry = wire.RecordEntry(entry_id, version, int(self.lease * 1000), value)
        answers = await asyncio.gather(*(
            client.put_record(member.data_address, key, entry) for member in self._replicas(key)))
        ok = False
        for answer in answers:
            if isinstance(answer, wire.RecordPutResult):
                if answer.status in (RecordStatus.STORED, RecordStatus.RENEWED):
                    ok = True
                elif answer.status is RecordStatus.STALE:
                    self.stats.stale_puts += 1
        if not ok:
            self.stats.put_failures += 1
        return ok

    async def get(self, key: bytes) -> list[wire.RecordEntry] | None:
        """The entries under a key, merged over the replicas (newest version per entry id);
        None if no replica answered."""
        self.stats.gets += 1
        client = self._client
        if client is None:  # closed: nobody is asked
            self.stats.get_failures += 1
            return None
        answers = await asyncio.gather(*(
            client.get_records(member.data_address, key) for member in self._replicas(key)))
        merged: dict[int, wire.RecordEntry] = {}
        answered = False
        for answer in answers:
            if isinstance(answer, wire.Records):
                answered = True
                for entry in answer.entries:
                    known = merged.get(entry.entry_id)
                    if known is None or entry.version > known.version:
                        merged[entry.entry_id] = entry
        if not answered:
            self.stats.get_failures += 1
            return None
        return list(merged.values())

    # -- what the switch asks -----------------------------------------------------------------

    async def lookup(self, vnet: int, mac: bytes) -> LocationRecord | None:
        """Where a MAC is (None: nowhere known, or no answer)."""
        entries = await self.get(location_key(vnet, mac))
        if not entries:
            return None
        return newest_location((e.version, e.value) for e in entries
                               if e.entry_id == LOCATION_ENTRY)

    async def publish(self, vnet: int, mac: bytes, version: int, *, gone: bool = False) -> bool:
        """Write this agent's location record of a MAC (renewed from now on unless gone)."""
        if gone:
            self._owned.pop((vnet, mac), None)
        else:
            self._owned[(vnet, mac)] = version
        value = encode_location(self.agent_id, self.public_host, self.tunnel_port, gone=gone)
        return await self.put(location_key(vnet, mac), LOCATION_ENTRY, version, value)

    def withdraw(self, vnet: int, mac: bytes) -> None:
        """Stop renewing a location (the MAC moved to another agent)."""
        self._owned.pop((vnet, mac), None)

    async def join(self, vnet: int) -> None:
        """Publish membership of ``vnet`` (renewed)."""
        self._networks.add(vnet)
        await self.put(network_key(vnet), self.agent_id, 1,
                       encode_member(self.public_host, self.tunnel_port, self.site))

    def leave(self, vnet: int) -> None:
        """Stop renewing membership (it expires with its lease)."""
        self._networks.discard(vnet)

    async def members(self, vnet: int) -> list[MemberRecord]:
        """The agents hosting ``vnet``."""
        entries = await self.get(network_key(vnet)) or []
        out = []
        for entry in entries:
            with contextlib.suppress(DecodeError):
                out.append(decode_member(entry.entry_id, entry.value))
        return out

    async def renew(self) -> None:
        """Renew every record this agent owns (call every lease / 3)."""
        for (vnet, mac), version in list(self._owned.items()):
            await self.put(location_key(vnet, mac), LOCATION_ENTRY, version,
                           encode_location(self.agent_id, self.public_host, self.tunnel_port))
        for vnet in list(self._networks):
            await self.join(vnet)

    @property
    def networks(self) -> set[int]:
        """The networks this agent is a member of."""
        return set(self._networks)
