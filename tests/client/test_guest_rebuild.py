"""A real guest rebuilt through a 4-node cluster with the tmdht command, as a user runs it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.cli import tmdht
from support.cluster import FAST_NODE_ARGS

from tmdht.lab import GuestCapture
from tmdht.node.local import LocalCluster

pytestmark = [pytest.mark.qemu, pytest.mark.slow]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with LocalCluster(tmp_path_factory.mktemp("guests"), 4, extra_args=FAST_NODE_ARGS) as c:
        yield c


def test_mine_publish_encode_rebuild_through_the_cluster(
    cluster: LocalCluster, guest_captures: list[GuestCapture], tmp_path: Path
) -> None:
    corpus = [c.stream_path for c in guest_captures[:3]]
    target = guest_captures[3].dump_path
    access = ["--seed", "{}:{}".format(*cluster.seed), "--cluster-key-file", cluster.key_file]
    tmdht("templates", "mine", *corpus, "-o", tmp_path / "c.tmc")
    published = json.loads(
        tmdht("templates", "publish", tmp_path / "c.tmc", *corpus, *access, "--json").stdout
    )
    assert published["published"] == published["templates"] > 1000 and published["not_found"] == 0
    assert published["replica_writes"] == 3 * published["published"]
    encoded = json.loads(
        tmdht(
            "encode", target, "-c", tmp_path / "c.tmc", "-o", tmp_path / "g.tmds", "--json"
        ).stdout
    )
    assert encoded["template_pages"] > 5000
    rebuilt = json.loads(
        tmdht(
            "rebuild",
            tmp_path / "g.tmds",
            *access,
            "-c",
            tmp_path / "c.tmc",
            "-o",
            tmp_path / "g.raw",
            "--json",
        ).stdout
    )
    assert rebuilt["template_pages"] == encoded["template_pages"]
    assert (tmp_path / "g.raw").read_bytes() == target.read_bytes()

    # A page the cluster does not have: `get` says so, with its replicas, and exits 1.
    missing = "ab" * 32
    proc = tmdht("get", missing, *access, "--json", expect=1)
    (row,) = json.loads(proc.stdout)["pages"]
    assert row["resolved"] is False and len(row["replicas"]) == 3
    assert not any(r["holds"] for r in row["replicas"])
    # A template digest as `templates list` prints it, next to the missing one: a table whose
    # replica marks have a legend, and one error line for the page that was not found.
    (first,) = tmdht("templates", "list", tmp_path / "c.tmc", "-n", "1").stdout.split()
    proc = tmdht("get", first, missing, *access, expect=1)
    table = " ".join(proc.stdout.split())
    assert "yes (verified)" in table and "+ holds it, - does not, ? did not answer" in table
    assert proc.stderr.strip() == f"Error: 1 pages unavailable from every replica (first {missing[:16]})"


def test_cluster_commands_need_a_seed_and_a_key(cluster: LocalCluster, tmp_path: Path) -> None:
    (tmp_path / "s.tmds").write_bytes(b"")
    proc = tmdht("rebuild", tmp_path / "s.tmds", "-o", tmp_path / "x", expect=2)
    assert "--seed" in proc.stderr
    proc = tmdht("get", "ab" * 32, "--seed", "{}:{}".format(*cluster.seed), expect=2)
    assert "no cluster key" in proc.stderr
    proc = tmdht(
        "get",
        "abc",
        "--seed",
        "{}:{}".format(*cluster.seed),
        "--cluster-key-file",
        cluster.key_file,
        expect=2,
    )
    assert "64 hex" in proc.stderr
