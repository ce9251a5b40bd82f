"""A local cluster of store nodes as separate processes: ``tmdht cluster up``, tests, benchmarks.

Each node is ``python -m tmdht.cli node run ... --ready-line`` with its own data directory under
the cluster directory, ports chosen by the kernel (port 0), and the first node as seed. A node
prints one ``READY {json}`` line on stdout once it serves; the cluster blocks on that pipe (with a
deadline) instead of polling. Processes are ended by PID: SIGTERM, a bounded wait, then SIGKILL.
"""

from __future__ import annotations

import json
import os
import secrets
import selectors
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from tmdht.node.errors import ClusterError

__all__ = ["READY_PREFIX", "ClusterError", "LocalCluster", "NodeProcess", "read_ready_line"]

READY_PREFIX = "READY "


def read_ready_line(proc: subprocess.Popen[bytes], timeout: float, what: str) -> dict[str, Any]:
    """Block until ``proc`` prints its READY line (or exits, or the deadline passes)."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    buffered = b""
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        for _ in range(100_000):  # bounded: each round reads at least one byte or times out
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ClusterError(f"{what} did not become ready within {timeout:.0f} s")
            if not sel.select(remaining):
                continue
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                proc.wait(timeout=5)
                raise ClusterError(f"{what} exited with code {proc.returncode} before it was ready")
            buffered += chunk
            while b"\n" in buffered:
                line, buffered = buffered.split(b"\n", 1)
                text = line.decode(errors="replace")
                if text.startswith(READY_PREFIX):
                    status: dict[str, Any] = json.loads(text[len(READY_PREFIX) :])
                    return status
    raise ClusterError(f"{what}: no READY line")


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
    ) -> None:
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
        args = [
            self.python, "-m", "tmdht.cli", "node", "run",
            "--data-dir", str(data_dir),
            "--host", self.host,
            "--kademlia-port", "0", "--data-port", "0", "--metrics-port", "0",
            "--replicas", str(self.replicas),
            "--ready-line",
        ]  # fmt: skip
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
        node.status = read_ready_line(node.proc, self.ready_timeout, f"node {node.index}")

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
