"""One run of the virtual-network experiment: a guest migrates between sites under traffic.

:func:`run_migration_scenario` builds a :class:`tmdht.lab.netlab.NetLab` (``vnet`` or
``bridge``), boots the migrating guest M at site ``a`` (and its destination QEMU at site ``b``),
optionally a second guest G at site ``b``, and a traffic peer at site ``c``. It measures, in
order: the peer's ping and echo round trips to M (idle), the TCP throughput from G to M
(``vnetprobe``), then the switch-over: the peer sends a numbered UDP stream to M (and pings
it) while M live-migrates from ``a`` to ``b`` through the tmdht proxies (``tmdht qemu send`` /
``receive``, no store cluster, an empty catalog: pages travel whole). It returns what was lost,
reordered and duplicated on the way to M (M's own counts) and back (the echoes), and the
packet-number timeline around the switch-over for plots.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Final

from tmdht.catalog import TemplateCatalog
from tmdht.lab.errors import LabError, QmpError
from tmdht.lab.guest import Guest
from tmdht.lab.host import HostTools
from tmdht.lab.migrate import make_fifo, read_ready, wait_report
from tmdht.lab.netguest import (
    PROBE_TCP_PORT,
    NetGuestSpec,
    run_in_guest,
    stream_nic_args,
    tap_nic_args,
)
from tmdht.lab.netlab import NetLab, Services, netns_tools, write_json
from tmdht.lab.netpeer import parse_report

__all__ = ["M_MAC", "M_SPEC", "run_migration_scenario"]

M_SPEC: Final = NetGuestSpec(name="vnet-m", workload="idle", seed=11, ip="10.77.0.2/24")
G_SPEC: Final = NetGuestSpec(name="vnet-g", workload="idle", seed=12, ip="10.77.0.3/24")
M_MAC: Final = "52:54:00:77:00:02"
G_MAC: Final = "52:54:00:77:00:03"
VNET: Final = 1


def _tmdht(*args: str | Path) -> str:
    return shlex.join([sys.executable, "-m", "tmdht.cli", *map(str, args)])


def _peer(lab: NetLab, work: Path, name: str, *, rate: float, duration: float,
          ping_rate: float, size: int = 64) -> tuple[Any, Path]:
    out = work / f"{name}.json"
    out.unlink(missing_ok=True)
    proc = lab.spawn(lab.sites["c"].namespace,
                     [sys.executable, "-m", "tmdht.lab.netpeer", "--target", M_SPEC.address,
                      "--rate", str(rate), "--duration", str(duration), "--ping-rate",
                      str(ping_rate), "--size", str(size), "--out", str(out)],
                     name=name, stdout=True)
    return proc, out


def _finish_peer(proc: Any, out: Path, timeout: float) -> dict[str, Any]:
    assert proc.stdout is not None
    first = proc.stdout.readline()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"the traffic peer did not finish: {exc}") from exc
    if proc.returncode != 0 or not out.exists():
        raise LabError(f"the traffic peer failed (exit {proc.returncode}); see {out.parent}")
    doc: dict[str, Any] = json.loads(out.read_text())
    doc["t0_ns"] = json.loads(first)["t0_ns"] if first else doc["send_ns"][0]
    return doc


def _stream_summary(peer: dict[str, Any], stop_ns: int | None,
                    resume_ns: int | None = None) -> dict[str, Any]:
    """Loss, order and duplicates of a stream run, from M's counts and the echoes. Echoes
    missing for datagrams sent from 1 s before the stop to 1 s after the resume count as lost
    at the switch-over (``missing_at_switchover``); M's own count is the total."""
    sent = int(peer["sent"])
    echoes = [seq for seq, _ in peer["echoes"] if 1 <= seq <= sent]
    seen: set[int] = set()
    duplicates = reordered = 0
    highest = 0
    for seq in echoes:
        if seq in seen:
            duplicates += 1
        seen.add(seq)
        if seq < highest:
            reordered += 1
        highest = max(highest, seq)
    missing = sorted(set(range(1, sent + 1)) - seen)
    report = parse_report(peer.get("report"))
    send_ns = peer["send_ns"]
    window_missing = None
    if stop_ns is not None and resume_ns is not None:
        low, high = stop_ns - 1_000_000_000, resume_ns + 1_000_000_000
        window_missing = sum(1 for seq in missing if low <= send_ns[seq - 1] <= high)
    at_stop = None
    if stop_ns is not None:
        at_stop = next((i + 1 for i, t in enumerate(send_ns) if t >= stop_ns), None)
    rtts = {seq: (recv - send_ns[seq - 1]) / 1e6 for seq, recv in peer["echoes"]
            if 1 <= seq <= sent}
    return {
        "sent": sent,
        "guest_received": report.get("received"),
        "guest_reordered": report.get("reordered"),
        "guest_duplicates": report.get("duplicates"),
        "lost_to_guest": None if "received" not in report else sent - report["received"],
        "echoed": len(seen),
        "lost_round_trip": len(missing),
        "missing_at_switchover": window_missing,
        "missing": missing[:2000],
        "echo_reordered": reordered,
        "echo_duplicates": duplicates,
        "seq_at_stop": at_stop,
        "max_echo_rtt_ms": max(rtts.values()) if rtts else None,
        "median_echo_rtt_ms": statistics.median(rtts.values()) if rtts else None,
        "pings_sent": peer["pings_sent"],
        "ping_replies": len(peer["ping_replies"]),
    }


