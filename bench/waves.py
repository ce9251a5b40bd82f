"""Migration waves over the emulated WAN: WAN bytes per VM and wave time, plain QEMU vs tmdht vs
tmdht with ``--wave``.

Built on ``bench/migrate.py`` (same WAN emulation, one core per site, 3-node store cluster,
catalog mined from the lab's corpus, memory compared page by page after every migration). The
wave is ``--guests`` server guests (``lab/server.sh``) booted from one image that carries the
same application data — ``--app-mib`` MiB of fixed pseudo-random content that every guest
writes into a tmpfs at boot from a shared 2 MiB pool (``wave_initramfs``), so it sits in every
guest's memory — with a different seed each (their own random data files, fill pattern and
workload); none of them is in the mining corpus.

Each variant migrates the guests one after another (``--modes sequential``) and then all at
once (``concurrent``): every guest its own destination QEMU and proxies (own ports, report
files), all migrations started together. A wave variant starts a fresh wave (new id and secret)
per variant run, so its first VM meets an empty wave store (all at once, every VM meets the
store as the others fill it). One after another, a VM's WAN bytes are the relay's counters over
its migration; all at once the relay's counters are the wave's, and a VM's bytes are its own
TCP connection's (the proxies' TCP_INFO: bytes acknowledged sent plus received; QEMU's
``transferred`` for plain QEMU), about 0.5 % below the relay's, which also counts the packets'
TCP/IP headers' share of what its tun device hands over. The wave time all at once is from the
first ``migrate`` to the last destination having loaded everything.

Run as root: ``python bench/waves.py`` (100 Mbit/s, 20 ms RTT, 4 guests of 256 MiB with
64 MiB of application data, every variant one after another and all at once: about 20 minutes;
``--modes sequential --variants tmdht,tmdht-wave`` about 4).
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import hashlib
import json
import os
import random
import shlex
import shutil
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import migrate as mb
from wanemu import DEST_CPU, DST_ADDR, PREFIX, SOURCE_CPU, Wan, parse_settings, signals_raise

from tmdht.files import atomic_write
from tmdht.lab import Guest, GuestSpec, HostTools
from tmdht.lab.initramfs import ensure_initramfs, pack_cpio, server_init_script
from tmdht.lab.migrate import make_fifo, read_ready, wait_report
from tmdht.native import describe as native_describe
from tmdht.node.local import LocalCluster

VARIANTS = ("qemu", "tmdht", "tmdht-wave", "tmdht-wave-noclaim", "tmdht-wave-every",
            "tmdht-wave-all")
"""``tmdht-wave``: the defaults (adaptive offering: pages go whole while offers are not found;
QEMU's stream read only while the offers' expected bodies are within 4 MiB); ``tmdht-wave-all``:
``--offer-every-page --offer-ahead 64MiB``, the sender as it was before both (every
non-template page offered, QEMU's stream up to the 64 MiB flow window ahead);
``tmdht-wave-every``: ``--offer-every-page`` (every page offered, the 4 MiB offer-ahead);
``tmdht-wave-noclaim``: the defaults with the receivers' ``--wave-claim-wait 0`` (no claims on
pages in flight: every miss is asked of the sender at once, as before claims)."""
WAVE_VARIANTS = ("tmdht-wave", "tmdht-wave-noclaim", "tmdht-wave-every", "tmdht-wave-all")
_SENDER_WAVE_ARGS = {"tmdht-wave": [], "tmdht-wave-noclaim": [],
                     "tmdht-wave-every": ["--offer-every-page"],
                     "tmdht-wave-all": ["--offer-every-page", "--offer-ahead", "64MiB"]}
_RECEIVER_WAVE_ARGS = {"tmdht-wave-noclaim": ["--wave-claim-wait", "0"]}
_wave: dict[str, Any] = {}  # the current wave's id and secret file (tmdht-wave)
_original_start_incoming = mb.start_incoming


def start_incoming(ctx: mb.Context, variant: str, dest: Guest, reports: Path) -> str:
    """bench/migrate.py's, plus ``--wave`` on both proxies for the wave variants."""
    if variant not in WAVE_VARIANTS:
        return _original_start_incoming(ctx, variant, dest, reports)
    wave = ["--wave", _wave["id"], "--wave-secret-file", str(_wave["secret"])]
    sender_wave = wave + _SENDER_WAVE_ARGS[variant]
    fifo = make_fifo(reports / "ready.fifo")
    host, port = ctx.cluster.seed
    dest.migrate_incoming(mb._tmdht(
        ctx.wan.wrappers["receiver"], "qemu", "receive", "--listen", f"{DST_ADDR}:0",
        "--seed", f"{host}:{port}", "--cluster-key-file", ctx.cluster.key_file,
        "--catalog", ctx.catalog, "--ready-file", fifo, "--report", reports / "receive.json",
        "--accept-timeout", "120", "--insecure-plaintext", *wave,
        *_RECEIVER_WAVE_ARGS.get(variant, [])))
    _host, listen_port = read_ready(fifo, timeout=60)
    return mb._tmdht(ctx.wan.wrappers["sender"], "qemu", "send", "--catalog", ctx.catalog,
                     "--to", f"{DST_ADDR}:{listen_port}", "--report", reports / "send.json",
                     "--insecure-plaintext", *sender_wave)


