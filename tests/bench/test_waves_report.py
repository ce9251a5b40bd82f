"""bench/waves.py's bookkeeping: the per-VM table and the ratios the issue's targets name."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import waves


def row(variant: str, vm: int, mib: float, seconds: float) -> dict[str, Any]:
    return {"variant": variant, "vm": vm, "mode": "sequential", "converged": True,
            "identical": True, "end_to_end_s": seconds,
            "wan": {"relay_up_bytes": int(mib * (1 << 20)), "relay_down_bytes": 0}}


def test_ratios_and_table() -> None:
    results = {
        "conditions": {"guests": 2, "variants": ["tmdht", "tmdht-wave"]},
        "runs": [row("tmdht", 1, 100, 10), row("tmdht", 2, 100, 10),
                 row("tmdht-wave", 1, 100, 11), row("tmdht-wave", 2, 40, 8)],
        "wave_seconds": {"sequential/tmdht": 20.0, "sequential/tmdht-wave": 19.0},
    }
    ratios = waves.ratios(results)
    assert ratios["sequential: VMs 2.. / VM 1 (tmdht-wave)"] == [0.4]
    assert ratios["sequential: wave total / tmdht total"] == 0.7
    assert ratios["sequential: median s per VM tmdht / tmdht-wave"] == [10, 9.5]
    assert "sequential: wave hits / offers per VM (receiver)" not in ratios
    text = waves.table(results)
    assert "| tmdht-wave | 100.0, 11.0 | 40.0, 8.0 | 140.0 | 19.0 |" in text


def test_hit_share_per_vm() -> None:
    runs = [row("tmdht-wave", 2, 40, 8), row("tmdht-wave", 1, 100, 11)]
    runs[0]["proxy"] = {"receive": {"wave_offers": 400, "wave_hits": 300}}
    runs[1]["proxy"] = {"receive": {"wave_offers": 400, "wave_hits": 0}}
    results = {"conditions": {"guests": 2, "variants": ["tmdht-wave"]}, "runs": runs,
               "wave_seconds": {}}
    assert waves.ratios(results)["sequential: wave hits / offers per VM (receiver)"] == [0.0,
                                                                                        0.75]


@pytest.mark.parametrize("app_mib", [1, 64, 300])
def test_application_data_pages_are_distinct(app_mib: int) -> None:
    """The guest's expansion (block k = 1 MiB of the pool at (k + 1) * stride mod 1 MiB)
    repeats no page, within the data or against the pool file's own pages."""
    page = 4096
    offsets = set()
    for k in range(app_mib):
        start = (k + 1) * waves.APP_STRIDE % (1 << 20)
        assert start + (1 << 20) <= waves.APP_POOL_BYTES
        offsets.update(start + page * p for p in range((1 << 20) // page))
    assert len(offsets) == app_mib * 256  # no two pages of the data start at one offset
    assert not any(o % page == 0 for o in offsets)  # none is a page of the pool file


def test_application_data_script() -> None:
    script = waves.APP_INIT.replace("APP_MIB", "64").replace("STRIDE", str(waves.APP_STRIDE))
    assert "while [ $k -lt 64 ]" in script
    assert f"skip=$(((k + 1) * {waves.APP_STRIDE} % 1048576))" in script
    assert script.rstrip().endswith('exec /init-server-base "$@"')


def test_all_at_once_counts_each_vm_by_its_connection_and_the_wave_by_the_relay() -> None:
    runs = [row("tmdht", 1, 100, 10), row("tmdht-wave", 1, 100, 12),
            row("tmdht-wave", 2, 40, 11)]
    for r in runs:
        r["mode"] = "concurrent"
        r["switchover_ms"] = 900 if r["variant"] == "tmdht" else 1000
        r["wan"] = {"flow_up_bytes": r["wan"]["relay_up_bytes"], "flow_down_bytes": 1 << 20}
    results = {
        "conditions": {"guests": 2, "variants": ["tmdht", "tmdht-wave"]},
        "runs": runs,
        "wave_seconds": {"concurrent/tmdht": 10.0, "concurrent/tmdht-wave": 12.0},
        "wave_wan": {"concurrent/tmdht-wave": {"relay_up_bytes": 150 << 20,
                                               "relay_down_bytes": 2 << 20}},
    }
    ratios = waves.ratios(results)
    assert ratios["concurrent: VMs 2.. / VM 1 (tmdht-wave)"] == [0.406]  # 41 / 101 MiB
    assert ratios["concurrent: median guest pause ms tmdht / tmdht-wave"] == [900, 1000]
    assert ratios["concurrent: VM 1 s / tmdht median s per VM"] == 1.2
    text = waves.table(results)
    assert "| tmdht-wave | 101.0, 12.0 | 41.0, 11.0 | 152.0 | 12.0 |" in text
    assert "| tmdht | 101.0, 10.0 | 101.0 |" in text  # no relay figure: the VMs' sum
