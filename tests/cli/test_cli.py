"""The ``tmdht`` command as a user runs it: real processes on synthetic images."""

from __future__ import annotations

import json
import os
import random
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from support.cli import tmdht
from support.synthetic import mixed_pages, page_pool, write_raw

from tmdht.catalog import TemplateCatalog
from tmdht.launch import tmdht_argv

POOL = page_pool(200, seed=6)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    for i in range(4):
        write_raw(root / f"g{i}.raw", mixed_pages(2000, POOL, seed=i))
    return root


def test_mine_info_encode_rebuild(corpus: Path, tmp_path: Path) -> None:
    images = [corpus / f"g{i}.raw" for i in range(3)]
    mined = json.loads(
        tmdht("templates", "mine", *images, "-o", tmp_path / "c.tmc", "--json").stdout
    )
    assert mined["templates"] > 0 and len(mined["images"]) == 3
    assert 0.3 < mined["coverage"] < 1.0
    info = json.loads(tmdht("templates", "info", tmp_path / "c.tmc", "--json").stdout)
    assert info["catalog_id"] == mined["catalog_id"] and info["templates"] == mined["templates"]
    assert [i["name"] for i in info["images"]] == [str(i) for i in images]  # as given

    enc = json.loads(
        tmdht(
            "encode",
            corpus / "g3.raw",
            "-c",
            tmp_path / "c.tmc",
            "-o",
            tmp_path / "g3.tmds",
            "--json",
        ).stdout
    )
    assert enc["template_pages"] > 0
    assert enc["stream_bytes"] == (tmp_path / "g3.tmds").stat().st_size
    # The stream is smaller by about the template share (plus the zero pages).
    assert enc["stream_bytes"] < enc["image_bytes"] * (1 - 0.9 * enc["template_share"] * 0.7)

    froms = [a for img in images for a in ("--pages-from", img)]
    out = tmp_path / "g3.out"
    tmdht("rebuild", tmp_path / "g3.tmds", *froms, "-c", tmp_path / "c.tmc", "-o", out)
    assert out.read_bytes() == (corpus / "g3.raw").read_bytes()


def test_human_output_has_a_summary(corpus: Path, tmp_path: Path) -> None:
    proc = tmdht(
        "templates", "mine", corpus / "g0.raw", corpus / "g1.raw", "-o", tmp_path / "c.tmc"
    )
    assert (
        "Template coverage" in proc.stdout and "GB/s" in proc.stdout and "templates" in proc.stdout
    )


def test_options_come_from_the_environment(corpus: Path, tmp_path: Path) -> None:
    env = {**os.environ, "TMDHT_TEMPLATES_MINE_THRESHOLD": "1000"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tmdht.cli",
            "templates",
            "mine",
            corpus / "g0.raw",
            "-o",
            tmp_path / "c.tmc",
            "--json",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=True,
    )
    assert json.loads(proc.stdout)["threshold"] == 1000


def test_image_info_and_dump(corpus: Path, tmp_path: Path) -> None:
    info = json.loads(tmdht("image", "info", corpus / "g0.raw", "--json").stdout)
    assert info["format"] == "raw" and info["pages"] == 2000
    tmdht("image", "dump", corpus / "g0.raw", "-o", tmp_path / "d.raw")
    assert (tmp_path / "d.raw").read_bytes() == (corpus / "g0.raw").read_bytes()


def test_every_group_help_names_all_its_subcommands() -> None:
    """`tmdht templates --help` once said "mine, inspect" and left publish out."""
    from tmdht.cli.main import cli

    groups = {n: cli.get_command(None, n) for n in cli.list_commands(None)}  # type: ignore[arg-type]
    groups = {n: g for n, g in groups.items() if getattr(g, "commands", None)}
    assert set(groups) >= {"templates", "image", "node", "cluster", "qemu"}
    for name, group in groups.items():
        help_text = tmdht(name, "--help").stdout
        summary = help_text.split("Options:")[0]
        for sub in group.commands:  # type: ignore[union-attr]
            assert re.search(rf"\b{sub}\b", summary), (name, sub, summary)
            assert re.search(rf"^\s+{sub}\s", help_text.split("Commands:")[1], re.M), (name, sub)


