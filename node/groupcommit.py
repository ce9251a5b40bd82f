"""When the data plane's writer starts its next group commit: at once, or after a short wait.

Every group commit is one LMDB transaction and one fsync, and its CPU cost is mostly per commit,
not per page (``PageStore.put_many`` on this machine: 114.8 us of CPU per page at 7 pages per
commit, 26.2 at 64, 12.5 at 448). A node that gets PUTs faster than one at a time but slower than
a commit takes -- the common case in a large ring, where each node sees a small share of a
publish -- committed them one datagram (7 pages) at a time. A short, bounded wait gathers the
PUTs already on their way into one commit.

:class:`CommitPacer` decides, sans-IO (times are parameters), when the queued PUTs are
committed:

- at once when ``target_pages`` are queued, when the wait is off (``max_delay`` 0), or when PUTs
  are not arriving fast enough for a wait to gather more (at the current arrival rate, fewer
  pages than one more PUT would arrive within ``max_delay``): a lone PUT, or a trickle, is
  never delayed;
- otherwise when the queue is expected to reach ``target_pages`` at the current arrival rate,
  but no later than ``max_delay`` after the oldest queued PUT arrived.

The arrival rate is an exponentially decaying count of pages (time constant
``RATE_WINDOWS x max_delay``), so a burst of datagrams read in one event-loop pass raises it
for a few milliseconds, and a pause lets it fall within a few more.

Durability is unchanged: a PUT is still answered only after the commit holding it returned
(fsync). The wait only bounds how much *later* that commit may start: ``max_delay`` (off by
default; e.g. 2 ms) on top of the answer's latency, and only while PUTs are streaming in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

from tmdht.errors import UsageError

__all__ = ["DEFAULT_COMMIT_DELAY", "DEFAULT_COMMIT_TARGET", "CommitPacer", "CommitPacing"]

DEFAULT_COMMIT_DELAY: Final = 0.0
"""Seconds a group commit may wait for more PUTs (after the oldest queued one arrived): off by
default. Measured with bench/publish_scale.py (8 and 32 local nodes, 2 shared cores), 2 ms and
5 ms changed nothing: at 8 nodes the commits already held 70-85 pages (PUTs queue during each
fsync); at 32 nodes PUTs reach each node in bursts, one per round trip (the client sends a node
its next PUTs as that node's answers come back), and a commit already holds the whole burst the
node read together (:mod:`tmdht.node.dataplane`), so the next PUTs are a round trip away, beyond
any wait worth making. It may pay where nodes get many small PUTs faster than one per fsync; the
wait is then bounded and adaptive as described above."""
DEFAULT_COMMIT_TARGET: Final = 256
"""Queued pages that start a commit at once (past a few hundred, a commit's CPU per page is
close to its floor)."""
RATE_WINDOWS: Final = 5
"""The arrival rate's time constant, in units of ``max_delay``."""
_SIZE_SMOOTHING: Final = 0.2
"""Weight of the newest PUT in the smoothed pages per PUT (an EWMA)."""


@dataclass(frozen=True, slots=True)
class CommitPacing:
    """How long a group commit may wait for more writes."""

    max_delay: float = DEFAULT_COMMIT_DELAY
    """Seconds a commit may start after its oldest PUT arrived, at most (0: never wait)."""
    target_pages: int = DEFAULT_COMMIT_TARGET
    """Queued pages that make a commit start at once."""

    def __post_init__(self) -> None:
        if not 0 <= self.max_delay <= 1:
            raise UsageError(f"commit delay must be 0-1 s, got {self.max_delay}")
        if self.target_pages < 1:
            raise UsageError(f"commit target must be >= 1 page, got {self.target_pages}")


class CommitPacer:
    """Tracks PUT arrivals and says when to start the next group commit (module docstring)."""

    __slots__ = ("_last", "_rate", "_size", "_tau", "pacing")

    def __init__(self, pacing: CommitPacing | None = None) -> None:
        self.pacing = pacing or CommitPacing()
        self._tau = max(1e-3, RATE_WINDOWS * self.pacing.max_delay)
        self._last = 0.0
        self._rate = 0.0  # pages per second, decayed to self._last
        self._size = 0.0  # smoothed pages per PUT

    def _rate_at(self, now: float) -> float:
        return self._rate * math.exp(-max(0.0, now - self._last) / self._tau)

    def arrived(self, pages: int, now: float) -> None:
        """A PUT of ``pages`` pages arrived at ``now``."""
        self._rate = self._rate_at(now) + pages / self._tau
        self._size = float(pages) if self._size == 0 else self._size + _SIZE_SMOOTHING * (
            pages - self._size)
        self._last = max(self._last, now)

    def start_at(self, queued_pages: int, oldest: float, now: float) -> float:
        """When to start committing ``queued_pages`` pages whose oldest PUT arrived at
        ``oldest``: ``now`` or a later time, never later than ``oldest + max_delay``."""
        delay = self.pacing.max_delay
        if delay <= 0 or queued_pages >= self.pacing.target_pages:
            return now
        rate = self._rate_at(now)
        if rate * delay < self._size:  # not even one more PUT expected within the wait
            return now
        expected = now + (self.pacing.target_pages - queued_pages) / rate
        return max(now, min(oldest + delay, expected))
