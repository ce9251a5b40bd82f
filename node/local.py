"""A local cluster of store nodes as separate processes: ``tmdht cluster up``, tests, benchmarks.

Each node is ``python -P -m tmdht.cli node run ... --ready-line`` (:func:`tmdht.launch.tmdht_argv`:
the current folder cannot shadow the package) with its own data directory under
the cluster directory, ports chosen by the kernel (port 0), and the first node as seed. A node
prints one ``READY {json}`` line on stdout once it serves; the cluster blocks on that pipe (with a
deadline) instead of polling. Processes are ended by PID: SIGTERM, a bounded wait, then SIGKILL.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from tmdht.domains import FailureDomain
from tmdht.launch import tmdht_argv
from tmdht.node.errors import ClusterError

__all__ = [
    "READY_PREFIX",
    "ClusterError",
    "LocalCluster",
    "NodeProcess",
    "describe_exit_code",
    "last_log_line",
    "read_ready_line",
]

READY_PREFIX = "READY "


def read_ready_line(
    proc: subprocess.Popen[bytes], timeout: float, what: str, log_path: Path | None = None
) -> dict[str, Any]:
    """Block until ``proc`` prints its READY line (or exits, or the deadline passes).

    The error when it exits first or never gets ready names its log (``log_path``, where its
    stderr goes) and the log's last line: the reason is nearly always there.
    """
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    buffered = b""
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        for _ in range(100_000):  # bounded: each round reads at least one byte or times out
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ClusterError(
                    f"{what} did not become ready within {timeout:.0f} s{_log_note(log_path)}"
                )
            if not sel.select(remaining):
                continue
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                proc.wait(timeout=5)
                raise ClusterError(
                    f"{what} {describe_exit_code(proc.returncode)} before it was ready"
                    f"{_log_note(log_path)}"
                )
            buffered += chunk
            while b"\n" in buffered:
                line, buffered = buffered.split(b"\n", 1)
                text = line.decode(errors="replace")
                if text.startswith(READY_PREFIX):
                    status: dict[str, Any] = json.loads(text[len(READY_PREFIX) :])
                    return status
    raise ClusterError(f"{what}: no READY line{_log_note(log_path)}")


def describe_exit_code(code: int | None) -> str:
    """'exited with code 1', 'was killed by SIGKILL' (a Popen returncode)."""
    if code is None:
        return "is still running"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name}"
    return f"exited with code {code}"


def last_log_line(path: Path, max_bytes: int = 16384) -> str | None:
    """The last non-empty line of a node's log, for an error message; None if there is none.

    JSON log lines (the node's default format) give their message and the last line of their
    exception: ``"node failed: ... | ImportError: ..."``. A traceback's last line is the error.
    """
    try:
        with path.open("rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - max_bytes))
            tail = f.read().decode(errors="replace")
    except OSError:
        return None
    lines = [line.strip() for line in tail.splitlines() if line.strip()]
    if not lines:
        return None
    line = lines[-1]
    try:
        doc = json.loads(line)
    except ValueError:
        return line
    if not isinstance(doc, dict) or "msg" not in doc:
        return line
    exc = str(doc.get("exc") or "").strip().splitlines()
    return f"{doc['msg']}" + (f" | {exc[-1].strip()}" if exc else "")


def _log_note(log_path: Path | None) -> str:
    if log_path is None:
        return ""
    last = last_log_line(log_path)
    return f"; log {log_path}" + (f" ends: {last}" if last else " is empty")


@dataclass
class NodeProcess:
    """One node process of a local cluster."""

    index: int
    data_dir: Path
    args: list[str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    status: dict[str, Any] = field(default_factory=dict)
    _log: IO[bytes] | None = None
    exit_reported: bool = False
    """:meth:`LocalCluster.wait_for_exit` returned this process's exit already."""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def address(self, plane: str) -> tuple[str, int]:
        """(host, port) of 'kademlia', 'data' or 'metrics'."""
        host, port = self.status[plane]
        return str(host), int(port)

    @property
    def node_id(self) -> bytes:
        return bytes.fromhex(self.status["node_id"])


class LocalCluster:
    """N node processes on loopback. Use as a context manager, or :meth:`start` / :meth:`stop`."""

    def __init__(
        self,
        root: Path,
        nodes: int,
        *,
        replicas: int = 3,
        host: str = "127.0.0.1",
        open_mode: bool = False,
        extra_args: list[str] | None = None,
        ready_timeout: float = 60.0,
        python: str = sys.executable,
        domains: Sequence[FailureDomain] | None = None,
    ) -> None:
        """``domains[i % len(domains)]`` is node i's failure domain (default: the machine's)."""
        if nodes < 1:
            raise ClusterError("a cluster needs at least one node")
        self.root = Path(root)
        self.count = nodes
        self.replicas = replicas
        self.host = host
        self.open_mode = open_mode
        self.extra_args = list(extra_args or [])
        self.ready_timeout = ready_timeout
        self.python = python
        self.domains = list(domains or [])
        self.key_file = self.root / "cluster.key"
        self.nodes: list[NodeProcess] = []

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- lifecycle ---------------------------------------------------------------------------

    def ensure_key(self) -> Path:
        """Create the cluster key file (0600) if there is none."""
        self.root.mkdir(parents=True, exist_ok=True)
        if not self.key_file.exists():
            fd = os.open(self.key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32) + "\n")
        return self.key_file

    def start(self) -> None:
        """Start every node (the first one is everyone's seed) and wait until all are ready."""
        if not self.open_mode:
            self.ensure_key()
        try:
            for i in range(self.count):
                node = self._make(i)
                self.nodes.append(node)
                self._launch(node)
            self.write_manifest()
        except BaseException:
            self.stop()
            raise

    @property
    def seed(self) -> tuple[str, int]:
        """Kademlia address of the first running node."""
        for node in self.nodes:
            if node.running and node.status:
                return node.address("kademlia")
        raise ClusterError("no node is running")

    def _make(self, index: int) -> NodeProcess:
        data_dir = self.root / f"node-{index}"
        args = tmdht_argv(
            "node", "run",
            "--data-dir", data_dir,
            "--host", self.host,
            "--kademlia-port", "0", "--data-port", "0", "--metrics-port", "0",
            "--replicas", str(self.replicas),
            "--ready-line",
            python=self.python,
        )  # fmt: skip
        if self.domains:
            domain = self.domains[index % len(self.domains)]
            args += ["--zone", domain.zone, "--rack", domain.rack, "--host-label", domain.host]
        if self.open_mode:
            args.append("--insecure-open")
        else:
            args += ["--cluster-key-file", str(self.key_file)]
        args += ["--seed", "{seed}"]  # resolved at launch: none for the very first node
        return NodeProcess(index, data_dir, args + self.extra_args, self.root / f"node-{index}.log")

    def _launch(self, node: NodeProcess) -> None:
        args = list(node.args)
        # Seed: the first other running node (a restarted first node rejoins through another).
        others = [n for n in self.nodes if n is not node and n.running and n.status]
        at = args.index("--seed")
        if others:
            args[at + 1] = "{}:{}".format(*others[0].address("kademlia"))
        else:
            del args[at : at + 2]
        node.data_dir.mkdir(parents=True, exist_ok=True)
        node._log = node.log_path.open("ab")
        env = {k: v for k, v in os.environ.items() if not k.startswith("TMDHT_")}
        node.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=node._log, env=env)
        node.exit_reported = False
        try:
            node.status = read_ready_line(
                node.proc, self.ready_timeout, f"node {node.index}", node.log_path
            )
        except ClusterError:
            self.stop_node(node.index)  # never ready: stopped (if it still runs) and reaped
            node.exit_reported = True  # the error says how it ended
            raise

    def stop_node(
        self, index: int, *, sig: int = signal.SIGTERM, timeout: float = 20.0
    ) -> int | None:
        """Stop one node by PID (SIGTERM, then SIGKILL after ``timeout``); returns its exit code."""
        node = self.nodes[index]
        if node.proc is None:
            return None
        if node.proc.poll() is None:
            node.proc.send_signal(sig)
            try:
                node.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                node.proc.kill()
                node.proc.wait(timeout=10)
        if node.proc.stdout is not None:
            node.proc.stdout.close()
        if node._log is not None:
            node._log.close()
            node._log = None
        return node.proc.returncode

    def wait_for_exit(self, timeout: float | None = None) -> list[NodeProcess]:
        """Block until a node exits (or ``timeout`` seconds pass: then []); return every node
        that exited since the last call, reaped, its pipe and log closed, the others untouched.

        Waits on the nodes' pidfds, so other children of this process are left alone. Raises
        :class:`ClusterError` when no node is running and none is left to report.
        """
        exited = [n for n in self.nodes if self._unreported_exit(n)]
        if not exited:
            running = [n for n in self.nodes if n.running]
            if not running:
                raise ClusterError("no node is running")
            with selectors.DefaultSelector() as sel, contextlib.ExitStack() as fds:
                for n in running:
                    try:
                        fd = os.pidfd_open(n.pid)
                    except ProcessLookupError:  # reaped already: poll() below reports it
                        continue
                    fds.callback(os.close, fd)
                    sel.register(fd, selectors.EVENT_READ, n)
                if len(sel.get_map()) == len(running):
                    sel.select(timeout)
            exited = [n for n in self.nodes if self._unreported_exit(n)]
        for n in exited:
            self.stop_node(n.index)  # reaps it (Popen) and closes its pipe and log
            n.exit_reported = True
        return exited

    @staticmethod
    def _unreported_exit(node: NodeProcess) -> bool:
        return node.proc is not None and node.proc.poll() is not None and not node.exit_reported

    def describe_exit(self, node: NodeProcess) -> str:
        """'node 1 (pid 4242) was killed by SIGKILL; log DIR/node-1.log ends: ...'."""
        code = None if node.proc is None else node.proc.returncode
        pid = "" if node.proc is None else f" (pid {node.proc.pid})"
        # Killed by a signal: the log ends wherever the node was, not with a reason.
        log = (
            f"; log {node.log_path}" if code is not None and code < 0 else _log_note(node.log_path)
        )
        return f"node {node.index}{pid} {describe_exit_code(code)}{log}"

    def kill_node(self, index: int) -> None:
        """SIGKILL one node (a crash)."""
        self.stop_node(index, sig=signal.SIGKILL)

    def restart_node(self, index: int) -> NodeProcess:
        """Start a stopped node again with the same data directory."""
        node = self.nodes[index]
        if node.running:
            raise ClusterError(f"node {index} is still running")
        self._launch(node)
        self.write_manifest()
        return node

    def add_node(self) -> NodeProcess:
        """Start one more node that joins through the seed."""
        node = self._make(len(self.nodes))
        self.nodes.append(node)
        self._launch(node)
        self.write_manifest()
        return node

    def stop(self) -> None:
        """Stop every node (in parallel: SIGTERM to all, then wait for each)."""
        for node in self.nodes:
            if node.proc is not None and node.proc.poll() is None:
                node.proc.send_signal(signal.SIGTERM)
        for i in range(len(self.nodes)):
            self.stop_node(i)

    def write_manifest(self) -> Path:
        """``cluster.json``: who runs where (for ``cluster status`` and tools)."""
        path = self.root / "cluster.json"
        doc = {
            "key_file": None if self.open_mode else str(self.key_file),
            "replicas": self.replicas,
            "nodes": [
                {"index": n.index, "data_dir": str(n.data_dir), **n.status} for n in self.nodes
            ],
        }
        path.write_text(json.dumps(doc, indent=2) + "\n")
        return path