mb.start_incoming = start_incoming


APP_POOL_BYTES = 2 << 20
"""The wave's shared random pool (in the appended archive), expanded in the guest."""
APP_STRIDE = 4099
"""Byte offset step between the application data's 1 MiB blocks in the pool: 3 modulo the page
size, so no block's pages start at a page-aligned pool offset or at another block's offset
modulo the page size: no page repeats (in a guest, across the wave or against the pool file
itself) for up to 4095 MiB of data."""
APP_INIT = """#!/bin/busybox sh
# /init-server of a wave guest: the wave's application data into a tmpfs, then the server
# workload (/init-server-base, lab/server.sh). Block k of /app/data.bin is the 1 MiB of
# /app-pool.bin at byte offset (k + 1) * STRIDE mod 1 MiB: the same bytes in every guest.
/bin/busybox mkdir -p /app /dev
/bin/busybox mount -t devtmpfs devtmpfs /dev
/bin/busybox mount -t tmpfs -o size=90% tmpfs /app
k=0
while [ $k -lt APP_MIB ]; do
    /bin/busybox dd if=/app-pool.bin of=/app/data.bin bs=1048576 count=1 seek=$k \\
        skip=$(((k + 1) * STRIDE % 1048576)) iflag=skip_bytes,fullblock conv=notrunc 2>/dev/null \\
        || { echo "tmdht-error app data block $k" > /dev/ttyS0; exit 1; }
    k=$((k + 1))
done
exec /init-server-base "$@"
"""


