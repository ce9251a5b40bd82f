"""Live migration over an emulated WAN, measured as an operator would.

Two network namespaces stand for two data centers, joined through a user-space delay relay and
a tbf rate limit (``bench/wanemu.py``; this kernel has no sch_netem). Each site has one core:
the source QEMU and the tmdht sender run on CPU 0; the destination QEMU, the tmdht receiver, a
3-node store cluster and the relay run on CPU 1. Every process role has its own cgroup, so the
CPU seconds each one spent on a migration are reported.

Guests (``server`` workload, ``lab/server.sh``) are filled the way a server's memory looks: the
host's libraries as a shared distribution, random and base64 data files, repeated blocks and a
fill pattern, a working set; ``--dirty`` makes them keep writing fresh content at that many
MiB/s. The catalog is mined from the lab's default guests and two small server guests
(``server-corpus-101/102``); the migrated guest (seed 41) is not in the corpus, and its data is
new random content every boot.

For each guest (sizes x dirty rates) the source boots once and is migrated again and again
(``cont`` after each migration): for every WAN setting (rates x RTTs), every repetition, every
variant (order rotated per repetition) a fresh destination QEMU receives it:

- ``qemu``: plain precopy over TCP;
- ``qemu-multifd-zstd``: multifd, 2 channels, zstd level 1;
- ``qemu-xbzrle``: XBZRLE with its cache the next power of two above the guest's dirty working
  set, at least QEMU's default 64 MiB (QEMU's docs: large enough for the hot pages);
- ``tmdht``, ``tmdht-zstd``: through ``tmdht qemu send/receive`` (``--compress``), with
  ``--insecure-plaintext`` (the namespaces' addresses are not loopback);
- ``tmdht-tls``: the same over mutual TLS (QEMU-style x509 credential directories from a scratch
  CA made with openssl for this run).

QEMU's bandwidth cap is raised to 10 GiB/s (the link is the limit), downtime limit 300 ms.
A migration that has not converged ``--converge-grace`` seconds (and as long as its first
pass took) after its first pass is cancelled and reported as not converged. After each completed
migration both guests' memory is saved (the destination was started with ``-S``) and compared
page by page, then the destination is resumed and must continue the guest's counter.

Reported per run: WAN bytes both ways (relay counters, also as on a 1500-MTU wire, and the tun
interface counters), QEMU's total time and downtime, rounds (``dirty-sync-count``), converged,
CPU seconds per role (QEMU also split into vCPU threads and the rest), memory identical,
resumed; per point the median, min and max over the repetitions. JSON goes to
``bench/results/migrate.json`` (``migrate-quick.json`` with ``--quick``), written after every
run; plots to ``bench/results/migrate*-{time,wan,downtime}.png``.

Run as root: ``python bench/migrate.py --quick`` (about 10 minutes) or ``python
bench/migrate.py`` (the full matrix; see bench/README.md for its duration). Everything it
creates (namespaces, cgroups, processes, files in /dev/shm) is named ``wanbench-*`` and
removed by name and PID at the end, also on errors and SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from migration.helpers import differing_pages  # noqa: E402
from support.tls import ScratchCA  # noqa: E402
from wanemu import (  # noqa: E402
    DEST_CPU,
    DST_ADDR,
    PREFIX,
    SOURCE_CPU,
    Setting,
    Wan,
    check_table,
    parse_settings,
    rate_bits,
    rate_label,
    signals_raise,
)

from tmdht.catalog import TemplateCatalog  # noqa: E402
from tmdht.images import open_image  # noqa: E402
from tmdht.lab import Guest, GuestSpec, HostTools, capture_guests, default_specs  # noqa: E402
from tmdht.lab.initramfs import ensure_initramfs  # noqa: E402
from tmdht.lab.migrate import make_fifo, read_ready, wait_report  # noqa: E402
from tmdht.mining import MiningConfig, TemplateMiner  # noqa: E402
from tmdht.native import describe as native_describe  # noqa: E402
from tmdht.node.local import LocalCluster  # noqa: E402

VARIANTS = ("qemu", "qemu-multifd-zstd", "qemu-xbzrle", "tmdht", "tmdht-zstd", "tmdht-tls")
SEED = 41
CORPUS_SERVERS = (GuestSpec(name="server-corpus-101", workload="server", seed=101),
                  GuestSpec(name="server-corpus-102", workload="server", seed=102))
MAX_BANDWIDTH = 10 << 30
DOWNTIME_LIMIT_MS = 300
MULTIFD_CHANNELS = 2
XBZRLE_MIN_CACHE = 64 << 20
NODE_ARGS = ["--log-format", "text", "--log-level", "warning"]
POLL_S = 0.25
THREAD_NAMES = ("-name", "debug-threads=on")  # merged into the lab's -name: "CPU 0/TCG", ...
QUICK = {"sizes": "128", "dirty": "0,50", "rates": "100mbit,1gbit", "rtts": "20", "reps": 1}
FULL = {"sizes": "128,1024", "dirty": "0,5,50", "rates": "100mbit,1gbit,uncapped",
        "rtts": "0,20,80", "reps": 3}
ROLES_SHOWN = ("src-qemu", "sender", "dst-qemu", "receiver", "nodes", "relay")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- set-up: corpus, catalog, cluster ---------------------------------------------------------


def mine_catalog(build_dir: Path, path: Path, tools: HostTools) -> tuple[TemplateCatalog, list[Path]]:
    """Mine the catalog from the default guests and the corpus servers; return it and the
    corpus streams (what gets published)."""
    captures = capture_guests(build_dir, (*default_specs(), *CORPUS_SERVERS), tools=tools)
    with TemplateMiner(MiningConfig()) as miner:
        for capture in captures:
            with open_image(capture.stream_path) as image:
                miner.add_image(capture.name, image.iter_pages())
        catalog = TemplateCatalog.from_mining(miner.finish())
    catalog.save(path)
    return catalog, [c.stream_path for c in captures]


def publish(wan: Wan, catalog: Path, images: list[Path], cluster: LocalCluster) -> dict[str, Any]:
    host, port = cluster.seed
    done = subprocess.run(
        [str(wan.wrappers["check-dst"]), sys.executable, "-m", "tmdht.cli", "templates",
         "publish", str(catalog), *map(str, images), "--seed", f"{host}:{port}",
         "--cluster-key-file", str(cluster.key_file), "--json"],
        capture_output=True, text=True, timeout=900, check=True)
    doc: dict[str, Any] = json.loads(done.stdout)
    return doc


# -- per-process and per-thread CPU -----------------------------------------------------------


_TICK = os.sysconf("SC_CLK_TCK")


def qemu_threads_cpu(pid: int) -> dict[str, float]:
    """CPU seconds of a QEMU's vCPU threads (``CPU n/TCG``) and of all its threads."""
    vcpu = total = 0.0
    with contextlib.suppress(FileNotFoundError, ProcessLookupError):
        for task in os.listdir(f"/proc/{pid}/task"):
            try:
                text = Path(f"/proc/{pid}/task/{task}/stat").read_text()
            except (FileNotFoundError, ProcessLookupError):
                continue
            comm = text[text.index("(") + 1 : text.rindex(")")]
            fields = text[text.rindex(")") + 2 :].split()
            seconds = (int(fields[11]) + int(fields[12])) / _TICK
            total += seconds
            if comm.startswith("CPU "):
                vcpu += seconds
    return {"vcpu": vcpu, "threads": total}


