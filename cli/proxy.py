"""Running one migration proxy process, without click (what ``tmdht qemu send`` and ``receive``
do once their options are parsed).

The sender runs as QEMU's ``exec:`` migration command, and QEMU's stream waits until it reads:
nothing here imports click, rich, numpy or prometheus_client unless asked for (``--progress``,
``--metrics-port``). :mod:`tmdht.cli.fastpath` parses ``qemu send``'s options without click and
calls :func:`run_proxy` directly; the click commands in :mod:`tmdht.cli.qemu` call it too.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

__all__ = ["progress_bar", "run_async", "run_proxy", "setup_logging"]

log = logging.getLogger("tmdht.cli")


def run_async(main: Coroutine[Any, Any, T], loop: str = "uvloop") -> T:
    """Run a command's coroutine on uvloop, every tmdht process's event loop, unless ``loop`` is
    ``"asyncio"`` (bench/node.py measures one against the other) or uvloop is not installed."""
    if loop == "uvloop":
        try:
            import uvloop  # noqa: PLC0415
        except ImportError:
            log.warning("uvloop is not installed; using asyncio's event loop")
        else:
            return uvloop.run(main)
    import asyncio  # noqa: PLC0415 - the sender runs without an event loop

    return asyncio.run(main)


def setup_logging(level: str) -> None:
    """Log lines on stderr (stdout may carry QEMU's stream)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("kademlia", "rpcudp"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@contextmanager
def progress_bar(enabled: bool, description: str) -> Iterator[Callable[..., None]]:
    """A live bar of QEMU bytes on stderr; yields ``update(done, total)``."""
    if not enabled:
        yield lambda done, total=None: None
        return
    from rich.progress import (  # noqa: PLC0415 - only when asked for
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TransferSpeedColumn,
    )

    from tmdht.cli.main import stderr  # noqa: PLC0415

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(),
                  TransferSpeedColumn(), console=stderr, transient=False) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int | None = None) -> None:
            bar.update(task, completed=done, total=max(total, done) if total else None)

        yield update


def run_proxy(role: str, progress: bool, metrics_port: int | None, report_path: Path | None,
              start: Callable[[Any, Callable[..., None]], Any], *,
              run_in_loop: bool = True) -> None:
    """Run one proxy, ``start(metrics, on_progress)``, with its metrics server (if a port is
    given; else ``metrics`` is None) and progress bar; write its report (a failure's too) to
    ``report_path``. ``start`` returns the report, or with ``run_in_loop`` a coroutine that
    does (run on uvloop). Raises MigrationFailed."""
    from tmdht.client.migration import (  # noqa: PLC0415 - IO stack on demand
        MigrationFailed,
        MigrationMetrics,
        MigrationReport,
        save_report,
        serve_metrics,
        write_report,
    )

    metrics = MigrationMetrics() if metrics_port is not None else None
    server = serve_metrics(metrics_port, metrics) if metrics_port is not None and metrics else None
    try:
        with progress_bar(progress, role) as update:
            try:
                report = (run_async(start(metrics, update)) if run_in_loop
                          else start(metrics, update))
            except MigrationFailed as exc:
                failed = exc.report or MigrationReport(role, ok=False, error=str(exc))
                if failed.counts.qemu_bytes:  # how far it got; else the error line says it all
                    write_report(failed, report_path)
                else:
                    save_report(failed, report_path)
                raise
        write_report(report, report_path)
    finally:
        if server is not None:
            server.shutdown()
            server.server_close()
