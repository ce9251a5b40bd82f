"""What every tmdht service process does around its work: stop on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Iterator

__all__ = ["stop_on_signals"]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextlib.contextmanager
def stop_on_signals(stop: asyncio.Event) -> Iterator[None]:
    """While inside, SIGTERM and SIGINT set ``stop`` (handled on the running loop); the previous
    handlers are back on the way out."""
    loop = asyncio.get_running_loop()
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    for s in STOP_SIGNALS:
        loop.add_signal_handler(s, stop.set)
    try:
        yield
    finally:
        for s in STOP_SIGNALS:
            loop.remove_signal_handler(s)
            signal.signal(s, previous[s])