# -- one guest, migrated many times -----------------------------------------------------------


_DIRTIED = re.compile(r"tmdht-dirtied mib=(\d+) cs=(\d+)")


def dirtied(guest: Guest) -> tuple[int, int] | None:
    """The guest dirtier's last progress line: (MiB written, uptime in 1/100 s)."""
    guest.console.pump(0.0)
    found = _DIRTIED.findall(guest.console.transcript)
    return (int(found[-1][0]), int(found[-1][1])) if found else None


def ready_fields(guest: Guest) -> dict[str, str]:
    line = guest.console.ready_line or ""
    return dict(word.split("=", 1) for word in line.split()[1:] if "=" in word)


def xbzrle_cache_bytes(working_mib: int) -> int:
    """The next power of two at or above the dirty working set, at least QEMU's default."""
    size = XBZRLE_MIN_CACHE
    while size < working_mib << 20:
        size <<= 1
    return size


@dataclass(frozen=True)
class Context:
    """What every migration needs."""

    wan: Wan
    src_tools: HostTools
    dst_tools: HostTools
    initramfs: Path
    catalog: Path
    cluster: LocalCluster
    work: Path
    shm: Path
    converge_grace: float
    timeout: float
    verify: bool
    tls: tuple[Path, Path]
    """tmdht-tls: the receiver's and the sender's credential directories."""


def _tmdht(wrapper: Path, *args: str | Path) -> str:
    return "exec:" + shlex.join([str(wrapper), sys.executable, "-m", "tmdht.cli", *map(str, args)])


def configure(variant: str, source: Guest, dest: Guest, xbzrle_cache: int) -> None:
    """Capabilities and parameters of ``variant`` on both QEMUs (the source is reused: every
    capability is set explicitly each time)."""
    multifd, xbzrle = variant == "qemu-multifd-zstd", variant == "qemu-xbzrle"
    for guest in (source, dest):
        guest.set_migration_capabilities(multifd=multifd, xbzrle=xbzrle)
        params: dict[str, Any] = {"max-bandwidth": MAX_BANDWIDTH,
                                  "downtime-limit": DOWNTIME_LIMIT_MS}
        if multifd:
            params |= {"multifd-compression": "zstd", "multifd-channels": MULTIFD_CHANNELS,
                       "multifd-zstd-level": 1}
        if xbzrle:
            params["xbzrle-cache-size"] = xbzrle_cache
        guest.qmp.execute("migrate-set-parameters", **params)


def start_incoming(ctx: Context, variant: str, dest: Guest, reports: Path) -> str:
    """Make the destination listen; return the URI the source migrates to."""
    if variant.startswith("qemu"):
        dest.migrate_incoming(f"tcp:{DST_ADDR}:0")
        return f"tcp:{DST_ADDR}:{dest.incoming_tcp_port()}"
    fifo = make_fifo(reports / "ready.fifo")
    host, port = ctx.cluster.seed
    dest.migrate_incoming(_tmdht(
        ctx.wan.wrappers["receiver"], "qemu", "receive", "--listen", f"{DST_ADDR}:0",
        "--seed", f"{host}:{port}", "--cluster-key-file", ctx.cluster.key_file,
        "--catalog", ctx.catalog, "--ready-file", fifo, "--report", reports / "receive.json",
        "--accept-timeout", "120", *_security(ctx, variant, 0)))
    _host, listen_port = read_ready(fifo, timeout=60)
    extra = ["--compress"] if variant == "tmdht-zstd" else []
    extra += _security(ctx, variant, 1)
    return _tmdht(ctx.wan.wrappers["sender"], "qemu", "send", "--catalog", ctx.catalog, "--to",
                  f"{DST_ADDR}:{listen_port}", "--report", reports / "send.json", *extra)


def _security(ctx: Context, variant: str, side: int) -> list[str | Path]:
    """TLS for tmdht-tls (``side`` 0: receiver, 1: sender), plaintext said out loud otherwise:
    the proxies refuse plaintext off loopback."""
    return ["--tls-creds", ctx.tls[side]] if variant == "tmdht-tls" else ["--insecure-plaintext"]


