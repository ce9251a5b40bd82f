"""What every tmdht service process does around its work: stop on SIGTERM/SIGINT, and reload
on SIGHUP for a service that can (the cluster key file: :func:`reload_cluster_keys`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from tmdht.errors import ConfigError, UsageError

if TYPE_CHECKING:
    from tmdht.aio.overlay import Overlay
    from tmdht.auth import Authenticator
    from tmdht.net.credentials import ClusterCredentials

__all__ = ["reload_cluster_keys", "stop_on_signals", "use_cluster_keys"]

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


def reload_cluster_keys(
    credentials: ClusterCredentials,
    key_file: Path | None,
    use: Callable[[ClusterCredentials], None],
    log: logging.Logger,
) -> ClusterCredentials | None:
    """A rotation step without a restart (SIGHUP, ``systemctl reload``): re-read ``key_file``,
    hand the keys to ``use`` and return them. If the file is refused (unreadable, unparsable,
    the keys did not come from a file, open mode), nothing changes: the reason is logged and
    None returned, so the caller keeps ``credentials``."""
    try:
        new = credentials.reloaded(key_file)
        use(new)
    except (ConfigError, UsageError) as exc:
        log.warning("cluster key reload failed: %s; keeping %s", exc, credentials.describe())
        return None
    log.info("cluster keys reloaded from %s: %s", key_file, new.describe())
    return new


def use_cluster_keys(
    auth: Authenticator, overlay: Overlay | None, credentials: ClusterCredentials
) -> None:
    """Tag and accept with ``credentials`` from now on on both planes: the data plane's ``auth``
    and the ``overlay`` (if started). UsageError, changing nothing, if either side is open."""
    key = credentials.overlay_key
    if auth.keyring is None or key is None:
        raise UsageError("open-mode authentication cannot take keys, nor give them up")
    auth.keyring.replace(list(credentials.keys))
    if overlay is not None:
        overlay.set_cluster_keys(key, credentials.accepted_overlay_keys)
