"""Migration waves, sans-IO: the wave credentials, the key scheme, and the time-to-live rules.

A *wave* is a set of VMs migrated together (one after another or at once). A receiver of a
wave stores the full pages it received into the destination cluster so that the wave's next
VMs can take them there instead of over the WAN; the sender offers a page's digest before its
body (:mod:`tmdht.migration.format`, OFFER) and sends the body only if the receiver asks.

Key scheme (why only holders of the wave secret can name or confirm a page)::

    page key   = BLAKE3-derive_key("tmdht wave page key v1", wave id || 0x00 || secret)
    check key  = BLAKE3-derive_key("tmdht wave check v1",    wave id || 0x00 || secret)
    wave key   = BLAKE3-keyed(page key, page digest)       (32 bytes; the DHT key is its
                                                           first 160 bits, like a digest's)
    wave tag   = BLAKE3-keyed(check key, b"wave hello")    (proves both proxies hold the
                                                           same wave, reveals neither)

A node stores a wave page under its wave key and cannot link it to a page digest (that needs
the page key); another wave's receiver computes different wave keys for the same digest, so it
can neither fetch nor confirm the existence of this wave's pages (SECURITY.md). A page fetched
by wave key is checked by the receiver against the digest the sender offered: a node serving
something else is caught and the page comes from the sender.

Claims on pages in flight: VMs of a wave migrated at once walk the same pages at the same
time, so most pages are looked up before any receiver has stored them. The first receiver that
misses a page claims its wave key at the node (WAVE_CLAIM, a short time-to-live) and asks its
sender for the body; the others are told PENDING and wait for the page (:class:`ClaimWaits`:
re-asked, bounded by count and time) before asking their senders. A claimer that dies or is
slow costs the waiters only the bound; a page is used only if it hashes to the offered digest.

Time is a parameter (``now``, seconds, any monotonic-enough clock the caller keeps).
"""

from __future__ import annotations

import heapq
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from blake3 import blake3

from tmdht.errors import ConfigError
from tmdht.net.credentials import read_key_file
from tmdht.pages import DIGEST_SIZE

__all__ = [
    "DEFAULT_WAVE_TTL",
    "MAX_WAVE_ID",
    "MAX_WAVE_TTL",
    "WAVE_KEY_SIZE",
    "WAVE_SECRET_ENV",
    "ClaimPolicy",
    "ClaimWaits",
    "WaveCredentials",
    "expires_at",
    "is_live",
]

WAVE_SECRET_ENV: Final = "TMDHT_WAVE_SECRET"
"""The environment variable the wave secret (64 hex digits) may come from instead of a file."""
WAVE_KEY_SIZE: Final = DIGEST_SIZE
"""A wave key is 32 bytes, placed on the ring like a page digest."""
MAX_WAVE_ID: Final = 64
"""Longest wave id (UTF-8 bytes)."""
DEFAULT_WAVE_TTL: Final = 6 * 3600.0
"""Seconds a wave page lives by default (a wave of VMs is migrated within hours)."""
MAX_WAVE_TTL: Final = 7 * 24 * 3600.0
"""Longest time-to-live a node accepts for a wave page (a week)."""
_PAGE_KEY_CONTEXT: Final = "tmdht wave page key v1"
_CHECK_CONTEXT: Final = "tmdht wave check v1"


def _parse_secret(text: str, source: str) -> bytes:
    value = text.strip()
    try:
        secret = bytes.fromhex(value)
    except ValueError:
        raise ConfigError(f"{source}: a wave secret is 64 hex digits") from None
    if len(secret) != 32:
        raise ConfigError(f"{source}: a wave secret is 64 hex digits, got {len(value)}")
    if secret == bytes(32):
        raise ConfigError(f"{source}: the all-zero wave secret is refused")
    return secret