def follow(ctx: Context, source: Guest) -> tuple[dict[str, Any], bool, float | None]:
    """Poll the source until the migration ends; cancel one that does not converge.

    Returns (last query-migrate, converged, seconds of the first pass)."""
    started = time.monotonic()
    first_pass: float | None = None
    cancelled = False
    info: dict[str, Any] = {}
    ram: dict[str, Any] = {}
    for _ in range(int(ctx.timeout / POLL_S) + 1000):
        info = source.query_migrate()
        ram = info.get("ram") or ram  # a cancelled migration reports no RAM figures
        status = info.get("status")
        if status in ("completed", "failed", "cancelled"):
            break
        now = time.monotonic()
        if first_pass is None and int(ram.get("dirty-sync-count", 0)) >= 2:
            first_pass = now - started
        late = first_pass is not None and \
            now - started - first_pass > max(ctx.converge_grace, first_pass)
        if not cancelled and (late or now - started > ctx.timeout):
            source.qmp.execute("migrate_cancel")
            cancelled = True
        time.sleep(POLL_S)  # a poll interval: QEMU has no event for rounds
    if info.get("status") == "completed":
        for _ in range(10_000):  # completed is announced before the times are filled in
            if source.status() != "finish-migrate":
                break
        info = source.query_migrate()
    if "ram" not in info:
        info["ram"] = ram
    return info, info.get("status") == "completed", first_pass


def switchover(source: Guest, dest: Guest) -> tuple[float | None, float | None]:
    """(When the source paused the guest, when the destination had loaded everything), from
    their STOP and MIGRATION completed events (host clock, seconds since the epoch).

    The difference is the guest's real pause, had the destination not been started with -S.
    QEMU's own ``downtime`` and ``total-time`` end when the source has written its last byte
    (into a socket or a pipe), not when the destination has it."""
    source.qmp.poll_events(0.0)
    dest.qmp.poll_events(0.0)
    stops = source.qmp.take_events("STOP")
    loaded = [e for e in dest.qmp.take_events("MIGRATION") if e.data.get("status") == "completed"]
    return (stops[-1].timestamp if stops else None, loaded[-1].timestamp if loaded else None)


def memory_differences(ctx: Context, source: Guest, dest: Guest) -> list[int]:
    """Save both guests' memory (/dev/shm), compare page by page (VGA window excepted) and
    return the page numbers that differ."""
    a, b = ctx.shm / "source.raw", ctx.shm / "dest.raw"
    try:
        source.pmemsave(a, timeout=300)
        dest.pmemsave(b, timeout=300)
        differing: list[int] = differing_pages(a, b)
        return differing
    finally:
        a.unlink(missing_ok=True)
        b.unlink(missing_ok=True)


def migrate_once(ctx: Context, variant: str, spec: GuestSpec, source: Guest,
                 xbzrle_cache: int) -> dict[str, Any]:
    reports = Path(tempfile.mkdtemp(prefix=f"{variant}-", dir=ctx.work))
    wan = ctx.wan
    row: dict[str, Any] = {"variant": variant}
    for role in ("sender", "receiver"):  # a proxy of an earlier run that did not exit
        for pid in wan.pids(role):
            log(f"  killing a leftover {role} (pid {pid})")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    with Guest(spec, incoming="defer", tools=ctx.dst_tools, initramfs=ctx.initramfs,
               extra_args=("-S", *THREAD_NAMES), start_timeout=60) as dest:
        configure(variant, source, dest, xbzrle_cache)
        before = wan.counters()
        threads_before = {"src": qemu_threads_cpu(source.pid), "dst": qemu_threads_cpu(dest.pid)}
        dirty_before = dirtied(source)
        source.qmp.take_events("STOP")
        uri = start_incoming(ctx, variant, dest, reports)
        wall, migrate_at = time.monotonic(), time.time()
        source.migrate(uri)
        info, converged, first_pass = follow(ctx, source)
        row["wall_s"] = time.monotonic() - wall
        ram = info.get("ram", {})
        row |= {
            "status": info.get("status"), "converged": converged,
            "error": info.get("error-desc"),
            "total_time_ms": info.get("total-time"), "downtime_ms": info.get("downtime"),
            "setup_time_ms": info.get("setup-time"), "first_pass_s": first_pass,
            "rounds": ram.get("dirty-sync-count"), "qemu_ram_bytes": ram.get("transferred"),
            "normal_pages": ram.get("normal"), "zero_pages": ram.get("duplicate"),
            "dirty_pages_rate": ram.get("dirty-pages-rate"),
            "multifd_bytes": ram.get("multifd-bytes"), "xbzrle": info.get("xbzrle-cache"),
        }
        if converged:
            dest_info = dest.query_migrate()
            for _ in range(int(60 / POLL_S)):
                if dest_info.get("status") in ("completed", "failed"):
                    break
                time.sleep(POLL_S)  # a poll interval
                dest_info = dest.query_migrate()
            row["dest_status"] = dest_info.get("status")
            stopped, loaded = switchover(source, dest)
            if stopped is not None and loaded is not None:
                row["switchover_ms"] = (loaded - stopped) * 1000
                row["end_to_end_s"] = loaded - migrate_at
        if not variant.startswith("qemu"):
            with contextlib.suppress(Exception):  # a cancelled migration may leave no report
                row["proxy"] = {"send": wait_report(reports / "send.json", 60 if converged else 5),
                                "receive": json.loads((reports / "receive.json").read_text())}
        after = wan.counters()
        threads_after = {"src": qemu_threads_cpu(source.pid), "dst": qemu_threads_cpu(dest.pid)}
        dirty_after = dirtied(source)
        row["wan"] = _wan_delta(before, after)
        row["cpu_s"] = {role: after["cpu"][role] - before["cpu"][role]
                        for role in after["cpu"] if role != "check"}
        row["qemu_vcpu_s"] = {side: threads_after[side]["vcpu"] - threads_before[side]["vcpu"]
                              for side in ("src", "dst")}
        if dirty_before and dirty_after and dirty_after[1] > dirty_before[1]:
            row["dirtied_mib_s"] = (dirty_after[0] - dirty_before[0]) / (
                (dirty_after[1] - dirty_before[1]) / 100)
        row["identical"] = row["resumed"] = None
        if converged and row.get("dest_status") == "completed":
            check_and_resume(ctx, row, source, dest)
    shutil.rmtree(reports, ignore_errors=True)
    if source.status() != "running":
        source.cont()
    row["loadavg_1min"] = os.getloadavg()[0]
    return row


