"""A service's HTTP endpoint: Prometheus ``/metrics``, liveness ``/healthz``, readiness
``/readyz`` (the store node's and the vnet agent's).

prometheus-client's WSGI app behind a small router, served by its threading WSGI server on a
thread the service owns and shuts down.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

__all__ = ["HealthServer"]

log = logging.getLogger("tmdht.aio.http")


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http: " + format, *args)


class HealthServer:
    """Serves /metrics from ``registry`` and health from ``health()`` -> (ready, details)."""

    def __init__(
        self,
        host: str,
        port: int,
        registry: CollectorRegistry,
        health: Callable[[], tuple[bool, dict[str, object]]],
    ) -> None:
        metrics_app = make_wsgi_app(registry)

        def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
            path = environ.get("PATH_INFO", "")
            if path in ("/healthz", "/readyz"):
                ready, details = health()
                ok = ready or path == "/healthz"  # alive as long as the process answers
                body = json.dumps(
                    {"status": "ok" if ok else "unavailable", "ready": ready, **details}
                ).encode()
                start_response(
                    "200 OK" if ok else "503 Service Unavailable",
                    [("Content-Type", "application/json"), ("Content-Length", str(len(body)))],
                )
                return [body]
            if path in ("/metrics", "/"):
                return metrics_app(environ, start_response)  # type: ignore[no-any-return]
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found\n"]

        self._server = make_server(
            host, port, app, ThreadingWSGIServer, handler_class=_QuietHandler
        )
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="tmdht-http", daemon=True
        )

    @property
    def port(self) -> int:
        """The bound port."""
        return int(self._server.server_port)

    def start(self) -> None:
        """Serve on the owned thread."""
        self._thread.start()

    def close(self) -> None:
        """Stop serving and join the thread."""
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join(timeout=5)
        self._server.server_close()
