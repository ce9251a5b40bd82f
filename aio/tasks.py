"""Background tasks with an owner: none is fire-and-forget, no failure goes unseen."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

__all__ = ["TaskSet"]

T = TypeVar("T")


class TaskSet:
    """The background tasks of one owner (a node, a client, an overlay).

    Each task is kept until it is done; a failure is logged (an error of a type in ``quiet``
    at debug level) and passed to ``on_failure``; :meth:`cancel_all` ends them all. Unlike
    ``asyncio.TaskGroup``, one task failing does not cancel the others: the owner decides
    (a node stops, a client keeps serving).
    """

    def __init__(
        self,
        logger: logging.Logger | logging.LoggerAdapter[logging.Logger],
        *,
        quiet: tuple[type[BaseException], ...] = (),
        on_failure: Callable[[str, BaseException], None] | None = None,
    ) -> None:
        self._log = logger
        self._quiet = quiet
        self._on_failure = on_failure
        self._tasks: set[asyncio.Task[Any]] = set()

    def __len__(self) -> int:
        return len(self._tasks)

    def spawn(self, coro: Coroutine[Any, Any, T], name: str) -> asyncio.Task[T]:
        """Start ``coro`` as a task this set owns."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None:
            return
        if isinstance(exc, self._quiet):
            self._log.debug("task %s ended: %s", task.get_name(), exc)
            return
        self._log.error("task %s failed: %r", task.get_name(), exc, exc_info=exc)
        if self._on_failure is not None:
            self._on_failure(task.get_name(), exc)

    async def cancel_all(self) -> None:
        """Cancel every task and wait until all have ended."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
