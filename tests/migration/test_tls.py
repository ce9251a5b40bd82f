"""Mutual TLS between ``tmdht qemu send`` and ``tmdht qemu receive``, as real processes on
loopback with certificates made by the openssl command line (tests/support/tls.py).

Every refused handshake must fail both proxies with one clear line, write nothing of the guest
to the destination (the receiver's stdout stays empty, so the destination QEMU never gets device
state) and — except for a plaintext sender, which speaks before it can be told — leave QEMU's
stream unread on the source (the sender exits before reading stdin: the source QEMU's migration
fails and the guest keeps running)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from migration.helpers import make_fifo, read_ready
from support.synthetic import page_pool, qemu_stream
from support.tls import EXPIRED, ScratchCA, openssl_available

from tmdht.catalog import TemplateCatalog
from tmdht.pages import PAGE_SIZE, digest_page

pytestmark = pytest.mark.skipif(not openssl_available(), reason="no openssl command")

POOL = page_pool(8, seed=18)


@dataclass
class Pki:
    """Credential directories (QEMU's tls-creds-x509 layout) for every case."""

    receiver: Path
    sender: Path
    sender_other_ca: Path
    """The sender's certificate, but trusting another CA than the receiver's."""
    sender_foreign_cert: Path
    """Trusts the right CA, but its certificate comes from another CA."""
    sender_expired: Path
    receiver_expired: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    ca = ScratchCA(root / "ca")
    other = ScratchCA(root / "other-ca", name="another CA")
    server = ca.issue("server", "/O=tmdht/CN=receiver", server=True)
    client = ca.issue("client", "/O=tmdht/CN=sender", server=False)
    return Pki(
        receiver=ca.creds(root / "receiver", server=server),
        sender=ca.creds(root / "sender", client=client),
        sender_other_ca=ca.creds(root / "sender-other-ca", client=client, ca=other.cert),
        sender_foreign_cert=ca.creds(
            root / "sender-foreign",
            client=other.issue("client", "/O=tmdht/CN=sender", server=False)),
        sender_expired=ca.creds(
            root / "sender-expired",
            client=ca.issue("client-old", "/O=tmdht/CN=sender", server=False, dates=EXPIRED)),
        receiver_expired=ca.creds(
            root / "receiver-expired",
            server=ca.issue("server-old", "/O=tmdht/CN=receiver", server=True, dates=EXPIRED)),
    )


@pytest.fixture(scope="module")
def stream(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(catalog, QEMU stream of 1200 pages)."""
    folder = tmp_path_factory.mktemp("stream")
    catalog = folder / "templates.tmc"
    TemplateCatalog.from_digests([digest_page(p) for p in POOL[:4]]).save(catalog)
    plan = [[("pc.ram", i % 256, POOL[i % len(POOL)] if i % 3 else bytes([i % 251]) * PAGE_SIZE)
             for i in range(1200)]]
    path = folder / "stream.bin"
    path.write_bytes(qemu_stream([("pc.ram", 256 * PAGE_SIZE)], plan)[0])
    return catalog, path


@dataclass
class Outcome:
    sender_code: int
    sender_error: str
    receiver_code: int
    receiver_error: str
    written: bytes
    sent: dict[str, Any]
    received: dict[str, Any]


def _tmdht(*args: object) -> list[str]:
    return [sys.executable, "-m", "tmdht.cli", *map(str, args)]


def _error(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("Error: ")]
    return lines[-1].removeprefix("Error: ") if lines else ""


def migrate(tmp_path: Path, stream: tuple[Path, Path], receiver: list[object],
            sender: list[object], env: dict[str, str] | None = None) -> Outcome:
    catalog, source = stream
    fifo = make_fifo(tmp_path / "ready.fifo")
    written = tmp_path / "written.bin"
    with written.open("wb") as out:
        proc = subprocess.Popen(
            _tmdht("qemu", "receive", "--listen", "127.0.0.1:0", "--no-cluster", "--ready-file",
                   fifo, "--report", tmp_path / "receive.json", "--accept-timeout", "60",
                   *receiver),
            stdout=out, stderr=subprocess.PIPE, text=True, env=env)
        try:
            _host, port = read_ready(fifo, timeout=60)
            with source.open("rb") as stdin:
                send = subprocess.run(
                    _tmdht("qemu", "send", "--catalog", catalog, "--to", f"127.0.0.1:{port}",
                           "--connect-timeout", "20", "--report", tmp_path / "send.json",
                           *sender),
                    stdin=stdin, capture_output=True, text=True, timeout=120, check=False,
                    env=env)
            _out, receiver_stderr = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
    return Outcome(send.returncode, _error(send.stderr), proc.returncode,
                   _error(receiver_stderr), written.read_bytes(),
                   json.loads((tmp_path / "send.json").read_text()),
                   json.loads((tmp_path / "receive.json").read_text()))


def assert_refused(outcome: Outcome, *, sender_read_nothing: bool = True) -> None:
    assert outcome.sender_code == 1, outcome
    assert outcome.receiver_code == 1, outcome
    assert outcome.sender_error and outcome.receiver_error
    assert outcome.written == b""  # the destination QEMU got nothing, device state least of all
    assert not outcome.sent["ok"] and not outcome.received["ok"]
    assert outcome.received["counts"]["pages"] == 0
    if sender_read_nothing:
        assert outcome.sent["counts"]["qemu_bytes"] == 0  # QEMU's stream untouched


@pytest.mark.parametrize("native", ["0", "1"], ids=["reference", "default"])
def test_tls_migration_carries_the_stream_exactly(
    native: str, pki: Pki, stream: tuple[Path, Path], tmp_path: Path
) -> None:
    env = {**os.environ, "TMDHT_NATIVE": native} if native == "0" else None
    outcome = migrate(tmp_path, stream,
                      ["--tls-creds", pki.receiver, "--tls-authz", "CN=sender,O=tmdht"],
                      ["--tls-creds", pki.sender, "--tls-authz", "O=tmdht, CN=receiver"], env)
    assert (outcome.sender_code, outcome.receiver_code) == (0, 0), outcome
    assert outcome.written == stream[1].read_bytes()
    assert outcome.sent["tls_peer"] == "CN=receiver,O=tmdht"
    assert outcome.received["tls_peer"] == "CN=sender,O=tmdht"
    assert outcome.sent["counts"] == outcome.received["counts"]
    # TCP carried the records plus TLS framing: a little more than the stream, never less.
    wan = outcome.sent["wan_sent_bytes"]
    assert wan <= outcome.sent["tcp_sent_bytes"] <= wan * 1.01 + 16384


@pytest.mark.parametrize(
    ("receiver", "sender", "sender_reason", "receiver_reason"),
    [("receiver", "sender_other_ca", "self-signed certificate in certificate chain",
      "it does not trust the CA that signed our certificate"),
     ("receiver_expired", "sender", "certificate has expired", "our certificate has expired")],
    ids=["wrong-ca", "expired-server-certificate"],
)
def test_sender_refuses_the_server_certificate(
    receiver: str, sender: str, sender_reason: str, receiver_reason: str, pki: Pki,
    stream: tuple[Path, Path], tmp_path: Path
) -> None:
    """The sender does not trust the CA of the receiver's certificate, or it has expired."""
    outcome = migrate(tmp_path, stream, ["--tls-creds", getattr(pki, receiver)],
                      ["--tls-creds", getattr(pki, sender)])
    assert_refused(outcome)
    assert outcome.sender_error == ("TLS handshake failed: the receiver's certificate is "
                                    f"refused: {sender_reason}")
    assert outcome.receiver_error == ("TLS handshake failed: the sender refused the connection: "
                                      f"{receiver_reason}")


@pytest.mark.parametrize(
    ("creds", "reason", "sender_reason"),
    [("sender_foreign_cert", "unable to get local issuer certificate",
      "it does not trust the CA that signed our certificate"),
     ("sender_expired", "certificate has expired", "our certificate has expired")],
    ids=["wrong-client-certificate", "expired-client-certificate"],
)
def test_receiver_refuses_the_client_certificate(
    creds: str, reason: str, sender_reason: str, pki: Pki, stream: tuple[Path, Path],
    tmp_path: Path
) -> None:
    """A certificate of another CA, or an expired one: TLS 1.3 completes the client's side of
    the handshake first, so the sender must wait for the receiver's TLS_READY. The receiver
    flushes its TLS alert (and drains the connection before closing it, so no reset overtakes
    the alert): the sender names the reason too."""
    outcome = migrate(tmp_path, stream, ["--tls-creds", pki.receiver],
                      ["--tls-creds", getattr(pki, creds)])
    assert_refused(outcome)
    assert outcome.receiver_error == ("TLS handshake failed: the sender's certificate is "
                                      f"refused: {reason}")
    assert outcome.sender_error == ("TLS handshake failed: the receiver refused the connection: "
                                    f"{sender_reason}")


def test_pinned_subject_refuses_another_certificate(
    pki: Pki, stream: tuple[Path, Path], tmp_path: Path
) -> None:
    """A valid certificate of the right CA, but not the subject --tls-authz names."""
    outcome = migrate(tmp_path, stream,
                      ["--tls-creds", pki.receiver, "--tls-authz", "CN=other-host,O=tmdht"],
                      ["--tls-creds", pki.sender])
    assert_refused(outcome)
    message = "the sender's certificate subject 'CN=sender,O=tmdht' is not one --tls-authz allows"
    assert outcome.receiver_error == message
    assert outcome.sender_error == f"the receiver refused the connection: {message}"


def test_plaintext_sender_against_a_tls_receiver(
    pki: Pki, stream: tuple[Path, Path], tmp_path: Path
) -> None:
    """The plaintext sender speaks first (it has read some of QEMU's stream), but the receiver
    writes nothing and tells it why in its own protocol."""
    outcome = migrate(tmp_path, stream, ["--tls-creds", pki.receiver], [])
    assert_refused(outcome, sender_read_nothing=False)
    assert outcome.receiver_error == ("the sender did not start a TLS handshake (a plaintext "
                                      "sender? it needs --tls-creds too)")
    assert outcome.sender_error == ("the receiver refused the stream: this receiver requires "
                                    "TLS: run the sender with --tls-creds")


def test_tls_sender_against_a_plaintext_receiver(
    pki: Pki, stream: tuple[Path, Path], tmp_path: Path
) -> None:
    outcome = migrate(tmp_path, stream, [], ["--tls-creds", pki.sender])
    assert_refused(outcome)
    assert outcome.receiver_error == ("the sender started a TLS handshake, but this receiver "
                                      "runs without TLS: give it --tls-creds too")
    assert outcome.sender_error.startswith("TLS handshake failed: the receiver does not speak "
                                           "TLS or closed the connection")
    assert outcome.sender_error.endswith("does it run with --tls-creds?")


def test_receiver_name_is_checked(pki: Pki, stream: tuple[Path, Path], tmp_path: Path) -> None:
    outcome = migrate(tmp_path, stream, ["--tls-creds", pki.receiver],
                      ["--tls-creds", pki.sender, "--tls-hostname", "migrate.example"])
    assert_refused(outcome)
    assert outcome.sender_error.startswith("TLS handshake failed: the receiver's certificate is "
                                           "refused: Hostname mismatch")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["send", "--to", "192.0.2.1:7000"],
         "--to 192.0.2.1:7000 is not a loopback address and TLS is off"),
        (["receive", "--listen", "0.0.0.0:0", "--no-cluster"],
         "--listen 0.0.0.0:0 is not a loopback address and TLS is off"),
    ],
    ids=["send", "receive"],
)
def test_plaintext_off_loopback_is_refused(
    args: list[str], message: str, stream: tuple[Path, Path]
) -> None:
    """Secure by default: one line, exit 2, before any connection."""
    catalog, source = stream
    with source.open("rb") as stdin:
        proc = subprocess.run(_tmdht("qemu", *args, "--catalog", catalog), stdin=stdin,
                              capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"Error: {message}: guest memory would cross the network")
    assert proc.stderr.rstrip().endswith("or --insecure-plaintext")
    assert len(proc.stderr.splitlines()) == 1


def test_missing_credentials_are_named(pki: Pki, stream: tuple[Path, Path]) -> None:
    catalog, source = stream
    with source.open("rb") as stdin:
        proc = subprocess.run(
            _tmdht("qemu", "send", "--catalog", catalog, "--to", "127.0.0.1:1", "--tls-creds",
                   pki.receiver), stdin=stdin, capture_output=True, text=True, timeout=60,
            check=False)
    assert proc.returncode != 0
    assert f"--tls-creds {pki.receiver}: missing client-cert.pem, client-key.pem" in proc.stderr
