"""Why a seed is silent: nothing there, or a node with another cluster key (client/probe.py)."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, HTTPServer

from tmdht.client.probe import SeedProbe, UdpVerdict, explain_silence, probe_seed


def closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


class Healthz(BaseHTTPRequestHandler):
    node_id = "ab" * 20

    def do_GET(self) -> None:
        body = json.dumps({"status": "ok", "ready": True, "node_id": self.node_id}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@contextmanager
def silent_node_with_metrics() -> Iterator[int]:
    """A bound UDP port that never answers (a node with another key) and, two ports up, a
    /healthz that names a node (its metrics port in the default layout); yields the UDP port."""
    for _ in range(50):  # bounded: find a port P whose P+2 is free on TCP
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind(("127.0.0.1", 0))
        port = udp.getsockname()[1]
        try:
            server = HTTPServer(("127.0.0.1", port + 2), Healthz)
        except OSError:
            udp.close()
            continue
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield port
        finally:
            server.shutdown()
            server.server_close()
            thread.join(timeout=10)
            udp.close()
        return
    raise AssertionError("no free pair of ports found")


def test_nothing_listening_is_refused() -> None:
    port = closed_port()
    probe = probe_seed("127.0.0.1", port)
    assert probe.udp is UdpVerdict.REFUSED and probe.metrics_port is None
    assert probe.explain() == (
        f"nothing listens at 127.0.0.1:{port} (connection refused): no node runs there"
    )


def test_a_bound_silent_port_on_loopback_points_at_the_key() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind(("127.0.0.1", 0))
        port = udp.getsockname()[1]
        probe = probe_seed("127.0.0.1", port, timeout=0.2)
    assert probe.udp is UdpVerdict.SILENT
    assert "is bound but does not answer: most likely a node with a different cluster key" in (
        probe.explain()
    )


def test_a_node_answering_on_its_metrics_port_has_another_key() -> None:
    with silent_node_with_metrics() as port:
        message = explain_silence([("127.0.0.1", port)], timeout=0.2)
    assert message == (
        f"no store node answered: 127.0.0.1:{port} does not answer, but the tmdht node "
        f"{'ab' * 8} answers on its metrics port 127.0.0.1:{port + 2}: it drops our datagrams, "
        "so it has a different cluster key"
    )


def test_a_silent_remote_seed_lists_every_cause_and_only_three_seeds_are_probed() -> None:
    remote = SeedProbe("10.1.2.3", 7400, UdpVerdict.SILENT)
    assert remote.explain() == (
        "no answer from 10.1.2.3:7400: nothing listening, unreachable, or a different cluster key"
    )
    ports = [closed_port() for _ in range(5)]
    message = explain_silence([("127.0.0.1", p) for p in ports], timeout=0.2)
    assert message.count("nothing listens at") == 3 and message.endswith(
        "; 2 more seeds not probed"
    )