def wave_initramfs(build_dir: Path, tools: HostTools, app_mib: int) -> Path:
    """The server initramfs with the wave's application data generator appended.

    The appended archive (the kernel unpacks concatenated archives; a later member replaces an
    earlier one) holds a 2 MiB random pool (fixed seed), ``/init-server-base`` (lab/server.sh)
    and a new ``/init-server`` that first expands the pool into ``app_mib`` MiB of distinct
    pages at ``/app/data.bin`` (tmpfs: page cache, resident) and then runs the server
    workload. Shipping the whole data in the archive instead does not fit: the compressed
    archive and its unpacked copy are both in memory while the kernel unpacks, and a 256 MiB
    guest's rootfs unpack fails ("Initramfs unpacking failed: write error"). The file name
    carries a hash of everything appended, so a changed generator never reuses an old image.
    """
    base = ensure_initramfs(build_dir / "lab", tools.busybox, tools.cpio, server=True)
    script = APP_INIT.replace("APP_MIB", str(app_mib)).replace("STRIDE", str(APP_STRIDE))
    pool = random.Random(2024).randbytes(APP_POOL_BYTES)
    server = server_init_script().encode()
    digest = hashlib.sha256(script.encode() + b"\0" + server + b"\0" + pool).hexdigest()[:12]
    stem = base.name.removesuffix(".cpio.gz")
    path = build_dir / "lab" / f"wave-app{app_mib}-{digest}-{stem}.cpio.gz"
    if path.is_file():
        return path
    with tempfile.TemporaryDirectory(prefix=PREFIX) as tmp:
        root = Path(tmp)
        (root / "init-server").write_text(script, encoding="utf-8")
        (root / "init-server-base").write_bytes(server)
        (root / "app-pool.bin").write_bytes(pool)
        for member in ("init-server", "init-server-base"):
            (root / member).chmod(0o755)
        archive = pack_cpio(root, ["app-pool.bin", "init-server", "init-server-base"],
                            tools.cpio)
        data = base.read_bytes() + gzip.compress(archive, compresslevel=6, mtime=0)
    atomic_write(path, data)
    return path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--guests", type=int, default=4)
    parser.add_argument("--memory-mib", type=int, default=256)
    parser.add_argument("--app-mib", type=int, default=64)
    parser.add_argument("--rate", default="100mbit")
    parser.add_argument("--rtt", default="20")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--modes", default="sequential,concurrent",
                        help="sequential (one after another), concurrent (all at once)")
    parser.add_argument("--no-verify", action="store_true")
    parser.add_argument("--build-dir", type=Path, default=mb.REPO / "build")
    parser.add_argument("--out", type=Path, default=mb.REPO / "bench" / "results")
    parser.add_argument("--name", default="waves")
    parser.add_argument("--render", type=Path, metavar="JSON",
                        help="print the table and ratios of an earlier run's JSON and exit")
    return parser.parse_args(argv)


def _wan_bytes(row: dict[str, Any]) -> int:
    """A VM's WAN bytes: the relay's counters (one after another) or its connection's own."""
    wan = row.get("wan", {})
    if "flow_up_bytes" in wan:
        return int(wan["flow_up_bytes"]) + int(wan.get("flow_down_bytes", 0))
    return int(wan.get("relay_up_bytes", 0)) + int(wan.get("relay_down_bytes", 0))


def _hit_share(row: dict[str, Any]) -> float | None:
    receive = row.get("proxy", {}).get("receive", {})
    offers = receive.get("wave_offers")
    return round(receive.get("wave_hits", 0) / offers, 3) if offers else None


def table(results: dict[str, Any]) -> str:
    lines = []
    for mode in ("sequential", "concurrent"):
        runs = [r for r in results["runs"] if r.get("mode") == mode]
        if not runs:
            continue
        lines.append(f"\n{mode}: WAN MiB per VM (both directions), end-to-end s per VM"
                     + ("" if mode == "sequential" else " (from the common start; VM bytes "
                        "from each VM's connection, the wave's from the relay)"))
        lines.append("| variant | " + " | ".join(f"VM {i + 1}" for i in range(
            results["conditions"]["guests"])) + " | wave total MiB | wave time s |")
        lines.append("|---" * (results["conditions"]["guests"] + 3) + "|")
        for variant in results["conditions"]["variants"]:
            rows = sorted((r for r in runs if r["variant"] == variant), key=lambda r: r["vm"])
            if not rows:
                continue
            cells = [f"{_wan_bytes(r) / (1 << 20):.1f}, {r.get('end_to_end_s') or 0:.1f}"
                     + ("" if r.get("identical") in (True, None) else " (DIFFERS)")
                     + ("" if r.get("converged") else " (not converged)") for r in rows]
            relay = results.get("wave_wan", {}).get(f"{mode}/{variant}")
            total = (sum(_wan_bytes(r) for r in rows) if relay is None else
                     relay["relay_up_bytes"] + relay["relay_down_bytes"]) / (1 << 20)
            wave_s = results["wave_seconds"].get(f"{mode}/{variant}", 0.0)
            lines.append(f"| {variant} | " + " | ".join(cells) + f" | {total:.1f} | "
                         f"{wave_s:.1f} |")
    return "\n".join(lines)


