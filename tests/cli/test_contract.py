"""The CLI's error contract, table-driven: every subcommand × every kind of bad input.

The contract (README "Using it", cli/main.py ``EXIT_CODES``): an error is one line on stderr,
``Error: ...``, never a traceback; exit code 2 when what the command was given cannot be used
(missing, empty, wrong kind, random bytes, truncated, malformed key), 1 when the operation
failed with usable input (no store node answered: nothing there or another cluster key); a
failed command leaves no output file behind. Raw memory images have no header, so any bytes are
one: "random bytes" as an image succeeds (exit 0), and says what it did with a partial page.

Each row is (subcommand, bad input, arguments, exit code, text the error line must hold).
"""

from __future__ import annotations

import os
import random
import socket
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from support.synthetic import mixed_pages, page_pool, qemu_stream, write_raw

from tmdht.catalog import TemplateCatalog
from tmdht.launch import tmdht_argv
from tmdht.node.local import LocalCluster
from tmdht.pages import PAGE_SIZE, digest_page

POOL = page_pool(64, seed=31)
OK, FAILED, UNUSABLE = 0, 1, 2

# What each kind of file argument does with each bad input: (bad input, file, code, message).
IMAGE = [
    ("missing file", "{missing}", UNUSABLE, "{missing}: no such file"),
    ("empty", "{empty}", UNUSABLE, "{empty}: empty file, not a memory image"),
    ("wrong kind", "{catalog}", UNUSABLE, "this is a tmdht template catalog, not a memory image"),
    ("random bytes", "{random}", OK, ""),  # a raw image: raw dumps have no header
    ("truncated", "{cut_image}", UNUSABLE, "{cut_image}: migration stream truncated"),
]
CATALOG = [
    ("missing file", "{missing}", UNUSABLE, "{missing}: no such file"),
    ("empty", "{empty}", UNUSABLE, "{empty}: empty file, not a tmdht template catalog"),
    ("wrong kind", "{image}", UNUSABLE, "{image}: not a tmdht template catalog"),
    ("random bytes", "{random}", UNUSABLE, "{random}: not a tmdht template catalog"),
    ("truncated", "{cut_catalog}", UNUSABLE, "(truncated)"),
]
STREAM = [
    ("missing file", "{missing}", UNUSABLE, "{missing}: no such file"),
    ("empty", "{empty}", UNUSABLE, "{empty}: empty file, not a tmdht dedup stream"),
    ("wrong kind", "{catalog}", UNUSABLE, "{catalog}: not a tmdht dedup stream"),
    ("random bytes", "{random}", UNUSABLE, "{random}: not a tmdht dedup stream"),
    ("truncated", "{cut_stream}", UNUSABLE, "{cut_stream}: dedup stream truncated"),
]
# Cluster access: (bad input, --seed and key arguments, code, message).
ACCESS = [
    ("missing key file", "--seed {seed} --cluster-key-file {missing}", UNUSABLE,
     "--cluster-key-file {missing}: No such file or directory"),
    ("empty key file", "--seed {seed} --cluster-key-file {empty}", UNUSABLE,
     "--cluster-key-file {empty}: no cluster key found"),
    ("bad key", "--seed {seed} --cluster-key-file {bad_key}", UNUSABLE,
     "--cluster-key-file {bad_key}: key 1: a cluster key is 64 hex digits"),
    ("random bytes key", "--seed {seed} --cluster-key-file {random}", UNUSABLE,
     "--cluster-key-file {random}: not a key file"),
    ("no key", "--seed {seed}", UNUSABLE,
     "no cluster key: --cluster-key-file FILE or $TMDHT_CLUSTER_KEY (or --insecure-open)"),
    ("unreachable seed", "--seed {dead} --cluster-key-file {key}", FAILED,
     "no store node answered: nothing listens at {dead} (connection refused)"),
    ("another cluster's key", "--seed {seed} --cluster-key-file {other_key}", FAILED,
     "different cluster key"),  # "is bound but does not answer: most likely a node with a"
]  # fmt: skip


