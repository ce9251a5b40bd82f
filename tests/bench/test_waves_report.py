"""bench/waves.py's bookkeeping: the per-VM table and the ratios the issue's targets name."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

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
    text = waves.table(results)
    assert "| tmdht-wave | 100.0, 11.0 | 40.0, 8.0 | 140.0 | 19.0 |" in text
