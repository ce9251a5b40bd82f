"""bench/multihost.py: a small multi-host ring (hosts as network namespaces, as root) places every
page's replicas on distinct hosts and survives a whole host's SIGKILL; the bench cleans up its
namespaces and node processes when it ends, when it is interrupted, and after a dead run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import multihost  # noqa: E402

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")


def namespaces() -> list[str]:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return [line.split()[0] for line in listed.stdout.splitlines() if line.split()]


def ours(pid: int) -> list[str]:
    return [ns for ns in namespaces() if ns.startswith(f"{multihost.PREFIX}{pid}-")]


def bench(*args: str, out: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(BENCH / "multihost.py"), *args, "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


@needs_root
@pytest.mark.slow
def test_three_hosts_place_replicas_apart_and_survive_a_host_kill(tmp_path: Path) -> None:
    out = tmp_path / "multihost.json"
    run = bench("--hosts", "3", "--nodes-per-host", "2", "--pages", "2000", "--batch", "1000",
                "--grace", "4", "--interval", "2", "--idle", "1", "--phase-limit", "90",
                "--kill-host", "2", "--check", out=out)  # fmt: skip
    output, _ = run.communicate(timeout=300)
    assert run.returncode == 0, output
    report = json.loads(out.read_text())
    assert all(report["verdicts"].values()), report["verdicts"]
    assert report["publish"]["failed"] == 0
    assert report["pages_per_node"]["total"] == 3 * 2000  # R copies, no more, no fewer
    # 3 hosts, R = 3: every page has one copy on each host, all held
    assert report["placement"] == {"members": 6, "short": 0, "not_distinct_hosts": 0,
                                   "unanswered": 0}  # fmt: skip
    assert report["kill"]["nodes"] == 2
    assert report["kill"]["resolve"]["unresolved"] == 0
    # the 2 hosts left: every page back to 3 copies on the 4 live nodes, 2 hosts spanned
    assert report["kill"]["replicated"]["restored"]
    assert report["kill"]["replicated"]["members"] == 4
    assert report["kill"]["replicated"]["not_distinct_hosts"] == 0
    assert report["restart"]["rebalanced"]["restored"]
    assert report["restart"]["surplus_copies_before"] > 0
    assert report["restart"]["surplus_copies_after"] == 0
    assert "FAIL" not in output
    assert ours(run.pid) == []


@needs_root
@pytest.mark.slow
def test_an_interrupted_run_kills_its_nodes_and_deletes_its_namespaces(tmp_path: Path) -> None:
    run = bench("--hosts", "2", "--nodes-per-host", "1", "--pages", "1000000",
                "--batch", "1000", out=tmp_path / "never.json")  # fmt: skip
    pids: list[int] = []
    deadline = time.monotonic() + 120
    try:
        for _ in range(1200):  # bounded: until both nodes were started (or the deadline)
            listed = list(Path(tempfile.gettempdir()).glob(f"{multihost.PREFIX}{run.pid}-*/pids"))
            if listed:
                pids = [int(p) for p in listed[0].read_text().split()]
            if len(pids) == 2 or time.monotonic() > deadline or run.poll() is not None:
                break
            time.sleep(0.1)
        assert len(pids) == 2, "the bench never started its nodes"
        assert len(ours(run.pid)) == 4  # hub, 2 hosts, client
    finally:
        run.send_signal(signal.SIGINT)
        run.communicate(timeout=120)
    assert run.returncode == 130
    assert ours(run.pid) == []
    for pid in pids:
        assert (
            not Path(f"/proc/{pid}").exists()
            or b"multihost" not in Path(f"/proc/{pid}/cmdline").read_bytes()
        )


@needs_root
def test_leftovers_of_a_dead_run_are_swept() -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    name = f"{multihost.PREFIX}{dead.pid}-hub"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        multihost.sweep_stale()
        assert name not in namespaces()
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux)")
@needs_root
def test_it_refuses_to_run_without_root(tmp_path: Path) -> None:
    # The bench run as a user that is not root. Not through setpriv: a checkout (and its venv)
    # in a private directory, as `mktemp -d` makes, is unreadable to another uid; the process
    # reports uid 65534 to the bench instead.
    script = (
        "import os, runpy, sys; os.geteuid = lambda: 65534; "
        f"sys.argv = [{str(BENCH / 'multihost.py')!r}, '--out', {str(tmp_path / 'x.json')!r}]; "
        "runpy.run_path(sys.argv[0], run_name='__main__')"
    )
    done = subprocess.run(
        [sys.executable, "-P", "-c", script],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert done.returncode == 2
    assert "needs root" in done.stderr
    assert not (tmp_path / "x.json").exists()
