"""Why no node answered: probes a client runs once its seeds stayed silent.

A node drops every datagram it cannot authenticate without a word (by design: an answer would
tell an attacker something and could be abused to amplify floods), so to the overlay a cluster
with another key looks exactly like no cluster at all. Two cheap probes tell them apart where the
network allows, and :func:`explain_silence` turns them into one line for the error:

- **UDP**: a datagram through a *connected* socket to the seed. If nothing is bound to that port
  the host answers ICMP port-unreachable, which the kernel reports as ``ECONNREFUSED``: nothing
  listens there. Certain on loopback (no ICMP rate limit) and on most LANs; a firewall may
  swallow the ICMP, and then the port only looks silent.
- **HTTP**: ``GET /healthz`` on the node's metrics port, which answers without any key. Only the
  default port layout (Kademlia, data, metrics = P, P+1, P+2, as 7400/7401/7402) says where that
  is, so ``P+2`` is tried, and the answer counts only if it names a node id.

Blocking (sockets with timeouts): call it from a thread in asyncio code.
"""

from __future__ import annotations

import errno
import json
import socket
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

__all__ = [
    "SeedProbe",
    "UdpVerdict",
    "explain_silence",
    "probe_metrics",
    "probe_seed",
    "probe_udp",
]

METRICS_PORT_OFFSET = 2
"""Where the default layout puts the metrics port: Kademlia port + 2 (7400 -> 7402)."""


class UdpVerdict(Enum):
    """What a UDP datagram to a seed told."""

    REFUSED = "refused"
    """The host said nothing listens on that port (ICMP port unreachable)."""
    SILENT = "silent"
    """No answer and no refusal: something drops the datagrams (a node with another cluster
    key, a firewall) or the host is unreachable."""
    UNRESOLVED = "unresolved"
    """The host name does not resolve, or the network is unreachable."""


@dataclass(frozen=True, slots=True)
class SeedProbe:
    """What the probes found about one seed."""

    host: str
    """The seed's host, as given."""
    port: int
    """The seed's Kademlia port."""
    udp: UdpVerdict
    """The UDP probe's verdict."""
    error: str = ""
    """Why the host could not be tried (``UNRESOLVED``)."""
    metrics_port: int | None = None
    """A port where a tmdht node answered /healthz (None: none found)."""
    node_id: str = ""
    """The node id that port gave."""

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def explain(self) -> str:
        """One clause: what is (not) at this seed and what that means."""
        if self.metrics_port is not None:
            return (
                f"{self.address} does not answer, but the tmdht node {self.node_id[:16]} "
                f"answers on its metrics port {self.host}:{self.metrics_port}: it drops our "
                "datagrams, so it has a different cluster key"
            )
        if self.udp is UdpVerdict.REFUSED:
            return f"nothing listens at {self.address} (connection refused): no node runs there"
        if self.udp is UdpVerdict.UNRESOLVED:
            return f"{self.address}: {self.error}"
        if _is_loopback(self.host):
            return (
                f"{self.address} is bound but does not answer: most likely a node with a "
                "different cluster key (nodes drop datagrams they cannot authenticate)"
            )
        return (
            f"no answer from {self.address}: nothing listening, unreachable, or a different "
            "cluster key"
        )


def probe_udp(host: str, port: int, timeout: float = 0.5) -> tuple[UdpVerdict, str]:
    """Send two empty datagrams to ``host:port`` through a connected socket and see whether the
    host refuses them (nothing bound there) within ``timeout`` seconds."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except OSError as exc:
        return UdpVerdict.UNRESOLVED, f"cannot resolve {host!r} ({exc.strerror or exc})"
    family, kind, proto, _name, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.settimeout(timeout / 2)
        try:
            sock.connect(address)
            for _ in range(2):  # the first refusal may arrive after the first recv times out
                sock.send(b"")
                try:
                    sock.recv(1)
                except TimeoutError:
                    continue
        except ConnectionRefusedError:
            return UdpVerdict.REFUSED, ""
        except OSError as exc:
            if exc.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH):
                return UdpVerdict.UNRESOLVED, exc.strerror or str(exc)
            return UdpVerdict.SILENT, ""
    return UdpVerdict.SILENT, ""


def probe_metrics(host: str, port: int, timeout: float = 1.0) -> str | None:
    """The node id a tmdht node's ``/healthz`` at ``host:port`` gives, or None."""
    url = f"http://{host}:{port}/healthz" if ":" not in host else f"http://[{host}]:{port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            doc = json.loads(response.read(65536))
    except (OSError, ValueError, urllib.error.URLError):
        return None
    node_id = doc.get("node_id") if isinstance(doc, dict) else None
    return node_id if isinstance(node_id, str) and node_id else None


def probe_seed(host: str, port: int, timeout: float = 0.5) -> SeedProbe:
    """Both probes on one seed."""
    verdict, error = probe_udp(host, port, timeout)
    if verdict is not UdpVerdict.SILENT:  # refused: nothing there, whatever answers elsewhere
        return SeedProbe(host, port, verdict, error)
    metrics_port = port + METRICS_PORT_OFFSET
    node_id = probe_metrics(host, metrics_port, 2 * timeout) if metrics_port < 65536 else None
    if node_id is None:
        return SeedProbe(host, port, verdict)
    return SeedProbe(host, port, verdict, metrics_port=metrics_port, node_id=node_id)


def explain_silence(
    seeds: Sequence[tuple[str, int]], *, timeout: float = 0.5, limit: int = 3
) -> str:
    """One line saying why no node answered at ``seeds`` (the first ``limit`` are probed)."""
    probes = [probe_seed(host, port, timeout) for host, port in seeds[:limit]]
    more = f"; {len(seeds) - limit} more seeds not probed" if len(seeds) > limit else ""
    return "no store node answered: " + "; ".join(p.explain() for p in probes) + more


def _is_loopback(host: str) -> bool:
    return host == "localhost" or host.startswith("127.") or host == "::1"
