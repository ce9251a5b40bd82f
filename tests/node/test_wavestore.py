"""The node's wave store: time-to-live with the clock as a parameter, its own capacity, and
nothing shared with the template store."""

from __future__ import annotations

from pathlib import Path

import pytest

from tmdht.errors import ConfigError
from tmdht.node.storage import PageStore
from tmdht.node.wavestore import MAX_CLAIM_TTL, ClaimStatus, WavePutResult, WaveStore
from tmdht.pages import PAGE_SIZE, digest_page


def wave_pages(n: int, tag: int) -> list[tuple[bytes, bytes]]:
    return [(digest_page(bytes([tag, i % 256, i // 256]) * 8), bytes([tag, i % 256]) * 2048)
            for i in range(n)]


def test_pages_expire_at_their_time_to_live(tmp_path: Path) -> None:
    store = WaveStore.open(tmp_path / "w", capacity_bytes=64 * PAGE_SIZE, max_ttl=100)
    pages = wave_pages(3, 1)
    assert store.put_many(pages[:2], ttl=10, now=1000.0) == [WavePutResult.STORED] * 2
    assert store.put_many(pages[2:], ttl=50, now=1000.0) == [WavePutResult.STORED]
    keys = [k for k, _ in pages]
    assert store.get_many(keys, now=1009.9) == [p for _, p in pages]
    assert store.get_many(keys, now=1010.0) == [None, None, pages[2][1]]
    # A put refreshes the time-to-live; the node's max_ttl caps what a receiver asks for.
    assert store.put_many(pages[2:], ttl=10_000, now=1040.0) == [WavePutResult.REFRESHED]
    assert store.get_many(keys[2:], now=1139.0) == [pages[2][1]]
    assert store.get_many(keys[2:], now=1140.0) == [None]
    assert store.stats().pages == 1  # the put at 1040 purged the two expired ones
    assert store.purge(now=1140.0) == 1
    assert store.stats().pages == 0
    store.close()


def test_a_full_wave_store_refuses_and_purges_expired_pages_first(tmp_path: Path) -> None:
    store = WaveStore.open(tmp_path / "w", capacity_bytes=4 * PAGE_SIZE, max_ttl=100)
    pages = wave_pages(6, 2)
    results = store.put_many(pages, ttl=10, now=0.0)
    assert results == [WavePutResult.STORED] * 4 + [WavePutResult.FULL] * 2
    assert store.put_many([(bytes(31), bytes(PAGE_SIZE))], ttl=10, now=0.0) == [
        WavePutResult.INVALID]
    # Once the first ones expired, new pages take their room.
    assert store.put_many(pages[4:], ttl=10, now=20.0) == [WavePutResult.STORED] * 2
    assert store.stats().pages == 2
    store.close()
    reopened = WaveStore.open(tmp_path / "w", capacity_bytes=4 * PAGE_SIZE, max_ttl=100)
    assert reopened.get_many([pages[5][0]], now=21.0) == [pages[5][1]]
    reopened.close()


def test_wave_pages_never_touch_the_template_store(tmp_path: Path) -> None:
    templates = PageStore.open(tmp_path / "pages", capacity_bytes=8 * PAGE_SIZE)
    pages = [bytes([9, i]) * 2048 for i in range(8)]
    templates.put_many([(digest_page(p), p) for p in pages])
    waves = WaveStore.open(tmp_path / "waves", capacity_bytes=2 * PAGE_SIZE, max_ttl=100)
    results = waves.put_many(wave_pages(50, 3), ttl=10, now=0.0)
    assert results.count(WavePutResult.FULL) == 48
    assert templates.get_many([digest_page(p) for p in pages]) == pages
    assert templates.page_count == 8
    templates.close()
    waves.close()


def test_bad_settings(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        WaveStore.open(tmp_path / "w", capacity_bytes=100, max_ttl=10)
    with pytest.raises(ConfigError):
        WaveStore.open(tmp_path / "w", capacity_bytes=PAGE_SIZE, max_ttl=0)


def test_claims_pend_until_stored_expire_and_are_bounded(tmp_path: Path) -> None:
    store = WaveStore.open(tmp_path / "w", capacity_bytes=64 * PAGE_SIZE, max_ttl=100,
                           max_claims=4)
    pages = wave_pages(6, 4)
    keys = [k for k, _ in pages]
    claimed, pending, held = ClaimStatus.CLAIMED, ClaimStatus.PENDING, ClaimStatus.HELD
    assert store.claim_many(keys[:2], ttl=5, now=100.0) == [claimed] * 2
    assert store.claim_many(keys[:3], ttl=5, now=101.0) == [pending, pending, claimed]
    assert store.stats().claims == 3
    # A stored page ends its claim and is HELD from then on.
    store.put_many(pages[:1], ttl=10, now=102.0)
    assert store.claim_many(keys[:3], ttl=5, now=102.0) == [held, pending, pending]
    assert store.stats().claims == 2
    # At max_claims, a miss is CLAIMED without keeping a claim: nobody waits for it.
    assert store.claim_many(keys[3:6], ttl=5, now=102.0) == [claimed] * 3
    assert store.stats().claims == 4
    assert store.claim_many(keys[5:6], ttl=5, now=102.0) == [claimed]
    # Claims expire (a claim asked for longer is capped at MAX_CLAIM_TTL) ...
    assert store.claim_many(keys[1:2], ttl=5, now=104.99) == [pending]
    assert store.claim_many(keys[1:2], ttl=1000, now=105.0) == [claimed]
    assert store.claim_many(keys[1:2], ttl=1, now=105.0 + MAX_CLAIM_TTL - 0.01) == [pending]
    assert store.claim_many(keys[1:2], ttl=1, now=105.0 + MAX_CLAIM_TTL) == [claimed]
    # ... and expired ones are dropped; an expired page is no longer HELD.
    assert store.stats().claims == 1
    assert store.claim_many(keys[:1], ttl=1, now=112.0) == [claimed]
    store.close()
