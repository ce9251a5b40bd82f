"""What every tmdht service process does around its work: stop on SIGTERM/SIGINT (and reload
on SIGHUP, for a service that can)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable, Iterator

__all__ = ["stop_on_signals"]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextlib.contextmanager
def stop_on_signals(
    stop: asyncio.Event, *, reload: Callable[[], object] | None = None
) -> Iterator[None]:
    """While inside, SIGTERM and SIGINT set ``stop`` and SIGHUP calls ``reload`` if given
    (handled on the running loop); the previous handlers are back on the way out."""
    loop = asyncio.get_running_loop()
    handlers: dict[signal.Signals, Callable[[], object]] = dict.fromkeys(STOP_SIGNALS, stop.set)
    if reload is not None:
        handlers[signal.SIGHUP] = reload
    previous = {s: signal.getsignal(s) for s in handlers}
    for s, handler in handlers.items():
        loop.add_signal_handler(s, handler)
    try:
        yield
    finally:
        for s in handlers:
            loop.remove_signal_handler(s)
            signal.signal(s, previous[s])