@dataclass(frozen=True, slots=True)
class WaveCredentials:
    """A wave's id and secret, and the keys derived from them."""

    wave_id: str
    """The operator's name for the wave (1 … MAX_WAVE_ID UTF-8 bytes)."""
    secret: bytes
    """32 random bytes shared by every proxy of the wave (never on the wire)."""

    def __post_init__(self) -> None:
        """Refuse an empty or over-long id and a secret that is not 32 bytes (ConfigError)."""
        raw = self.wave_id.encode("utf-8")
        if not 0 < len(raw) <= MAX_WAVE_ID or "\x00" in self.wave_id:
            raise ConfigError(f"a wave id is 1 … {MAX_WAVE_ID} bytes without NUL")
        if len(self.secret) != 32:
            raise ConfigError("a wave secret is 32 bytes")

    @classmethod
    def from_file(cls, wave_id: str, path: Path, label: str = "wave secret file"
                  ) -> WaveCredentials:
        """The secret in ``path`` (64 hex digits); ConfigError naming the file, never the key."""
        source = f"{label} {path}"
        return cls(wave_id, _parse_secret(read_key_file(path, source), source))

    @classmethod
    def load(cls, wave_id: str, *, secret_file: Path | None = None,
             env: Mapping[str, str] | None = None,
             label: str = "--wave-secret-file") -> WaveCredentials:
        """From ``secret_file``, else ``$TMDHT_WAVE_SECRET`` in ``env`` (default: os.environ);
        ConfigError if neither gives one."""
        if secret_file is not None:
            return cls.from_file(wave_id, secret_file, label)
        env = os.environ if env is None else env
        if env.get(WAVE_SECRET_ENV):
            return cls(wave_id, _parse_secret(env[WAVE_SECRET_ENV], f"${WAVE_SECRET_ENV}"))
        raise ConfigError(f"--wave needs a wave secret: {label} or ${WAVE_SECRET_ENV}")

    @staticmethod
    def generate_secret() -> str:
        """A new secret as a key file's text (64 hex digits and a newline)."""
        return os.urandom(32).hex() + "\n"

    def _material(self) -> bytes:
        return self.wave_id.encode("utf-8") + b"\x00" + self.secret

    @property
    def page_key(self) -> bytes:
        """The key wave keys are made with."""
        return blake3(self._material(), derive_key_context=_PAGE_KEY_CONTEXT).digest()

    @property
    def tag(self) -> bytes:
        """32 bytes both proxies of one wave compute alike; the sender puts them on the wire."""
        check = blake3(self._material(), derive_key_context=_CHECK_CONTEXT).digest()
        return blake3(b"wave hello", key=check).digest()

    def wave_key(self, digest: bytes) -> bytes:
        """The name of the page with this digest in this wave's store."""
        return blake3(digest, key=self.page_key).digest()

    def wave_keys(self, digests: Sequence[bytes]) -> list[bytes]:
        """:meth:`wave_key` of many digests (the page key derived once)."""
        key = self.page_key
        return [blake3(d, key=key).digest() for d in digests]

    def __repr__(self) -> str:  # never the secret in logs
        return f"WaveCredentials(wave_id={self.wave_id!r})"


def expires_at(now: float, ttl: float) -> float:
    """When a page stored at ``now`` with ``ttl`` (capped at MAX_WAVE_TTL) expires."""
    if ttl <= 0:
        raise ConfigError(f"a wave time-to-live is positive, got {ttl}")
    return now + min(ttl, MAX_WAVE_TTL)


def is_live(expiry: float, now: float) -> bool:
    """Whether a page expiring at ``expiry`` may still be served at ``now``."""
    return now < expiry


