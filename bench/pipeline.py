"""The migration pipeline's cost, native against the pure-Python reference, in one run.

Stages (``--stages``, default all but ``live``):

- ``cores``: the sender core alone (QEMU stream → migration records) and the receiver core alone
  (records → QEMU stream, template pages "resolved" from a dict), on the saved stream of a real
  guest that is not in the catalog's corpus. CPU microseconds (process time) per non-zero page
  per side, best and median of ``--repeat`` passes; every output is checked byte for byte.
  Three rows per side: ``baseline`` is tmdht/migration_stream.py of ``--baseline-rev`` (default
  ``main``) driven as that revision's proxies drove it (numpy catalog membership, one supply
  call per page), ``reference`` the pure-Python path of this tree, ``native`` the Rust module.
- ``startup``: ``tmdht qemu send`` from exec to the first byte at a listening socket (what QEMU
  waits for before its stream moves), ``--startup-runs`` times per path.
- ``loopback``: the two proxies as processes on loopback with a 3-node store cluster holding
  the catalog's templates: the saved stream piped into ``qemu send``, ``qemu receive`` writing
  to a file (checked against the stream); wall time and each proxy's CPU seconds.
- ``live``: live migrations of a lab guest (not in the corpus) with QEMU: plain TCP, and through
  the proxies on each path (``tmdht.lab.migrate``, the demo's code); QEMU's total time.

Every figure is measured for both paths in the same run (the reference with ``TMDHT_NATIVE=0``
in its processes). Prints a table; writes JSON to ``bench/results/pipeline.json``.

    python bench/pipeline.py                          # cores, startup, loopback
    python bench/pipeline.py --stages live --live-runs 3
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import platform
import resource
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

from tmdht.catalog import TemplateCatalog  # noqa: E402
from tmdht.catalog_file import TemplateDigests  # noqa: E402
from tmdht.images import open_image  # noqa: E402
from tmdht.lab import HostTools, capture_guests, default_specs  # noqa: E402
from tmdht.migration_stream import Ack, SenderRewriter  # noqa: E402
from tmdht.mining import MiningConfig, TemplateMiner  # noqa: E402
from tmdht.native import (  # noqa: E402
    NativeReceiver,
    NativeSender,
    ReferenceReceiver,
    describe,
    native_module,
    tune_allocator,
)
from tmdht.pages import DIGEST_SIZE, digest_page  # noqa: E402

CHUNK = 256 << 10  # what the sender proxy reads at a time
RESOLVE_BATCH = 512
CORPUS = 3  # the catalog is mined from the first three default guests; the stream is the 4th


def load_setup(build_dir: Path, work: Path) -> tuple[Path, Path, TemplateDigests]:
    """(stream of a guest outside the corpus, catalog file, its digests)."""
    tools = HostTools.discover()
    captures = capture_guests(build_dir, default_specs(), tools=tools)
    catalog_path = work / "templates.tmc"
    with TemplateMiner(MiningConfig()) as miner:
        for capture in captures[:CORPUS]:
            with open_image(capture.stream_path) as image:
                miner.add_image(capture.name, image.iter_pages())
        catalog = TemplateCatalog.from_mining(miner.finish())
    catalog.save(catalog_path)
    digests = TemplateDigests(catalog.catalog_id, catalog.digests.tobytes())
    return captures[CORPUS].stream_path, catalog_path, digests


# -- cores ---------------------------------------------------------------------------------------


def _cpu() -> float:
    return time.process_time()


def run_sender(make: Callable[[], Any], stream: bytes) -> tuple[float, bytes, Any]:
    sender = make()
    out = [sender.start()]
    view = memoryview(stream)
    started = _cpu()
    for i in range(0, len(stream), CHUNK):
        out.append(sender.feed(view[i : i + CHUNK]))
        counts = sender.counts
        sender.acknowledge(Ack(counts.pages, counts.qemu_bytes))  # as the receiver's ACKs do
    out.append(sender.finish())
    return _cpu() - started, b"".join(out), sender.counts


def run_receiver(make: Callable[[], Any], wire: bytes, pages: dict[bytes, bytes]
                 ) -> tuple[float, int, Any]:
    receiver = make()
    view = memoryview(wire)
    written = 0
    digest_out = None
    started = _cpu()
    for i in range(0, len(wire), CHUNK):
        receiver.feed(view[i : i + CHUNK])
        while True:
            indices, digests = receiver.wanted_batch(RESOLVE_BATCH)
            if not indices:
                break
            keys = [digests[j : j + DIGEST_SIZE] for j in range(0, len(digests), DIGEST_SIZE)]
            receiver.supply_batch(indices, [pages[k] for k in keys])  # the resolve "call"
        for chunk in receiver.output():
            written += len(chunk)
        receiver.ack(CHUNK)
    elapsed = _cpu() - started
    assert receiver.verified, "receiver did not verify the stream"
    return elapsed, written, (receiver.stats, digest_out)


def load_baseline(rev: str, work: Path) -> Any:
    """tmdht/migration_stream.py as of ``rev``, imported as a module of its own (it imports the
    rest of tmdht from this tree), or None if git cannot show it."""
    try:
        source = subprocess.run(["git", "show", f"{rev}:tmdht/migration_stream.py"], cwd=REPO,
                                capture_output=True, check=True, timeout=30).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    path = work / "baseline_migration_stream.py"
    path.write_bytes(source)
    spec = importlib.util.spec_from_file_location("baseline_migration_stream", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


class _BaselineReceiver:
    """The baseline rebuilder driven the way that revision's receiver proxy drove it."""

    def __init__(self, module: Any, catalog_id: bytes) -> None:
        self.core = module.ReceiverRebuilder(catalog_id)

    def feed(self, data: Any) -> None:
        self.core.feed(data)

    def wanted_batch(self, limit: int) -> tuple[list[int], bytes]:
        batch = self.core.wanted(limit)
        self._batch = batch
        return [i for i, _ in batch], b"".join(d for _, d in batch)

    def supply_batch(self, indices: list[int], pages: list[bytes]) -> None:
        for index, page in zip(indices, pages, strict=True):
            self.core.supply(index, page)

    def output(self) -> list[bytes]:
        out: list[bytes] = self.core.output()
        return out

    def ack(self, every: int) -> bytes:
        out: bytes = self.core.ack(every)
        return out

    @property
    def verified(self) -> bool:
        return bool(self.core.verified)

    @property
    def stats(self) -> Any:
        return self.core.stats


