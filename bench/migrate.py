"""Live migration over an emulated WAN: plain QEMU, QEMU multifd+zstd, tmdht, tmdht+zstd,
tmdht over mutual TLS (``tmdht-tls``; the other tmdht variants run ``--insecure-plaintext``).

Two network namespaces joined by a veth pair stand for two data centers; tc netem on both ends
adds 10 ms each way (20 ms RTT) and caps the rate (100 Mbit/s and 1 Gbit/s by default). The
source QEMU runs in the source namespace; the destination QEMU, the tmdht receiver and a 3-node
store cluster run in the destination namespace. The catalog is mined from the lab's default
guests; the migrated guest (workload ``mixed``, seed 21) is none of them.

For each link and variant the same guest is booted fresh and migrated; reported are the bytes
that crossed the veth (both directions, from the interface counters: headers included), QEMU's
total time and downtime (``query-migrate`` on the source). JSON goes to
``bench/results/migrate.json``, plots to ``bench/results/migrate-*.png``.

Run as root: ``python bench/migrate.py [--rates 100mbit,1gbit] [--reps 1]``. Everything it
creates (namespaces, processes) is removed by name/PID at the end, also on errors.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from migration.helpers import make_fifo, read_ready, wait_report  # noqa: E402
from support.tls import ScratchCA  # noqa: E402

from tmdht.catalog import TemplateCatalog  # noqa: E402
from tmdht.images import open_image  # noqa: E402
from tmdht.lab import (  # noqa: E402
    Guest,
    GuestSpec,
    HostTools,
    MigrationStats,
    capture_guests,
    default_specs,
)
from tmdht.lab.initramfs import ensure_initramfs  # noqa: E402
from tmdht.mining import MiningConfig, TemplateMiner  # noqa: E402
from tmdht.node.local import LocalCluster  # noqa: E402

SPEC = GuestSpec(name="wanderer", workload="mixed", seed=21)
SRC_ADDR, DST_ADDR = "10.233.0.1", "10.233.0.2"
VARIANTS = ("qemu", "qemu-multifd-zstd", "tmdht", "tmdht-zstd", "tmdht-tls")
MAX_BANDWIDTH = 10 << 30  # QEMU's own cap out of the way: the link is the limit
FAST_NODE_ARGS = ["--replication-interval", "5", "--log-format", "text"]


def run(*args: str, check: bool = True) -> str:
    done = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)
    if check and done.returncode != 0:
        raise RuntimeError(f"{shlex.join(args)} failed: {done.stderr.strip()}")
    return done.stdout


class Wan:
    """Two namespaces, a veth pair, netem on both ends."""

    def __init__(self, tag: str) -> None:
        self.src = f"tmdht-src-{tag}"
        self.dst = f"tmdht-dst-{tag}"
        self.src_if = f"tms{tag}"[:15]
        self.dst_if = f"tmd{tag}"[:15]

    def __enter__(self) -> Wan:
        try:
            run("ip", "netns", "add", self.src)
            run("ip", "netns", "add", self.dst)
            run("ip", "link", "add", self.src_if, "netns", self.src, "type", "veth",
                "peer", "name", self.dst_if, "netns", self.dst)
            for ns, dev, addr in ((self.src, self.src_if, SRC_ADDR),
                                  (self.dst, self.dst_if, DST_ADDR)):
                run("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
                run("ip", "-n", ns, "link", "set", dev, "up")
                run("ip", "-n", ns, "link", "set", "lo", "up")
        except BaseException:
            self.__exit__()
            raise
        return self

    def shape(self, rate: str, one_way_delay_ms: float) -> str:
        """netem (rate and delay); where the kernel has no sch_netem, tbf (rate only).

        Returns the qdisc used."""
        for ns, dev in ((self.src, self.src_if), (self.dst, self.dst_if)):
            tc = ("ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev, "root")
            try:
                run(*tc, "netem", "delay", f"{one_way_delay_ms}ms", "rate", rate,
                    "limit", "100000")
                kind = "netem"
            except RuntimeError as exc:
                if "unknown" not in str(exc):
                    raise
                bits = _rate_bits(rate)
                burst = max(32 << 10, bits // 8 // 250)  # 4 ms of tokens at the rate
                run(*tc, "tbf", "rate", rate, "burst", str(burst), "latency", "50ms")
                kind = "tbf"
        return kind

    def bytes(self) -> int:
        """Bytes sent by both ends of the link."""
        total = 0
        for ns, dev in ((self.src, self.src_if), (self.dst, self.dst_if)):
            doc = json.loads(run("ip", "-n", ns, "-s", "-j", "link", "show", "dev", dev))
            total += int(doc[0]["stats64"]["tx"]["bytes"])
        return total

    def __exit__(self, *exc: object) -> None:
        for ns in (self.src, self.dst):
            run("ip", "netns", "del", ns, check=False)


def _rate_bits(rate: str) -> int:
    units = {"kbit": 10**3, "mbit": 10**6, "gbit": 10**9}
    for unit, factor in units.items():
        if rate.lower().endswith(unit):
            return int(float(rate[: -len(unit)]) * factor)
    return int(rate)


def wrapper(directory: Path, name: str, namespace: str, program: str) -> Path:
    """A script that runs ``program`` inside ``namespace`` (ip netns exec execs it: same PID)."""
    path = directory / name
    path.write_text(f"#!/bin/sh\nexec ip netns exec {namespace} {shlex.quote(program)} \"$@\"\n")
    path.chmod(0o755)
    return path


def tmdht(*args: str | Path) -> str:
    return shlex.join([sys.executable, "-m", "tmdht.cli", *map(str, args)])


def mine_catalog(build_dir: Path, path: Path, tools: HostTools) -> TemplateCatalog:
    captures = capture_guests(build_dir, default_specs(), tools=tools)
    with TemplateMiner(MiningConfig()) as miner:
        for capture in captures:
            with open_image(capture.stream_path) as image:
                miner.add_image(capture.name, image.iter_pages())
        catalog = TemplateCatalog.from_mining(miner.finish())
    catalog.save(path)
    return catalog


def migrate_once(variant: str, wan: Wan, src_tools: HostTools, dst_tools: HostTools,
                 initramfs: Path, work: Path, catalog: Path, cluster: LocalCluster,
                 timeout: float, tls: tuple[Path, Path] | None = None) -> dict[str, Any]:
    """One migration; ``tls``: the (receiver, sender) credential directories of tmdht-tls."""
    with Guest(SPEC, tools=src_tools, initramfs=initramfs) as source, \
            Guest(SPEC, incoming="defer", tools=dst_tools, initramfs=initramfs) as dest:
        source.wait_counter(3, timeout=90)
        for guest in (source, dest):
            guest.set_migration_parameters(max_bandwidth=MAX_BANDWIDTH, downtime_limit=300)
        receive_report = work / f"{variant}-receive.json"
        send_report = work / f"{variant}-send.json"
        for report in (receive_report, send_report):
            report.unlink(missing_ok=True)
        if variant.startswith("qemu"):
            if variant == "qemu-multifd-zstd":
                for guest in (source, dest):
                    guest.set_migration_capabilities(multifd=True)
                    guest.set_migration_parameters(multifd_compression="zstd",
                                                   multifd_channels=2)
            dest.migrate_incoming(f"tcp:{DST_ADDR}:0")
            uri = f"tcp:{DST_ADDR}:{dest.incoming_tcp_port()}"
        else:
            fifo = work / f"{variant}.fifo"
            fifo.unlink(missing_ok=True)
            make_fifo(fifo)
            host, port = cluster.nodes[0].address("kademlia")
            dest.migrate_incoming("exec:" + tmdht(
                "qemu", "receive", "--listen", f"{DST_ADDR}:0", "--seed", f"{host}:{port}",
                "--cluster-key-file", cluster.key_file, "--ready-file", fifo,
                "--report", receive_report, "--accept-timeout", "120",
                # the namespaces' veth is not loopback: TLS, or plaintext said out loud
                *(["--tls-creds", tls[0]] if variant == "tmdht-tls" and tls
                  else ["--insecure-plaintext"])))
            _host, port = read_ready(fifo, timeout=60)
            extra = ["--compress"] if variant == "tmdht-zstd" else []
            extra += (["--tls-creds", str(tls[1])] if variant == "tmdht-tls" and tls
                      else ["--insecure-plaintext"])
            uri = "exec:" + tmdht("qemu", "send", "--catalog", catalog, "--to",
                                  f"{DST_ADDR}:{port}", "--report", send_report, *extra)
        before = wan.bytes()
        started = time.monotonic()
        source.migrate(uri)
        stats = source.wait_migration(timeout=timeout)
        dest.wait_migration(timeout=60)
        for _ in range(100):  # QEMU announces "completed" before it fills in the times
            if stats.total_time_ms:
                break
            time.sleep(0.05)
            stats = MigrationStats.from_query(source.query_migrate())
        wall = time.monotonic() - started
        counter = source.counter or 0
        resumed = dest.wait_counter(counter + 1, timeout=60)
        row: dict[str, Any] = {
            "variant": variant,
            "wan_bytes": wan.bytes() - before,
            "total_time_ms": stats.total_time_ms,
            "downtime_ms": stats.downtime_ms,
            "wall_s": wall,
            "qemu_transferred_bytes": stats.transferred_bytes,
            "dirty_sync_count": stats.dirty_sync_count,
            "resumed_counter": resumed,
        }
        if not variant.startswith("qemu"):
            sent = wait_report(send_report, timeout=60)
            received = json.loads(receive_report.read_text())
            row["proxy"] = {"send": sent, "receive": received}
            row["qemu_stream_bytes"] = sent["counts"]["qemu_bytes"]
        return row


def plot(results: dict[str, Any], out_dir: Path) -> list[Path]:
    try:
        import matplotlib  # noqa: PLC0415
    except ImportError:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "matplotlib"], check=True,
                       timeout=600)
        import matplotlib  # noqa: PLC0415
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    paths = []
    metrics = (("wan_bytes", "WAN bytes (MiB)", 1 / (1 << 20)),
               ("total_time_ms", "total migration time (s)", 1 / 1000),
               ("downtime_ms", "downtime (ms)", 1.0))
    for key, label, scale in metrics:
        fig, axes = plt.subplots(1, len(results["links"]), figsize=(5 * len(results["links"]), 4),
                                 squeeze=False)
        for ax, link in zip(axes[0], results["links"], strict=True):
            rows = link["summary"]
            names = [r["variant"] for r in rows]
            values = [(r[key] or 0) * scale for r in rows]
            ax.bar(names, values, color=["#888", "#c84", "#48c", "#4a4"][: len(names)])
            ax.set_title(f"{link['rate']}, {link['rtt_ms']:.0f} ms RTT")
            ax.set_ylabel(label)
            ax.tick_params(axis="x", rotation=20)
        fig.tight_layout()
        path = out_dir / f"migrate-{key.replace('_ms', '')}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Median per variant."""
    out = []
    for variant in VARIANTS:
        mine = [r for r in rows if r["variant"] == variant]
        if not mine:
            continue
        entry: dict[str, Any] = {"variant": variant, "runs": len(mine)}
        for key in ("wan_bytes", "total_time_ms", "downtime_ms", "qemu_transferred_bytes"):
            values = sorted(r[key] for r in mine if r[key] is not None)
            entry[key] = values[len(values) // 2] if values else None
        for side in ("send", "receive"):  # the proxies' own CPU seconds (their reports)
            cpu = sorted(r["proxy"][side].get("cpu_s", 0.0) for r in mine if "proxy" in r)
            if cpu:
                entry[f"{side}_cpu_s"] = cpu[len(cpu) // 2]
        out.append(entry)
    plain_tmdht = next((e for e in out if e["variant"] == "tmdht"), None)
    for entry in out:
        if entry["variant"] == "tmdht-tls" and plain_tmdht and plain_tmdht["total_time_ms"]:
            entry["time_vs_tmdht"] = entry["total_time_ms"] / plain_tmdht["total_time_ms"]
            entry["wan_vs_tmdht"] = entry["wan_bytes"] / plain_tmdht["wan_bytes"]
    base = next((e for e in out if e["variant"] == "qemu"), None)
    for entry in out:
        if base and base["wan_bytes"]:
            entry["wan_vs_plain"] = entry["wan_bytes"] / base["wan_bytes"]
        if base and base["total_time_ms"] and entry["total_time_ms"]:
            entry["time_vs_plain"] = entry["total_time_ms"] / base["total_time_ms"]
        if base and base["downtime_ms"] is not None and entry["downtime_ms"] is not None:
            entry["downtime_minus_plain_ms"] = entry["downtime_ms"] - base["downtime_ms"]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", default="100mbit,1gbit")
    parser.add_argument("--rtt-ms", type=float, default=20.0)
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--timeout", type=float, default=300.0, help="per migration, seconds")
    parser.add_argument("--build-dir", type=Path, default=REPO / "build")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("needs root (network namespaces)", file=sys.stderr)
        return 2
    variants = [v for v in args.variants.split(",") if v]
    tools = HostTools.discover()
    initramfs = ensure_initramfs(args.build_dir / "lab", tools.busybox, tools.cpio)
    args.out.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid() % 100000}"
    results: dict[str, Any] = {"guest": {"workload": SPEC.workload, "seed": SPEC.seed,
                                         "memory_mib": SPEC.memory_mib},
                               "cpus": os.cpu_count(), "links": []}
    with tempfile.TemporaryDirectory(prefix="tmdht-bench-") as tmp, Wan(tag) as wan:
        work = Path(tmp)
        catalog_path = work / "templates.tmc"
        catalog = mine_catalog(args.build_dir, catalog_path, tools)
        ca = ScratchCA(work / "ca")  # tmdht-tls: QEMU tls-creds-x509 directories
        tls = (ca.creds(work / "tls-receiver", server=ca.issue(
                   "receiver", "/O=bench/CN=receiver", server=True, names=f"IP:{DST_ADDR}")),
               ca.creds(work / "tls-sender", client=ca.issue(
                   "sender", "/O=bench/CN=sender", server=False)))
        results["catalog_templates"] = len(catalog)
        src_tools = replace(tools, qemu=wrapper(work, "qemu-src", wan.src, str(tools.qemu)))
        dst_tools = replace(tools, qemu=wrapper(work, "qemu-dst", wan.dst, str(tools.qemu)))
        python_dst = wrapper(work, "python-dst", wan.dst, sys.executable)
        with LocalCluster(work / "cluster", 3, extra_args=FAST_NODE_ARGS,
                          python=str(python_dst)) as cluster:
            host, port = cluster.nodes[0].address("kademlia")
            captures = capture_guests(args.build_dir, default_specs(), tools=tools)
            published = subprocess.run(
                [str(python_dst), "-m", "tmdht.cli", "templates", "publish", str(catalog_path),
                 *[str(c.stream_path) for c in captures], "--seed", f"{host}:{port}",
                 "--cluster-key-file", str(cluster.key_file), "--json"],
                capture_output=True, text=True, timeout=600, check=True)
            results["publish"] = json.loads(published.stdout)
            for rate in args.rates.split(","):
                qdisc = wan.shape(rate, args.rtt_ms / 2)
                if qdisc != "netem":
                    print(f"no sch_netem in this kernel: {rate} via tbf, NO added delay",
                          file=sys.stderr, flush=True)
                rows = []
                for rep in range(args.reps):
                    for variant in variants:
                        print(f"{rate} rep {rep + 1}: {variant} ...", file=sys.stderr, flush=True)
                        row = migrate_once(variant, wan, src_tools, dst_tools, initramfs, work,
                                           catalog_path, cluster, args.timeout, tls)
                        row["rep"] = rep
                        rows.append(row)
                        print(f"  wan {row['wan_bytes'] / (1 << 20):.1f} MiB, total "
                              f"{row['total_time_ms']} ms, downtime {row['downtime_ms']} ms",
                              file=sys.stderr, flush=True)
                results["links"].append({"rate": rate, "qdisc": qdisc,
                                         "rtt_ms": args.rtt_ms if qdisc == "netem" else 0.0,
                                         "runs": rows,
                                         "summary": summarize(rows)})
    out = args.out / "migrate.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\n{'link':8} {'variant':18} {'WAN MiB':>8} {'vs plain':>8} {'total s':>8} "
          f"{'vs plain':>8} {'downtime ms':>11}")
    for link in results["links"]:
        for e in link["summary"]:
            print(f"{link['rate']:8} {e['variant']:18} {e['wan_bytes'] / (1 << 20):8.1f} "
                  f"{e.get('wan_vs_plain', 0):8.2f} {(e['total_time_ms'] or 0) / 1000:8.2f} "
                  f"{e.get('time_vs_plain', 0):8.2f} {e['downtime_ms']!s:>11}")
    for path in plot(results, args.out):
        print(f"wrote {path}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
