"""Helpers for live migrations through the proxies: commands, the READY FIFO, memory checks."""

from __future__ import annotations

import json
import os
import select
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from tmdht.pages import PAGE_SIZE

VGA_WINDOW = range(0xA0000 // PAGE_SIZE, 0xC0000 // PAGE_SIZE)  # pages 160-191: the VGA device


def tmdht_command(*args: str | Path) -> str:
    """A shell command line running ``tmdht ARGS`` with this interpreter (for ``exec:``)."""
    return shlex.join([sys.executable, "-m", "tmdht.cli", *map(str, args)])


def make_fifo(path: Path) -> Path:
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
            raise AssertionError(f"receiver did not get ready within {timeout} s: {line!r}")
        host, _, port = line[len("READY ") :].rpartition(":")
        return host, int(port)
    finally:
        os.close(fd)


def differing_pages(a: Path, b: Path) -> list[int]:
    """Page numbers where two raw dumps differ, outside the VGA window."""
    out = []
    with a.open("rb") as fa, b.open("rb") as fb:
        index = 0
        while True:
            x, y = fa.read(PAGE_SIZE * 256), fb.read(PAGE_SIZE * 256)
            if not x and not y:
                return out
            if x != y:
                for i in range(0, max(len(x), len(y)), PAGE_SIZE):
                    page = index + i // PAGE_SIZE
                    if x[i : i + PAGE_SIZE] != y[i : i + PAGE_SIZE] and page not in VGA_WINDOW:
                        out.append(page)
            index += 256


def descendants(pid: int) -> list[int]:
    """Process ids below ``pid`` (from /proc children lists)."""
    out: list[int] = []
    todo = [pid]
    while todo and len(out) < 1000:
        current = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{current}/task")
        except FileNotFoundError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{current}/task/{task}/children", encoding="ascii") as f:
                    children = [int(c) for c in f.read().split()]
            except FileNotFoundError:
                continue
            out += children
            todo += children
    return out


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except FileNotFoundError:
        return ""


def load_report(path: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(path.read_text())
    return doc


def wait_report(path: Path, timeout: float) -> dict[str, Any]:
    """The JSON report another process writes when it finishes (polled, bounded)."""
    deadline = time.monotonic() + timeout
    for _ in range(100_000):
        if path.exists():
            return load_report(path)
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)  # a poll interval: the proxy is QEMU's child, not ours to wait for
    raise AssertionError(f"{path.name} not written within {timeout} s")