def ratios(results: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for mode in ("sequential", "concurrent"):
        runs = [r for r in results["runs"] if r.get("mode") == mode]

        def ordered(variant: str, runs: list[dict[str, Any]] = runs) -> list[dict[str, Any]]:
            return sorted((r for r in runs if r["variant"] == variant), key=lambda r: r["vm"])

        plain = [_wan_bytes(r) for r in ordered("tmdht")]
        plain_times = [float(r.get("end_to_end_s") or 0.0) for r in ordered("tmdht")]
        for variant in WAVE_VARIANTS:
            rows = ordered(variant)
            wave = [_wan_bytes(r) for r in rows]
            tag = "" if variant == "tmdht-wave" else f" ({variant})"
            if len(wave) >= 2 and wave[0]:
                out[f"{mode}: VMs 2.. / VM 1 ({variant})"] = [round(b / wave[0], 3)
                                                             for b in wave[1:]]
            shares = [_hit_share(r) for r in rows]
            if any(share is not None for share in shares):
                # Offers are the non-template, non-zero, non-repeated pages not sent whole:
                # the hits of VMs 2.. are the share of those common to the wave.
                out[f"{mode}: wave hits / offers per VM (receiver){tag}"] = shares
            if wave and plain and sum(plain):
                out[f"{mode}: wave total / tmdht total{tag}"] = round(sum(wave) / sum(plain), 3)
            times = [float(r.get("end_to_end_s") or 0.0) for r in rows]
            if times and plain_times and all(times) and all(plain_times):
                out[f"{mode}: median s per VM tmdht / {variant}"] = [
                    round(statistics.median(plain_times), 2), round(statistics.median(times), 2)]
                pauses = [float(r.get("switchover_ms") or 0.0) for r in rows]
                plain_pauses = [float(r.get("switchover_ms") or 0.0) for r in ordered("tmdht")]
                if all(pauses) and all(plain_pauses):
                    # The guest's real pause: the destination loaded after the source stopped.
                    out[f"{mode}: median guest pause ms tmdht / {variant}"] = [
                        round(statistics.median(plain_pauses)),
                        round(statistics.median(pauses))]
                # The time target is per VM; VM 1 (an empty wave store) is the one at risk.
                out[f"{mode}: VM 1 s / tmdht median s per VM{tag}"] = round(
                    times[0] / statistics.median(plain_times), 3)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render is not None:
        earlier = json.loads(args.render.read_text())
        print(table(earlier))
        print(json.dumps(ratios(earlier), indent=1))
        return 0
    if os.geteuid() != 0:
        mb.log("needs root (network namespaces, tun devices, cgroups)")
        return 2
    variants = [v for v in args.variants.split(",") if v]
    modes = [m for m in args.modes.split(",") if m]
    if set(modes) - {"sequential", "concurrent"} or set(variants) - set(VARIANTS):
        mb.log(f"unknown modes or variants: {modes} {variants}")
        return 2
    (setting,) = parse_settings(args.rate, args.rtt)
    args.out.mkdir(parents=True, exist_ok=True)
    out_json = args.out / f"{args.name}.json"
    results: dict[str, Any] = {
        "conditions": {"command": shlex.join(sys.argv), "guests": args.guests,
                       "memory_mib": args.memory_mib, "app_mib": args.app_mib,
                       "rate": setting.rate, "rtt_ms": setting.rtt_ms, "variants": variants,
                       "modes": modes, "loadavg_start": os.getloadavg(),
                       "pipeline": native_describe(),
                       "started": time.strftime("%Y-%m-%d %H:%M:%S %z")},
        "runs": [], "wave_seconds": {}, "wave_wan": {}, "wave_cpu_s": {}, "guests": [],
    }
    tools = HostTools.discover()
    started = time.monotonic()
    with signals_raise(), contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=PREFIX)))
        shm = Path(f"/dev/shm/{PREFIX}{os.getpid()}")
        shm.mkdir()
        stack.callback(shutil.rmtree, shm, True)
        wan = stack.enter_context(Wan(work, pin=True))
        wan.shape(setting)
        check = wan.self_check(3.0)
        results["conditions"]["check"] = check
        mb.log(f"{setting.label}: RTT {check['rtt_ms_median']:.2f} ms, TCP bulk "
               f"{check['bulk_mbit_s']:.0f} Mbit/s")
        catalog_path = work / "templates.tmc"
        catalog, corpus = mb.mine_catalog(args.build_dir, catalog_path, tools)
        results["conditions"]["catalog_templates"] = len(catalog)
        initramfs = wave_initramfs(args.build_dir, tools, args.app_mib)
        cluster = stack.enter_context(LocalCluster(
            work / "cluster", 3, extra_args=mb.NODE_ARGS, python=str(wan.wrappers["nodes"])))
        mb.log("publishing the templates ...")
        results["conditions"]["publish"] = mb.publish(wan, catalog_path, corpus, cluster)
        ctx = mb.Context(wan=wan,
                         src_tools=replace(tools, qemu=wan.wrapper(
                             "qemu-src", wan.src, SOURCE_CPU, "src-qemu", tools.qemu)),
                         dst_tools=replace(tools, qemu=wan.wrapper(
                             "qemu-dst", wan.dst, DEST_CPU, "dst-qemu", tools.qemu)),
                         initramfs=initramfs, catalog=catalog_path, cluster=cluster,
                         work=work, shm=shm, converge_grace=30.0, timeout=600.0,
                         verify=not args.no_verify, tls=(work, work))
        specs = [GuestSpec(name=f"wave-{41 + i}", workload="server", seed=41 + i,
                           memory_mib=args.memory_mib) for i in range(args.guests)]
        sources = []
        for spec in specs:
            t0 = time.monotonic()
            guest = stack.enter_context(Guest(spec, tools=ctx.src_tools, initramfs=initramfs,
                                              extra_args=mb.THREAD_NAMES, start_timeout=60))
            guest.wait_counter(2, timeout=900)
            info = {"name": spec.name, "boot_and_fill_s": time.monotonic() - t0,
                    "ready": mb.ready_fields(guest)}
            results["guests"].append(info)
            mb.log(f"booted {spec.name} in {info['boot_and_fill_s']:.0f} s: {info['ready']}")
            sources.append(guest)
        for mode in modes:
            for variant in variants:
                _wave["id"] = f"bench-{os.getpid()}-{mode}-{variant}"
                _wave["secret"] = work / f"{_wave['id']}.key"
                _wave["secret"].write_text(os.urandom(32).hex() + "\n")
                t0 = time.monotonic()
                if mode == "sequential":
                    rows = [run_one(ctx, variant, spec, source)
                            for spec, source in zip(specs, sources, strict=True)]
                    results["wave_seconds"][f"{mode}/{variant}"] = time.monotonic() - t0
                else:
                    rows, wave = run_concurrently(ctx, variant, specs, sources)
                    results["wave_seconds"][f"{mode}/{variant}"] = wave["seconds"]
                    results["wave_wan"][f"{mode}/{variant}"] = wave["wan"]
                    results["wave_cpu_s"][f"{mode}/{variant}"] = wave["cpu_s"]
                for vm, row in enumerate(rows):
                    row |= {"mode": mode, "vm": vm + 1}
                    results["runs"].append(row)
                    proxy = row.get("proxy", {})
                    mb.log(f"{mode} {variant} VM {vm + 1}: WAN "
                           f"{_wan_bytes(row) / (1 << 20):.1f} MiB, "
                           f"{row.get('end_to_end_s') or 0:.1f} s, identical "
                           f"{row.get('identical')}, resumed {row.get('resumed')}; wave "
                           f"{ {k: v for k, v in proxy.get('send', {}).items() if k.startswith('wave')} }")
                out_json.write_text(json.dumps(results, indent=1) + "\n")
        results["conditions"]["seconds"] = time.monotonic() - started
        results["conditions"]["loadavg_end"] = os.getloadavg()
    results["ratios"] = ratios(results)
    out_json.write_text(json.dumps(results, indent=1) + "\n")
    print(table(results))
    print(json.dumps(results["ratios"], indent=1))
    print(f"wrote {out_json}")
    return 0


