"""A ring of 100 to 10,000 nodes, simulated: data moved per join/leave, lookup hops, load balance,
client view memory.

    python bench/simulate.py [--nodes 100,300,1000,3000,10000] [--replicas 3] [--seed 1]
                             [--quick] [--no-plot] [--out bench/results/simulate.json]

Everything runs in this process and is deterministic for a seed: node IDs are BLAKE2b of (seed,
node), keys a regular grid over the key space, every random choice from a seeded generator.
Placement is tmdht's own (:class:`tmdht.placement.Ring`, virtual IDs as nodes and clients derive
them: ``virtual_ids`` tokens per node); routing tables, the FIND_NODE
answer and the iterative crawl are the kademlia package's, as the node's overlay uses them.

1. **Movement.** For each layout and ring size N, every key's replica set (physical nodes) before
   and after one node joins or leaves (each event on its own against the same base ring). Share
   of keys whose set changed (ideal R/N: the newcomer's or the leaver's fair share) and of
   copies that must be written (ideal 1/N). A key whose set changed but does not hold the joining
   or leaving node breaks minimal movement; their count must be 0.
2. **Balance.** Copies per physical node in the base ring: max/mean, p99/mean, min/mean and the
   coefficient of variation, with and without virtual IDs (several IDs per node) and failure
   domains (10 zones x 8 racks, equal zones; and, with virtual IDs, one zone three times the
   size of each other one).
   The keys are a grid, so the figures are the placement's own imbalance, not sampling noise.
3. **Lookups.** An iterative Kademlia lookup (k=20, alpha=3) for the R closest nodes of random
   keys, from random nodes, over converged routing tables: the package's k-bucket table (bucket
   split rule and all) filled with every other node in a random order per node. Answers are the k
   closest contacts (tmdht's overlay) or the package's ``find_neighbors`` walk. Rounds (sequential
   round trips), RPCs, whether the true R closest were found; once with every node up, once with
   1% of the members changed and not yet seen (half gone, half new: tables, like views, are the
   old ones; a gone node costs a timeout).
4. **One hop with a stale view.** The client places every key on its view (the old membership)
   while 1% of members changed: how often the first contacted node is wrong (gone; no longer a
   replica; not the current primary), extra hops until a replica answers (strict: a current replica; lenient: any live old
   replica, which keeps the page for the surplus grace period), and keys for which every replica
   in the view is wrong (the view must be refreshed).
5. **View memory.** tracemalloc bytes per member of a complete client view: the member record (a
   :class:`tmdht.wire.NodeInfo` with its ID and address) and the placement :class:`Ring` with and
   without domains, at the largest N; and the size of one converged Kademlia routing table.

Prints a table per part, writes JSON (--out) and a PNG next to it (matplotlib). The full range
takes a few minutes on a shared 2-core machine; --quick runs 100..1000 nodes with fewer keys and
lookups as a smoke test.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
from kademlia.crawling import NodeSpiderCrawl
from kademlia.node import Node
from kademlia.routing import KBucket, RoutingTable

from tmdht.placement import VIRTUAL_IDS, FailureDomain, Ring
from tmdht.wire import NodeInfo

ROOT = Path(__file__).resolve().parent.parent
KSIZE = 20
"""Kademlia k: contacts per bucket and per FIND_NODE answer (the overlay's default)."""
ALPHA = 3
"""Kademlia alpha: parallel queries per lookup round (the overlay's default)."""
CHUNK = 1 << 16
"""Keys placed per call, to bound the placement's temporary arrays."""
ID_LIMIT = 2**160
T = TypeVar("T")


@dataclass(frozen=True)
class Layout:
    """How a simulated ring is built."""

    name: str
    virtual_ids: int = 1
    """Placement tokens per node (V, :func:`tmdht.placement.tokens_of`)."""
    zones: int = 0
    """Failure-domain zones (0: no domains); racks below them, each node its own host."""
    racks: int = 0
    """Racks per zone."""
    big_zone: int = 1
    """Zone 0 holds this many times the nodes of any other zone."""
    nodes_per_host: int = 1
    """Node processes sharing a host (the failure domain when there are no zones)."""


LAYOUTS = {
    layout.name: layout
    for layout in (
        Layout("plain"),
        Layout("vids16", virtual_ids=16),
        Layout("zones", zones=10, racks=8),
        Layout("zones+vids16", virtual_ids=16, zones=10, racks=8),
        Layout("zones 3:1:..:1+vids16", virtual_ids=16, zones=10, racks=8, big_zone=3),
    )
}
MOVEMENT_LAYOUTS = ("plain", "vids16", "zones")


def node_id(seed: int, node: int) -> bytes:
    """The node ID of node ``node``: independent of the others."""
    return hashlib.blake2b(f"{seed}:{node}:0".encode(), digest_size=20).digest()


def node_domain(layout: Layout, node: int) -> FailureDomain:
    """Node ``node``'s domain: zones and racks dealt round robin (zone 0 ``big_zone`` times)."""
    if not layout.zones:
        return FailureDomain(host=f"h{node // layout.nodes_per_host}")
    slots = layout.zones + layout.big_zone - 1
    slot = node % slots
    zone = 0 if slot < layout.big_zone else slot - layout.big_zone + 1
    return FailureDomain(f"z{zone}", f"r{(node // slots) % layout.racks}", f"n{node}")


class SimRing:
    """A simulated membership: nodes, their IDs and domains, as one Ring."""

    def __init__(self, layout: Layout, seed: int, nodes: Iterable[int]) -> None:
        self.nodes = sorted(nodes)
        ids = [node_id(seed, node) for node in self.nodes]
        spread = layout.zones > 0 or layout.nodes_per_host > 1
        domains = [node_domain(layout, node) for node in self.nodes] if spread else None
        self.ring = Ring(ids, domains, virtual_ids=layout.virtual_ids)
        self.owners = np.array(self.nodes, dtype=np.intp)

    def place(self, keys: npt.NDArray[np.uint8], replicas: int) -> npt.NDArray[np.intp]:
        """The physical nodes holding each key (one row per key, closest first)."""
        out = np.empty((len(keys), replicas), dtype=np.intp)
        for start in range(0, len(keys), CHUNK):
            rows = self.ring.replica_indices(keys[start : start + CHUNK], replicas)
            out[start : start + CHUNK] = self.owners[rows]
        return out


def grid_keys(count: int, rng: np.random.Generator) -> npt.NDArray[np.uint8]:
    """``count`` 20-byte keys spaced evenly over the key space (random offset and low bytes)."""
    step = np.uint64((2**64) // count)
    tops = np.arange(count, dtype=np.uint64) * step + np.uint64(rng.integers(0, int(step)))
    keys = np.empty((count, 20), dtype=np.uint8)
    keys[:, :8] = tops.astype(">u8").view(np.uint8).reshape(count, 8)
    keys[:, 8:] = rng.integers(0, 256, size=(count, 12), dtype=np.uint8)
    return keys


def random_keys(count: int, rng: np.random.Generator) -> npt.NDArray[np.uint8]:
    return rng.integers(0, 256, size=(count, 20), dtype=np.uint8)


def balance(copies: npt.NDArray[np.intp], nodes: Sequence[int]) -> dict[str, float]:
    """Copies per physical node: max, p99 and min over the mean, coefficient of variation."""
    loads = np.bincount(copies.ravel(), minlength=max(nodes) + 1)[list(nodes)].astype(float)
    mean = loads.mean()
    return {
        "mean": float(mean),
        "max_over_mean": float(loads.max() / mean),
        "p99_over_mean": float(np.percentile(loads, 99) / mean),
        "min_over_mean": float(loads.min() / mean),
        "cv": float(loads.std() / mean),
    }


def changes(before: npt.NDArray[np.intp], after: npt.NDArray[np.intp]) -> tuple[npt.NDArray[np.bool_], int]:
    """Per key whether its replica set changed, and the copies in ``after`` not in ``before``."""
    new_copies = (after[:, :, None] != before[:, None, :]).all(axis=2)
    return new_copies.any(axis=1), int(new_copies.sum())


def base_placement(
    layout: Layout, size: int, replicas: int, seed: int, keys_per_node: int
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.intp]]:
    """Grid keys and their replica sets (physical nodes) on a ring of nodes 0..size-1.

    The same keys for every layout of a size: comparisons are paired.
    """
    keys = grid_keys(size * keys_per_node, np.random.default_rng([seed, size, keys_per_node]))
    return keys, SimRing(layout, seed, range(size)).place(keys, replicas)


def movement(
    layout: Layout, size: int, replicas: int, seed: int, keys: npt.NDArray[np.uint8],
    before: npt.NDArray[np.intp], events: int,
) -> dict[str, Any]:
    """Part 1: joins and leaves, each against the base ring (the same leaving nodes for every
    layout)."""
    rng = np.random.default_rng([seed, size, 1])
    members = set(range(size))
    result: dict[str, Any] = {"layout": layout.name, "nodes": size, "keys": len(keys), "events": []}
    for event in range(events):
        if event % 2 == 0:
            subject, after_members = size + event, members | {size + event}
        else:
            subject = int(rng.choice(sorted(members)))
            after_members = members - {subject}
        after = SimRing(layout, seed, after_members).place(keys, replicas)
        changed, new_copies = changes(before, after)
        holds = ((after if event % 2 == 0 else before) == subject).any(axis=1)
        result["events"].append({
            "kind": "join" if event % 2 == 0 else "leave",
            "keys_changed_share": float(changed.mean()),
            "copies_moved_share": new_copies / before.size,
            "ideal_keys_share": replicas / max(len(after_members), len(members)),
            "not_minimal": int((changed & ~holds).sum()),
            "copies_per_changed_key": new_copies / max(1, int(changed.sum())),
        })
    shares = [e["keys_changed_share"] / e["ideal_keys_share"] for e in result["events"]]
    result["keys_changed_over_ideal"] = statistics.mean(shares) if shares else None
    return result


def virtual_id_sweep(sizes: Sequence[int], vids: Sequence[int], replicas: int, seed: int) -> list[dict[str, Any]]:
    """Part 2b: balance against virtual IDs per node, plain and with 4 nodes per host (the
    32-node ring of issue 16 has 8 hosts of 4). Keys grow with the IDs so that the grid still
    measures each region finely; small rings are drawn several times (other IDs), since one
    draw of 32 IDs says little: the figures are the mean and the worst over the draws."""
    rows = []
    for size in sizes:
        draws = max(1, min(5, 2000 // size))
        for v in vids:
            for name, per_host in (("plain", 1), ("hosts of 4", 4)):
                layout = Layout(name, virtual_ids=v, nodes_per_host=per_host)
                found = [balance(base_placement(layout, size, replicas, seed + draw, max(50, 8 * v))[1], range(size))
                         for draw in range(draws)]
                rows.append({"layout": name, "nodes": size, "virtual_ids": v, "draws": draws,
                             "max_over_mean": statistics.mean(b["max_over_mean"] for b in found),
                             "worst_max_over_mean": max(b["max_over_mean"] for b in found),
                             "cv": statistics.mean(b["cv"] for b in found)})
    return rows


# -- Kademlia ----------------------------------------------------------------------------------


class ConvergedTables:
    """The kademlia package's routing tables, as each node's would be after meeting all others.

    Adding every node to every table (``RoutingTable.add_contact``, 10^8 calls at 10,000 nodes)
    is too slow, so the table is built by the same rule in one pass per bucket: a bucket holds
    the first k nodes to arrive in its range; when the (k+1)-th arrives, it splits if it covers
    the table's own ID or if its contents' shared prefix is not a multiple of 5 (section 4.2 of
    the paper, the package's rule), and each half then sees the range's arrivals in order; else
    the rest only go to the replacement cache (ignored here: nothing is removed). The result is
    real ``KBucket`` objects in a real ``RoutingTable``: tests check it equals tables built
    with ``add_contact`` node by node.
    """

    def __init__(self, ids: Sequence[bytes], seed: int, clients: int = 0) -> None:
        """Tables of the members ``ids``, and of ``clients`` non-members that know them all."""
        self.members = len(ids)
        self.ids = [*ids, *(node_id(seed, -1 - c) for c in range(clients))]
        self.nodes = [Node(i, str(n), 0) for n, i in enumerate(self.ids)]
        self.tops = np.frombuffer(b"".join(i[:8] for i in self.ids), ">u8").astype(np.uint64)
        self.longs = [n.long_id for n in self.nodes]
        self.seed = seed
        self.tables: dict[int, tuple[RoutingTable, npt.NDArray[np.intp]]] = {}

    def arrival(self, own: int) -> npt.NDArray[np.intp]:
        """The order in which ``own`` (a member or a client) met the members."""
        order = np.random.default_rng([self.seed, own]).permutation(self.members).astype(np.intp)
        kept: npt.NDArray[np.intp] = order[order != own]
        return kept

    def table(self, own: int) -> RoutingTable:
        return self._entry(own)[0]

    def contacts(self, own: int) -> npt.NDArray[np.intp]:
        """Indices of every contact in ``own``'s table."""
        return self._entry(own)[1]

    def _entry(self, own: int) -> tuple[RoutingTable, npt.NDArray[np.intp]]:
        if own not in self.tables:
            buckets: list[KBucket] = []
            held: list[int] = []
            self._fill(own, 0, ID_LIMIT, 0, self.arrival(own), buckets, held)
            table = RoutingTable(None, KSIZE, self.nodes[own])
            table.buckets = buckets
            self.tables[own] = (table, np.array(held, dtype=np.intp))
        return self.tables[own]

    def _fill(self, own: int, low: int, high: int, depth: int, arrived: npt.NDArray[np.intp],
              out: list[KBucket], held: list[int]) -> None:
        if len(arrived) > KSIZE:
            first = self.tops[arrived[:KSIZE]]
            shared = 64 - int(first.min() ^ first.max()).bit_length()
            if low <= self.longs[own] <= high or shared % 5 != 0:
                middle = (low + high) // 2
                upper = ((self.tops[arrived] >> np.uint64(63 - depth)) & np.uint64(1)).astype(bool)
                self._fill(own, low, middle, depth + 1, arrived[~upper], out, held)
                self._fill(own, middle + 1, high, depth + 1, arrived[upper], out, held)
                return
        bucket = KBucket(low, high, KSIZE)
        kept = arrived[:KSIZE].tolist()
        for index in kept:
            bucket.nodes[self.ids[index]] = self.nodes[index]
        out.append(bucket)
        held += kept


class SimulatedNetwork:
    """What the crawl's ``protocol`` does, answered from the converged tables.

    ``answer`` is ``"closest"`` (tmdht's overlay: the k closest contacts of the table) or
    ``"package"`` (the package's ``RoutingTable.find_neighbors`` bucket walk).
    """

    def __init__(self, tables: ConvergedTables, alive: npt.NDArray[np.bool_], answer: str) -> None:
        self.tables, self.alive, self.answer = tables, alive, answer
        self.asker: Node | None = None
        self.rpcs = 0
        self.timeouts = 0

    def neighbours(self, peer: int, target: Node) -> list[Node]:
        if self.answer == "package":
            found: list[Node] = self.tables.table(peer).find_neighbors(target, KSIZE, exclude=self.asker)
            return found
        held = self.tables.contacts(peer)
        if self.asker is not None:
            held = held[held != int(self.asker.ip)]
        key_top = np.uint64(target.long_id >> 96)
        dist = self.tables.tops[held] ^ key_top
        nearest = held[np.argsort(dist)[:KSIZE]] if len(held) > KSIZE else held[np.argsort(dist)]
        return [self.tables.nodes[i] for i in nearest.tolist()]

    async def call_find_node(self, peer: Node, target: Node) -> tuple[bool, Any]:
        self.rpcs += 1
        if not self.alive[int(peer.ip)]:
            self.timeouts += 1
            return (False, None)
        return (True, [tuple(n) for n in self.neighbours(int(peer.ip), target)])


class CountedLookup(NodeSpiderCrawl):  # type: ignore[misc]
    """The package's FIND_NODE crawl, counting its rounds and the rounds that met a timeout."""

    def __init__(self, network: SimulatedNetwork, target: Node, peers: list[Node]) -> None:
        super().__init__(network, target, peers, KSIZE, ALPHA)
        self.rounds = 0
        self.waiting_rounds = 0

    async def _find(self, rpcmethod: Callable[..., Any]) -> Any:
        self.rounds += 1
        waited = False

        async def ask(peer: Node, target: Node) -> Any:
            nonlocal waited
            answer = await rpcmethod(peer, target)
            if not answer[0] and not waited:
                waited = True
                self.waiting_rounds += 1
            return answer

        return await super()._find(ask)


def stale_membership(size: int, churn: float, seed: int) -> tuple[list[bytes], npt.NDArray[np.bool_], list[bytes]]:
    """Old IDs, which of them are still up, and the IDs that joined since (half and half)."""
    rng = np.random.default_rng([seed, size, 77])
    changed = max(2, round(size * churn))
    old = [node_id(seed, n) for n in range(size)]
    alive = np.ones(size, dtype=np.bool_)
    alive[rng.choice(size, changed // 2, replace=False)] = False
    joined = [node_id(seed, size + n) for n in range(changed - changed // 2)]
    return old, alive, joined


def lookups(size: int, replicas: int, seed: int, count: int, churn: float) -> dict[str, Any]:
    """Part 3 for one ring size."""
    old, alive, joined = stale_membership(size, churn, seed)
    clients = 10
    tables = ConvergedTables(old, seed, clients)
    rng = np.random.default_rng([seed, size, 3])
    targets = [rng.bytes(20) for _ in range(count)]
    current = [i for i, up in zip(old, alive, strict=True) if up] + joined
    out: dict[str, Any] = {"nodes": size, "lookups": count, "churn": churn, "clients": clients}
    started = time.perf_counter()
    with asyncio.Runner() as runner:
        for answer in ("closest", "package"):
            for label, down, members in (("no churn", 0, old), ("churn", size - int(alive.sum()), current)):
                up = np.ones(len(tables.ids), dtype=np.bool_)
                up[:size] = alive if down else True
                # A lookup finds the nodes closest by node ID (not placement tokens).
                truth = Ring(members, virtual_ids=1).replica_indices(targets, replicas)
                network = SimulatedNetwork(tables, up, answer)
                rounds, waiting, rpcs, exact, dead = [], [], [], 0, 0
                for n, (target, want) in enumerate(zip(targets, truth.tolist(), strict=True)):
                    client = size + n % clients
                    network.asker = tables.nodes[client]
                    goal = Node(target)
                    if answer == "package":
                        start = tables.table(client).find_neighbors(goal, KSIZE)
                    else:
                        start = network.neighbours(client, goal)
                    before = network.rpcs
                    crawl = CountedLookup(network, goal, start)
                    found = runner.run(crawl.find())
                    rounds.append(crawl.rounds)
                    waiting.append(crawl.waiting_rounds)
                    rpcs.append(network.rpcs - before)
                    exact += [n.id for n in found[:replicas]] == [members[i] for i in want]
                    # The package's crawl drops a peer that timed out, but a later answer that
                    # still lists it pushes it back, marked contacted: it can end in the result.
                    dead += any(not up[int(n.ip)] for n in found[:replicas])
                out[f"{answer}, {label}"] = {
                    "rounds_mean": statistics.mean(rounds), "rounds_p99": float(np.percentile(rounds, 99)),
                    "rounds_max": max(rounds), "rounds_with_timeout_mean": statistics.mean(waiting),
                    "rpcs_mean": statistics.mean(rpcs), "found_true_replicas": exact / count,
                    "gone_node_in_result": dead / count,
                }
    member_tables = [own for own in tables.tables if own < size]
    out["table_contacts_mean"] = statistics.mean(len(tables.contacts(own)) for own in member_tables)
    out["tables_built"] = len(tables.tables)
    out["seconds"] = time.perf_counter() - started
    return out


def one_hop(size: int, replicas: int, seed: int, keys: int, churn: float) -> dict[str, Any]:
    """Part 4 for one ring size."""
    old, alive, joined = stale_membership(size, churn, seed)
    # Members as numbers: the old ones 0..size-1, the new ones from size on.
    current = np.concatenate([np.flatnonzero(alive), size + np.arange(len(joined))])
    everyone = [*old, *joined]
    sample = random_keys(keys, np.random.default_rng([seed, size, 4]))
    view = Ring(old).replica_indices(sample, replicas)
    truth = current[Ring([everyone[i] for i in current.tolist()]).replica_indices(sample, replicas)]
    is_replica = (view[:, :, None] == truth[:, None, :]).any(axis=2)
    is_up = alive[view]
    # Extra hops: contacts tried before the first good one; none good: all R of them, then one
    # more after refreshing the view.
    strict = np.where(is_replica.any(axis=1), is_replica.argmax(axis=1), replicas + 1)
    lenient = np.where(is_up.any(axis=1), is_up.argmax(axis=1), replicas + 1)
    return {
        "nodes": size, "keys": keys, "churn": churn,
        "first_contact_gone": float((~is_up[:, 0]).mean()),
        "first_contact_not_a_replica": float((~is_replica[:, 0]).mean()),
        "first_contact_not_the_primary": float((view[:, 0] != truth[:, 0]).mean()),
        "extra_hops_strict_mean": float(strict.mean()),
        "extra_hops_lenient_mean": float(lenient.mean()),
        "view_refresh_needed_strict": float((~is_replica.any(axis=1)).mean()),
        "view_refresh_needed_lenient": float((~is_up.any(axis=1)).mean()),
    }


def traced(build: Callable[[], T]) -> tuple[T, int]:
    """``build()`` and the bytes it left allocated (tracemalloc)."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        value = build()
        return value, tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()


def view_memory(size: int, seed: int) -> dict[str, Any]:
    """Part 5 at one ring size."""
    layout = LAYOUTS["zones"]

    def records() -> dict[bytes, NodeInfo]:
        view = {}
        for n in range(size):
            ident = node_id(seed, n)
            view[ident] = NodeInfo(
                request_id=0, node_id=ident, data_address=(f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}", 7401),
                kademlia_port=7400, metrics_port=7402, version="0.1.0", pages_stored=n * 1000,
                bytes_stored=n * 4096000, capacity_bytes=10 << 30)
        return view

    view, record_bytes = traced(records)
    ids = list(view)
    domains, domain_bytes = traced(lambda: [node_domain(layout, n) for n in range(size)])
    _, ring_v1_bytes = traced(lambda: Ring(ids, virtual_ids=1))
    _, ring_bytes = traced(lambda: Ring(ids))
    _, ring_domain_bytes = traced(lambda: Ring(ids, domains))
    tables = ConvergedTables(ids, seed)
    _, table_bytes = traced(lambda: tables.table(0))
    return {
        "nodes": size,
        "record_bytes_per_member": record_bytes / size,
        "domain_bytes_per_member": domain_bytes / size,
        "ring_v1_bytes_per_member": ring_v1_bytes / size,
        "virtual_ids": VIRTUAL_IDS,
        "ring_bytes_per_member": ring_bytes / size,
        "ring_with_domains_bytes_per_member": ring_domain_bytes / size,
        "view_bytes_per_member": (record_bytes + domain_bytes + ring_domain_bytes) / size,
        "kademlia_table_contacts": len(tables.contacts(0)),
        "kademlia_table_bytes": table_bytes,
    }


def print_table(title: str, header: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    print(f"\n{title}")
    widths = [max(10, len(h)) for h in header]
    print("  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True)))
    for row in rows:
        cells = [f"{c:.4g}" if isinstance(c, float) else str(c) for c in row]
        print("  ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True)))


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib  # noqa: PLC0415  (only the plot needs it)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ((moved, hops), (spread, vids)) = plt.subplots(2, 2, figsize=(13, 10))
    replicas = result["replicas"]
    sizes = sorted({r["nodes"] for r in result["movement"]})
    for name in MOVEMENT_LAYOUTS:
        rows = [r for r in result["movement"] if r["layout"] == name]
        for kind, marker in (("join", "o"), ("leave", "x")):
            shares = [statistics.mean(e["keys_changed_share"] for e in r["events"] if e["kind"] == kind) for r in rows]
            moved.plot([r["nodes"] for r in rows], shares, marker=marker, label=f"{name}, {kind}")
    moved.plot(sizes, [replicas / n for n in sizes], "k--", label="ideal R/N")
    moved.set(xscale="log", yscale="log", xlabel="nodes", ylabel="share of keys whose replica set changed",
              title=f"Keys moved per join/leave (R={replicas})")
    moved.legend(fontsize=7)
    rows = result["lookups"]
    churn = f"{result['churn']:.0%} churn"
    for key, label in (("closest, no churn", "k closest, no churn"), ("closest, churn", f"k closest, {churn}"),
                       ("package, churn", f"package's walk, {churn}")):
        hops.plot([r["nodes"] for r in rows], [r[key]["rounds_mean"] + 1 for r in rows], marker="o",
                  label=f"Kademlia lookup + GET ({label})")
    rows = result["one_hop"]
    hops.plot([r["nodes"] for r in rows], [1 + r["extra_hops_strict_mean"] for r in rows], marker="s",
              label=f"one hop, view {result['churn']:.0%} stale (strict)")
    hops.set(xscale="log", xlabel="nodes", ylabel="round trips to a page (mean)", ylim=(0, None),
             title="Lookup: iterative vs one hop")
    hops.legend(fontsize=7)
    for name in LAYOUTS:
        rows = [r for r in result["balance"] if r["layout"] == name]
        spread.plot([r["nodes"] for r in rows], [r["max_over_mean"] for r in rows], marker="o", label=name)
    spread.set(xscale="log", xlabel="nodes", ylabel="max / mean copies per node", title="Load balance")
    spread.legend(fontsize=7)
    for (name, size), rows in _groups(result["virtual_ids"]).items():
        vids.plot([r["virtual_ids"] for r in rows], [r["max_over_mean"] for r in rows], marker="o",
                  label=f"{size} nodes, {name}")
    vids.axhline(1.3, color="k", linestyle=":", label="1.3")
    vids.set(xscale="log", xlabel="virtual IDs per node", ylabel="max / mean copies per node",
             title="Balance against virtual IDs")
    vids.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _groups(rows: Iterable[dict[str, Any]]) -> dict[tuple[str, int], list[dict[str, Any]]]:
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["layout"], row["nodes"]), []).append(row)
    return groups


def run(sizes: Sequence[int], replicas: int, seed: int, keys_per_node: int, events: int,
        lookup_count: int, hop_keys: int, churn: float, sweep: tuple[Sequence[int], Sequence[int]]) -> dict[str, Any]:
    """Every part over every ring size; returns the JSON-able result."""
    result: dict[str, Any] = {"replicas": replicas, "seed": seed, "keys_per_node": keys_per_node,
                              "events": events, "churn": churn,
                              "layouts": {k: asdict(v) for k, v in LAYOUTS.items()},
                              "movement": [], "balance": [], "lookups": [], "one_hop": []}
    seconds: dict[str, float] = {}

    @contextmanager
    def timing(part: str) -> Iterator[None]:
        started = time.perf_counter()
        yield
        seconds[part] = seconds.get(part, 0.0) + time.perf_counter() - started

    for size in sizes:
        for name, layout in LAYOUTS.items():
            with timing("placement"):
                keys, before = base_placement(layout, size, replicas, seed, keys_per_node)
            result["balance"].append({"layout": name, "nodes": size, **balance(before, range(size))})
            if name in MOVEMENT_LAYOUTS:
                with timing("movement"):
                    result["movement"].append(movement(layout, size, replicas, seed, keys, before, events))
        with timing("lookups"):
            result["lookups"].append(lookups(size, replicas, seed, lookup_count, churn))
        with timing("one hop"):
            result["one_hop"].append(one_hop(size, replicas, seed, hop_keys, churn))
    with timing("virtual ids"):
        result["virtual_ids"] = virtual_id_sweep(*sweep, replicas, seed)
    with timing("memory"):
        result["view_memory"] = view_memory(max(sizes), seed)
    result["seconds_per_part"] = seconds
    return result


def report(result: dict[str, Any]) -> None:
    r = result["replicas"]
    print_table(f"1. Movement (R={r}, {result['keys_per_node']} grid keys per node, each event against the base ring)",
                ["layout", "nodes", "event", "keys moved", "ideal R/N", "ratio", "copies/key", "not minimal"],
                [(m["layout"], m["nodes"], e["kind"], e["keys_changed_share"], e["ideal_keys_share"],
                  e["keys_changed_share"] / e["ideal_keys_share"], e["copies_per_changed_key"], e["not_minimal"])
                 for m in result["movement"] for e in m["events"]])
    print_table("1'. Movement, mean over events: keys moved over the ideal R/N",
                ["layout", *[str(n) for n in sorted({m["nodes"] for m in result["movement"]})]],
                [(name, *[m["keys_changed_over_ideal"] for m in result["movement"] if m["layout"] == name])
                 for name in MOVEMENT_LAYOUTS])
    print_table("2. Balance (copies per physical node over the mean)",
                ["layout", "nodes", "max", "p99", "min", "cv"],
                [(b["layout"], b["nodes"], b["max_over_mean"], b["p99_over_mean"], b["min_over_mean"], b["cv"])
                 for b in result["balance"]])
    groups = _groups(result["virtual_ids"])
    print_table("2b. Balance against virtual IDs per node: max / mean copies per node (mean over draws, worst)",
                ["layout", "nodes", "draws", *[f"V={v['virtual_ids']}" for v in next(iter(groups.values()))]],
                [(name, size, rows[0]["draws"], *[f"{r['max_over_mean']:.3g} ({r['worst_max_over_mean']:.3g})" for r in rows])
                 for (name, size), rows in groups.items()])
    print_table("3. Iterative Kademlia lookup (k=20, alpha=3): rounds, rounds that met a timeout, RPCs, "
                "true R closest found, a gone node among the R returned, contacts per table",
                ["nodes", "answer, churn", "rounds", "p99", "timeouts", "rpcs", "found", "gone in R", "contacts"],
                [(k["nodes"], key, k[key]["rounds_mean"], k[key]["rounds_p99"],
                  k[key]["rounds_with_timeout_mean"], k[key]["rpcs_mean"], k[key]["found_true_replicas"],
                  k[key]["gone_node_in_result"], k["table_contacts_mean"])
                 for k in result["lookups"] for key in k if isinstance(k[key], dict)])
    print_table(f"4. One hop with a view missing {result['churn']:.0%} of changes (half gone, half new)",
                ["nodes", "1st gone", "1st no replica", "1st not primary", "extra strict", "extra lenient",
                 "refresh strict", "refresh lenient"],
                [(h["nodes"], h["first_contact_gone"], h["first_contact_not_a_replica"],
                  h["first_contact_not_the_primary"], h["extra_hops_strict_mean"],
                  h["extra_hops_lenient_mean"], h["view_refresh_needed_strict"], h["view_refresh_needed_lenient"])
                 for h in result["one_hop"]])
    v = result["view_memory"]
    print_table(f"5. Client view memory, bytes per member ({v['nodes']} members); one converged Kademlia table",
                ["record", "domain", "ring V=1", f"ring V={v['virtual_ids']}", "ring+domains", "view total",
                 "kad contacts", "kad table B"],
                [(v["record_bytes_per_member"], v["domain_bytes_per_member"], v["ring_v1_bytes_per_member"],
                  v["ring_bytes_per_member"],
                  v["ring_with_domains_bytes_per_member"], v["view_bytes_per_member"],
                  v["kademlia_table_contacts"], v["kademlia_table_bytes"])])
    print("\nseconds per part: " + ", ".join(f"{k} {v:.1f}" for k, v in result["seconds_per_part"].items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--nodes", default="100,300,1000,3000,10000")
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--keys-per-node", type=int, default=50, help="grid keys per node (movement, balance)")
    parser.add_argument("--events", type=int, default=6, help="joins and leaves (alternating) per layout and size")
    parser.add_argument("--lookups", type=int, default=100, help="lookups per size and variant")
    parser.add_argument("--hop-keys", type=int, default=100_000, help="random keys for the one-hop part")
    parser.add_argument("--churn", type=float, default=0.01, help="share of members changed and not yet seen")
    parser.add_argument("--sweep-nodes", default="32,1000", help="ring sizes of the virtual-ID sweep")
    parser.add_argument("--sweep-vids", default="1,2,4,8,16,32,64,128")
    parser.add_argument("--quick", action="store_true", help="100..1000 nodes, fewer keys, events and lookups")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/simulate.json")
    args = parser.parse_args()
    if args.quick:
        args.nodes, args.keys_per_node, args.events, args.lookups, args.hop_keys = "100,300,1000", 20, 2, 20, 20_000
        args.sweep_nodes, args.sweep_vids = "32", "1,4,16,64"
    sizes = [int(n) for n in args.nodes.split(",")]
    sweep = ([int(n) for n in args.sweep_nodes.split(",")], [int(v) for v in args.sweep_vids.split(",")])
    started, cpu = time.perf_counter(), time.process_time()
    result = run(sizes, args.replicas, args.seed, args.keys_per_node, args.events, args.lookups,
                 args.hop_keys, args.churn, sweep)
    result["seconds"] = time.perf_counter() - started
    result["cpu_seconds"] = time.process_time() - cpu
    result["machine"] = {"cpus": os.cpu_count(), "load_avg": os.getloadavg(), "python": sys.version.split()[0],
                         "platform": platform.platform(), "numpy": np.__version__}
    report(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{result['seconds']:.0f} s ({result['cpu_seconds']:.0f} s CPU); wrote {args.out}")
    if not args.no_plot:
        png = args.out.with_suffix(".png")
        plot(result, png)
        print(f"wrote {png}")


if __name__ == "__main__":
    main()