def check_and_resume(ctx: Context, row: dict[str, Any], source: Guest, dest: Guest) -> None:
    """After a completed migration: compare both guests' memory page by page (``ctx.verify``),
    resume the destination and check that it continues the guest's counter; into ``row``."""
    last = source.counter or 0
    if ctx.verify:
        differing = memory_differences(ctx, source, dest)
        row["identical"] = not differing
        row["differing_pages"] = len(differing)
        row["differing_sample"] = differing[:16]
    dest.cont()
    try:
        dest.wait_counter(last + 1, timeout=60)
        row["resumed"] = True
    except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
        row["resumed"] = False
        row["resume_error"] = str(exc)[:500]


def _wan_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, int]:
    out = {}
    for direction in ("up", "down"):
        b, a = before["relay"][direction], after["relay"][direction]
        for key in ("bytes", "wire_bytes", "packets", "wire_packets", "dropped_packets"):
            out[f"relay_{direction}_{key}"] = a[key] - b[key]
        out[f"if_{direction}_bytes"] = (after["interface"][direction]
                                        - before["interface"][direction])
    for key, value in after.get("drops", {}).items():  # tbf and tun queue overflows
        out[f"dropped_{key}"] = value - before["drops"][key]
    return out


# -- the matrix -------------------------------------------------------------------------------


@dataclass(frozen=True)
class GuestConfig:
    memory_mib: int
    dirty: int

    @property
    def label(self) -> str:
        size = f"{self.memory_mib // 1024} GiB" if self.memory_mib >= 1024 \
            else f"{self.memory_mib} MiB"
        return f"{size} {'idle' if not self.dirty else f'dirty {self.dirty} MiB/s'}"

    def spec(self) -> GuestSpec:
        return GuestSpec(name=f"wanbench-{self.memory_mib}-{self.dirty}", workload="server",
                         seed=SEED, memory_mib=self.memory_mib, dirty_mib_s=self.dirty)


def boot_source(ctx: Context, config: GuestConfig, stack: contextlib.ExitStack
                ) -> tuple[Guest, dict[str, Any]]:
    spec = config.spec()
    started = time.monotonic()
    source = stack.enter_context(Guest(spec, tools=ctx.src_tools, initramfs=ctx.initramfs,
                                       extra_args=THREAD_NAMES, start_timeout=60))
    source.wait_counter(2, timeout=900)
    fields = ready_fields(source)
    info: dict[str, Any] = {"boot_and_fill_s": time.monotonic() - started, "ready": fields}
    if config.dirty:  # QEMU's own estimate, before any migration
        source.qmp.execute("calc-dirty-rate", **{"calc-time": 2})
        for _ in range(40):
            time.sleep(0.25)  # a poll interval: calc-dirty-rate runs for calc-time seconds
            rate = source.qmp.execute("query-dirty-rate")
            if rate.get("status") == "measured":
                info["qemu_dirty_rate_mb_s"] = rate.get("dirty-rate")
                break
    return source, info


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per (guest, setting, variant): counts, medians, min and max."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for run in runs:
        key = (run["memory_mib"], run["dirty"], run["rate"], run["rtt_ms"], run["variant"])
        groups.setdefault(key, []).append(run)
    out = []
    for (memory_mib, dirty, rate, rtt, variant), rows in groups.items():
        done = [r for r in rows if r["converged"]]
        entry: dict[str, Any] = {
            "memory_mib": memory_mib, "dirty": dirty, "rate": rate, "rtt_ms": rtt,
            "variant": variant, "runs": len(rows), "converged": len(done),
            "failed": sum(1 for r in rows if r["status"] not in ("completed", "cancelled")),
            "identical": sum(1 for r in rows if r["identical"]),
            "resumed": sum(1 for r in rows if r["resumed"]),
        }
        stats = {
            "total_s": [r["end_to_end_s"] for r in done if r.get("end_to_end_s") is not None],
            "switchover_ms": [r["switchover_ms"] for r in done
                              if r.get("switchover_ms") is not None],
            "qemu_total_s": [r["total_time_ms"] / 1000 for r in done if r["total_time_ms"]],
            "qemu_downtime_ms": [r["downtime_ms"] for r in done if r["downtime_ms"] is not None],
            "dirtied_mib_s": [r["dirtied_mib_s"] for r in rows if r.get("dirtied_mib_s")],
            "rounds": [r["rounds"] for r in rows if r["rounds"] is not None],
            "wan_up_mib": [r["wan"]["relay_up_bytes"] / (1 << 20) for r in rows],
            "wan_down_mib": [r["wan"]["relay_down_bytes"] / (1 << 20) for r in rows],
            "wire_mib": [(r["wan"]["relay_up_wire_bytes"] + r["wan"]["relay_down_wire_bytes"])
                         / (1 << 20) for r in rows],
            "if_mib": [(r["wan"]["if_up_bytes"] + r["wan"]["if_down_bytes"]) / (1 << 20)
                       for r in rows],
            "wall_s": [r["wall_s"] for r in rows],
        }
        for role in ROLES_SHOWN:
            stats[f"cpu_{role}"] = [r["cpu_s"][role] for r in done or rows]
        for side in ("src", "dst"):
            stats[f"vcpu_{side}"] = [r["qemu_vcpu_s"][side] for r in done or rows]
        for name, values in stats.items():
            entry[name] = _spread(values)
        out.append(entry)
    by_point = {(e["memory_mib"], e["dirty"], e["rate"], e["rtt_ms"]): e for e in out
                if e["variant"] == "qemu"}
    for entry in out:
        base = by_point.get((entry["memory_mib"], entry["dirty"], entry["rate"], entry["rtt_ms"]))
        if base is None:
            continue
        for name in ("total_s", "wan_up_mib"):
            mine, theirs = entry[name]["median"], base[name]["median"]
            if mine is not None and theirs:
                entry[f"{name}_vs_plain"] = mine / theirs
    return out


