"""What mutual TLS costs the migration proxies, against plaintext in the same run.

``tmdht qemu send`` and ``tmdht qemu receive`` as processes on loopback (no store cluster:
template pages come back from the sender), a saved synthetic QEMU stream piped through them,
alternating plaintext and TLS ``--repeat`` times. Per run: wall time from the sender's start to
both exits, CPU seconds (user + system) of each proxy, the bytes the proxies wrote
(``wan_sent_bytes``) and the bytes TCP carried (``tcp_sent_bytes``: TLS records and handshake
included). Medians, and TLS / plaintext ratios. Credentials are made with the openssl command.

Loopback has no bandwidth limit, so the time ratio is an upper bound of what TLS adds to a
migration over a 100 Mbit/s or 1 Gbit/s WAN, where the link, not the CPU, sets the pace.

    python bench/tls.py [--pages 40000] [--repeat 5]
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


def _tmdht(*args: object) -> list[str]:
    return [sys.executable, "-m", "tmdht.cli", *map(str, args)]


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


def _cpu(pid_usage: Any) -> float:
    return float(pid_usage.ru_utime + pid_usage.ru_stime)


def one_run(work: Path, catalog: Path, stream: Path, tls: tuple[Path, Path] | None
            ) -> dict[str, Any]:
    fifo = make_fifo(work / f"ready-{time.monotonic_ns()}")
    recv_tls = ["--tls-creds", tls[0]] if tls else []
    send_tls = ["--tls-creds", tls[1]] if tls else []
    out = work / "out.bin"
    with out.open("wb") as sink:
        receiver = subprocess.Popen(
            _tmdht("qemu", "receive", "--listen", "127.0.0.1:0", "--no-cluster", "--ready-file",
                   fifo, "--report", work / "r.json", *recv_tls),
            stdout=sink, stderr=subprocess.DEVNULL)
        _host, port = read_ready(fifo, timeout=60)
        began = time.perf_counter()
        with stream.open("rb") as stdin:
            sender = subprocess.Popen(
                _tmdht("qemu", "send", "--catalog", catalog, "--to", f"127.0.0.1:{port}",
                       "--report", work / "s.json", *send_tls),
                stdin=stdin, stderr=subprocess.DEVNULL)
            _, send_status, send_usage = os.wait4(sender.pid, 0)
        _, recv_status, recv_usage = os.wait4(receiver.pid, 0)
        wall = time.perf_counter() - began
        sender.returncode = receiver.returncode = 0
    if send_status or recv_status or out.stat().st_size != stream.stat().st_size:
        raise SystemExit(f"migration failed (tls={bool(tls)})")
    sent = json.loads((work / "s.json").read_text())
    return {"wall_s": wall, "sender_cpu_s": _cpu(send_usage),
            "receiver_cpu_s": _cpu(recv_usage), "wan_sent_bytes": sent["wan_sent_bytes"],
            "tcp_sent_bytes": sent["tcp_sent_bytes"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=40000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "tls.json")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="secure-tls-bench-") as tmp:
        work = Path(tmp)
        ca = ScratchCA(work / "ca")
        server = ca.issue("server", "/O=bench/CN=receiver", server=True)
        client = ca.issue("client", "/O=bench/CN=sender", server=False)
        creds = (ca.creds(work / "recv", server=server), ca.creds(work / "send", client=client))
        catalog, stream = _stream(args.pages, work)
        runs: dict[str, list[dict[str, Any]]] = {"plaintext": [], "tls": []}
        for _ in range(args.repeat):  # alternate, so drifts in the shared machine hit both
            runs["plaintext"].append(one_run(work, catalog, stream, None))
            runs["tls"].append(one_run(work, catalog, stream, creds))
        qemu_bytes = stream.stat().st_size
    medians = {variant: {key: statistics.median(r[key] for r in rows) for key in rows[0]}
               for variant, rows in runs.items()}
    ratio = {key: medians["tls"][key] / medians["plaintext"][key]
             for key in medians["tls"] if medians["plaintext"][key]}
    print(f"{args.pages} pages, QEMU stream {qemu_bytes / 1e6:.1f} MB, loopback, "
          f"{args.repeat} alternating runs each, medians; {describe()}")
    print(f"{'variant':<10} {'wall s':>8} {'send CPU s':>11} {'recv CPU s':>11} "
          f"{'app bytes':>12} {'TCP bytes':>12}")
    for variant, m in medians.items():
        print(f"{variant:<10} {m['wall_s']:>8.3f} {m['sender_cpu_s']:>11.3f} "
              f"{m['receiver_cpu_s']:>11.3f} {m['wan_sent_bytes']:>12.0f} "
              f"{m['tcp_sent_bytes']:>12.0f}")
    print(f"{'TLS/plain':<10} {ratio['wall_s']:>8.3f} {ratio['sender_cpu_s']:>11.3f} "
          f"{ratio['receiver_cpu_s']:>11.3f} {ratio['wan_sent_bytes']:>12.4f} "
          f"{ratio['tcp_sent_bytes']:>12.4f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "conditions": {"pages": args.pages, "qemu_bytes": qemu_bytes, "repeat": args.repeat,
                       "network": "loopback", "cluster": "none (--no-cluster)",
                       "implementation": describe(), "machine": platform.platform(),
                       "cpus": os.cpu_count(), "shared": True},
        "runs": runs, "medians": medians, "tls_over_plaintext": ratio}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
