"""Helpers for live migrations through the proxies: commands, the READY FIFO, memory checks."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tmdht.lab.migrate import make_fifo, read_ready, tmdht_command, wait_report
from tmdht.pages import PAGE_SIZE

__all__ = [
    "cmdline",
    "descendants",
    "differing_pages",
    "load_report",
    "make_fifo",
    "read_ready",
    "tmdht_command",
    "wait_report",
]

VGA_WINDOW = range(0xA0000 // PAGE_SIZE, 0xC0000 // PAGE_SIZE)  # pages 160-191: the VGA device


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
