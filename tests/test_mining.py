"""TMDM mining against a brute-force count, in memory and spilled to disk."""

from __future__ import annotations

import collections
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support.synthetic import mixed_pages, page_pool

from tmdht.errors import UsageError
from tmdht.mining import MiningConfig, TemplateMiner
from tmdht.pages import ZERO_PAGE, digest_page

POOL = page_pool(300, seed=3)


def brute_force(images: list[list[bytes]], threshold: int) -> tuple[list[bytes], list[int]]:
    counts = collections.Counter(p for img in images for p in img if p != ZERO_PAGE)
    templates = {p for p, n in counts.items() if n >= threshold}
    digests = sorted(digest_page(p) for p in templates)
    covered = [sum(1 for p in img if p in templates) for img in images]
    return digests, covered


def mine(images: list[list[bytes]], config: MiningConfig) -> object:
    with TemplateMiner(config, expected_pages=sum(map(len, images))) as miner:
        for i, img in enumerate(images):
            miner.add_image(f"img{i}", [memoryview(p) for p in img])
        return miner.finish()


@settings(max_examples=25, deadline=None)
@given(
    st.integers(2, 4), st.integers(0, 1000), st.lists(st.integers(0, 400), min_size=1, max_size=4)
)
def test_matches_brute_force(threshold: int, seed: int, sizes: list[int]) -> None:
    images = [mixed_pages(n, POOL[:40], seed + i) for i, n in enumerate(sizes)]
    result = mine(images, MiningConfig(threshold=threshold))
    digests, covered = brute_force(images, threshold)
    assert [bytes(d) for d in result.digests] == digests
    assert [i.template_pages for i in result.images] == covered
    assert [i.zero_pages for i in result.images] == [img.count(ZERO_PAGE) for img in images]
    assert result.distinct_contents == len({p for img in images for p in img if p != ZERO_PAGE})


def test_spilling_gives_the_same_result_within_the_budget(tmp_path: Path) -> None:
    images = [mixed_pages(30000, POOL, seed) for seed in range(3)]
    in_memory = mine(images, MiningConfig())
    spilled = mine(images, MiningConfig(memory_budget=1 << 20, spill_dir=tmp_path))
    assert in_memory.partitions == 1 and spilled.partitions >= 8
    assert spilled.spilled_bytes > 0
    assert (spilled.digests == in_memory.digests).all()
    assert (spilled.counts == in_memory.counts).all()
    assert spilled.images == in_memory.images
    assert list(tmp_path.iterdir()) == []  # spill files removed


def test_zero_page_is_never_a_template() -> None:
    result = mine([[ZERO_PAGE] * 50, [ZERO_PAGE, POOL[0], POOL[0]]], MiningConfig())
    assert [bytes(d) for d in result.digests] == [digest_page(POOL[0])]
    assert result.images[0].coverage == 0.0 and result.images[1].coverage == 1.0
    assert result.totals.zero_pages == 51


def test_counts_and_threshold() -> None:
    images = [[POOL[0]] * 5 + [POOL[1]] * 2, [POOL[1], POOL[2]]]
    result = mine(images, MiningConfig(threshold=3))
    got = dict(zip((bytes(d) for d in result.digests), result.counts.tolist(), strict=True))
    assert got == {digest_page(POOL[0]): 5, digest_page(POOL[1]): 3}


def test_bad_config_is_refused() -> None:
    with pytest.raises(UsageError):
        MiningConfig(threshold=1)
    with pytest.raises(UsageError):
        MiningConfig(memory_budget=1000)