def counter_agreement(runs: list[dict[str, Any]]) -> str:
    """How the tun interface counters compare with the relay's (they count the same packets:
    the tun's transmit side is what the relay reads)."""
    relay = sum(r["wan"]["relay_up_bytes"] + r["wan"]["relay_down_bytes"] for r in runs)
    interface = sum(r["wan"]["if_up_bytes"] + r["wan"]["if_down_bytes"] for r in runs)
    wire = sum(r["wan"].get("relay_up_wire_bytes", 0) + r["wan"].get("relay_down_wire_bytes", 0)
               for r in runs)
    if not relay:
        return "no WAN bytes counted"
    return (f"WAN bytes over all runs: relay {relay / (1 << 30):.2f} GiB, tun interfaces "
            f"{interface / (1 << 30):.2f} GiB ({interface / relay - 1:+.2%}), as on a 1500-MTU "
            f"wire {wire / (1 << 30):.2f} GiB ({wire / relay - 1:+.2%}: a header per segment)")


def _spread(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"median": None, "min": None, "max": None}
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _fmt(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def _range(spread: dict[str, float | None], spec: str) -> str:
    if spread["median"] is None:
        return "-"
    if spread["min"] == spread["max"]:
        return _fmt(spread["median"], spec)
    return f"{_fmt(spread['median'], spec)} [{_fmt(spread['min'], spec)}-{_fmt(spread['max'], spec)}]"


def tables(results: dict[str, Any]) -> str:
    """One table per link rate."""
    summary = results["summary"]
    checks = {(s["rate"], s["rtt_ms"]): s["check"] for s in results["settings"]}
    lines = []
    for rate in dict.fromkeys(s["rate"] for s in results["settings"]):
        rows = [e for e in summary if e["rate"] == rate]
        if not rows:
            continue
        lines.append(f"\n== {rate_label(rate)} ==")
        for (r, rtt), check in checks.items():
            if r == rate:
                lines.append(f"   self-check at {rtt:g} ms: RTT {check['rtt_ms_median']:.1f} ms, "
                             f"TCP bulk {check['bulk_mbit_s']:.0f} Mbit/s")
        lines.append(
            f"{'guest':21} {'RTT':>3} {'variant':17} {'WAN MiB':>7} {'down':>4} {'xplain':>6} "
            f"{'time s [min-max]':>17} {'xplain':>6} {'switchover ms':>17} {'QEMU':>5} "
            f"{'rnd':>3} {'conv':>4} {'same':>4} {'up':>4} {'dirt':>4} | CPU s: "
            f"{'srcQEMU(vcpu)':>13} {'sender':>6} {'dstQEMU':>7} {'recv':>5} {'nodes':>5} "
            f"{'relay':>5}")
        order = {v: i for i, v in enumerate(VARIANTS)}
        rows.sort(key=lambda e: (e["memory_mib"], e["dirty"], e["rtt_ms"], order[e["variant"]]))
        for e in rows:
            guest = GuestConfig(e["memory_mib"], e["dirty"]).label
            cpu = {role: e[f"cpu_{role}"]["median"] for role in ROLES_SHOWN}
            lines.append(
                f"{guest:21} {e['rtt_ms']:3g} {e['variant']:17} "
                f"{_fmt(e['wan_up_mib']['median']):>7} {_fmt(e['wan_down_mib']['median']):>4} "
                f"{_fmt(e.get('wan_up_mib_vs_plain'), '.2f'):>6} "
                f"{_range(e['total_s'], '.1f'):>17} {_fmt(e.get('total_s_vs_plain'), '.2f'):>6} "
                f"{_range(e['switchover_ms'], '.0f'):>17} "
                f"{_fmt(e['qemu_downtime_ms']['median'], '.0f'):>5} "
                f"{_fmt(e['rounds']['median'], '.0f'):>3} {e['converged']}/{e['runs']:<2} "
                f"{e['identical']}/{e['converged']:<2} {e['resumed']}/{e['converged']:<2} "
                f"{_fmt(e['dirtied_mib_s']['median'], '.0f'):>4} | "
                f"{'':6}{_fmt(cpu['src-qemu'], '.1f'):>6}({_fmt(e['vcpu_src']['median'], '.1f')})"
                f" {_fmt(cpu['sender'], '.2f'):>6} {_fmt(cpu['dst-qemu'], '.1f'):>7} "
                f"{_fmt(cpu['receiver'], '.2f'):>5} {_fmt(cpu['nodes'], '.2f'):>5} "
                f"{_fmt(cpu['relay'], '.2f'):>5}")
    return "\n".join(lines)


# -- plots ------------------------------------------------------------------------------------


def plot(results: dict[str, Any], out_dir: Path, stem: str) -> list[Path]:
    """``STEM-time.png`` (time against link rate, one panel per RTT and guest), ``STEM-wan.png``
    (WAN bytes per variant) and ``STEM-downtime.png`` (downtime per variant).

    A point whose repetitions did not all converge is labelled ``converged/runs`` above it; one
    where none converged gets a red x on the axis (its time and downtime do not exist; its WAN
    bytes, counted until it was cancelled, are drawn hatched)."""
    try:
        import matplotlib  # noqa: PLC0415
    except ImportError as exc:  # a dev dependency (pyproject's [dev] extra)
        raise SystemExit("plots need matplotlib: pip install -e '.[dev]'") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    import matplotlib.ticker  # noqa: PLC0415

    summary = results["summary"]
    guests = sorted({(e["memory_mib"], e["dirty"]) for e in summary})
    rtts = sorted({e["rtt_ms"] for e in summary})
    rates = list(dict.fromkeys(s["rate"] for s in results["settings"]
                               if any(e["rate"] == s["rate"] for e in summary)))
    variants = [v for v in VARIANTS if any(e["variant"] == v for e in summary)]
    style = dict(zip(VARIANTS, (("#555555", "o"), ("#d08c2c", "s"), ("#a05cb0", "^"),
                                ("#3b7dc4", "D"), ("#3a9a4a", "v"), ("#c44e52", "P")),
                     strict=True))
    index = {(e["memory_mib"], e["dirty"], e["rate"], e["rtt_ms"], e["variant"]): e
             for e in summary}
    width = 0.8 / len(variants)

    def offset(i: int) -> float:
        return (i - len(variants) / 2 + 0.5) * width

    def points(memory: int, dirty: int, rtt: float) -> Iterator[tuple[str, float, dict[str, Any]]]:
        """(variant, x, summary entry) of one panel, missing points left out."""
        for i, variant in enumerate(variants):
            for rate in rates:
                e = index.get((memory, dirty, rate, rtt, variant))
                if e is not None:
                    yield variant, link_x_of(rates, rate) + offset(i), e

    fig_width = max(4.2 * len(rtts) + 0.4, 6.0)
    legend_columns = min(len(variants), int(fig_width // 1.5))
    legend_rows = -(-len(variants) // legend_columns)

    def panels(title: str) -> tuple[Any, Any, float]:
        """The figure, its panels and the height of its top band (title, legend), inches."""
        text = textwrap.fill(title, int(fig_width * 12))
        title_band = 0.1 + 0.17 * (text.count("\n") + 1)
        top = title_band + 0.22 * legend_rows
        fig, axes = plt.subplots(len(guests), len(rtts), squeeze=False,
                                 figsize=(fig_width, 2.9 * len(guests) + top))
        fig.suptitle(text, fontsize=9, y=1 - 0.08 / fig.get_figheight(), va="top")
        for row, (memory, dirty) in enumerate(guests):
            for col, rtt in enumerate(rtts):
                ax = axes[row][col]
                ax.set_title(f"{GuestConfig(memory, dirty).label}, RTT {rtt:g} ms", fontsize=9)
                ax.set_xticks(range(len(rates)), [rate_label(r) for r in rates], fontsize=8)
                ax.set_xlim(-0.5, len(rates) - 0.5)
        return fig, axes, top

    def not_measured(ax: Any, memory: int, dirty: int, rtt: float) -> bool:
        """Label a panel no run covers (merged files need not cover every guest and RTT)."""
        if next(points(memory, dirty, rtt), None) is not None:
            return False
        ax.text(0.5, 0.5, "not measured", transform=ax.transAxes, ha="center", va="center",
                fontsize=8, color="#777777")
        ax.set_yticks([])
        return True

    def convergence(ax: Any, x: float, y: float | None, e: dict[str, Any]) -> None:
        if not e["converged"]:
            ax.plot([x], [0], marker="x", color="#cc0000", transform=ax.get_xaxis_transform(),
                    clip_on=False, markersize=7, zorder=5)
        elif e["converged"] < e["runs"] and y is not None:
            ax.annotate(f"{e['converged']}/{e['runs']}", (x, y), xytext=(0, 4),
                        textcoords="offset points", ha="center", fontsize=6, color="#cc0000")

    def finish(fig: Any, axes: Any, top: float, name: str) -> Path:
        """One legend for the figure, under its title (panels stay free of it)."""
        for ax in (ax for row in axes for ax in row):
            handles, labels = ax.get_legend_handles_labels()
            if handles:
                legend_top = top - 0.22 * legend_rows
                fig.legend(handles, labels, loc="upper center", ncol=legend_columns, fontsize=8,
                           bbox_to_anchor=(0.5, 1 - legend_top / fig.get_figheight()),
                           frameon=False)
                break
        fig.tight_layout(rect=(0, 0, 1, 1 - (top - 0.1) / fig.get_figheight()))
        return _save(fig, out_dir / f"{stem}-{name}.png", plt)

    paths = []
    fig, axes, top = panels("Migration time, start to destination loaded (median, bars min-max over "
                       "converged runs; k/n: converged of runs; red x: none converged)")
    for row, (memory, dirty) in enumerate(guests):
        for col, rtt in enumerate(rtts):
            ax = axes[row][col]
            if not_measured(ax, memory, dirty, rtt):
                continue
            lines: dict[str, tuple[list[float], list[float], list[float], list[float]]] = {}
            for variant, x, e in points(memory, dirty, rtt):
                spread = e["total_s"]
                convergence(ax, x, spread["max"], e)
                if spread["median"] is None:
                    continue
                xs, ys, lo, hi = lines.setdefault(variant, ([], [], [], []))
                xs.append(x)
                ys.append(spread["median"])
                lo.append(spread["median"] - spread["min"])
                hi.append(spread["max"] - spread["median"])
            for variant, (xs, ys, lo, hi) in lines.items():
                color, marker = style[variant]
                ax.errorbar(xs, ys, yerr=[lo, hi], marker=marker, capsize=2, label=variant,
                            color=color, linewidth=1, markersize=5)
            ax.set_ylabel("seconds", fontsize=8)
            if lines:
                ax.set_yscale("log")
                ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
                ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
                ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
                ax.set_ylim(top=ax.get_ylim()[1] * 1.5)  # room for the k/n labels
            ax.tick_params(axis="y", which="both", labelsize=7)
            ax.grid(alpha=0.3, which="both")
    paths.append(finish(fig, axes, top, "time"))

    for key, unit, name, title in (
            ("wan_up_mib", "MiB", "wan",
             "WAN bytes, source to destination (median over all runs; hatched: none converged, "
             "bytes until cancelled; k/n: converged of runs)"),
            ("switchover_ms", "ms", "downtime",
             "Downtime: source paused to destination loaded (median, bars min-max over "
             "converged runs; k/n: converged of runs; red x: none converged)")):
        fig, axes, top = panels(title)
        for row, (memory, dirty) in enumerate(guests):
            for col, rtt in enumerate(rtts):
                ax = axes[row][col]
                if not_measured(ax, memory, dirty, rtt):
                    continue
                labelled: set[str] = set()
                for variant, x, e in points(memory, dirty, rtt):
                    spread = e[key]
                    convergence(ax, x, spread["max" if key == "switchover_ms" else "median"], e)
                    if spread["median"] is None:
                        continue
                    errors = None
                    if key == "switchover_ms":
                        errors = [[spread["median"] - spread["min"]],
                                  [spread["max"] - spread["median"]]]
                    ax.bar([x], [spread["median"]], width, yerr=errors,
                           label=None if variant in labelled else variant,
                           color=style[variant][0], capsize=1.5, error_kw={"linewidth": 0.7},
                           hatch="///" if not e["converged"] else None,
                           edgecolor="white" if not e["converged"] else None)
                    labelled.add(variant)
                ax.set_ylabel(unit, fontsize=8)
                ax.tick_params(axis="y", labelsize=7)
                ax.grid(alpha=0.3, axis="y")
                if labelled:
                    ax.set_ylim(top=ax.get_ylim()[1] * 1.08)  # room for the k/n labels
        paths.append(finish(fig, axes, top, name))
    return paths


def link_x_of(rates: list[str], rate: str) -> int:
    return rates.index(rate)


def _save(fig: Any, path: Path, plt: Any) -> Path:
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# -- main -------------------------------------------------------------------------------------


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help=f"a short run (about 10 minutes): {QUICK}")
    parser.add_argument("--sizes", help=f"guest MiB, comma-separated (full: {FULL['sizes']})")
    parser.add_argument("--dirty", help=f"guest dirty rates, MiB/s (full: {FULL['dirty']})")
    parser.add_argument("--rates", help=f"link rates, 'uncapped' for none (full: {FULL['rates']})")
    parser.add_argument("--rtts", help=f"round-trip times added, ms (full: {FULL['rtts']})")
    parser.add_argument("--reps", type=int, help=f"repetitions (full: {FULL['reps']})")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--converge-grace", type=float, default=30.0,
                        help="seconds after the first pass (at least as long as the first pass) "
                             "before a migration counts as not converging and is cancelled")
    parser.add_argument("--timeout", type=float, default=900.0, help="per migration, seconds")
    parser.add_argument("--no-verify", action="store_true",
                        help="skip the page-by-page memory comparison")
    parser.add_argument("--check-seconds", type=float, default=4.0,
                        help="duration of the self-check's TCP bulk transfer")
    parser.add_argument("--no-pin", action="store_true", help="do not pin sites to CPUs")
    parser.add_argument("--build-dir", type=Path, default=REPO / "build")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--name", help="results file stem (default: migrate, migrate-quick)")
    parser.add_argument("--report", nargs="+", type=Path, metavar="JSON",
                        help="run nothing: merge these results files, print their tables and "
                             "plot them (as --name, default migrate-report)")
    args = parser.parse_args(argv)
    defaults = QUICK if args.quick else FULL
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.name = args.name or ("migrate-report" if args.report else
                              "migrate-quick" if args.quick else "migrate")
    return args


def report(paths: list[Path], out: Path, name: str) -> int:
    """Tables and plots of earlier results files, merged (settings: the first file's check)."""
    merged: dict[str, Any] = {"conditions": [], "settings": [], "guests": [], "runs": []}
    seen = set()
    for path in paths:
        doc = json.loads(path.read_text())
        merged["conditions"].append(doc["conditions"])
        merged["guests"] += doc["guests"]
        merged["runs"] += doc["runs"]
        for setting in doc["settings"]:
            if (setting["rate"], setting["rtt_ms"]) not in seen:
                seen.add((setting["rate"], setting["rtt_ms"]))
                merged["settings"].append(setting)
    merged["summary"] = summarize(merged["runs"])
    print_results(merged)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(merged, indent=1) + "\n")
    for path in plot(merged, out, name):
        print(f"wrote {path}")
    return 0


def print_results(results: dict[str, Any]) -> None:
    print("The emulation's self-check (TCP ping-pong RTT; plain TCP bulk throughput; the relay's "
          "CPU per GB forwarded during the bulk transfer):")
    print(check_table([(Setting(s["rate"], s["rtt_ms"]), s["check"])
                       for s in results["settings"]]))
    print(tables(results))
    print(counter_agreement(results["runs"]))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report:
        return report(args.report, args.out, args.name)
    if os.geteuid() != 0:
        log("needs root (network namespaces, tun devices, cgroups)")
        return 2
    variants = _csv(args.variants)
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        log(f"unknown variants {sorted(unknown)}; known: {', '.join(VARIANTS)}")
        return 2
    guests = [GuestConfig(int(size), int(dirty)) for size in _csv(args.sizes)
              for dirty in _csv(args.dirty)]
    settings = parse_settings(args.rates, args.rtts)
    for setting in settings:
        rate_bits(setting.rate)  # a bad rate fails now, not an hour in
    total = len(guests) * len(settings) * args.reps * len(variants)
    args.out.mkdir(parents=True, exist_ok=True)
    out_json = args.out / f"{args.name}.json"
    results: dict[str, Any] = {
        "conditions": {
            "command": shlex.join(sys.argv), "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "host": platform.node(), "kernel": platform.release(), "cpus": os.cpu_count(),
            "loadavg_start": os.getloadavg(), "variants": variants,
            "guests": [g.__dict__ for g in guests], "reps": args.reps,
            "converge_grace_s": args.converge_grace, "pinned": not args.no_pin,
            "multifd_channels": MULTIFD_CHANNELS, "downtime_limit_ms": DOWNTIME_LIMIT_MS,
            "max_bandwidth": MAX_BANDWIDTH, "pipeline": native_describe(),
        },
        "settings": [], "guests": [], "runs": [], "summary": [],
    }
    log(f"{total} migrations: {len(guests)} guests x {len(settings)} WAN settings x "
        f"{args.reps} reps x {len(variants)} variants")
    tools = HostTools.discover()
    started = time.monotonic()
    with signals_raise(), contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=PREFIX)))
        shm = Path(f"/dev/shm/{PREFIX}{os.getpid()}")
        shm.mkdir()
        stack.callback(shutil.rmtree, shm, True)
        wan = stack.enter_context(Wan(work, pin=not args.no_pin))
        log("self-check of the emulation ...")
        for setting in settings:
            wan.shape(setting)
            check = wan.self_check(args.check_seconds)
            results["settings"].append({"rate": setting.rate, "rtt_ms": setting.rtt_ms,
                                        "check": check})
            log(f"  {setting.label}: RTT {check['rtt_ms_median']:.2f} ms, TCP bulk "
                f"{check['bulk_mbit_s']:.0f} Mbit/s, relay {check['relay_cpu_s_per_gb'] or 0:.2f}"
                f" CPU s/GB")
        log("mining the catalog (corpus captures are cached in build/guests) ...")
        catalog_path = work / "templates.tmc"
        catalog, corpus = mine_catalog(args.build_dir, catalog_path, tools)
        results["conditions"]["catalog_templates"] = len(catalog)
        initramfs = ensure_initramfs(args.build_dir / "lab", tools.busybox, tools.cpio,
                                     server=True)
        cluster = stack.enter_context(LocalCluster(
            work / "cluster", 3, extra_args=NODE_ARGS, python=str(wan.wrappers["nodes"])))
        log("publishing the templates into the 3-node cluster ...")
        results["conditions"]["publish"] = publish(wan, catalog_path, corpus, cluster)
        ca = ScratchCA(work / "ca")  # tmdht-tls: QEMU tls-creds-x509 directories
        tls = (ca.creds(work / "tls-receiver", server=ca.issue(
                   "receiver", "/O=bench/CN=receiver", server=True, names=f"IP:{DST_ADDR}")),
               ca.creds(work / "tls-sender", client=ca.issue(
                   "sender", "/O=bench/CN=sender", server=False)))
        ctx = Context(wan=wan,
                      src_tools=replace(tools, qemu=wan.wrapper(
                          "qemu-src", wan.src, SOURCE_CPU, "src-qemu", tools.qemu)),
                      dst_tools=replace(tools, qemu=wan.wrapper(
                          "qemu-dst", wan.dst, DEST_CPU, "dst-qemu", tools.qemu)),
                      initramfs=initramfs, catalog=catalog_path, cluster=cluster, work=work,
                      shm=shm, converge_grace=args.converge_grace, timeout=args.timeout,
                      verify=not args.no_verify, tls=tls)
        done = 0
        eta_from = time.monotonic()  # the ETA counts migrations (and boots), not the set-up
        for config in guests:
            with contextlib.ExitStack() as guest_stack:
                log(f"booting the {config.label} guest ...")
                source, info = boot_source(ctx, config, guest_stack)
                results["guests"].append({**config.__dict__, **info})
                log(f"  ready after {info['boot_and_fill_s']:.0f} s: {info['ready']}"
                    + (f", QEMU dirty rate {info.get('qemu_dirty_rate_mb_s')} MB/s"
                       if config.dirty else ""))
                xbzrle_cache = xbzrle_cache_bytes(int(info["ready"].get("working_mib", 0)))
                for setting in settings:
                    wan.shape(setting)
                    for rep in range(args.reps):
                        for variant in variants[rep % len(variants):] + \
                                variants[: rep % len(variants)]:
                            done += 1
                            row = run_one(ctx, variant, config, source, xbzrle_cache)
                            row |= {"memory_mib": config.memory_mib, "dirty": config.dirty,
                                    "rate": setting.rate, "rtt_ms": setting.rtt_ms, "rep": rep}
                            results["runs"].append(row)
                            log(_progress(done, total, eta_from, config, setting, rep, row))
                            results["summary"] = summarize(results["runs"])
                            out_json.write_text(json.dumps(results, indent=1) + "\n")
        results["conditions"]["seconds"] = time.monotonic() - started
        results["conditions"]["loadavg_end"] = os.getloadavg()
    out_json.write_text(json.dumps(results, indent=1) + "\n")
    print_results(results)
    for path in plot(results, args.out, args.name):
        print(f"wrote {path}")
    print(f"wrote {out_json} ({results['conditions']['seconds'] / 60:.1f} min)")
    return 0