def bench_cores(stream_path: Path, templates: TemplateDigests, catalog_path: Path, repeat: int,
                baseline: Any) -> dict[str, Any]:
    stream = stream_path.read_bytes()
    members = templates.as_set()
    senders: dict[str, Callable[[], Any]] = {}
    receivers: dict[str, Callable[[], Any]] = {}
    if baseline is not None:
        catalog = TemplateCatalog.load(catalog_path)
        senders["baseline"] = lambda: baseline.SenderRewriter(
            catalog.catalog_id, lambda ds: catalog.contains_many(ds).tolist())
        receivers["baseline"] = lambda: _BaselineReceiver(baseline, templates.catalog_id)
    senders |= {
        "reference": lambda: SenderRewriter(templates.catalog_id,
                                            lambda ds: [d in members for d in ds]),
        "native": lambda: NativeSender(templates),
    }
    receivers |= {
        "reference": lambda: ReferenceReceiver(templates.catalog_id),
        "native": lambda: NativeReceiver(templates.catalog_id),
    }
    if native_module() is None:
        del senders["native"], receivers["native"]
    # The pages the "cluster" holds: every template page of the stream.
    pages: dict[bytes, bytes] = {}
    from tmdht.qemu_stream import QemuStreamParser, RamPage  # noqa: PLC0415

    parser = QemuStreamParser()
    parser.feed(stream)
    for event in parser.events():
        if isinstance(event, RamPage):
            digest = digest_page(event.data)
            if digest in members:
                pages[digest] = bytes(event.data)
    results: dict[str, Any] = {"stream_bytes": len(stream), "sender": {}, "receiver": {}}
    wires: dict[str, bytes] = {}
    for name, make in senders.items():
        times = []
        for _ in range(repeat):
            elapsed, wire, counts = run_sender(make, stream)
            times.append(elapsed)
        wires[name] = wire
        results["sender"][name] = _per_page(times, counts.pages, len(stream))
        results["counts"] = dataclasses.asdict(counts)
        results["wire_bytes"] = len(wire)
    if len(set(wires.values())) != 1:
        raise AssertionError("the paths wrote different wire bytes")
    wire = next(iter(wires.values()))
    for name, make in receivers.items():
        if name == "native":
            tune_allocator()  # as the proxies do on the native path (process-wide: runs last)
        times = []
        for _ in range(repeat):
            elapsed, written, (stats, _) = run_receiver(make, wire, pages)
            times.append(elapsed)
            if written != len(stream):
                raise AssertionError(f"{name} receiver wrote {written} of {len(stream)} bytes")
        results["receiver"][name] = _per_page(times, stats.pages, len(stream))
    return results


