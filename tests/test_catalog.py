"""The catalog file format and membership tests."""

from __future__ import annotations

import contextlib
import os
import random
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tmdht.catalog import CorpusStats, TemplateCatalog
from tmdht.errors import DecodeError, UnknownFormatError, UsageError
from tmdht.mining import ImageCoverage
from tmdht.pages import ZERO_DIGEST

digests_st = st.lists(st.binary(min_size=32, max_size=32), max_size=60, unique=True)


def catalog_of(digests: list[bytes], threshold: int = 2) -> TemplateCatalog:
    cat = TemplateCatalog.from_digests([d for d in digests if d != ZERO_DIGEST], threshold)
    return TemplateCatalog(
        cat.digests,
        np.arange(len(cat), dtype=np.uint64) + 2,
        threshold=threshold,
        stats=CorpusStats((ImageCoverage("g1", 10, 2, 5),), 7, {"tool": "test"}),
    )


@settings(max_examples=100, deadline=None)
@given(digests_st, st.integers(2, 1000))
def test_round_trip(digests: list[bytes], threshold: int) -> None:
    cat = catalog_of(digests, threshold)
    back = TemplateCatalog.from_bytes(cat.to_bytes())
    assert back.catalog_id == cat.catalog_id
    assert (back.digests == cat.digests).all() and (back.counts == cat.counts).all()
    assert back.threshold == threshold and back.stats == cat.stats


@settings(max_examples=100, deadline=None)
@given(digests_st, st.lists(st.binary(min_size=32, max_size=32), max_size=20))
def test_membership_matches_a_set(digests: list[bytes], others: list[bytes]) -> None:
    cat = catalog_of(digests)
    members = set(cat)
    queries = digests + others
    assert [cat.contains(q) for q in queries] == [q in members for q in queries]
    assert cat.contains_many(queries).tolist() == [q in members for q in queries]


def test_digests_sharing_a_prefix() -> None:
    prefix = os.urandom(8)
    same = sorted(prefix + os.urandom(24) for _ in range(5))
    cat = TemplateCatalog.from_digests(same[::2])
    assert [cat.contains(d) for d in same] == [True, False, True, False, True]
    assert cat.contains_many(same).tolist() == [True, False, True, False, True]


def test_catalog_id_names_the_digest_list() -> None:
    a = TemplateCatalog.from_digests([b"\x01" * 32, b"\x02" * 32])
    b = TemplateCatalog.from_digests([b"\x02" * 32, b"\x01" * 32], threshold=5)
    c = TemplateCatalog.from_digests([b"\x01" * 32])
    assert a.catalog_id == b.catalog_id != c.catalog_id


def test_damage_is_detected(tmp_path: Path) -> None:
    data = bytearray(catalog_of([os.urandom(32) for _ in range(50)]).to_bytes())
    rng = random.Random(4)
    for _ in range(50):
        damaged = bytearray(data)
        damaged[rng.randrange(len(damaged))] ^= 1 << rng.randrange(8)
        with pytest.raises(DecodeError):
            TemplateCatalog.from_bytes(bytes(damaged))
    with pytest.raises(DecodeError, match="truncated"):
        TemplateCatalog.from_bytes(bytes(data[:-1]))
    with pytest.raises(UnknownFormatError):
        TemplateCatalog.from_bytes(b"QEVM" + bytes(100))
    bad_version = bytes(data[:8]) + b"\x00\x09" + bytes(data[10:])
    with pytest.raises(DecodeError, match="version 9"):
        TemplateCatalog.from_bytes(bad_version)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_raise_only_decode_error(noise: bytes) -> None:
    for data in (noise, b"TMDHTCAT" + noise):
        with contextlib.suppress(DecodeError):
            TemplateCatalog.from_bytes(data)


def test_zero_digest_and_disorder_are_refused() -> None:
    with pytest.raises(DecodeError, match="zero page"):
        TemplateCatalog.from_digests([ZERO_DIGEST])
    raw = np.frombuffer(b"\x02" * 32 + b"\x01" * 32, dtype=np.uint8)
    with pytest.raises(DecodeError, match="ascending"):
        TemplateCatalog(raw)


def test_save_and_load(tmp_path: Path) -> None:
    cat = catalog_of([os.urandom(32) for _ in range(10)])
    cat.save(tmp_path / "c.tmc")
    assert TemplateCatalog.load(tmp_path / "c.tmc").catalog_id == cat.catalog_id
    assert [p.name for p in tmp_path.iterdir()] == ["c.tmc"]
    with pytest.raises(UsageError, match="no such file"):
        TemplateCatalog.load(tmp_path / "nope")
