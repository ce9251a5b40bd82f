"""Local clusters as a user starts them: from any folder, and `tmdht cluster up` supervising its
nodes (a node that dies is reported, the others keep serving, ``--restart`` brings it back)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.cli import Lines
from support.cluster import FAST_NODE_ARGS, make_pages

from tmdht.client.store import TemplateStoreClient
from tmdht.lab.migrate import tmdht_command
from tmdht.launch import tmdht_argv
from tmdht.node.local import ClusterError, LocalCluster, describe_exit_code, last_log_line

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(params=["clone", "decoy"])
def beside_a_clone(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """The current folder holds a folder named ``tmdht``: the repository itself (``git clone``
    into the folder a user then works in; it shadows an editable install, as setup.sh makes) or
    a decoy package (it would shadow any install)."""
    if request.param == "clone":
        (tmp_path / "tmdht").symlink_to(REPO_ROOT, target_is_directory=True)
    else:
        (tmp_path / "tmdht").mkdir()
        (tmp_path / "tmdht" / "__init__.py").write_text(
            "raise ImportError('cannot import name tmdht: the decoy in the current folder')\n"
        )
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_shadowing_folder_breaks_plain_python_m(beside_a_clone: Path) -> None:
    """The trap itself, so the next test proves something: ``python -m tmdht.cli`` from this
    folder imports the folder instead of the package and fails."""
    argv = tmdht_argv("templates", "--help")
    plain = [argv[0], *argv[2:]]  # without -P
    proc = subprocess.run(plain, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 1 and "cannot import name" in proc.stderr


def test_nodes_and_proxies_start_beside_a_clone(beside_a_clone: Path) -> None:
    """Regression (issue 17): `tmdht cluster up` from a folder holding a clone named tmdht
    failed with 'node 0 exited with code 1 before it was ready' (ImportError in its log)."""
    with LocalCluster(beside_a_clone / "cl", 2, extra_args=FAST_NODE_ARGS) as cluster:
        assert all(n.running for n in cluster.nodes)
    # The QEMU proxies' exec: command line (QEMU runs it from its own working folder).
    proc = subprocess.run(
        tmdht_command("qemu", "receive", "--help"),
        shell=True,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr


def test_a_node_that_dies_before_ready_names_its_log_and_reason(tmp_path: Path) -> None:
    cluster = LocalCluster(tmp_path / "cl", 1, extra_args=["--capacity", "lots"])
    with pytest.raises(ClusterError) as failure:
        cluster.start()
    message = str(failure.value)
    assert "node 0 exited with code 2 before it was ready" in message
    assert f"log {tmp_path / 'cl' / 'node-0.log'} ends: " in message
    assert "lots" in message  # the node's own error line: what was wrong
    assert "\n" not in message


def test_exit_descriptions_and_log_tails(tmp_path: Path) -> None:
    assert describe_exit_code(3) == "exited with code 3"
    assert describe_exit_code(-signal.SIGKILL) == "was killed by SIGKILL"
    assert describe_exit_code(None) == "is still running"
    log = tmp_path / "node.log"
    assert last_log_line(log) is None  # no log yet
    log.write_text("Traceback (most recent call last):\n  ...\nImportError: no\n\n")
    assert last_log_line(log) == "ImportError: no"
    json_line = {"msg": "node failed", "exc": "Traceback ...\nOSError: [Errno 98] in use"}
    log.write_text('{"msg": "starting"}\n' + json.dumps(json_line) + "\n")
    assert last_log_line(log) == "node failed | OSError: [Errno 98] in use"


# -- `tmdht cluster up` supervising its nodes ------------------------------------------------


class ClusterUp:
    """A `tmdht cluster up` process and what it says."""

    def __init__(self, root: Path, *extra: str) -> None:
        self.root = root
        env = {k: v for k, v in os.environ.items() if not k.startswith("TMDHT_")}
        self.proc = subprocess.Popen(
            tmdht_argv("cluster", "up", "--nodes", "3", "--dir", root, *extra),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self.out = Lines(self.proc.stdout)
        self.err = Lines(self.proc.stderr)
        self.out.wait_for("Ctrl-C stops the cluster", 120)

    def manifest(self) -> list[dict[str, object]]:
        nodes: list[dict[str, object]] = json.loads((self.root / "cluster.json").read_text())[
            "nodes"
        ]
        return nodes

    def address(self, index: int, plane: str) -> tuple[str, int]:
        host, port = self.manifest()[index][plane]  # type: ignore[misc]
        return str(host), int(port)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(timeout=60)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(timeout=10)
            for pipe in (self.proc.stdout, self.proc.stderr):
                assert pipe is not None
                pipe.close()


@pytest.fixture
def cluster_up(tmp_path: Path) -> Iterator[list[ClusterUp]]:
    started: list[ClusterUp] = []
    yield started
    for up in started:
        up.stop()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def ready(address: tuple[str, int]) -> bool:
    with urllib.request.urlopen("http://{}:{}/readyz".format(*address), timeout=5) as response:
        return response.status == 200


async def resolve_through(seed: tuple[str, int], key: str, digests: list[bytes]) -> int:
    """Pages a fresh client resolves through ``seed`` (a new client: a new view of the ring)."""
    async with TemplateStoreClient([seed], cluster_key=key) as store:
        found, _ = await store.resolve(digests)
        return len(found)


@pytest.mark.slow
def test_cluster_up_keeps_the_survivors_serving(
    tmp_path: Path, cluster_up: list[ClusterUp]
) -> None:
    up = ClusterUp(tmp_path / "cl")
    cluster_up.append(up)
    key = (tmp_path / "cl" / "cluster.key").read_text().strip()
    pages = make_pages(300, tag=17)

    async def publish() -> None:
        async with TemplateStoreClient([up.address(0, "kademlia")], cluster_key=key) as store:
            await store.put_many(pages)

    asyncio.run(asyncio.wait_for(publish(), 60))
    victim = int(up.manifest()[0]["pid"])  # type: ignore[call-overload]
    os.kill(victim, signal.SIGKILL)
    line = up.err.wait_for("node 0", 30)
    assert (
        f"node 0 (pid {victim}) was killed by SIGKILL; log {tmp_path / 'cl' / 'node-0.log'}" in line
    )
    up.err.wait_for("2 of 3 nodes serving", 10)
    up.err.wait_for("seed now: {}:{}".format(*up.address(1, "kademlia")), 10)
    assert up.proc.poll() is None  # the supervisor goes on
    assert all(ready(up.address(i, "metrics")) for i in (1, 2))
    found = asyncio.run(
        asyncio.wait_for(resolve_through(up.address(2, "kademlia"), key, [d for d, _ in pages]), 60)
    )
    assert found == len(pages)
    survivors = [int(up.manifest()[i]["pid"]) for i in (1, 2)]  # type: ignore[call-overload]
    assert up.stop() == 0  # Ctrl-C stops them all
    assert not any(pid_alive(p) for p in survivors)


@pytest.mark.slow
def test_cluster_up_restart_brings_a_dead_node_back_with_its_data(
    tmp_path: Path, cluster_up: list[ClusterUp]
) -> None:
    up = ClusterUp(tmp_path / "cl", "--restart")
    cluster_up.append(up)
    before = up.manifest()[1]
    os.kill(int(before["pid"]), signal.SIGTERM)  # type: ignore[call-overload]
    line = up.err.wait_for("node 1 (pid", 30)
    assert "exited with code 0" in line
    restarted = up.err.wait_for("node 1 restarted", 60)
    assert f"with its data dir {tmp_path / 'cl' / 'node-1'}" in restarted
    after = up.manifest()[1]
    assert after["pid"] != before["pid"] and after["node_id"] == before["node_id"]
    assert ready(up.address(1, "metrics"))
    assert up.stop() == 0
    assert not pid_alive(int(after["pid"]))  # type: ignore[call-overload]


def test_a_restart_that_fails_is_reported_once(tmp_path: Path) -> None:
    """`cluster up --restart` must not retry a node that cannot start again forever."""
    cluster = LocalCluster(tmp_path / "cl", 1)
    with cluster:
        cluster.stop_node(0)
        assert cluster.wait_for_exit(timeout=5) == [cluster.nodes[0]]
        cluster.nodes[0].args.append("--capacity=lots")  # it will not start again
        with pytest.raises(ClusterError, match="exited with code 2 before it was ready"):
            cluster.restart_node(0)
        with pytest.raises(ClusterError, match="no node is running"):
            cluster.wait_for_exit(timeout=5)