def _per_page(times: list[float], pages: int, stream_bytes: int) -> dict[str, Any]:
    best, median = min(times), statistics.median(times)
    return {"runs": len(times), "cpu_s": [round(t, 4) for t in times], "pages": pages,
            "us_per_page_best": round(best * 1e6 / pages, 2),
            "us_per_page_median": round(median * 1e6 / pages, 2),
            "stream_mb_per_cpu_s": round(stream_bytes / best / 1e6, 1)}


# -- startup -----------------------------------------------------------------------------------


def _env(path: str) -> dict[str, str]:
    env = dict(os.environ)
    if path == "reference":
        env["TMDHT_NATIVE"] = "0"
    else:
        env.pop("TMDHT_NATIVE", None)
    return env


BASELINE_PYTHON: list[str] = []  # --baseline-python: another tree's interpreter (its venv)


def _paths() -> list[str]:
    """The proxy paths to measure: the baseline tree's (if given), then this tree's."""
    return ((["baseline"] if BASELINE_PYTHON else []) + ["reference"]
            + (["native"] if native_module() else []))


def _tmdht(path: str = "native") -> list[str]:
    python = BASELINE_PYTHON[0] if path == "baseline" else sys.executable
    return [python, "-m", "tmdht.cli"]


def bench_startup(stream_path: Path, catalog_path: Path, runs: int) -> dict[str, Any]:
    """exec of ``tmdht qemu send`` to the first forwarded byte (hello) and to the first QEMU
    bytes (the RAW record after the hello) at a listening socket."""
    head = stream_path.read_bytes()[: 1 << 20]
    results: dict[str, Any] = {}
    for path in _paths():
        firsts, datas = [], []
        for _ in range(runs):
            with socket.create_server(("127.0.0.1", 0)) as listener:
                port = listener.getsockname()[1]
                read_fd, write_fd = os.pipe()
                started = time.perf_counter()
                proc = subprocess.Popen(
                    [*_tmdht(path), "qemu", "send", "--catalog", str(catalog_path),
                     "--to", f"127.0.0.1:{port}", "--connect-timeout", "10"],
                    stdin=read_fd, stderr=subprocess.DEVNULL, env=_env(path))
                os.close(read_fd)
                os.write(write_fd, head[:65536])  # what QEMU has in the pipe when it starts
                listener.settimeout(30)
                conn, _ = listener.accept()
                with conn:
                    conn.settimeout(30)
                    got = b""
                    first = None
                    while len(got) < 54 + 5:
                        data = conn.recv(65536)
                        if not data:
                            break
                        if first is None:
                            first = time.perf_counter() - started
                        got += data
                    data_at = time.perf_counter() - started
                os.close(write_fd)
                proc.kill()
                proc.wait(timeout=30)
                if first is not None:
                    firsts.append(first)
                    datas.append(data_at)
        results[path] = {"runs": runs, "first_byte_ms_median": _ms(statistics.median(firsts)),
                         "first_byte_ms_min": _ms(min(firsts)),
                         "first_qemu_bytes_ms_median": _ms(statistics.median(datas))}
    return results


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


# -- loopback: the two proxies as processes ----------------------------------------------------


@contextmanager
def cluster_with(catalog_path: Path, build_dir: Path, work: Path) -> Iterator[Any]:
    sys.path.insert(0, str(REPO / "tests"))
    from support.cluster import FAST_NODE_ARGS  # noqa: PLC0415

    from tmdht.cli.jobs import publish_files  # noqa: PLC0415
    from tmdht.net.credentials import ClusterAccess, ClusterCredentials  # noqa: PLC0415
    from tmdht.node.local import LocalCluster  # noqa: PLC0415

    captures = capture_guests(build_dir, default_specs(), tools=HostTools.discover())
    with LocalCluster(work / "cluster", 3, extra_args=FAST_NODE_ARGS) as local:
        access = ClusterAccess((local.seed,), ClusterCredentials.from_file(local.key_file))
        publish_files(TemplateCatalog.load(catalog_path),
                      [c.stream_path for c in captures[:CORPUS]], access)
        yield local