def run_one(ctx: Context, variant: str, config: GuestConfig, source: Guest,
            xbzrle_cache: int) -> dict[str, Any]:
    """One migration; an error is recorded in the row (and the source kept running)."""
    try:
        return migrate_once(ctx, variant, config.spec(), source, xbzrle_cache)
    except Exception as exc:
        log(f"  {variant} FAILED: {exc}")
        if source.returncode is not None:
            raise
        with contextlib.suppress(Exception):
            if source.status() != "running":
                source.cont()
        return {"variant": variant, "status": "error", "error": str(exc)[:2000],
                "converged": False, "identical": None, "resumed": None, "rounds": None,
                "total_time_ms": None, "downtime_ms": None, "wall_s": 0.0,
                "wan": dict.fromkeys(("relay_up_bytes", "relay_down_bytes",
                                      "relay_up_wire_bytes", "relay_down_wire_bytes",
                                      "if_up_bytes", "if_down_bytes"), 0),
                "cpu_s": dict.fromkeys(ROLES_SHOWN, 0.0), "qemu_vcpu_s": {"src": 0.0, "dst": 0.0}}


def _progress(done: int, total: int, started: float, config: GuestConfig, setting: Setting,
              rep: int, row: dict[str, Any]) -> str:
    elapsed = time.monotonic() - started
    left = elapsed / done * (total - done)
    wan = row["wan"]
    if row["converged"]:
        outcome = (f"{row.get('end_to_end_s') or 0:.1f} s (QEMU {(row['total_time_ms'] or 0) / 1000:.1f}), "
                   f"switchover {row.get('switchover_ms') or 0:.0f} ms (QEMU {row['downtime_ms']}), "
                   f"{row['rounds']} rounds, "
                   f"{'identical' if row['identical'] else 'NOT IDENTICAL' if row['identical'] is False else 'unchecked'}, "
                   f"{'resumed' if row['resumed'] else 'NOT RESUMED'}")
    else:
        outcome = f"{row['status']} (not converged) after {row['wall_s']:.0f} s, {row['rounds']} rounds"
    return (f"[{done}/{total} {elapsed / 60:.0f} min, ~{left / 60:.0f} min left] {config.label} | "
            f"{setting.label} | rep {rep + 1} | {row['variant']}: {outcome}; WAN "
            f"{wan['relay_up_bytes'] / (1 << 20):.1f}/{wan['relay_down_bytes'] / (1 << 20):.1f} MiB")


if __name__ == "__main__":
    sys.exit(main())
