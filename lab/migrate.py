"""Live migrations of lab guests: plain QEMU over TCP, or through ``tmdht qemu send/receive``.

Used by the demo (``tmdht demo``), the migration tests and ``bench/migrate.py``. The receiver is
started by the destination QEMU itself (``migrate-incoming "exec:tmdht qemu receive ..."``) and
announces its port-0 listener with one ``READY host:port`` line on a FIFO we create and block on.
"""

from __future__ import annotations

import json
import os
import select
import shlex
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tmdht.lab.errors import MigrationError
from tmdht.lab.guest import Guest, GuestSpec, MigrationStats
from tmdht.lab.host import HostTools
from tmdht.launch import tmdht_argv

__all__ = [
    "MigrationOutcome",
    "make_fifo",
    "migrate_guest",
    "read_ready",
    "tmdht_command",
    "wait_report",
]


def tmdht_command(*args: str | Path) -> str:
    """A shell command line running ``tmdht ARGS`` with this interpreter (for ``exec:``); QEMU
    runs it in its own working folder, which must not decide what the proxy imports."""
    return shlex.join(tmdht_argv(*args))


def make_fifo(path: Path) -> Path:
    """A FIFO only we may open."""
    os.mkfifo(path, 0o600)
    return path


def read_ready(fifo: Path, timeout: float) -> tuple[str, int]:
    """Block until the receiver wrote ``READY host:port`` to ``fifo`` (bounded by ``timeout``)."""
    deadline = time.monotonic() + timeout
    fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # no writer yet: not readable, no HUP
    try:
        data = b""
        for _ in range(10_000):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            ready, _, _ = select.select([fd], [], [], remaining)
            if not ready:
                continue
            chunk = os.read(fd, 4096)
            data += chunk
            if b"\n" in data or not chunk:
                break
        line = data.decode().strip()
        if not line.startswith("READY "):
            raise MigrationError(f"receiver did not get ready within {timeout} s: {line!r}")
        host, _, port = line[len("READY ") :].rpartition(":")
        return host, int(port)
    finally:
        os.close(fd)


def wait_report(path: Path, timeout: float) -> dict[str, Any]:
    """The JSON report a proxy writes when it finishes (polled, bounded: it is QEMU's child)."""
    deadline = time.monotonic() + timeout
    for _ in range(100_000):
        if path.exists():
            doc: dict[str, Any] = json.loads(path.read_text())
            return doc
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)  # a poll interval: the proxy is QEMU's child, not ours to wait for
    raise MigrationError(f"{path.name} not written within {timeout} s")


@dataclass(frozen=True)
class MigrationOutcome:
    """What one live migration did."""

    method: str
    """``plain`` or ``tmdht``."""
    stats: MigrationStats
    """The source QEMU's figures (total time, downtime, RAM bytes transferred)."""
    wire_bytes: int
    """Bytes that crossed the migration connection (for tmdht: the dedup stream both ways)."""
    qemu_bytes: int
    """Bytes QEMU produced (for plain: RAM transferred)."""
    resumed_counter: int
    """A counter value the destination printed after resuming (proof it runs)."""
    last_source_counter: int
    """The source's last counter before switch-over."""
    send_report: dict[str, Any] | None = None
    """The sender's report (tmdht only)."""
    receive_report: dict[str, Any] | None = None
    """The receiver's report (tmdht only)."""


def migrate_guest(
    spec: GuestSpec,
    *,
    tools: HostTools,
    initramfs: Path,
    method: str,
    seed: tuple[str, int] | None = None,
    key_file: Path | None = None,
    catalog: Path | None = None,
    warmup_counter: int = 3,
    max_bandwidth: int = 1 << 30,
    timeout: float = 180.0,
) -> MigrationOutcome:
    """Boot ``spec``, run it a few seconds, live-migrate it to a fresh QEMU, check it resumes."""
    if method not in ("plain", "tmdht"):
        raise MigrationError(f"unknown migration method {method!r}")
    with tempfile.TemporaryDirectory(prefix="tmdht-migrate-") as tmp_dir:
        tmp = Path(tmp_dir)
        with (
            Guest(spec, tools=tools, initramfs=initramfs) as source,
            Guest(spec, incoming="defer", tools=tools, initramfs=initramfs) as dest,
        ):
            source.wait_counter(warmup_counter, timeout=timeout)
            source.set_migration_parameters(max_bandwidth=max_bandwidth, downtime_limit=300)
            send_report = receive_report = None
            if method == "plain":
                dest.migrate_incoming("tcp:127.0.0.1:0")
                source.migrate(f"tcp:127.0.0.1:{dest.incoming_tcp_port()}")
            else:
                if seed is None or key_file is None or catalog is None:
                    raise MigrationError("a tmdht migration needs a seed, a key file and a catalog")
                # QEMU runs exec: commands from its own working directory: absolute paths only.
                key_file, catalog = key_file.resolve(), catalog.resolve()
                fifo = make_fifo(tmp / "ready.fifo")
                receive_report = tmp / "receive.json"
                send_report = tmp / "send.json"
                receive: list[str | Path] = [
                    "qemu", "receive", "--listen", "127.0.0.1:0",
                    "--seed", f"{seed[0]}:{seed[1]}", "--cluster-key-file", key_file,
                    "--catalog", catalog, "--ready-file", fifo, "--report", receive_report,
                    "--accept-timeout", "60",
                ]  # fmt: skip
                dest.migrate_incoming("exec:" + tmdht_command(*receive))
                _host, port = read_ready(fifo, timeout=60)
                send: list[str | Path] = [
                    "qemu", "send", "--catalog", catalog, "--to", f"127.0.0.1:{port}",
                    "--report", send_report,
                ]  # fmt: skip
                source.migrate("exec:" + tmdht_command(*send))
            stats = source.wait_migration(timeout=timeout)
            if stats.status != "completed":
                raise MigrationError(f"{method} migration ended {stats.status}")
            dest.wait_migration(timeout=60)
            last = source.counter or 0
            resumed = dest.wait_counter(last + 1, timeout=60)
            sent = wait_report(send_report, 30) if send_report else None
            received = wait_report(receive_report, 30) if receive_report else None
        if sent is not None and received is not None:
            wire = int(sent["wan_bytes"])
            qemu = int(sent["counts"]["qemu_bytes"])
        else:
            wire = qemu = int(stats.transferred_bytes or 0)
        return MigrationOutcome(method, stats, wire, qemu, resumed, last, sent, received)