def rows() -> Iterator[tuple[str, str, str, int, str]]:
    """(subcommand, bad input, arguments, code, message)."""
    for bad, path, code, text in IMAGE:
        yield "templates mine", bad, f"templates mine {path} -o {{out}}", code, text
        yield "encode", bad, f"encode {path} -c {{catalog}} -o {{out}}", code, text
        yield "image info", bad, f"image info {path}", code, text
        yield "image dump", bad, f"image dump {path} -o {{out}}", code, text
        # Bytes that hold no template: nothing to publish, no template pages to rebuild from.
        holds_none = code == OK
        yield ("templates publish", f"image: {bad}",
               f"templates publish {{catalog}} {path} --seed {{seed}} --cluster-key-file {{key}}",
               UNUSABLE if holds_none else code,
               "published nothing: none of the" if holds_none else text)  # fmt: skip
        yield ("rebuild", f"--pages-from: {bad}",
               f"rebuild {{stream}} --pages-from {path} -o {{out}}",
               UNUSABLE if holds_none else code,
               "template pages are in none of the --pages-from images" if holds_none else text,
               )  # fmt: skip
    for bad, path, code, text in CATALOG:
        yield "templates info", bad, f"templates info {path}", code, text
        yield "templates list", bad, f"templates list {path}", code, text
        yield ("templates publish", bad,
               f"templates publish {path} {{image}} --seed {{seed}} --cluster-key-file {{key}}",
               code, text)  # fmt: skip
        yield "encode", f"--catalog: {bad}", f"encode {{image}} -c {path} -o {{out}}", code, text
        yield ("rebuild", f"--catalog: {bad}",
               f"rebuild {{stream}} --pages-from {{image}} -c {path} -o {{out}}", code, text)  # fmt: skip
        if bad == "missing file":  # click checks these options' files itself
            text = f"Invalid value for '--catalog': File '{path}' does not exist"  # noqa: PLW2901
        yield ("qemu send", f"--catalog: {bad}",
               f"qemu send --catalog {path} --to {{dead}}", code, text)  # fmt: skip
        yield ("qemu receive", f"--catalog: {bad}",
               f"qemu receive --listen 127.0.0.1:0 --no-cluster --catalog {path}", code, text)  # fmt: skip
    for bad, path, code, text in STREAM:
        yield "rebuild", bad, f"rebuild {path} --pages-from {{image}} -o {{out}}", code, text
    for bad, access, code, text in ACCESS:
        yield ("templates publish", bad, f"templates publish {{catalog}} {{image}} {access}",
               code, text)  # fmt: skip
        yield "rebuild", bad, f"rebuild {{stream}} {access} -o {{out}}", code, text
        yield "get", bad, f"get {{digest}} {access}", code, text
        yield "cluster status", bad, f"cluster status {access}", code, text
        if "seed" not in bad and "another" not in bad:  # the receiver falls back to the sender
            yield ("qemu receive", bad, f"qemu receive --listen 127.0.0.1:0 {access}",
                   code, text)  # fmt: skip
    yield "get", "not a digest", "get xyz --seed {seed} --cluster-key-file {key}", UNUSABLE, (
        "'xyz' is not a digest (64 hex characters)"
    )
    yield "rebuild", "another catalog", (
        "rebuild {stream} --pages-from {image} -c {other_catalog} -o {out}"
    ), UNUSABLE, "{stream}: stream was encoded against catalog"
    yield "qemu send", "unreachable receiver", "qemu send --catalog {catalog} --to {dead}", (
        FAILED
    ), "cannot reach the receiver at {dead} (Connection refused)"
    # `node run`: its config file and key.
    node = "node run --data-dir {out}.d --kademlia-port 0 --data-port 0 --metrics-port 0"
    for bad, path, text in [
        ("missing file", "{missing}", "{missing}: No such file or directory"),
        ("empty", "{empty}", "data_dir is required (--data-dir DIR"),
        ("wrong kind", "{catalog}", "{catalog}: not a TOML config file (binary content)"),
        ("random bytes", "{random}", "{random}: not a TOML config file (binary content)"),
        ("truncated", "{cut_toml}", "{cut_toml}: Unterminated string"),
    ]:
        yield "node run", f"--config: {bad}", f"node run --config {path}", UNUSABLE, text
    for bad, key, text in [
        ("missing key file", "--cluster-key-file {missing}",
         "cluster key file {missing}: No such file or directory"),
        ("bad key", "--cluster-key-file {bad_key}", "cluster key file {bad_key}: key 1:"),
        ("no key", "", "no cluster key: --cluster-key-file FILE (cluster_key_file in the config "
         "file) or $TMDHT_CLUSTER_KEY; for local development only, --insecure-open"),
    ]:  # fmt: skip
        yield "node run", bad, f"{node} {key}", UNUSABLE, text
    yield "cluster up", "wrong kind", "cluster up --dir {random}", UNUSABLE, (
        "Invalid value for '--dir': Directory '{random}' is a file"
    )
    # `vnet run`: its config file, store nodes and key; the control commands: the agent's socket.
    agent = "vnet run --data-dir {out}.d --tunnel-port 0 --metrics-port 0"
    for bad, args, text in [
        ("missing file", "--config {missing}", "{missing}: No such file or directory"),
        ("empty", "--config {empty}", "data_dir is required (--data-dir DIR"),
        ("wrong kind", "--config {catalog}", "{catalog}: not a TOML config file (binary content)"),
        ("random bytes", "--config {random}", "{random}: not a TOML config file (binary content)"),
        ("no seed", f"{agent.removeprefix('vnet run')}", "seeds are required (--seed HOST:PORT"),
        ("missing key file", f"{agent.removeprefix('vnet run')} --seed {{seed}} "
         "--cluster-key-file {missing}", "cluster key file {missing}: No such file or directory"),
        ("no key", f"{agent.removeprefix('vnet run')} --seed {{seed}}",
         "no cluster key: --cluster-key-file FILE (cluster_key_file in the config file) or "
         "$TMDHT_CLUSTER_KEY; for local development only, --insecure-open"),
    ]:  # fmt: skip
        yield "vnet run", bad, f"vnet run {args}", UNUSABLE, text
    for command in ("attach vm1 --vnet 1 --net-socket {missing} --qmp-socket {missing}",
                    "detach vm1", "status"):
        yield (f"vnet {command.split()[0]}", "no agent", f"vnet {command} --control-socket "
               "{missing}", UNUSABLE, "no vnet agent at {missing}: No such file or directory")
        yield (f"vnet {command.split()[0]}", "not a socket", f"vnet {command} --control-socket "
               "{random}", UNUSABLE, "no vnet agent at {random}: Connection refused")