def _rusage_wait(proc: subprocess.Popen[bytes], timeout: float) -> float:
    """Wait for ``proc``; its CPU seconds (user + system)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return usage.ru_utime + usage.ru_stime
        time.sleep(0.01)  # polling a child we own: wait4 has no timeout
    proc.kill()
    raise TimeoutError(f"{proc.args} still runs after {timeout} s")


def bench_loopback(stream_path: Path, catalog_path: Path, cluster: Any, work: Path,
                   runs: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    host, port = cluster.nodes[0].address("kademlia")
    for path in _paths():
        rows = []
        for run in range(runs):
            out_path = work / f"rebuilt-{path}-{run}.bin"
            ready = work / f"ready-{path}-{run}"
            receiver = subprocess.Popen(
                [*_tmdht(path), "qemu", "receive", "--listen", "127.0.0.1:0",
                 "--seed", f"{host}:{port}", "--cluster-key-file", str(cluster.key_file),
                 "--ready-file", str(ready), "--report", str(work / f"recv-{path}.json")],
                stdout=out_path.open("wb"), stderr=subprocess.DEVNULL, env=_env(path))
            for _ in range(3000):
                if ready.exists() and ready.read_text().endswith("\n"):
                    break
                time.sleep(0.01)  # the receiver is ours; it announces its port in a file
            rport = int(ready.read_text().split(":")[-1])
            started = time.perf_counter()
            with stream_path.open("rb") as stdin:
                sender = subprocess.Popen(
                    [*_tmdht(path), "qemu", "send", "--catalog", str(catalog_path),
                     "--to", f"127.0.0.1:{rport}", "--report", str(work / f"send-{path}.json")],
                    stdin=stdin, stderr=subprocess.DEVNULL, env=_env(path))
                send_cpu = _rusage_wait(sender, 300)
            receive_cpu = _rusage_wait(receiver, 300)
            wall = time.perf_counter() - started
            if sender.returncode or receiver.returncode:
                raise RuntimeError(f"{path}: send {sender.returncode}, "
                                   f"receive {receiver.returncode}")
            if out_path.read_bytes() != stream_path.read_bytes():
                raise AssertionError(f"{path}: rebuilt stream differs")
            report = json.loads((work / f"send-{path}.json").read_text())
            out_path.unlink()
            rows.append({"wall_s": round(wall, 3), "send_cpu_s": round(send_cpu, 3),
                         "receive_cpu_s": round(receive_cpu, 3),
                         "wan_bytes": report["wan_bytes"], "pages": report["counts"]["pages"]})
        results[path] = {"runs": rows,
                         "wall_s_median": statistics.median(r["wall_s"] for r in rows),
                         "send_cpu_s_median": statistics.median(r["send_cpu_s"] for r in rows),
                         "receive_cpu_s_median": statistics.median(r["receive_cpu_s"]
                                                                  for r in rows)}
    return results


# -- live migrations ---------------------------------------------------------------------------


def bench_live(catalog_path: Path, cluster: Any, build_dir: Path, runs: int) -> dict[str, Any]:
    from tmdht.lab import GuestSpec  # noqa: PLC0415
    from tmdht.lab.initramfs import ensure_initramfs  # noqa: PLC0415
    from tmdht.lab.migrate import migrate_guest  # noqa: PLC0415

    tools = HostTools.discover()
    initramfs = ensure_initramfs(build_dir / "lab", tools.busybox, tools.cpio)
    spec = GuestSpec(name="pipeline-traveller", workload="mixed", seed=21)
    rows: dict[str, list[dict[str, Any]]] = {}
    from tmdht.lab import migrate as lab_migrate  # noqa: PLC0415

    own_command = lab_migrate.tmdht_command
    paths = ["plain", *_paths()]
    saved = os.environ.get("TMDHT_NATIVE")
    try:
        for run in range(runs):
            for path in paths:
                if path == "reference":
                    os.environ["TMDHT_NATIVE"] = "0"  # inherited by QEMU's exec: proxies
                else:
                    os.environ.pop("TMDHT_NATIVE", None)
                lab_migrate.tmdht_command = (  # the proxies QEMU runs: which tree's
                    (lambda *args: shlex.join([*_tmdht("baseline"), *map(str, args)]))
                    if path == "baseline" else own_command)
                outcome = migrate_guest(
                    spec, tools=tools, initramfs=initramfs,
                    method="plain" if path == "plain" else "tmdht",
                    seed=cluster.nodes[0].address("kademlia"), key_file=cluster.key_file,
                    catalog=catalog_path)
                rows.setdefault(path, []).append({
                    "run": run, "total_time_ms": outcome.stats.total_time_ms,
                    "downtime_ms": outcome.stats.downtime_ms, "wire_bytes": outcome.wire_bytes,
                    "qemu_bytes": outcome.qemu_bytes})
                print(f"  live {path} run {run + 1}: {outcome.stats.total_time_ms} ms",
                      file=sys.stderr, flush=True)
    finally:
        lab_migrate.tmdht_command = own_command
        if saved is None:
            os.environ.pop("TMDHT_NATIVE", None)
        else:
            os.environ["TMDHT_NATIVE"] = saved
    summary: dict[str, Any] = {}
    plain = statistics.median(r["total_time_ms"] for r in rows["plain"])
    for path, mine in rows.items():
        total = statistics.median(r["total_time_ms"] for r in mine)
        summary[path] = {"runs": mine, "total_time_ms_median": total,
                         "time_vs_plain": round(total / plain, 2),
                         "wire_vs_plain": round(statistics.median(r["wire_bytes"] for r in mine)
                                                / statistics.median(r["wire_bytes"]
                                                                    for r in rows["plain"]), 3)}
    return summary


# -- main --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stages", default="cores,startup,loopback")
    parser.add_argument("--repeat", type=int, default=3, help="passes per core measurement")
    parser.add_argument("--baseline-rev", default="main",
                        help="git revision whose migration_stream.py is the 'baseline' row")
    parser.add_argument("--baseline-python", default=None,
                        help="python of another tree's venv (e.g. a checkout of main): its "
                        "proxies are the 'baseline' row of startup, loopback and live")
    parser.add_argument("--startup-runs", type=int, default=10)
    parser.add_argument("--loopback-runs", type=int, default=3)
    parser.add_argument("--live-runs", type=int, default=3)
    parser.add_argument("--build-dir", type=Path, default=REPO / "build")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "pipeline.json")
    args = parser.parse_args(argv)
    stages = {s.strip() for s in args.stages.split(",") if s.strip()}
    if args.baseline_python:
        BASELINE_PYTHON.append(args.baseline_python)
    doc: dict[str, Any] = {
        "benchmark": "pipeline", "implementation": describe(),
        "machine": {"python": sys.version.split()[0], "platform": platform.platform(),
                    "cpus": os.cpu_count(), "loadavg_start": os.getloadavg()},
    }
    with tempfile.TemporaryDirectory(prefix="native-pipeline-") as tmp:
        work = Path(tmp)
        stream_path, catalog_path, templates = load_setup(args.build_dir, work)
        doc["stream"] = {"path": str(stream_path), "templates": len(templates)}
        if "cores" in stages:
            baseline = load_baseline(args.baseline_rev, work)
            doc["cores"] = cores = bench_cores(stream_path, templates, catalog_path, args.repeat,
                                               baseline)
            doc["cores"]["baseline_rev"] = args.baseline_rev if baseline is not None else None
            print(f"\ncores ({cores['stream_bytes'] / 2**20:.1f} MiB stream, "
                  f"{cores['sender'][next(iter(cores['sender']))]['pages']} non-zero pages; "
                  f"CPU us per non-zero page, best/median of {args.repeat})")
            for side in ("sender", "receiver"):
                for path, row in cores[side].items():
                    print(f"  {side:8} {path:9} {row['us_per_page_best']:7.2f} "
                          f"{row['us_per_page_median']:7.2f}   "
                          f"{row['stream_mb_per_cpu_s']:7.1f} MB of QEMU stream per CPU s")
        if "startup" in stages:
            doc["startup"] = startup = bench_startup(stream_path, catalog_path, args.startup_runs)
            print(f"\nsender start-up to first forwarded byte (median of {args.startup_runs})")
            for path, row in startup.items():
                print(f"  {path:9} {row['first_byte_ms_median']:7.1f} ms "
                      f"(min {row['first_byte_ms_min']} ms; first QEMU bytes "
                      f"{row['first_qemu_bytes_ms_median']} ms)")
        if stages & {"loopback", "live"}:
            with cluster_with(catalog_path, args.build_dir, work) as cluster:
                if "loopback" in stages:
                    doc["loopback"] = loop = bench_loopback(stream_path, catalog_path, cluster,
                                                            work, args.loopback_runs)
                    print(f"\nproxies on loopback, 3-node cluster (median of "
                          f"{args.loopback_runs})")
                    for path, row in loop.items():
                        print(f"  {path:9} wall {row['wall_s_median']:6.2f} s   send CPU "
                              f"{row['send_cpu_s_median']:6.2f} s   receive CPU "
                              f"{row['receive_cpu_s_median']:6.2f} s")
                if "live" in stages:
                    doc["live"] = live = bench_live(catalog_path, cluster, args.build_dir,
                                                    args.live_runs)
                    print(f"\nlive migration on loopback (median of {args.live_runs})")
                    for path, row in live.items():
                        print(f"  {path:9} total {row['total_time_ms_median']:7.0f} ms  "
                              f"{row['time_vs_plain']:5.2f}x plain   wire "
                              f"{row['wire_vs_plain']:5.3f}x plain")
    doc["machine"]["loadavg_end"] = os.getloadavg()
    doc["machine"]["maxrss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