def test_templates_list_and_info_digests_feed_get(corpus: Path, tmp_path: Path) -> None:
    tmdht("templates", "mine", corpus / "g0.raw", corpus / "g1.raw", "-o", tmp_path / "c.tmc")
    listed = tmdht("templates", "list", tmp_path / "c.tmc").stdout.split()
    info = json.loads(tmdht("templates", "info", tmp_path / "c.tmc", "--json").stdout)
    assert len(listed) == info["templates"] and all(len(d) == 64 for d in listed)
    assert listed == sorted(listed)
    assert tmdht("templates", "list", tmp_path / "c.tmc", "-n", "3").stdout.split() == listed[:3]
    shown = json.loads(
        tmdht("templates", "info", tmp_path / "c.tmc", "--digests", "2", "--json").stdout
    )
    assert shown["digests"] == listed[:2]
    # `| head` is no error, even when the list is far longer than a pipe holds.
    rng = random.Random(3)
    big = sorted(rng.randbytes(32) for _ in range(20_000))
    TemplateCatalog.from_digests(big).save(tmp_path / "big.tmc")
    piped = subprocess.run(
        f"{shlex.join(tmdht_argv('templates', 'list', tmp_path / 'big.tmc'))} | head -n 1",
        shell=True, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert piped.stdout.split() == [big[0].hex()] and piped.stderr == ""
    human = tmdht("templates", "info", tmp_path / "c.tmc").stdout
    assert f"tmdht templates list {tmp_path / 'c.tmc'}" in human


def test_image_info_says_what_it_does_with_a_partial_page(tmp_path: Path) -> None:
    (tmp_path / "odd.raw").write_bytes(b"\x01" * (3 * 4096 + 100))
    info = tmdht("image", "info", tmp_path / "odd.raw").stdout
    assert "its last page holds 100 bytes and is read padded with 3,996 zero bytes" in " ".join(
        info.split()
    )
    doc = json.loads(tmdht("image", "info", tmp_path / "odd.raw", "--json").stdout)
    assert doc["pages"] == 4 and doc["blocks"][0]["partial_page_bytes"] == 100
    tmdht("image", "dump", tmp_path / "odd.raw", "-o", tmp_path / "back.raw")
    assert (tmp_path / "back.raw").read_bytes() == (tmp_path / "odd.raw").read_bytes()


ENCODED = {
    "source": "migration stream", "pages": 37074, "full_pages": 9290, "zero_pages": 14856,
    "template_pages": 12928, "distinct_templates": 7072, "image_bytes": 151855104,
    "stream_bytes": 38489131, "ratio": 0.2535, "rebuild_seconds": 1.06, "byte_identical": True,
}  # fmt: skip
MIGRATIONS = [
    {"method": "plain", "qemu_bytes": 92443494, "wire_bytes": 92443494, "total_ms": 209,
     "downtime_ms": 95, "rounds": 3, "pages": 22493, "zero_pages": 14672, "template_pages": None,
     "backref_pages": None, "full_pages": 22493, "compressed_pages": None, "resumed": True},
    {"method": "tmdht", "qemu_bytes": 100112417, "wire_bytes": 40571226, "total_ms": 4635,
     "downtime_ms": 133, "rounds": 4, "pages": 24307, "zero_pages": 14687, "template_pages": 7058,
     "backref_pages": 7548, "full_pages": 9701, "compressed_pages": 0, "resumed": True},
]  # fmt: skip


def test_demo_tables_fit_and_say_what_their_numbers_are() -> None:
    """The demo's figures of one run: each table fits 120 columns (no wrapped cells), shares
    are labelled, and the legend explains the live hits vs the offline share with numbers."""
    from rich.console import Console

    from tmdht.cli import demo

    console = Console(width=120, record=True, highlight=False)
    console.print(demo._encode_table([ENCODED, {**ENCODED, "source": "raw dump"}]))
    console.print(demo._migration_table(MIGRATIONS))
    rows = [line for line in console.export_text().splitlines() if line.strip()]
    assert len(rows) == 2 * 4 + 2, rows  # title, header, rule, one line per row: nothing wrapped
    assert "12,928 (58%)" in rows[3] and "7,072" in rows[3]
    assert "7,058 (29%)" in rows[-1] and "7,548 (31%)" in rows[-1] and "9,701 (40%)" in rows[-1]
    legend = " ".join(demo._encode_legend([ENCODED]) + demo._migration_legend(MIGRATIONS, ENCODED))
    assert "shares of the non-zero pages" in legend
    assert "template hits 29% vs 58% offline" in legend
    assert "goes as a back-reference even when it is a template" in legend
    assert "holds 7,072 distinct template contents in 12,928 template pages" in legend
    assert "pages in full 9,701 x 4 KiB = 37.9 MiB" in legend and ": 38.7 MiB" in legend


def test_catalog_sources_keep_the_names_they_were_given(corpus: Path) -> None:
    """The demo's corpus files are all called stream.bin: the catalog named them that way."""
    from tmdht.cli.jobs import mine_files
    from tmdht.mining import MiningConfig

    images = [corpus / "g0.raw", corpus / "g1.raw"]
    catalog, result, _ = mine_files(images, MiningConfig(), names={images[0]: "idle-1"})
    assert [i.name for i in catalog.stats.images] == ["idle-1", str(images[1])]
    assert [i.name for i in result.images] == ["idle-1", str(images[1])]