@dataclass(frozen=True, slots=True)
class ClaimPolicy:
    """How a receiver claims pages in flight and waits for other receivers' claims."""

    claim_ttl: float = 5.0
    """Seconds a claim this receiver makes lasts (its sender's body must come and be stored
    within it; after it a waiter claims the page itself)."""
    wait: float = 6.0
    """Seconds a page claimed by another receiver is waited for at most; then it is asked of
    the sender (0: no claims, every miss asks the sender at once)."""
    first_ask: float = 0.05
    """Seconds before the first re-ask of a pending page."""
    backoff: float = 1.5
    """Each re-ask waits this many times longer than the one before ..."""
    max_interval: float = 0.5
    """... up to this many seconds."""
    max_asks: int = 40
    """Re-asks of one page at most."""
    max_waiting: int = 32768
    """Pages waiting at most (about 150 bytes each); more are asked of the sender at once."""

    def __post_init__(self) -> None:
        """Refuse settings that would not bound the wait (ConfigError)."""
        if not (self.claim_ttl > 0 and self.wait >= 0 and self.first_ask > 0
                and self.backoff >= 1 and self.max_interval >= self.first_ask
                and self.max_asks >= 1 and self.max_waiting >= 0):
            raise ConfigError(f"bad claim policy {self}")

    @property
    def enabled(self) -> bool:
        """Whether misses are claimed (and others' claims waited for) at all."""
        return self.wait > 0 and self.max_waiting > 0


@dataclass(slots=True)
class _Wait:
    digest: bytes
    since: float
    asks: int
    due: float


class ClaimWaits:
    """Pages (by body index) another receiver claimed, waiting to be re-asked (sans-IO).

    :meth:`add` a page told PENDING; :meth:`take_due` the pages to ask about again now and the
    ones whose bound ran out (ask the sender); report each asked page back: :meth:`again` if
    still pending, :meth:`forget` otherwise. Bounded: at most ``policy.max_waiting`` pages."""

    def __init__(self, policy: ClaimPolicy) -> None:
        """Wait as ``policy`` says."""
        self.policy = policy
        self._waiting: dict[int, _Wait] = {}
        self._schedule: list[tuple[float, int]] = []  # (due, index), stale entries skipped

    def __len__(self) -> int:
        return len(self._waiting)

    def add(self, index: int, digest: bytes, now: float) -> bool:
        """Wait for the page of ``index``; False if full (ask the sender instead)."""
        if index in self._waiting or len(self._waiting) >= self.policy.max_waiting:
            return False
        wait = _Wait(digest, now, 0, now + self.policy.first_ask)
        self._waiting[index] = wait
        heapq.heappush(self._schedule, (wait.due, index))
        return True

    def next_due(self) -> float | None:
        """When :meth:`take_due` has something next (None: nothing waits)."""
        while self._schedule:
            due, index = self._schedule[0]
            wait = self._waiting.get(index)
            if wait is not None and wait.due == due:
                return due
            heapq.heappop(self._schedule)
        return None

    def take_due(self, now: float, limit: int) -> tuple[list[tuple[int, bytes]], list[int]]:
        """Up to ``limit`` (index, digest) to ask about again now (they stay waiting until
        :meth:`again` or :meth:`forget`), and the indices whose wait ran out (forgotten: ask
        the sender for them)."""
        ask: list[tuple[int, bytes]] = []
        expired: list[int] = []
        policy = self.policy
        while self._schedule and len(ask) < limit:
            due, index = self._schedule[0]
            wait = self._waiting.get(index)
            if wait is None or wait.due != due:
                heapq.heappop(self._schedule)
                continue
            if due > now:
                break
            heapq.heappop(self._schedule)
            if now - wait.since >= policy.wait or wait.asks >= policy.max_asks:
                del self._waiting[index]
                expired.append(index)
                continue
            wait.asks += 1
            wait.due = float("inf")  # asked: not due again until :meth:`again`
            ask.append((index, wait.digest))
        return ask, expired

    def again(self, indices: Sequence[int], now: float) -> None:
        """These asked pages are still pending: ask again later (or give up at the bound)."""
        policy = self.policy
        for index in indices:
            wait = self._waiting.get(index)
            if wait is None:
                continue
            interval = min(policy.first_ask * policy.backoff ** wait.asks, policy.max_interval)
            wait.due = min(now + interval, wait.since + policy.wait)
            heapq.heappush(self._schedule, (wait.due, index))

    def forget(self, indices: Sequence[int]) -> None:
        """These pages no longer wait (found, claimed here, or asked of the sender)."""
        for index in indices:
            self._waiting.pop(index, None)
