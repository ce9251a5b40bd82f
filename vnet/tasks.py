"""Background tasks with an owner (the agent, the directory client): every task is kept until it
ends, its failure is logged, and closing cancels and awaits them all."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

__all__ = ["TaskSet"]


class TaskSet:
    """A set of tasks named ``<prefix>-<name>``; a task that fails is logged on ``log``."""

    def __init__(self, log: logging.Logger, prefix: str) -> None:
        self._log = log
        self._prefix = prefix
        self._tasks: set[asyncio.Task[Any]] = set()

    def __len__(self) -> int:
        return len(self._tasks)

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """Start ``coro`` as an owned task."""
        task = asyncio.get_running_loop().create_task(coro, name=f"{self._prefix}-{name}")
        self._tasks.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self._tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:
                self._log.error("task %s failed: %r", name, t.exception(),
                                exc_info=t.exception())

        task.add_done_callback(done)
        return task

    async def close(self) -> None:
        """Cancel every task and wait for them to end."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
