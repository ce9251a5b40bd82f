"""What mutual TLS costs the migration proxies, against plaintext in the same run.

``tmdht qemu send`` and ``tmdht qemu receive`` as processes on loopback (no store cluster:
template pages come back from the sender), a saved synthetic QEMU stream piped through them,
alternating plaintext and TLS ``--repeat`` times. Per run: wall time from the sender's start to
both exits, CPU seconds (user + system) of each proxy, the bytes the proxies wrote
(``wan_sent_bytes``) and the bytes TCP carried (``tcp_sent_bytes``: TLS records and handshake
included). Medians, and TLS / plaintext ratios. Credentials are made with the openssl command.

Loopback has no bandwidth limit, so its time ratio is what TLS costs in CPU alone. ``--wan
RATE:RTT`` (repeatable; root) runs the same pairs across bench/wanemu.py's emulated WAN instead:
the sender in the source namespace on CPU 0, the receiver in the destination namespace on CPU 1
(with the relay), e.g. ``--wan 1gbit:20 --wan 100mbit:20``: the handshake's round trips and the
link's pace count there. ``--profile`` writes cProfile statistics of both proxies of the last
run of each variant (``bench/results/tls-profile-*.txt``, the top functions by own time).

    python bench/tls.py [--pages 40000] [--repeat 5] [--wan RATE:RTT ...] [--profile]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from support.synthetic import page_pool, qemu_stream  # noqa: E402
from support.tls import ScratchCA  # noqa: E402

from tmdht.catalog import TemplateCatalog  # noqa: E402
from tmdht.lab.migrate import make_fifo, read_ready  # noqa: E402
from tmdht.native import describe  # noqa: E402
from tmdht.pages import PAGE_SIZE, digest_page  # noqa: E402

sys.path.insert(0, str(REPO / "bench"))
from wanemu import DST_ADDR, Setting, Wan, rate_label  # noqa: E402


def _tmdht(*args: object, wrapper: Path | None = None, profile: Path | None = None,
           python_path: str = sys.executable) -> list[str]:
    python = [str(wrapper)] if wrapper else []
    python += [python_path, "-P"]  # -P: each installation's own tmdht, not the one in the cwd
    if profile is not None:
        python += ["-m", "cProfile", "-o", str(profile)]
    return [*python, "-m", "tmdht.cli", *map(str, args)]


def _stream(pages: int, folder: Path) -> tuple[Path, Path]:
    """Half template pages, a quarter repeats, a quarter random (incompressible) pages."""
    pool = page_pool(64, seed=18)
    rng = random.Random(18)
    plan = [[("pc.ram", i, pool[rng.randrange(48)] if i % 4 < 2 else
              pool[48 + rng.randrange(16)] if i % 4 == 2 else rng.randbytes(PAGE_SIZE))
             for i in range(pages)]]
    path = folder / "stream.bin"
    path.write_bytes(qemu_stream([("pc.ram", pages * PAGE_SIZE)], plan)[0])
    catalog = folder / "templates.tmc"
    TemplateCatalog.from_digests([digest_page(p) for p in pool[:48]]).save(catalog)
    return catalog, path


def _relay_packets(wan: Wan | None) -> int:
    """Packets the relay forwarded so far, both ways (TSO packets count once)."""
    if wan is None:
        return 0
    stats = wan.relay_command("stats")
    return sum(int(d.get("packets", 0)) for d in stats.values() if isinstance(d, dict))


def _cpu(pid_usage: Any) -> float:
    return float(pid_usage.ru_utime + pid_usage.ru_stime)


def one_run(work: Path, catalog: Path, stream: Path, tls: tuple[Path, Path] | None,
            wan: Wan | None = None, profile: str | None = None,
            python: str = sys.executable) -> dict[str, Any]:
    fifo = make_fifo(work / f"ready-{time.monotonic_ns()}")
    plain = ["--insecure-plaintext"] if wan else []
    recv_tls = ["--tls-creds", tls[0]] if tls else plain
    send_tls = ["--tls-creds", tls[1]] if tls else plain
    host = DST_ADDR if wan else "127.0.0.1"
    out = work / "out.bin"
    with out.open("wb") as sink:
        receiver = subprocess.Popen(
            _tmdht("qemu", "receive", "--listen", f"{host}:0", "--no-cluster", "--ready-file",
                   fifo, "--report", work / "r.json", *recv_tls,
                   wrapper=wan.wrappers["receiver"] if wan else None, python_path=python,
                   profile=work / f"{profile}-receiver.prof" if profile else None),
            stdout=sink, stderr=subprocess.DEVNULL)
        _host, port = read_ready(fifo, timeout=60)
        relay_before = wan.cpu_seconds()["relay"] if wan else 0.0
        packets_before = _relay_packets(wan)
        began = time.perf_counter()
        with stream.open("rb") as stdin:
            sender = subprocess.Popen(
                _tmdht("qemu", "send", "--catalog", catalog, "--to", f"{host}:{port}",
                       "--report", work / "s.json", *send_tls,
                       wrapper=wan.wrappers["sender"] if wan else None, python_path=python,
                       profile=work / f"{profile}-sender.prof" if profile else None),
                stdin=stdin, stderr=None if os.environ.get("TLSBENCH_DEBUG") else subprocess.DEVNULL)
            _, send_status, send_usage = os.wait4(sender.pid, 0)
        _, recv_status, recv_usage = os.wait4(receiver.pid, 0)
        wall = time.perf_counter() - began
        relay_cpu = wan.cpu_seconds()["relay"] - relay_before if wan else 0.0
        packets = _relay_packets(wan) - packets_before
        sender.returncode = receiver.returncode = 0
    if send_status or recv_status or out.stat().st_size != stream.stat().st_size:
        raise SystemExit(f"migration failed (tls={bool(tls)})")
    sent = json.loads((work / "s.json").read_text())
    return {"wall_s": wall, "relay_cpu_s": relay_cpu, "relay_packets": packets, "sender_cpu_s": _cpu(send_usage),
            "receiver_cpu_s": _cpu(recv_usage), "wan_sent_bytes": sent["wan_sent_bytes"],
            "tcp_sent_bytes": sent["tcp_sent_bytes"], "connect_s": sent.get("connect_s", 0.0)}


def _profile_text(path: Path, top: int = 25) -> str:
    import io  # noqa: PLC0415
    import pstats  # noqa: PLC0415

    text = io.StringIO()
    pstats.Stats(str(path), stream=text).sort_stats("tottime").print_stats(top)
    return text.getvalue()


def _bench(work: Path, catalog: Path, stream: Path, creds: tuple[Path, Path], repeat: int,
           wan: Wan | None, profile: Path | None, baseline: str | None
           ) -> dict[str, list[dict[str, Any]]]:
    variants: list[tuple[str, tuple[Path, Path] | None, str]] = [
        ("plaintext", None, sys.executable), ("tls", creds, sys.executable)]
    if baseline:
        variants += [("plaintext-baseline", None, baseline), ("tls-baseline", creds, baseline)]
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in variants}
    for rep in range(repeat):  # alternate (rotated), so drifts in the shared machine hit all
        for name, tls, python in variants[rep % len(variants):] + variants[:rep % len(variants)]:
            runs[name].append(one_run(work, catalog, stream, tls, wan, python=python))
    if profile is not None:  # extra runs: cProfile's overhead stays out of the medians
        for variant, tls in (("plaintext", None), ("tls", creds)):
            one_run(work, catalog, stream, tls, wan, profile=variant)
            for role in ("sender", "receiver"):
                (profile.parent / f"{profile.name}-{variant}-{role}.txt").write_text(
                    _profile_text(work / f"{variant}-{role}.prof"))
    return runs


def _table(label: str, runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    medians = {variant: {key: statistics.median(r[key] for r in rows) for key in rows[0]}
               for variant, rows in runs.items()}
    ratios = {f"{tls}/{plain}": {key: medians[tls][key] / medians[plain][key]
                                 for key in medians[tls] if medians[plain][key]}
              for tls, plain in (("tls", "plaintext"), ("tls-baseline", "plaintext-baseline"))
              if tls in medians}
    spread = {variant: (min(r["wall_s"] for r in rows), max(r["wall_s"] for r in rows))
              for variant, rows in runs.items()}
    print(f"\n{label}")
    print(f"{'variant':<19} {'wall s':>7} {'(min-max)':>15} {'connect s':>9} {'send CPU':>8} "
          f"{'recv CPU':>8} {'relay CPU':>9} {'packets':>8} {'app bytes':>11} {'TCP bytes':>11}")
    for variant, m in medians.items():
        low, high = spread[variant]
        print(f"{variant:<19} {m['wall_s']:>7.3f} {f'({low:.3f}-{high:.3f})':>15} "
              f"{m['connect_s']:>9.3f} {m['sender_cpu_s']:>8.3f} "
              f"{m['receiver_cpu_s']:>8.3f} {m['relay_cpu_s']:>9.3f} "
              f"{m['relay_packets']:>8.0f} {m['wan_sent_bytes']:>11.0f} "
              f"{m['tcp_sent_bytes']:>11.0f}")
    for name, ratio in ratios.items():
        print(f"{name:<19} {ratio['wall_s']:>7.3f} {'':>15} {'':>9} "
              f"{ratio['sender_cpu_s']:>8.3f} {ratio['receiver_cpu_s']:>8.3f} "
              f"{ratio.get('relay_cpu_s', float('nan')):>9.3f} "
              f"{ratio.get('relay_packets', float('nan')):>8.3f} "
              f"{ratio['wan_sent_bytes']:>11.4f} {ratio['tcp_sent_bytes']:>11.4f}")
    return {"network": label, "runs": runs, "medians": medians, "ratios": ratios}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=40000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--wan", action="append", default=[], metavar="RATE:RTT",
                        help="run across the emulated WAN (e.g. 1gbit:20), not loopback (root)")
    parser.add_argument("--profile", action="store_true",
                        help="also profile one run of each variant (cProfile)")
    parser.add_argument("--baseline-python", metavar="PYTHON",
                        help="also run plaintext and TLS with another installation's python "
                        "(e.g. main's build/venv/bin/python), alternating with these runs")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "tls.json")
    args = parser.parse_args(argv)
    settings = [Setting(w.partition(":")[0], float(w.partition(":")[2] or 0)) for w in args.wan]
    load = os.getloadavg()
    results = []
    with tempfile.TemporaryDirectory(prefix="tlsperf-bench-") as tmp:
        work = Path(tmp)
        ca = ScratchCA(work / "ca")
        server = ca.issue("server", "/O=bench/CN=receiver", server=True,
                          names=f"IP:127.0.0.1,IP:{DST_ADDR},DNS:localhost")
        client = ca.issue("client", "/O=bench/CN=sender", server=False)
        creds = (ca.creds(work / "recv", server=server), ca.creds(work / "send", client=client))
        catalog, stream = _stream(args.pages, work)
        qemu_bytes = stream.stat().st_size
        print(f"{args.pages} pages, QEMU stream {qemu_bytes / 1e6:.1f} MB, no cluster, "
              f"{args.repeat} alternating runs each, medians; {describe()}")
        profile = args.out.with_suffix("") if args.profile else None
        if not settings:
            results.append(_table("loopback", _bench(work, catalog, stream, creds, args.repeat,
                                                     None, profile, args.baseline_python)))
        else:
            (work / "wan").mkdir()
            with Wan(work / "wan") as wan:
                for setting in settings:
                    wan.shape(setting)
                    label = f"emulated WAN {setting.label}"
                    results.append(_table(label, _bench(
                        work, catalog, stream, creds, args.repeat, wan,
                        profile and profile.with_name(f"{profile.name}-{setting.rate}"),
                        args.baseline_python)))
    load_after = os.getloadavg()
    print(f"\nload average before {load[0]:.2f}, after {load_after[0]:.2f} (shared machine)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "conditions": {"pages": args.pages, "qemu_bytes": qemu_bytes, "repeat": args.repeat,
                       "cluster": "none (--no-cluster)", "implementation": describe(),
                       "machine": platform.platform(), "cpus": os.cpu_count(), "shared": True,
                       "load_before": load, "load_after": load_after,
                       "baseline_python": args.baseline_python,
                       "links": [f"{rate_label(s.rate)}, {s.rtt_ms:g} ms" for s in settings]
                       or ["loopback"]},
        "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
