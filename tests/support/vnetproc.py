"""Real processes for the vnet tests: agents (``tmdht vnet run``) and fake QEMU VMs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from tmdht.lab.netlab import parse_metrics
from tmdht.node.local import read_ready_line
from tmdht.vnet.control import control_request

FAKE_QEMU = Path(__file__).with_name("fakeqemu.py")


class AgentProcess:
    """One ``tmdht vnet run`` process (killed by PID on close)."""

    def __init__(self, data_dir: Path, *, seeds: list[tuple[str, int]], key_file: Path | None,
                 site: str, extra: list[str] | None = None) -> None:
        self.data_dir = data_dir
        self.args = [sys.executable, "-m", "tmdht.cli", "vnet", "run", "--data-dir",
                     str(data_dir), "--host", "127.0.0.1", "--tunnel-port", "0",
                     "--metrics-port", "0", "--site", site, "--lease", "3",
                     "--members-interval", "0.5", "--log-format", "text", "--log-level", "info",
                     "--ready-line", *(extra or [])]
        for host, port in seeds:
            self.args += ["--seed", f"{host}:{port}"]
        self.args += ["--cluster-key-file", str(key_file)] if key_file else ["--insecure-open"]
        self.proc: subprocess.Popen[bytes] | None = None
        self.status: dict[str, Any] = {}

    def start(self, timeout: float = 30.0) -> AgentProcess:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = (self.data_dir / "agent.log").open("ab")
        self.proc = subprocess.Popen(self.args, stdout=subprocess.PIPE, stderr=log,
                                     stdin=subprocess.DEVNULL)
        log.close()
        self.status = read_ready_line(self.proc, timeout, f"vnet agent in {self.data_dir}")
        return self

    @property
    def control(self) -> Path:
        return Path(self.status["control"])

    def request(self, doc: dict[str, Any]) -> dict[str, Any]:
        return control_request(self.control, doc)

    def attach(self, name: str, vnet: int, vm: FakeVm) -> dict[str, Any]:
        return self.request({"op": "attach", "name": name, "vnet": vnet, "kind": "qemu",
                             "net_socket": str(vm.net), "qmp_socket": str(vm.qmp)})["port"]

    def metrics(self) -> dict[str, float]:
        host, port = self.status["metrics"]
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as answer:
            text = answer.read().decode()
        return parse_metrics(text)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()


class FakeVm:
    """A fake QEMU (``fakeqemu.py``) with its NIC socket and QMP monitor."""

    def __init__(self, directory: Path, mac: str, state: str = "running") -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.net = directory / "net.sock"
        self.qmp = directory / "qmp.sock"
        self.mac = mac
        self.proc = subprocess.Popen(
            [sys.executable, str(FAKE_QEMU), str(self.net), str(self.qmp), mac, state],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        ready = self._read()
        assert ready.get("ready"), ready

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError("the fake QEMU exited")
        doc: dict[str, Any] = json.loads(line)
        return doc

    def command(self, line: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()
        return self._read()

    def send(self, frame: bytes) -> None:
        assert self.command(f"send {frame.hex()}")["ok"]

    def received(self) -> list[bytes]:
        return [bytes.fromhex(f) for f in self.command("received")["frames"]]

    def close(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()


def wait_for(check: Any, timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll another process's state until ``check()`` is truthy (bounded by time and count)."""
    deadline = time.monotonic() + timeout
    last = None
    for _ in range(int(timeout / interval) + 2):
        last = check()
        if last:
            return last
        if time.monotonic() > deadline:
            break
        time.sleep(interval)  # a poll interval: the state lives in other processes
    raise AssertionError(f"{what}: not within {timeout} s (last {last!r})")
