"""bench/migrate.py's bookkeeping: summaries over repetitions, tables, the xbzrle cache size."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import migrate


def run(variant: str, rep: int, *, seconds: float | None, wan_mib: float,
        sender_cpu: float = 0.0) -> dict[str, Any]:
    converged = seconds is not None
    mib = 1 << 20
    return {
        "variant": variant, "memory_mib": 128, "dirty": 0, "rate": "1gbit", "rtt_ms": 20.0,
        "rep": rep, "status": "completed" if converged else "cancelled",
        "converged": converged, "identical": converged, "resumed": converged,
        "end_to_end_s": seconds, "switchover_ms": 300.0 if converged else None,
        "total_time_ms": int(seconds * 1000) if seconds else None,
        "downtime_ms": 20 if converged else None, "rounds": 3, "wall_s": seconds or 40.0,
        "wan": {"relay_up_bytes": int(wan_mib * mib), "relay_down_bytes": mib // 10,
                "relay_up_wire_bytes": int(wan_mib * mib * 1.033),
                "relay_down_wire_bytes": mib // 10, "if_up_bytes": int(wan_mib * mib),
                "if_down_bytes": mib // 10},
        "cpu_s": {"src-qemu": 0.2, "sender": sender_cpu, "dst-qemu": 0.3, "receiver": 0.0,
                  "nodes": 0.0, "relay": 0.2},
        "qemu_vcpu_s": {"src": 0.1, "dst": 0.0},
    }


RUNS = [
    run("qemu", 0, seconds=1.0, wan_mib=116), run("qemu", 1, seconds=1.4, wan_mib=116),
    run("qemu", 2, seconds=1.2, wan_mib=116),
    run("tmdht", 0, seconds=4.0, wan_mib=60, sender_cpu=1.5),
    run("tmdht", 1, seconds=None, wan_mib=300, sender_cpu=9.0),
    run("tmdht", 2, seconds=3.0, wan_mib=58, sender_cpu=1.3),
]


def test_summary_takes_medians_over_repetitions_and_compares_with_plain_qemu() -> None:
    summary = {e["variant"]: e for e in migrate.summarize(RUNS)}
    plain, tmdht = summary["qemu"], summary["tmdht"]
    assert plain["total_s"] == {"median": 1.2, "min": 1.0, "max": 1.4}
    assert (plain["runs"], plain["converged"], plain["identical"]) == (3, 3, 3)
    # the migration that did not converge counts as a run, not in times or CPU
    assert (tmdht["runs"], tmdht["converged"], tmdht["resumed"]) == (3, 2, 2)
    assert tmdht["total_s"] == {"median": 3.5, "min": 3.0, "max": 4.0}
    assert tmdht["cpu_sender"]["median"] == pytest.approx(1.4)
    assert tmdht["wan_up_mib"]["median"] == pytest.approx(60)
    assert tmdht["total_s_vs_plain"] == pytest.approx(3.5 / 1.2)
    assert tmdht["wan_up_mib_vs_plain"] == pytest.approx(60 / 116)


def test_tables_and_counter_agreement_print_every_point() -> None:
    results = {"settings": [{"rate": "1gbit", "rtt_ms": 20.0,
                             "check": {"rtt_ms_median": 20.6, "bulk_mbit_s": 930.0}}],
               "runs": RUNS, "summary": migrate.summarize(RUNS)}
    text = migrate.tables(results)
    assert "== 1 Gbit/s ==" in text and "TCP bulk 930 Mbit/s" in text
    lines = [line for line in text.splitlines() if line.startswith("128 MiB idle")]
    assert [line.split()[4] for line in lines] == ["qemu", "tmdht"]
    assert "2/3" in lines[1]  # converged 2 of 3
    agreement = migrate.counter_agreement(RUNS)
    assert "(+0.00%)" in agreement and "(+3.30%" in agreement


def test_report_merges_result_files(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(migrate, "plot", lambda results, out, name: [])
    setting = {"rate": "1gbit", "rtt_ms": 20.0,
               "check": {"rtt_ms_min": 20.5, "rtt_ms_median": 20.6, "rtt_ms_max": 21.0,
                         "bulk_mbit_s": 930.0, "dropped_packets": 0,
                         "relay_cpu_s_per_gb": 1.8}}
    for index, part in enumerate((RUNS[:3], RUNS[3:])):
        (tmp_path / f"{index}.json").write_text(json.dumps(
            {"conditions": {}, "settings": [setting], "guests": [], "runs": part}))
    assert migrate.report([tmp_path / "0.json", tmp_path / "1.json"], tmp_path, "merged") == 0
    merged = json.loads((tmp_path / "merged.json").read_text())
    assert len(merged["runs"]) == 6 and len(merged["settings"]) == 1
    assert "tmdht" in capsys.readouterr().out


@pytest.mark.parametrize(("working_mib", "cache"), [(0, 64), (12, 64), (64, 64), (65, 128),
                                                    (210, 256)])
def test_xbzrle_cache_is_a_power_of_two_covering_the_working_set(working_mib: int,
                                                                 cache: int) -> None:
    assert migrate.xbzrle_cache_bytes(working_mib) == cache << 20


def test_plots_are_written_with_points_that_did_not_converge(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    runs = [*RUNS, *(run("qemu-xbzrle", rep, seconds=None, wan_mib=400) for rep in range(3))]
    runs += [dict(r, rate="100mbit") for r in runs]
    results = {"settings": [{"rate": "100mbit", "rtt_ms": 20.0, "check": {}},
                            {"rate": "1gbit", "rtt_ms": 20.0, "check": {}}],
               "runs": runs, "summary": migrate.summarize(runs)}
    paths = migrate.plot(results, tmp_path, "t")
    assert [p.name for p in paths] == ["t-time.png", "t-wan.png", "t-downtime.png"]
    for path in paths:
        assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_plots_label_panels_no_run_covers(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    other = [dict(r, memory_mib=1024, rtt_ms=80.0) for r in RUNS[:3]]  # 1 GiB only at 80 ms
    runs = [*RUNS, *other]
    results = {"settings": [{"rate": "1gbit", "rtt_ms": 20.0, "check": {}},
                            {"rate": "1gbit", "rtt_ms": 80.0, "check": {}}],
               "runs": runs, "summary": migrate.summarize(runs)}
    assert len(migrate.plot(results, tmp_path, "t")) == 3
