"""The virtual network: frames lost at a migration's switch-over, tmdht vnet against a bridge.

Three sites as network namespaces on one host (a hub namespace stands for the WAN): the guest M
(busybox, virtio NIC) runs at site a and live-migrates to site b through the tmdht proxies
(``tmdht qemu send`` / ``receive``); a peer at site c sends M a numbered UDP stream (``--rates``
datagrams/s, M echoes each) and pings it (100/s) from a few seconds before the migration until
a few seconds after the destination resumed. Two data planes, run alternately:

- ``vnet``: a tmdht vnet agent per site (tunnels encrypted between sites), the MAC directory on
  two store nodes (sites a and b), M attached through ``-netdev stream`` and a QMP socket;
- ``bridge``: a Linux bridge per site, the sites' WAN links bridged (one L2 segment), M on a
  tap device; only QEMU's own announce (RARP) follows the VM.

Before the migration each run also measures the peer's ping round trip to M (idle, 50/s) and
the TCP throughput of a second guest G (site b) to M (site a) with ``vnetprobe``.

Reported per setup and rate (medians over ``--reps`` runs, every run in the JSON): datagrams
lost on the way to M (M's own count), reordered and duplicated (M's counts and the echoes), the
stop-to-resume time, ping RTT, TCP Mbit/s; vnet/bridge ratios. JSON goes to
``bench/results/vnet.json``, the packet-number plot around the switch-over to
``bench/results/vnet-switchover.png``.

Run as root: ``python bench/vnet.py [--rates 500,2000] [--reps 3]``. Everything it creates
(``vnet-*`` namespaces, processes) is removed by name/PID at the end, also on errors.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tmdht.lab import HostTools
from tmdht.lab.netguest import ensure_net_initramfs
from tmdht.lab.netlab import Services
from tmdht.lab.netscenario import run_migration_scenario
from tmdht.node.local import read_ready_line
from tmdht.vnet.control import control_request

REPO = Path(__file__).resolve().parents[1]
MODES = ("bridge", "vnet")


def load() -> float:
    return os.getloadavg()[0]


def median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize(runs: list[dict[str, Any]], rates: list[float]) -> list[dict[str, Any]]:
    rows = []
    for rate in rates:
        for mode in MODES:
            mine = [r for r in runs if r["mode"] == mode and r["rate"] == rate and "error" not in r]
            if not mine:
                continue
            stream = [r["stream"] for r in mine]
            rows.append({
                "mode": mode, "rate": rate, "runs": len(mine),
                "lost_to_guest": [s["lost_to_guest"] for s in stream],
                "lost_median": median([s["lost_to_guest"] for s in stream]),
                "reordered": sum((s["guest_reordered"] or 0) + s["echo_reordered"]
                                 for s in stream),
                "duplicates": sum((s["guest_duplicates"] or 0) + s["echo_duplicates"]
                                  for s in stream),
                "lost_round_trip_median": median([s["lost_round_trip"] for s in stream]),
                "missing_at_switchover": [s.get("missing_at_switchover") for s in stream],
                "stop_to_resume_ms": median([r["migration"]["stop_to_resume_ms"] for r in mine]),
                "downtime_ms": median([r["migration"]["downtime_ms"] for r in mine]),
                "max_echo_rtt_ms": median([s["max_echo_rtt_ms"] for s in stream]),
                "ping_rtt_ms": median([r["idle"]["ping_rtt_ms_median"] for r in mine]),
                "tcp_mbit": median([r["tcp"]["mbit"] for r in mine if "tcp" in r]),
                "load": median([r["load"] for r in mine]),
            })
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    head = (f"{'setup':7} {'rate/s':>6} {'runs':>4} {'lost (each run)':>18} "
            f"{'at switch-over':>15} {'reord':>5} "
            f"{'dups':>4} {'stop->resume':>12} {'ping ms':>7} {'TCP Mbit/s':>10} {'load':>5}")
    print(head)
    print("-" * len(head))
    for r in rows:
        lost = ",".join("?" if v is None else str(v) for v in r["lost_to_guest"])
        near = ",".join("?" if v is None else str(v) for v in r.get("missing_at_switchover", []))
        print(f"{r['mode']:7} {r['rate']:>6.0f} {r['runs']:>4} {lost:>18} {near:>15} "
              f"{r['reordered']:>5} "
              f"{r['duplicates']:>4} {fmt(r['stop_to_resume_ms'], 'ms'):>12} "
              f"{fmt(r['ping_rtt_ms']):>7} {fmt(r['tcp_mbit']):>10} {fmt(r['load']):>5}")


def fmt(value: float | None, unit: str = "") -> str:
    return "-" if value is None else f"{value:.1f}{(' ' + unit) if unit else ''}"


def ratios(rows: list[dict[str, Any]]) -> dict[str, float | None]:
    def pick(mode: str, key: str) -> float | None:
        values = [r[key] for r in rows if r["mode"] == mode and r[key] is not None]
        return statistics.median(values) if values else None

    out: dict[str, float | None] = {}
    for key in ("ping_rtt_ms", "tcp_mbit"):
        vnet, bridge = pick("vnet", key), pick("bridge", key)
        out[f"{key}_vnet_over_bridge"] = vnet / bridge if vnet and bridge else None
    vnet_ping, bridge_ping = pick("vnet", "ping_rtt_ms"), pick("bridge", "ping_rtt_ms")
    out["added_ping_rtt_ms"] = vnet_ping - bridge_ping if vnet_ping and bridge_ping else None
    return out


def plot(runs: list[dict[str, Any]], rate: float, path: Path) -> Path | None:
    """Per setup (one run each, the first whose guest report came back): the packet number by
    the time its echo arrived (a flat stretch is the switch-over; lost numbers never arrive and
    are marked at their send time), and each packet's echo round trip by its send time."""
    try:
        import matplotlib  # noqa: PLC0415
    except ImportError:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "matplotlib"], check=True,
                       timeout=600)
        import matplotlib  # noqa: PLC0415
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    chosen = {}
    for mode in MODES:
        candidates = [r for r in runs if r["mode"] == mode and r["rate"] == rate
                      and r.get("timeline", {}).get("rows")]
        reported = [r for r in candidates if r["stream"].get("lost_to_guest") is not None]
        if reported or candidates:
            chosen[mode] = (reported or candidates)[0]
    if not chosen:
        return None
    fig, axes = plt.subplots(2, len(chosen), figsize=(6.5 * len(chosen), 7.5), squeeze=False)
    for column, (mode, run) in enumerate(chosen.items()):
        timeline = run["timeline"]
        rows = timeline["rows"]
        resume = (timeline["resume_ns"] - timeline["stop_ns"]) / 1e9 \
            if timeline.get("resume_ns") else None
        got = [(t + rtt / 1000, seq, t, rtt) for seq, t, rtt in rows if rtt is not None]
        lost = [(t, seq) for seq, t, rtt in rows if rtt is None]
        top, bottom = axes[0][column], axes[1][column]
        top.scatter([a for a, _, _, _ in got], [s for _, s, _, _ in got], s=2, color="#2a6",
                    label="echo arrived")
        top.scatter([t for t, _ in lost], [s for _, s in lost], s=4, color="#d33",
                    label=f"never arrived ({len(lost)})")
        lost_total = run["stream"].get("lost_to_guest")
        top.set_title(f"{mode}, {rate:.0f} datagrams/s: lost by the guest's count "
                      f"{'?' if lost_total is None else lost_total}")
        top.set_ylabel("packet number")
        top.set_xlabel("arrival time of the echo (lost: send time), s from the STOP")
        bottom.scatter([t for _, _, t, _ in got], [r for _, _, _, r in got], s=2, color="#26a")
        bottom.set_yscale("log")
        bottom.set_ylabel("echo round trip (ms)")
        bottom.set_xlabel("send time, s from the source's STOP")
        for ax in (top, bottom):
            ax.axvline(0, color="#888", linestyle="--", linewidth=1)
            if resume is not None:
                ax.axvline(resume, color="#888", linestyle=":", linewidth=1)
        top.legend(loc="upper left", markerscale=4)
    fig.suptitle("UDP stream to the migrating guest around the switch-over "
                 "(dashed: source STOP, dotted: destination RESUME)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="500,2000",
                        help="datagrams/s of the stream (comma-separated)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--throughput-seconds", type=float, default=5.0)
    parser.add_argument("--migrate-after", type=float, default=3.0)
    parser.add_argument("--out", type=Path, default=REPO / "bench/results/vnet.json")
    parser.add_argument("--plot", type=Path, default=REPO / "bench/results/vnet-switchover.png")
    parser.add_argument("--keep", action="store_true", help="keep the work directories")
    parser.add_argument("--replot", action="store_true",
                        help="only redraw the plot and the table from --out")
    args = parser.parse_args()
    if args.replot:
        doc = json.loads(args.out.read_text())
        print_table(doc["summary"])
        print(plot(doc["runs"], max(doc["conditions"]["rates"]), args.plot))
        return 0
    if os.geteuid() != 0:
        print("bench/vnet.py needs root (network namespaces)", file=sys.stderr)
        return 2
    rates = [float(r) for r in args.rates.split(",")]
    tools = HostTools.discover()
    build = REPO / "build" / "lab"
    initramfs = ensure_net_initramfs(build, tools)
    runs: list[dict[str, Any]] = []
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="vnet-bench-") as tmp:
        for rep in range(args.reps):
            for rate in rates:
                for mode in MODES:
                    work = Path(tmp) / f"{mode}-{rate:.0f}-{rep}"
                    before = load()
                    began = time.monotonic()
                    try:
                        result = run_migration_scenario(
                            mode, tools, initramfs, work,
                            Services(read_ready_line, control_request), rate=rate,
                            migrate_after=args.migrate_after,
                            throughput_seconds=args.throughput_seconds if rate == rates[0]
                            else 0.0, tag=f"{rep}{mode[0]}")
                    except Exception as exc:  # noqa: BLE001 - one failed run is reported, not fatal
                        result = {"mode": mode, "rate": rate, "error": repr(exc)}
                        print(f"run {mode} {rate:.0f}/s #{rep}: FAILED {exc!r}", file=sys.stderr)
                    result.update(rep=rep, load=(before + load()) / 2,
                                  seconds=time.monotonic() - began)
                    runs.append(result)
                    if "stream" in result:
                        s = result["stream"]
                        print(f"run {mode:6} {rate:6.0f}/s #{rep}: lost {s['lost_to_guest']} "
                              f"(echoes missing around the switch-over "
                              f"{s.get('missing_at_switchover')}), "
                              f"reordered {s['guest_reordered']}, dups {s['guest_duplicates']}, "
                              f"stop->resume {result['migration']['stop_to_resume_ms']} ms, "
                              f"load {result['load']:.1f}", file=sys.stderr)
                    if args.keep:
                        subprocess.run(["cp", "-r", str(work), str(args.out.parent)], check=False)
    rows = summarize(runs, rates)
    print_table(rows)
    doc = {"runs": runs, "summary": rows, "ratios": ratios(rows),
           "conditions": {"cores": os.cpu_count(), "shared_machine": True,
                          "duration_s": time.time() - started, "reps": args.reps,
                          "rates": rates, "qemu": tools.qemu_version()}}
    print(json.dumps(doc["ratios"], indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    path = plot(runs, max(rates), args.plot)
    print(f"wrote {args.out}" + (f" and {path}" if path else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
