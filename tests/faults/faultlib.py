"""Fault injection for tests with real node processes: packet-dropping partitions (nftables),
tmpfs data directories, and the waits the fault tests share."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path

from support.cluster import eventually, expected_replicas, holders

from tmdht.aio.dataplane import DataPlaneClient
from tmdht.node.local import LocalCluster

_SS_LINE = re.compile(r"^\S+\s+\d+\s+\d+\s+\S*:(\d+)\s+.*pid=(\d+),")


def udp_ports(pids: Iterable[int]) -> set[int]:
    """Every UDP port bound by these processes (kademlia, data plane, replication client)."""
    wanted = set(pids)
    out = subprocess.run(["ss", "-Huanp"], capture_output=True, text=True, check=True).stdout
    ports = set()
    for line in out.splitlines():
        match = _SS_LINE.match(line)
        if match and int(match.group(2)) in wanted:
            ports.add(int(match.group(1)))
    return ports


class Partition:
    """Cut a group of processes off from every other UDP endpoint on this host (nftables).

    Loopback traffic passes the output hook once: a datagram *from* one of the group's ports to
    a port outside it, or the other way round, is dropped. The group still talks among itself.
    HTTP (metrics) is TCP and stays reachable, so tests can watch both sides.
    """

    def __init__(self, pids: Iterable[int]) -> None:
        nft = shutil.which("nft")
        assert nft, "nftables is missing: scripts/setup.sh installs it"
        self.nft = nft
        self.ports = udp_ports(pids)
        assert self.ports, "the partitioned processes have no UDP ports"
        self.table = f"tmdht_faults_{os.getpid()}"
        self.active = False

    def _run(self, script: str) -> None:
        subprocess.run([self.nft, "-f", "-"], input=script, text=True, check=True)

    def cut(self) -> None:
        ports = ", ".join(str(p) for p in sorted(self.ports))
        self._run(
            f"""
            table inet {self.table} {{
                set cut {{ type inet_service; elements = {{ {ports} }} }}
                chain output {{
                    type filter hook output priority 0; policy accept;
                    udp sport @cut udp dport != @cut drop
                    udp dport @cut udp sport != @cut drop
                }}
            }}
            """
        )
        self.active = True

    def heal(self) -> None:
        if self.active:
            self._run(f"delete table inet {self.table}")
            self.active = False

    def __enter__(self) -> Partition:
        self.cut()
        return self

    def __exit__(self, *exc: object) -> None:
        self.heal()


class Tmpfs:
    """A small tmpfs mounted on ``path`` (a full disk on demand); unmounted on exit."""

    def __init__(self, path: Path, size: str) -> None:
        self.path = path
        self.size = size

    def __enter__(self) -> Tmpfs:
        self.path.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={self.size}", "tmpfs", str(self.path)],
            check=True,
        )
        return self

    def __exit__(self, *exc: object) -> None:
        subprocess.run(["umount", "-l", str(self.path)], check=False)


async def placed(
    client: DataPlaneClient,
    cluster: LocalCluster,
    digests: list[bytes],
    live: list[int],
    timeout: float,
    r: int = 3,
) -> float:
    """Wait until every digest is on exactly its R closest live nodes; returns the seconds."""
    want = expected_replicas(cluster, digests, live, r)
    started = time.monotonic()
    last: dict[str, int] = {}

    async def check() -> bool:
        got = await holders(client, cluster, digests, live)
        wrong = [d for d in digests if got[d] != want[d]]
        last["wrong"] = len(wrong)
        return not wrong

    await eventually(
        check, timeout, f"{len(digests)} pages on their {r} closest of {live} ({last})"
    )
    return time.monotonic() - started
