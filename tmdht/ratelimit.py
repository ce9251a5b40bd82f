"""Per-source token buckets for the data plane (sans-IO: the caller passes ``now``).

A node answers a datagram of a few dozen bytes with up to ``max_datagram`` bytes of pages, so an
unauthenticated flood costs it a BLAKE3 tag check per datagram and an authenticated client can ask
for a lot. :class:`SourceRateLimiter` bounds what one source address may make the node do: each
source has a bucket of ``burst`` tokens refilled at ``rate`` tokens per second, a datagram takes
one token, and a datagram that finds its bucket empty is dropped (the node counts it with reason
``rate_limited``). The check runs *before* authentication, so a flood of forged datagrams is
throttled too, at the price of one dictionary lookup each.

Memory is bounded: at most ``max_sources`` buckets are kept. A bucket that has been full for a
while carries no information (a new bucket starts full), so when the table is full the buckets
that have refilled completely are forgotten first; if none has, the least recently used bucket
goes. A flood from many spoofed sources can therefore only make the limiter forget, never grow.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Final

from tmdht.errors import ConfigError

__all__ = [
    "DEFAULT_BURST",
    "DEFAULT_MAX_SOURCES",
    "DEFAULT_RATE",
    "RateLimitConfig",
    "SourceRateLimiter",
]

DEFAULT_RATE: Final = 200_000.0
"""Datagrams per second one source may send (far above what one client needs: bench/node.py
moves ~100k pages/s in ~4 pages a datagram)."""
DEFAULT_BURST: Final = 20_000
"""Datagrams one source may send at once after being idle."""
DEFAULT_MAX_SOURCES: Final = 65_536
"""Most sources tracked at once (about 100 bytes each)."""


@dataclass(frozen=True, slots=True)
class RateLimitConfig:
    """How much one source address may send."""

    rate: float = DEFAULT_RATE
    """Tokens (datagrams) added to a source's bucket per second; 0 disables the limiter."""
    burst: int = DEFAULT_BURST
    """Bucket size: datagrams a source may send back to back."""
    max_sources: int = DEFAULT_MAX_SOURCES
    """Most buckets kept at once."""

    def __post_init__(self) -> None:
        if self.rate < 0:
            raise ConfigError(f"a rate limit is >= 0 datagrams/s, got {self.rate}")
        if self.burst < 1:
            raise ConfigError(f"a rate-limit burst is >= 1 datagram, got {self.burst}")
        if self.max_sources < 1:
            raise ConfigError(f"a rate limiter tracks >= 1 source, got {self.max_sources}")

    @property
    def enabled(self) -> bool:
        """False when ``rate`` is 0 (every datagram allowed)."""
        return self.rate > 0


class SourceRateLimiter:
    """Token bucket per source. ``allow(source, now)`` is True if the datagram may be served."""

    __slots__ = ("_buckets", "_burst", "_config", "_full_after", "_rate", "allowed", "limited")

    def __init__(self, config: RateLimitConfig | None = None) -> None:
        self._config = config or RateLimitConfig()
        # source -> [tokens, time of last update]; most recently used last. A bucket is a list
        # updated in place: allow() runs for every datagram, so it allocates nothing for a
        # known source (one lookup, one move_to_end, two stores).
        self._buckets: OrderedDict[object, list[float]] = OrderedDict()
        self._rate = self._config.rate
        self._burst = float(self._config.burst)
        self._full_after = self._burst / self._rate if self._config.enabled else 0.0
        self.allowed = 0
        """Datagrams allowed so far."""
        self.limited = 0
        """Datagrams refused so far."""

    @property
    def config(self) -> RateLimitConfig:
        """The limits in force."""
        return self._config

    def __len__(self) -> int:
        """Sources currently tracked (at most ``max_sources``)."""
        return len(self._buckets)

    def allow(self, source: object, now: float, cost: float = 1.0) -> bool:
        """Take ``cost`` tokens from ``source``'s bucket if it has them; ``now`` is monotonic."""
        rate = self._rate
        if not rate:  # disabled
            self.allowed += 1
            return True
        buckets = self._buckets
        bucket = buckets.get(source)
        if bucket is None:
            if len(buckets) >= self._config.max_sources:
                self._evict(now)
            bucket = buckets[source] = [self._burst, now]
            tokens = self._burst
        else:
            buckets.move_to_end(source)
            tokens = bucket[0]
            # A clock that goes backwards (it should not: monotonic) refills nothing.
            if now > bucket[1]:
                tokens += (now - bucket[1]) * rate
                tokens = min(tokens, self._burst)
            bucket[1] = now
        if tokens >= cost:
            bucket[0] = tokens - cost
            self.allowed += 1
            return True
        bucket[0] = tokens
        self.limited += 1
        return False

    def _evict(self, now: float) -> None:
        """Make room for one bucket: drop every refilled bucket, else the least recently used."""
        horizon = now - self._full_after
        # Oldest first: stop at the first bucket used recently enough that it may not be full.
        stale = []
        for source, (_, last) in self._buckets.items():
            if last > horizon:
                break
            stale.append(source)
        for source in stale:
            del self._buckets[source]
        if not stale:
            self._buckets.popitem(last=False)
