"""Page primitives: digests, keys, the zero check, page views."""

from __future__ import annotations

import pytest
from blake3 import blake3
from hypothesis import given
from hypothesis import strategies as st

from tmdht.errors import DecodeError, IntegrityError
from tmdht.pages import (
    PAGE_SIZE,
    ZERO_DIGEST,
    ZERO_PAGE,
    check_page,
    dht_key,
    digest_page,
    is_zero_page,
    iter_page_views,
    page_digest,
)


@given(st.integers(0, PAGE_SIZE - 1), st.integers(1, 255))
def test_zero_check_sees_any_nonzero_byte(position: int, value: int) -> None:
    page = bytearray(PAGE_SIZE)
    page[position] = value
    for form in (bytes(page), page, memoryview(page), memoryview(bytes(page))):
        assert not is_zero_page(form)
    for form in (ZERO_PAGE, bytearray(PAGE_SIZE), memoryview(bytearray(PAGE_SIZE))):
        assert is_zero_page(form)


def test_digest_key_and_check() -> None:
    page = bytes(range(256)) * 16
    digest = digest_page(memoryview(page))
    assert digest == blake3(page).digest() and len(digest) == 32
    assert dht_key(digest) == digest[:20]
    assert blake3(ZERO_PAGE).digest() == ZERO_DIGEST
    check_page(digest, page)
    with pytest.raises(IntegrityError):
        check_page(digest, page[:-1] + b"\x00")
    with pytest.raises(IntegrityError):
        check_page(digest, page[:100])
    with pytest.raises(DecodeError):
        page_digest(b"short")


def test_page_views_are_zero_copy() -> None:
    buffer = bytearray(3 * PAGE_SIZE)
    views = list(iter_page_views(buffer))
    assert len(views) == 3
    buffer[PAGE_SIZE] = 7
    assert views[1][0] == 7  # a view, not a copy
    with pytest.raises(DecodeError):
        list(iter_page_views(bytes(PAGE_SIZE + 1)))
