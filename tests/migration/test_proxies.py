"""``tmdht qemu send`` and ``tmdht qemu receive`` as real processes on loopback, without QEMU:
a synthetic migration stream piped through both, on each implementation (``TMDHT_NATIVE``), and
the sender's start-up (what it imports before its first byte)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from migration.helpers import make_fifo, read_ready
from support.cores import native_available
from support.synthetic import page_pool, qemu_stream

from tmdht.catalog import TemplateCatalog
from tmdht.pages import PAGE_SIZE, digest_page

POOL = page_pool(16, seed=77)
IMPLEMENTATIONS = [
    pytest.param("0", id="reference"),
    pytest.param(
        "1",
        id="native",
        marks=pytest.mark.skipif(
            not native_available(), reason="tmdht._native is not built (no Rust toolchain)"
        ),
    ),
]


def _stream(pages: int) -> bytes:
    rng = random.Random(pages)
    plan = [
        [
            (
                "pc.ram",
                i % 512,
                POOL[rng.randrange(len(POOL))]
                if rng.random() < 0.6
                else (None if rng.random() < 0.3 else rng.randbytes(PAGE_SIZE)),
            )
            for i in range(pages)
        ]
    ]
    return qemu_stream([("pc.ram", 512 * PAGE_SIZE)], plan)[0]


def _env(native: str) -> dict[str, str]:
    return {**os.environ, "TMDHT_NATIVE": native}


def _tmdht(*args: object) -> list[str]:
    return [sys.executable, "-m", "tmdht.cli", *map(str, args)]


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("catalog") / "templates.tmc"
    TemplateCatalog.from_digests([digest_page(p) for p in POOL[:8]]).save(path)
    return path


@pytest.mark.parametrize("native", IMPLEMENTATIONS)
@pytest.mark.parametrize("compress", [False, True], ids=["plain", "zstd"])
def test_proxies_carry_the_stream_exactly(
    native: str, compress: bool, catalog: Path, tmp_path: Path
) -> None:
    """No cluster: every template page comes back from the sender as a FALLBACK."""
    stream = _stream(3000)
    source = tmp_path / "stream.bin"
    source.write_bytes(stream)
    fifo = make_fifo(tmp_path / "ready.fifo")
    rebuilt = tmp_path / "rebuilt.bin"
    with rebuilt.open("wb") as out:
        receiver = subprocess.Popen(
            _tmdht(
                "qemu",
                "receive",
                "--listen",
                "127.0.0.1:0",
                "--no-cluster",
                "--catalog",
                catalog,
                "--ready-file",
                fifo,
                "--report",
                tmp_path / "receive.json",
                "--accept-timeout",
                "60",
            ),
            stdout=out,
            stderr=subprocess.PIPE,
            env=_env(native),
        )
        try:
            _host, port = read_ready(fifo, timeout=60)
            extra = ["--compress"] if compress else []
            with source.open("rb") as stdin:
                sender = subprocess.run(
                    _tmdht(
                        "qemu",
                        "send",
                        "--catalog",
                        catalog,
                        "--to",
                        f"127.0.0.1:{port}",
                        "--report",
                        tmp_path / "send.json",
                        *extra,
                    ),
                    stdin=stdin,
                    capture_output=True,
                    text=True,
                    timeout=120,
                    env=_env(native),
                    check=False,
                )
            assert sender.returncode == 0, sender.stderr
            assert receiver.wait(timeout=60) == 0, receiver.stderr.read() if receiver.stderr else ""
        finally:
            receiver.kill()
            receiver.wait(timeout=30)
            if receiver.stderr:
                receiver.stderr.close()
    assert rebuilt.read_bytes() == stream
    sent = json.loads((tmp_path / "send.json").read_text())
    received = json.loads((tmp_path / "receive.json").read_text())
    assert sent["ok"] and received["ok"]
    assert sent["counts"] == received["counts"]
    counts = sent["counts"]
    assert counts["template_pages"] > 0 and counts["backref_pages"] > 0
    assert received["fallback_pages"] == counts["template_pages"]
    if compress:
        assert counts["compressed_pages"] + counts["full_pages"] > 0


@pytest.mark.parametrize("native", IMPLEMENTATIONS)
def test_sender_refuses_a_receiver_that_is_not_there(
    native: str, catalog: Path, tmp_path: Path
) -> None:
    """One ``Error:`` line and exit 1, the report written (the fast path, like click)."""
    stream = tmp_path / "stream.bin"
    stream.write_bytes(_stream(10))
    with stream.open("rb") as stdin:
        proc = subprocess.run(
            _tmdht(
                "qemu",
                "send",
                "--catalog",
                catalog,
                "--to",
                "127.0.0.1:1",
                "--connect-timeout",
                "5",
                "--report",
                tmp_path / "send.json",
            ),
            stdin=stdin,
            capture_output=True,
            text=True,
            timeout=60,
            env=_env(native),
            check=False,
        )
    assert proc.returncode == 1
    assert proc.stderr.splitlines()[-1].startswith("Error: ")
    assert not json.loads((tmp_path / "send.json").read_text())["ok"]


_PROBE = """
import sys
from tmdht.cli import main
sys.argv = ["tmdht", "qemu", "send", "--catalog", sys.argv[1], "--to", "127.0.0.1:1",
            "--connect-timeout", "5"]
try:
    main()
except SystemExit:
    pass
heavy = {"numpy", "click", "rich", "prometheus_client", "asyncio", "uvloop", "kademlia", "lmdb"}
loaded = {name.split(".")[0] for name, module in sys.modules.items()
          if type(module).__name__ != "_LazyModule"}  # imported on first use, if ever
print(" ".join(sorted(heavy & loaded)))
"""


@pytest.mark.parametrize("native", IMPLEMENTATIONS)
def test_sender_imports_nothing_heavy_before_its_first_byte(native: str, catalog: Path) -> None:
    """The sender is QEMU's exec: command: numpy, click, rich, prometheus_client and asyncio
    each cost tens of milliseconds of QEMU's migration time to import."""
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, str(catalog)],
        capture_output=True,
        text=True,
        timeout=60,
        env=_env(native),
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "", f"the sender imported {proc.stdout.strip()}"
    assert "Error: " in proc.stderr  # it did run (and found no receiver)