def run_one(ctx: mb.Context, variant: str, spec: GuestSpec, source: Guest) -> dict[str, Any]:
    try:
        return mb.migrate_once(ctx, variant, spec, source, mb.XBZRLE_MIN_CACHE)
    except Exception as exc:  # noqa: BLE001 - recorded, the wave goes on
        mb.log(f"  {variant} {spec.name} FAILED: {exc}")
        with contextlib.suppress(Exception):
            if source.status() != "running":
                source.cont()
        return {"variant": variant, "status": "error", "error": str(exc)[:2000],
                "converged": False, "wan": {}}


def run_concurrently(ctx: mb.Context, variant: str, specs: list[GuestSpec],
                     sources: list[Guest]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """All guests at once: the rows (one per VM) and the wave's own figures (relay bytes, CPU
    seconds per role, seconds from the first ``migrate`` to the last VM loaded)."""
    try:
        return migrate_all(ctx, variant, specs, sources)
    except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
        mb.log(f"  {variant} all at once FAILED: {exc}")
        for source in sources:
            with contextlib.suppress(Exception):
                if source.status() != "running":
                    source.cont()
        row = {"variant": variant, "status": "error", "error": str(exc)[:2000],
               "converged": False, "wan": {}}
        return [dict(row) for _ in specs], {"seconds": 0.0, "wan": {}, "cpu_s": {}}


def migrate_all(ctx: mb.Context, variant: str, specs: list[GuestSpec],
                sources: list[Guest]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    wan = ctx.wan
    for role in ("sender", "receiver"):  # proxies of an earlier run that did not exit
        for pid in wan.pids(role):
            mb.log(f"  killing a leftover {role} (pid {pid})")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    rows: list[dict[str, Any]] = [{"variant": variant} for _ in specs]
    with contextlib.ExitStack() as stack:
        dests, reports = [], []
        for spec, source in zip(specs, sources, strict=True):
            reports.append(Path(tempfile.mkdtemp(prefix=f"{variant}-{spec.name}-",
                                                 dir=ctx.work)))
            dest = stack.enter_context(Guest(
                spec, incoming="defer", tools=ctx.dst_tools, initramfs=ctx.initramfs,
                extra_args=("-S", *mb.THREAD_NAMES), start_timeout=60))
            mb.configure(variant, source, dest, mb.XBZRLE_MIN_CACHE)
            source.qmp.take_events("STOP")
            dests.append(dest)
        uris = [mb.start_incoming(ctx, variant, dest, report)
                for dest, report in zip(dests, reports, strict=True)]
        before = wan.counters()
        migrate_at = time.time()
        for source, uri in zip(sources, uris, strict=True):
            source.migrate(uri)
        infos = follow_all(ctx, sources)
        for row, info, source, dest, report in zip(rows, infos, sources, dests, reports,
                                                   strict=True):
            ram = info.get("ram", {})
            converged = info.get("status") == "completed"
            row |= {"status": info.get("status"), "converged": converged,
                    "error": info.get("error-desc"), "total_time_ms": info.get("total-time"),
                    "downtime_ms": info.get("downtime"), "rounds": ram.get("dirty-sync-count"),
                    "qemu_ram_bytes": ram.get("transferred")}
            if converged:
                dest_info = dest.query_migrate()
                for _ in range(int(60 / mb.POLL_S)):
                    if dest_info.get("status") in ("completed", "failed"):
                        break
                    time.sleep(mb.POLL_S)  # a poll interval
                    dest_info = dest.query_migrate()
                row["dest_status"] = dest_info.get("status")
                stopped, loaded = mb.switchover(source, dest)
                if stopped is not None and loaded is not None:
                    row["switchover_ms"] = (loaded - stopped) * 1000
                    row["end_to_end_s"] = loaded - migrate_at
            if variant.startswith("qemu"):
                row["wan"] = {"flow_up_bytes": int(ram.get("transferred") or 0),
                              "flow_down_bytes": 0}
                continue
            with contextlib.suppress(Exception):  # a failed migration may leave no report
                send = wait_report(report / "send.json", 60 if converged else 5)
                row["proxy"] = {"send": send,
                                "receive": json.loads((report / "receive.json").read_text())}
                row["wan"] = {"flow_up_bytes": int(send.get("tcp_sent_bytes") or 0),
                              "flow_down_bytes": int(send.get("tcp_received_bytes") or 0)}
        after = wan.counters()
        ends = [row["end_to_end_s"] for row in rows if row.get("end_to_end_s")]
        wave = {"seconds": max(ends) if len(ends) == len(rows) else 0.0,
                "wan": mb._wan_delta(before, after),
                "cpu_s": {role: after["cpu"][role] - before["cpu"][role]
                          for role in after["cpu"] if role != "check"}}
        for row, source, dest in zip(rows, sources, dests, strict=True):
            row["identical"] = row["resumed"] = None
            if row.get("converged") and row.get("dest_status") == "completed":
                mb.check_and_resume(ctx, row, source, dest)
            if source.status() != "running":
                source.cont()
            row["loadavg_1min"] = os.getloadavg()[0]
        for report in reports:
            shutil.rmtree(report, ignore_errors=True)
    return rows, wave


def follow_all(ctx: mb.Context, sources: list[Guest]) -> list[dict[str, Any]]:
    """Poll every source until its migration ended; cancel all still running after
    ``ctx.timeout`` seconds. Returns their last query-migrate."""
    started = time.monotonic()
    infos: list[dict[str, Any] | None] = [None] * len(sources)
    last: list[dict[str, Any]] = [{} for _ in sources]
    cancelled = False
    for _ in range(int(ctx.timeout / mb.POLL_S) + 1000):
        for i, source in enumerate(sources):
            if infos[i] is not None:
                continue
            info = source.query_migrate()
            if "ram" not in info and "ram" in last[i]:
                info["ram"] = last[i]["ram"]  # a cancelled migration reports no RAM figures
            last[i] = info
            if info.get("status") in ("completed", "failed", "cancelled"):
                if info.get("status") == "completed":
                    for _ in range(10_000):  # completed comes before the times are filled in
                        if source.status() != "finish-migrate":
                            break
                    info = source.query_migrate() | ({} if "ram" in info else
                                                     {"ram": last[i].get("ram", {})})
                infos[i] = info
        if all(info is not None for info in infos):
            break
        if not cancelled and time.monotonic() - started > ctx.timeout:
            for i, source in enumerate(sources):
                if infos[i] is None:
                    with contextlib.suppress(Exception):
                        source.qmp.execute("migrate_cancel")
            cancelled = True
        time.sleep(mb.POLL_S)  # a poll interval: QEMU has no event for rounds
    return [info if info is not None else last[i] for i, info in enumerate(infos)]


if __name__ == "__main__":
    sys.exit(main())
