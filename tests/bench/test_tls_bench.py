"""bench/tls.py and bench/tls_receive.py stay runnable: a tiny loopback run of each, real
processes, checking the JSON they write (the figures themselves are the benchmarks' business)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from support.tls import openssl_available

BENCH = Path(__file__).resolve().parents[2] / "bench"

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not openssl_available(), reason="no openssl command")]


def test_tls_bench_compares_plaintext_and_tls_on_loopback(tmp_path: Path) -> None:
    out = tmp_path / "tls.json"
    done = subprocess.run([sys.executable, str(BENCH / "tls.py"), "--pages", "300", "--repeat",
                           "1", "--out", str(out)], capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.returncode == 0, done.stderr
    (result,) = json.loads(out.read_text())["results"]
    assert result["network"] == "loopback"
    tls, plain = result["medians"]["tls"], result["medians"]["plaintext"]
    assert tls["wan_sent_bytes"] == plain["wan_sent_bytes"]  # the same records either way
    assert tls["tcp_sent_bytes"] > plain["tcp_sent_bytes"]  # plus TLS framing
    assert tls["connect_s"] > 0 and "tls/plaintext" in result["ratios"]


def test_receive_path_bench_reads_every_byte_every_way(tmp_path: Path) -> None:
    out = tmp_path / "receive.json"
    done = subprocess.run([sys.executable, str(BENCH / "tls_receive.py"), "--mib", "2",
                           "--repeat", "1", "--out", str(out)], capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    runs = json.loads(out.read_text())["runs"]
    assert set(runs) == {"plaintext", "tls-transport", "tls-socket"}
    assert [run["bytes"] for run in runs["plaintext"] + runs["tls-socket"]] == [2 << 20] * 2
    # uvloop's SSL transport may drop the tail when the sender closes without close_notify
    # (bench/README.md); the tmdht sender closes only after the receiver's verdict.
    assert 0 < runs["tls-transport"][0]["bytes"] <= 2 << 20
