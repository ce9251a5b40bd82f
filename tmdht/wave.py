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

Time is a parameter (``now``, seconds, any monotonic-enough clock the caller keeps).
"""

from __future__ import annotations

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
