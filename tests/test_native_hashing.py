"""Bulk hashing (tmdht.native.digest_pages / pages_match): the native calls are the reference."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support.cores import native_available

from tmdht.native import digest_pages, pages_match
from tmdht.pages import PAGE_SIZE, digest_page


@settings(max_examples=40, deadline=None)
@given(count=st.integers(0, 200), seed=st.integers(0, 2**32), threads=st.booleans())
def test_active_implementation_matches_per_page_blake3(count: int, seed: int, threads: bool) -> None:
    rng = random.Random(seed)
    pages = [rng.randbytes(rng.choice([PAGE_SIZE, PAGE_SIZE, 0, 100])) for _ in range(count)]
    digests = [digest_page(p) for p in pages]
    assert digest_pages(pages, threads=threads) == digests
    wrong = [bytes(32) if rng.random() < 0.3 else d for d in digests]
    assert pages_match(wrong, [memoryview(p) for p in pages], threads=threads) == [
        w == d for w, d in zip(wrong, digests, strict=True)
    ]


@pytest.mark.skipif(not native_available(), reason="tmdht._native is not built")
def test_native_calls_directly() -> None:
    from tmdht import _native

    pages = [bytes([i]) * PAGE_SIZE for i in range(100)]
    assert _native.digest_pages(pages) == [digest_page(p) for p in pages]
    with pytest.raises(ValueError, match="one page per digest"):
        _native.pages_match([bytes(32)], [])
