"""Migration waves over the emulated WAN: WAN bytes per VM and wave time, plain QEMU vs tmdht vs
tmdht with ``--wave``.

Built on ``bench/migrate.py`` (same WAN emulation, one core per site, 3-node store cluster,
catalog mined from the lab's corpus, memory compared page by page after every migration). The
wave is ``--guests`` server guests (``lab/server.sh``) booted from one image that carries the
same application data — ``--app-mib`` MiB of fixed pseudo-random content that every guest
writes into a tmpfs at boot from a shared 2 MiB pool (``wave_initramfs``), so it sits in every
guest's memory — with a different seed each (their own random data files, fill pattern and
workload); none of them is in the mining corpus.

Each variant migrates the guests one after another; ``tmdht-wave`` starts a fresh wave (new id
and secret) per variant run, so its first VM meets an empty wave store. (All at once is not
measured: bench/migrate.py's per-migration step kills leftover proxies of its role and reads
the relay's shared byte counters, both of which assume one migration at a time.)

Run as root: ``python bench/waves.py`` (100 Mbit/s, 20 ms RTT, 4 guests of 256 MiB with
64 MiB of application data).
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
from tmdht.lab.migrate import make_fifo, read_ready
from tmdht.native import describe as native_describe
from tmdht.node.local import LocalCluster

VARIANTS = ("qemu", "tmdht", "tmdht-wave")
_wave: dict[str, Any] = {}  # the current wave's id and secret file (tmdht-wave)
_original_start_incoming = mb.start_incoming


def start_incoming(ctx: mb.Context, variant: str, dest: Guest, reports: Path) -> str:
    """bench/migrate.py's, plus ``--wave`` on both proxies for tmdht-wave."""
    if variant != "tmdht-wave":
        return _original_start_incoming(ctx, variant, dest, reports)
    wave = ["--wave", _wave["id"], "--wave-secret-file", str(_wave["secret"])]
    fifo = make_fifo(reports / "ready.fifo")
    host, port = ctx.cluster.seed
    dest.migrate_incoming(mb._tmdht(
        ctx.wan.wrappers["receiver"], "qemu", "receive", "--listen", f"{DST_ADDR}:0",
        "--seed", f"{host}:{port}", "--cluster-key-file", ctx.cluster.key_file,
        "--catalog", ctx.catalog, "--ready-file", fifo, "--report", reports / "receive.json",
        "--accept-timeout", "120", "--insecure-plaintext", *wave))
    _host, listen_port = read_ready(fifo, timeout=60)
    return mb._tmdht(ctx.wan.wrappers["sender"], "qemu", "send", "--catalog", ctx.catalog,
                     "--to", f"{DST_ADDR}:{listen_port}", "--report", reports / "send.json",
                     "--insecure-plaintext", *wave)


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
    parser.add_argument("--no-verify", action="store_true")
    parser.add_argument("--build-dir", type=Path, default=mb.REPO / "build")
    parser.add_argument("--out", type=Path, default=mb.REPO / "bench" / "results")
    parser.add_argument("--name", default="waves")
    return parser.parse_args(argv)


def _wan_bytes(row: dict[str, Any]) -> int:
    wan = row.get("wan", {})
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
        lines.append(f"\n{mode}: WAN MiB per VM (both directions), end-to-end s per VM")
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
            total = sum(_wan_bytes(r) for r in rows) / (1 << 20)
            wave_s = results["wave_seconds"].get(f"{mode}/{variant}", 0.0)
            lines.append(f"| {variant} | " + " | ".join(cells) + f" | {total:.1f} | "
                         f"{wave_s:.1f} |")
    return "\n".join(lines)


def ratios(results: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for mode in ("sequential", "concurrent"):
        runs = [r for r in results["runs"] if r.get("mode") == mode]
        per = {v: [_wan_bytes(r) for r in sorted((r for r in runs if r["variant"] == v),
                                                 key=lambda r: r["vm"])]
               for v in results["conditions"]["variants"]}
        wave, plain = per.get("tmdht-wave") or [], per.get("tmdht") or []
        if len(wave) >= 2 and wave[0]:
            out[f"{mode}: VMs 2.. / VM 1 (tmdht-wave)"] = [round(b / wave[0], 3)
                                                         for b in wave[1:]]
        shares = [_hit_share(r) for r in sorted((r for r in runs if r["variant"] == "tmdht-wave"),
                                                key=lambda r: r["vm"])]
        if any(share is not None for share in shares):
            # Offers are the non-template, non-zero, non-repeated pages: the hits of VMs 2..
            # are the share of those common to the wave.
            out[f"{mode}: wave hits / offers per VM (receiver)"] = shares
        if wave and plain and sum(plain):
            out[f"{mode}: wave total / tmdht total"] = round(sum(wave) / sum(plain), 3)
        times = {v: [r.get("end_to_end_s") for r in runs if r["variant"] == v]
                 for v in ("tmdht", "tmdht-wave")}
        if all(times.values()) and all(all(t for t in ts) for ts in times.values()):
            out[f"{mode}: median s per VM tmdht / tmdht-wave"] = [
                round(statistics.median(times["tmdht"]), 2),
                round(statistics.median(times["tmdht-wave"]), 2)]
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        mb.log("needs root (network namespaces, tun devices, cgroups)")
        return 2
    variants = [v for v in args.variants.split(",") if v]
    modes = ["sequential"]
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
        "runs": [], "wave_seconds": {}, "guests": [],
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
                rows = [run_one(ctx, variant, spec, source)
                        for spec, source in zip(specs, sources, strict=True)]
                results["wave_seconds"][f"{mode}/{variant}"] = time.monotonic() - t0
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


if __name__ == "__main__":
    sys.exit(main())
