"""Running the ``tmdht`` command as a user would: a real process."""

from __future__ import annotations

import os
import selectors
import subprocess
import time
from typing import IO

from tmdht.launch import tmdht_argv


def tmdht(*args: object, expect: int = 0, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run ``tmdht ARGS`` with this interpreter; assert its exit code."""
    proc = subprocess.run(
        tmdht_argv(*args),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == expect, proc.stderr
    return proc


class Lines:
    """The lines a running process writes to one of its pipes, read as they come (bounded)."""

    def __init__(self, pipe: IO[bytes]) -> None:
        self.pipe = pipe
        self.seen: list[str] = []
        self._buffer = b""
        self._closed = False

    def wait_for(self, text: str, timeout: float) -> str:
        """The first line (seen before or arriving within ``timeout`` s) that contains ``text``."""
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(self.pipe, selectors.EVENT_READ)
            for _ in range(100_000):  # each round reads at least one byte or times out
                for line in self.seen:
                    if text in line:
                        self.seen = self.seen[self.seen.index(line) + 1 :]
                        return line
                remaining = deadline - time.monotonic()
                if self._closed or remaining <= 0 or not sel.select(remaining):
                    break
                chunk = os.read(self.pipe.fileno(), 65536)
                self._closed = not chunk
                self._buffer += chunk
                *lines, self._buffer = self._buffer.split(b"\n")
                self.seen += [line.decode(errors="replace") for line in lines]
        raise AssertionError(f"no line with {text!r} within {timeout} s; saw {self.seen!r}")
