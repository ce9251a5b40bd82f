"""tmdht.aio.system: systemd's readiness protocol, the open-files limit, socket buffer grants
(and the node process using them), and the replication job's log level."""

from __future__ import annotations

import logging
import os
import resource
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tmdht.aio.system import (
    OPEN_FILES_WANTED,
    BufferGrant,
    buffer_grants,
    notify_supervisor,
    raise_open_files_limit,
)
from tmdht.node.local import read_ready_line
from tmdht.node.replication import SweepReport, sweep_log_level


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(60)  # a bound on a blocking receive, not a sleep
    yield sock
    sock.close()


def test_notify_sends_one_datagram_to_the_socket(notify_socket: socket.socket) -> None:
    env = {"NOTIFY_SOCKET": notify_socket.getsockname()}
    assert notify_supervisor("READY=1\nSTATUS=serving", env)
    assert notify_socket.recv(4096) == b"READY=1\nSTATUS=serving"


def test_notify_reaches_an_abstract_socket() -> None:
    name = f"tmdht-deploy-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(60)
        assert notify_supervisor("STOPPING=1", {"NOTIFY_SOCKET": "@" + name})
        assert sock.recv(4096) == b"STOPPING=1"


def test_notify_without_a_supervisor_does_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert not notify_supervisor("READY=1", {})
    with caplog.at_level(logging.WARNING, "tmdht.node"):
        assert not notify_supervisor("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "absent")})
        assert not notify_supervisor("READY=1", {"NOTIFY_SOCKET": "relative/path"})
    assert len(caplog.records) == 2  # each failure is said once; none raises


def test_buffer_grants_compare_what_linux_granted_with_what_was_asked() -> None:
    if sys.platform != "linux":
        pytest.skip("Linux reports twice the granted size; other systems differ")
    mib = 1 << 20
    # 16 MiB asked under a 4 MiB rmem_max: getsockopt reports 8 MiB, 4 MiB were granted.
    assert buffer_grants("data", 16 * mib, (8 * mib, 8 * mib)) == [
        BufferGrant("data", "receive", 16 * mib, 4 * mib),
        BufferGrant("data", "send", 16 * mib, 4 * mib),
    ]
    assert all(g.short for g in buffer_grants("data", 16 * mib, (8 * mib, 8 * mib)))
    assert not any(g.short for g in buffer_grants("kademlia", 4 * mib, (8 * mib, 8 * mib)))
    assert not any(g.short for g in buffer_grants("kademlia", 0, (212992, 212992)))


def test_sweeps_with_nothing_to_do_log_at_debug() -> None:
    idle = SweepReport(examined=100, complete=True)
    assert sweep_log_level(idle, None) == logging.INFO  # the first one says the job runs
    assert sweep_log_level(idle, idle) == logging.DEBUG
    assert sweep_log_level(SweepReport(copied=3), idle) == logging.INFO
    assert sweep_log_level(SweepReport(dropped=1), idle) == logging.INFO
    short = SweepReport(under_replicated=5)
    assert sweep_log_level(short, idle) == logging.INFO  # a change is news
    assert sweep_log_level(short, short) == logging.DEBUG  # the same shortfall again is not


def test_node_process_raises_its_limit_and_tells_systemd_when_ready_and_stopping(
    tmp_path: Path, notify_socket: socket.socket
) -> None:
    """A real `tmdht node run` under a hard open-files limit below what it wants and with
    $NOTIFY_SOCKET set, as systemd runs it: it starts anyway with a warning, its soft limit is
    raised to the hard one, READY=1 arrives once /readyz answers 200, STOPPING=1 on SIGTERM."""
    key = tmp_path / "cluster.key"
    key.write_text(os.urandom(32).hex() + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TMDHT_")}
    env["NOTIFY_SOCKET"] = notify_socket.getsockname()
    log = tmp_path / "node.log"
    with log.open("wb") as stderr:
        proc = subprocess.Popen(
            ["prlimit", "--nofile=256:4096", "--",
             sys.executable, "-m", "tmdht.cli", "node", "run", "--data-dir", str(tmp_path / "data"),
             "--cluster-key-file", str(key), "--kademlia-port", "0", "--data-port", "0",
             "--metrics-port", "0", "--log-format", "text", "--ready-line"],
            stdout=subprocess.PIPE, stderr=stderr, env=env,
        )  # fmt: skip
    try:
        status = read_ready_line(proc, 60, "node")
        ready = notify_socket.recv(4096).decode()
        assert ready.startswith("READY=1\nSTATUS=serving as "), ready
        url = f"http://127.0.0.1:{status['metrics'][1]}/readyz"
        with urllib.request.urlopen(url, timeout=10) as response:
            assert response.status == 200
        limits = Path(f"/proc/{proc.pid}/limits").read_text()
        assert any(
            line.startswith("Max open files") and line.split()[3:5] == ["4096", "4096"]
            for line in limits.splitlines()
        ), limits
        proc.send_signal(signal.SIGTERM)
        assert notify_socket.recv(4096).decode().startswith("STOPPING=1")
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        assert proc.stdout is not None
        proc.stdout.close()
    text = log.read_text()
    assert f"open files limit is 4096 (hard limit 4096), below the {OPEN_FILES_WANTED}" in text


def test_raising_the_open_files_limit_never_lowers_it() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert raise_open_files_limit(1) == (soft, hard)  # already above: left alone
    after = raise_open_files_limit()
    assert after[1] == hard and after[0] >= soft
