"""X.509 credentials for tests, made with the openssl command line (no Python dependency):
directories laid out like QEMU's tls-creds-x509 ``dir=``."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ScratchCA", "openssl_available"]

_CA_CONFIG = """\
[ ca ]
default_ca = CA_default
[ CA_default ]
database = index.txt
new_certs_dir = .
serial = serial
default_md = sha256
policy = policy_any
unique_subject = no
[ policy_any ]
commonName = supplied
organizationName = optional
"""
VALID = ("20200101000000Z", "20991231000000Z")
EXPIRED = ("20200101000000Z", "20200102000000Z")


def openssl_available() -> bool:
    return shutil.which("openssl") is not None


def _run(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@dataclass
class ScratchCA:
    """A CA in ``folder`` that issues certificates and assembles credential directories."""

    folder: Path
    name: str = "tmdht test CA"

    def __post_init__(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "ca.cnf").write_text(_CA_CONFIG)
        (self.folder / "index.txt").write_text("")
        (self.folder / "serial").write_text("01\n")
        _run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", "ca-key.pem", "-out", "ca-cert.pem", "-subj", f"/O=tmdht/CN={self.name}",
             "-days", "3650", cwd=self.folder)

    @property
    def cert(self) -> Path:
        return self.folder / "ca-cert.pem"

    def issue(self, name: str, subject: str, *, server: bool,
              dates: tuple[str, str] = VALID,
              names: str = "IP:127.0.0.1,DNS:localhost") -> tuple[Path, Path]:
        """(cert, key) for ``subject`` (``/O=x/CN=y``); a server certificate carries ``names``
        as its subjectAltName."""
        key, csr, cert = (self.folder / f"{name}-{kind}.pem" for kind in ("key", "csr", "cert"))
        _run("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", key.name, "-out", csr.name, "-subj", subject, cwd=self.folder)
        ext = self.folder / f"{name}.ext"
        ext.write_text(f"subjectAltName={names}\nextendedKeyUsage=serverAuth\n"
                       if server else "extendedKeyUsage=clientAuth\n")
        _run("ca", "-batch", "-notext", "-config", "ca.cnf", "-cert", "ca-cert.pem", "-keyfile",
             "ca-key.pem", "-in", csr.name, "-out", cert.name, "-startdate", dates[0],
             "-enddate", dates[1], "-extfile", ext.name, cwd=self.folder)
        return cert, key

    def creds(self, folder: Path, *, server: tuple[Path, Path] | None = None,
              client: tuple[Path, Path] | None = None, ca: Path | None = None) -> Path:
        """A tls-creds-x509 directory: ca-cert.pem (this CA's, or ``ca``) and the given pairs."""
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(ca or self.cert, folder / "ca-cert.pem")
        for role, pair in (("server", server), ("client", client)):
            if pair is not None:
                shutil.copy(pair[0], folder / f"{role}-cert.pem")
                shutil.copy(pair[1], folder / f"{role}-key.pem")
        return folder