def _timeline(peer: dict[str, Any], stop_ns: int | None, window: float) -> dict[str, Any]:
    """Per packet around the switch-over: send time (s from the stop) and echo round trip (ms,
    None if lost)."""
    if stop_ns is None:
        return {}
    send_ns = peer["send_ns"]
    echoed = {seq: recv for seq, recv in peer["echoes"]}
    rows = []
    for seq, sent in enumerate(send_ns, 1):
        offset = (sent - stop_ns) / 1e9
        if -window <= offset <= window:
            recv = echoed.get(seq)
            rows.append([seq, round(offset, 6), None if recv is None else
                         round((recv - sent) / 1e6, 3)])
    return {"stop_ns": stop_ns, "rows": rows}


def _event_ns(guest: Guest, name: str, wall_minus_mono: float,
              timeout: float = 10.0) -> int | None:
    """When QEMU sent event ``name`` (CLOCK_MONOTONIC ns), waiting for it if needed."""
    events = guest.qmp.take_events(name)
    if not events:
        with contextlib.suppress(QmpError):
            events = [guest.qmp.wait_event(name, timeout=timeout)]
    for event in events:
        if event.timestamp:
            return int((event.timestamp - wall_minus_mono) * 1e9)
    return None


def run_migration_scenario(mode: str, tools: HostTools, initramfs: Path, work: Path,
                           services: Services, *,
                           rate: float = 2000.0, stream_seconds: float = 120.0,
                           migrate_after: float = 3.0, tail_seconds: float = 3.0,
                           ping_rate: float = 100.0,
                           latency_seconds: float = 4.0, throughput_seconds: float = 0.0,
                           window: float = 1.0, tag: str = "") -> dict[str, Any]:
    """See the module docstring; ``throughput_seconds`` 0 skips guest G and the TCP test. The
    stream runs from ``migrate_after`` seconds before the migration starts to ``tail_seconds``
    after the destination resumed (at most ``stream_seconds``)."""
    work.mkdir(parents=True, exist_ok=True)
    sockets = Path(tempfile.mkdtemp(prefix="vnet-s-"))  # unix socket paths must stay short
    catalog = work / "empty.catalog"
    TemplateCatalog.from_digests([]).save(catalog)
    result: dict[str, Any] = {"mode": mode, "rate": rate}
    with NetLab(mode, services, work=work, tag=tag) as lab, ExitStack() as guests:
        tools_a = netns_tools(tools, lab.sites["a"].namespace, work)
        tools_b = netns_tools(tools, lab.sites["b"].namespace, work)
        if mode == "vnet":
            lab.start_directory()
            for site in ("a", "b", "c"):
                lab.start_agent(site)
            lab.peer("c")
            src_args = stream_nic_args(M_MAC, sockets / "m-src.net", sockets / "m-src.qmp")
            dst_args = stream_nic_args(M_MAC, sockets / "m-dst.net", sockets / "m-dst.qmp")
            g_args = stream_nic_args(G_MAC, sockets / "g.net", sockets / "g.qmp")
        else:
            lab.peer("c")
            src_args = tap_nic_args(M_MAC, lab.tap("a", "vnet-tms"))
            dst_args = tap_nic_args(M_MAC, lab.tap("b", "vnet-tmd"))
            g_args = tap_nic_args(G_MAC, lab.tap("b", "vnet-tg"))
        source = guests.enter_context(Guest(M_SPEC, tools=tools_a, initramfs=initramfs,
                                            extra_args=src_args))
        dest = guests.enter_context(Guest(M_SPEC, incoming="defer", tools=tools_b,
                                          initramfs=initramfs, extra_args=dst_args))
        second = None
        if throughput_seconds > 0:
            second = guests.enter_context(Guest(G_SPEC, tools=tools_b, initramfs=initramfs,
                                                extra_args=g_args))
        if mode == "vnet":
            for site, name, prefix in (("a", "m", "m-src"), ("b", "m", "m-dst"),
                                       ("b", "g", "g")):
                if prefix == "g" and second is None:
                    continue
                lab.agent_request(site, {"op": "attach", "name": name, "vnet": VNET,
                                         "kind": "qemu",
                                         "net_socket": str(sockets / f"{prefix}.net"),
                                         "qmp_socket": str(sockets / f"{prefix}.qmp")})
        for guest in (source, second):
            if guest is not None:
                guest.wait_counter(1, timeout=120)
        if mode == "vnet":
            lab.wait_agents_know("c", M_MAC, "a")
        # Warm up (ARP, forwarding tables), then idle round trips.
        warm, warm_out = _peer(lab, work, "peer-warmup", rate=50, duration=1.0, ping_rate=10)
        _finish_peer(warm, warm_out, 60)
        idle, idle_out = _peer(lab, work, "peer-idle", rate=50, duration=latency_seconds,
                               ping_rate=50)
        idle_doc = _finish_peer(idle, idle_out, 60 + latency_seconds)
        pings = [rtt for _, rtt, _ in idle_doc["ping_replies"]]
        result["idle"] = {
            "ping_rtt_ms_median": statistics.median(pings) if pings else None,
            "ping_rtt_ms_p90": sorted(pings)[int(0.9 * (len(pings) - 1))] if pings else None,
            "pings": len(pings),
            "echo": _stream_summary(idle_doc, None),
        }
        if second is not None:
            status, out = run_in_guest(second, f"vnetprobe tcp-send {M_SPEC.address} "
                                       f"{PROBE_TCP_PORT} {throughput_seconds}",
                                       timeout=60 + throughput_seconds)
            line = next((w for w in out.split("\n") if w.startswith("tmdht-tcp")), "")
            fields = dict(w.split("=", 1) for w in line.split()[1:] if "=" in w)
            result["tcp"] = {"status": status, "mbit": float(fields.get("mbit", "nan")),
                             "bytes": int(fields.get("bytes", "0")), "raw": line}
        # The switch-over under traffic.
        for guest in (source, dest):
            guest.set_migration_parameters(max_bandwidth=1 << 30, downtime_limit=300)
            guest.qmp.take_events()
        wall_minus_mono = time.time() - time.monotonic()
        stream, stream_out = _peer(lab, work, "peer-stream", rate=rate,
                                   duration=stream_seconds, ping_rate=ping_rate)
        time.sleep(migrate_after)  # let the stream run before the migration (a wall-time plan)
        fifo = make_fifo(work / "ready.fifo")
        receive_report, send_report = work / "receive.json", work / "send.json"
        dst_address = lab.sites["b"].address
        # The proxies cross the lab's veth "WAN" inside this host: plaintext, as bench/migrate.py's
        # non-TLS variants (the network is what is measured here, not the migration's TLS).
        dest.migrate_incoming("exec:" + _tmdht(
            "qemu", "receive", "--listen", f"{dst_address}:0", "--no-cluster", "--ready-file",
            fifo, "--report", receive_report, "--accept-timeout", "60", "--insecure-plaintext"))
        _host, port = read_ready(fifo, timeout=60)
        source.migrate("exec:" + _tmdht("qemu", "send", "--catalog", catalog, "--to",
                                        f"{dst_address}:{port}", "--report", send_report,
                                        "--insecure-plaintext"))
        stats = source.wait_migration(timeout=120)
        dest.wait_migration(timeout=60)
        stop_ns = _event_ns(source, "STOP", wall_minus_mono)
        resume_ns = _event_ns(dest, "RESUME", wall_minus_mono)
        time.sleep(tail_seconds)  # the stream goes on after the switch-over (a wall-time plan)
        with contextlib.suppress(ProcessLookupError):
            os.kill(stream.pid, signal.SIGUSR1)
        peer_doc = _finish_peer(stream, stream_out, 120 + stream_seconds)
        result["migration"] = {**stats.to_json(),
                               "stop_to_resume_ms": None if stop_ns is None or resume_ns is None
                               else (resume_ns - stop_ns) / 1e6,
                               "send_report": wait_report(send_report, 30).get("ok"),
                               "receive_report": wait_report(receive_report, 30).get("ok")}
        result["stream"] = _stream_summary(peer_doc, stop_ns, resume_ns)
        result["timeline"] = _timeline(peer_doc, stop_ns, window)
        if resume_ns is not None:
            result["timeline"]["resume_ns"] = resume_ns
        if mode == "vnet":
            result["agents"] = {site: {k: v for k, v in lab.agent_metrics(site).items()
                                       if k.startswith("tmdht_vnet_")} for site in "abc"}
        write_json(work / "scenario.json", result)
    shutil.rmtree(sockets, ignore_errors=True)
    return result
