"""The network lab's traffic peer: a numbered UDP stream and pings to one guest, recorded.

    python -m tmdht.lab.netpeer --target 10.77.0.2 --rate 2000 --duration 12 --out peer.json

Runs on a host interface of the guests' network (in the lab: the peer site's namespace). Sends
datagrams of ``--size`` bytes to the guest's ``vnetprobe udp-echo`` port, the first 8 bytes a
big-endian sequence number (1, 2, ...) and the next 8 the send time (CLOCK_MONOTONIC, ns), at
``--rate`` per second; the guest echoes each one back. Meanwhile ICMP echo requests go out at
``--ping-rate`` per second. At the end it asks the guest for its own counts (``report ...``).

Stops after ``--duration`` seconds or at SIGUSR1. Prints ``{"t0_ns": ...}`` on stdout when the
stream starts, and writes the JSON record to
``--out``: every send time, every echo (seq, receive time), every ping (seq, round trip), the
guest's report. CLOCK_MONOTONIC is shared by the processes of one host: a benchmark can place
QMP events on the same time line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import struct
import sys
import threading
import time
from pathlib import Path
from typing import Any, Final

__all__ = ["main"]

REPORT_SEQ: Final = (1 << 64) - 1
_HEAD: Final = struct.Struct(">QQ")
_ICMP_ECHO: Final = 8
_ICMP_REPLY: Final = 0


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


class Peer:
    def __init__(self, target: str, port: int, rate: float, size: int, ping_rate: float) -> None:
        self.target, self.port, self.rate, self.size = target, port, rate, size
        self.ping_rate = ping_rate
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        self.udp.connect((target, port))
        self.udp.settimeout(0.2)
        self.icmp = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        self.icmp.settimeout(0.2)
        self.ident = os.getpid() & 0xFFFF
        self.send_ns: list[int] = []
        self.echoes: list[tuple[int, int]] = []
        self.pings_sent: dict[int, int] = {}
        self.ping_replies: list[tuple[int, float, int]] = []
        self.report: str | None = None
        self.stop = threading.Event()
        self.finish = threading.Event()
        """Set by SIGUSR1: stop sending now (before ``--duration``)."""

    def receive_udp(self) -> None:
        while not self.stop.is_set():
            try:
                data = self.udp.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                continue  # ICMP errors (port unreachable while the guest boots) and the like
            now = time.monotonic_ns()
            if data.startswith(b"report"):
                self.report = data.decode(errors="replace").strip()
            elif len(data) >= 8:
                self.echoes.append((int.from_bytes(data[:8], "big"), now))

    def receive_icmp(self) -> None:
        while not self.stop.is_set():
            try:
                data = self.icmp.recv(65536)
            except (TimeoutError, OSError):
                continue
            now = time.monotonic_ns()
            header = (data[0] & 0x0F) * 4
            kind, _code, _sum, ident, seq = struct.unpack_from("!BBHHH", data, header)
            if kind == _ICMP_REPLY and ident == self.ident and seq in self.pings_sent:
                self.ping_replies.append((seq, (now - self.pings_sent[seq]) / 1e6, now))

    def ping(self, seq: int) -> None:
        payload = struct.pack(">Q", time.monotonic_ns()).ljust(56, b"p")
        header = struct.pack("!BBHHH", _ICMP_ECHO, 0, 0, self.ident, seq & 0xFFFF)
        packet = struct.pack("!BBHHH", _ICMP_ECHO, 0, _checksum(header + payload), self.ident,
                             seq & 0xFFFF) + payload
        self.pings_sent[seq & 0xFFFF] = time.monotonic_ns()
        with contextlib.suppress(OSError):
            self.icmp.sendto(packet, (self.target, 0))

    def run(self, duration: float) -> int:
        threads = [threading.Thread(target=self.receive_udp, daemon=True),
                   threading.Thread(target=self.receive_icmp, daemon=True)]
        for thread in threads:
            thread.start()
        padding = bytes(max(0, self.size - _HEAD.size))
        t0 = time.monotonic_ns()
        print(json.dumps({"t0_ns": t0}), flush=True)
        interval_ns = int(1e9 / self.rate)
        ping_every = max(1, round(self.rate / self.ping_rate)) if self.ping_rate > 0 else 0
        total = 0
        for seq in range(1, int(duration * self.rate) + 1):
            if self.finish.is_set():
                break
            total = seq
            due = t0 + (seq - 1) * interval_ns
            delay = due - time.monotonic_ns()
            if delay > 0:
                time.sleep(delay / 1e9)
            now = time.monotonic_ns()
            # An error (no route, unreachable) means the guest did not get it: counted as lost.
            with contextlib.suppress(OSError):
                self.udp.send(_HEAD.pack(seq, now) + padding)
            self.send_ns.append(now)
            if ping_every and seq % ping_every == 0:
                self.ping(seq // ping_every)
        time.sleep(1.5)  # stragglers (frames held during a switch-over come late)
        for _ in range(40):  # up to 20 s: a loaded guest may still work through a burst
            with contextlib.suppress(OSError):
                self.udp.send(_HEAD.pack(REPORT_SEQ, 0))
            deadline = time.monotonic() + 0.5
            while self.report is None and time.monotonic() < deadline:
                time.sleep(0.01)
            if self.report is not None:
                break
        self.stop.set()
        for thread in threads:
            thread.join(timeout=2)
        return total

    def record(self, total: int) -> dict[str, Any]:
        return {"target": self.target, "rate": self.rate, "size": self.size, "sent": total,
                "send_ns": self.send_ns, "echoes": self.echoes, "report": self.report,
                "pings_sent": len(self.pings_sent), "ping_replies": self.ping_replies}


def parse_report(text: str | None) -> dict[str, int]:
    """``report received=1 highest=2 ...`` -> {"received": 1, ...} (empty if None)."""
    out: dict[str, int] = {}
    for word in (text or "").split()[1:]:
        key, _, value = word.partition("=")
        if value.isdigit():
            out[key] = int(value)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True)
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--rate", type=float, default=2000.0)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--ping-rate", type=float, default=100.0)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    peer = Peer(args.target, args.port, args.rate, args.size, args.ping_rate)
    signal.signal(signal.SIGUSR1, lambda _signum, _frame: peer.finish.set())
    total = peer.run(args.duration)
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    tmp.write_text(json.dumps(peer.record(total)))
    tmp.replace(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