ROWS = list(rows())


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    root = tmp_path_factory.mktemp("contract")
    pages = mixed_pages(600, POOL, seed=1)
    image = write_raw(root / "image.raw", pages)
    blocks = [("pc.ram", 600 * PAGE_SIZE)]
    stream, _ = qemu_stream(blocks, [[("pc.ram", i, p) for i, p in enumerate(pages)]])
    (root / "cut.qemu").write_bytes(stream[: len(stream) // 2])
    catalog = TemplateCatalog.from_digests(sorted({digest_page(p) for p in POOL}))
    catalog.save(root / "catalog.tmc")
    TemplateCatalog.from_digests(sorted({digest_page(p) for p in POOL[:8]})).save(
        root / "other.tmc"
    )
    (root / "cut.tmc").write_bytes((root / "catalog.tmc").read_bytes()[:1000])
    subprocess.run(
        tmdht_argv("encode", image, "-c", root / "catalog.tmc", "-o", root / "s.tmds"),
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    (root / "cut.tmds").write_bytes((root / "s.tmds").read_bytes()[:20000])
    (root / "empty").write_bytes(b"")
    (root / "random.bin").write_bytes(random.Random(5).randbytes(100_000))
    (root / "bad.key").write_text("not-a-key\n")
    (root / "other.key").write_text(random.Random(6).randbytes(32).hex() + "\n")
    (root / "cut.toml").write_text('[node]\ndata_dir = "/tmp/x')
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    with LocalCluster(root / "cluster", 1) as cluster:
        yield {
            "tmp": str(root),
            "missing": str(root / "missing.file"),
            "empty": str(root / "empty"),
            "random": str(root / "random.bin"),
            "image": str(image),
            "cut_image": str(root / "cut.qemu"),
            "catalog": str(root / "catalog.tmc"),
            "other_catalog": str(root / "other.tmc"),
            "cut_catalog": str(root / "cut.tmc"),
            "stream": str(root / "s.tmds"),
            "cut_stream": str(root / "cut.tmds"),
            "cut_toml": str(root / "cut.toml"),
            "bad_key": str(root / "bad.key"),
            "other_key": str(root / "other.key"),
            "key": str(cluster.key_file),
            "seed": "{}:{}".format(*cluster.seed),
            "dead": dead,
            "digest": digest_page(POOL[0]).hex(),
        }


@pytest.fixture(scope="module")
def outcomes(files: dict[str, str]) -> dict[int, tuple[subprocess.CompletedProcess[str], str]]:
    """Every row run once, four at a time (most of a row's time is interpreter start-up and
    waiting for a silent seed): row index -> (the finished process, its output path)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TMDHT_")}

    def run(index: int) -> tuple[subprocess.CompletedProcess[str], str]:
        out = f"{files['tmp']}/out-{index}"
        argv = [a.format(**{**files, "out": out}) for a in ROWS[index][2].split()]
        proc = subprocess.run(
            tmdht_argv(*argv), capture_output=True, text=True, env=env, timeout=120,
            stdin=subprocess.DEVNULL, check=False,
        )  # fmt: skip
        return proc, out

    with ThreadPoolExecutor(4) as pool:
        return dict(enumerate(pool.map(run, range(len(ROWS)))))


@pytest.mark.parametrize(
    ("index", "code", "message"),
    [(i, code, message) for i, (_, _, _, code, message) in enumerate(ROWS)],
    ids=[f"{command} × {bad}" for command, bad, *_ in ROWS],
)
def test_bad_input(
    files: dict[str, str],
    outcomes: dict[int, tuple[subprocess.CompletedProcess[str], str]],
    index: int,
    code: int,
    message: str,
) -> None:
    proc, out = outcomes[index]
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr
    if code == OK:
        assert "Error" not in proc.stderr
        return
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, lines  # one line
    assert lines[0].startswith("Error: ")
    assert message.format(**{**files, "out": out}) in lines[0]
    assert not Path(out).exists()  # a failed command leaves nothing behind


def test_the_table_covers_every_subcommand() -> None:
    from tmdht.cli.main import cli

    covered = {command for command, *_ in ROWS}
    for name in cli.list_commands(None):  # type: ignore[arg-type]
        group = cli.get_command(None, name)  # type: ignore[arg-type]
        subs = getattr(group, "commands", None)
        expected = {f"{name} {s}" for s in subs} if subs else {name}
        missing = expected - covered - NOT_COVERED
        assert not missing, f"no bad-input rows for {sorted(missing)}"


NOT_COVERED = {"demo"}  # takes no input file: boots its own guests and cluster
