"""Per-source token buckets: burst, refill, independence of sources, bounded memory."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tmdht.errors import ConfigError
from tmdht.ratelimit import RateLimitConfig, SourceRateLimiter


def test_a_burst_passes_then_excess_is_refused_until_refilled() -> None:
    limiter = SourceRateLimiter(RateLimitConfig(rate=10, burst=5))
    assert [limiter.allow("a", 0.0) for _ in range(7)] == [True] * 5 + [False] * 2
    assert not limiter.allow("a", 0.05)  # half a token
    assert limiter.allow("a", 0.1)  # one token since the last refused try... at 0.05 + 0.05
    assert limiter.allow("a", 10.0)  # long idle: full again, but never more than the burst
    assert sum(limiter.allow("a", 10.0) for _ in range(10)) == 4
    assert (limiter.allowed, limiter.limited) == (11, 9)


def test_sources_are_independent() -> None:
    limiter = SourceRateLimiter(RateLimitConfig(rate=1, burst=2))
    assert limiter.allow("a", 0) and limiter.allow("a", 0) and not limiter.allow("a", 0)
    assert limiter.allow("b", 0) and limiter.allow("b", 0)


def test_rate_zero_disables_and_a_clock_going_back_refills_nothing() -> None:
    off = SourceRateLimiter(RateLimitConfig(rate=0, burst=1))
    assert all(off.allow("a", 0) for _ in range(1000))
    limiter = SourceRateLimiter(RateLimitConfig(rate=1000, burst=1))
    assert limiter.allow("a", 5.0) and not limiter.allow("a", 4.0)


def test_memory_is_bounded_and_refilled_buckets_go_first() -> None:
    limiter = SourceRateLimiter(RateLimitConfig(rate=100, burst=10, max_sources=3))
    for _ in range(10):
        limiter.allow("busy", 0.0)  # empty bucket: must not be forgotten while others can go
    limiter.allow("idle-1", 0.0)
    limiter.allow("idle-2", 0.0)
    assert not limiter.allow("busy", 0.0)
    # At t=0.05 nothing has refilled (a bucket of 10 at 100/s takes 0.1 s): the LRU goes.
    limiter.allow("new-1", 0.05)
    assert len(limiter) == 3
    # Much later every bucket is full: all of them are forgotten at once to make room.
    limiter.allow("new-2", 10.0)
    assert len(limiter) == 1


def test_bad_limits_are_config_errors() -> None:
    for kwargs in ({"rate": -1.0}, {"burst": 0}, {"max_sources": 0}):
        with pytest.raises(ConfigError):
            RateLimitConfig(**kwargs)  # type: ignore[arg-type]


@settings(max_examples=200, deadline=None)
@given(
    rate=st.floats(1, 1000),
    burst=st.integers(1, 50),
    gaps=st.lists(st.floats(0, 0.5), min_size=1, max_size=200),
)
def test_never_more_than_burst_plus_rate_times_elapsed(
    rate: float, burst: int, gaps: list[float]
) -> None:
    limiter = SourceRateLimiter(RateLimitConfig(rate=rate, burst=burst))
    now = 0.0
    for gap in gaps:
        now += gap
        limiter.allow("src", now)
    assert limiter.allowed <= burst + rate * now + 1e-6
    assert limiter.allowed + limiter.limited == len(gaps)
