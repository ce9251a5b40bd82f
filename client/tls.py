"""TLS 1.3 with mutual X.509 authentication on the migration proxies' connection.

The credentials are a directory laid out like QEMU's ``tls-creds-x509`` ``dir=``, so an operator
points tmdht at the files they already made for QEMU's own TLS migration::

    ca-cert.pem                       the CA both sides' certificates must chain to
    ca-crl.pem        (optional)      revoked certificates (checked for the peer's certificate)
    server-cert.pem, server-key.pem   the receiver's (``tmdht qemu receive``, QEMU's server)
    client-cert.pem, client-key.pem   the sender's (``tmdht qemu send``, QEMU's client)

Both sides require and verify the peer's certificate (mutual TLS, TLS 1.3 only). The sender also
checks that the receiver's certificate names the host it connects to (QEMU's default; another
name with ``--tls-hostname``, like QEMU's ``tls-hostname``). Either side may pin the peer's
subject (``--tls-authz``, like QEMU's ``tls-authz`` with an exact DN list): the certificate must
then also carry exactly one of the given subjects.

Python's :mod:`ssl` (OpenSSL) does the cryptography; the native cores never see a socket, they
hand their buffers to the proxies' Python loops, which write them to the TLS socket. ``ssl`` is
imported only when TLS is used: the plaintext loopback sender keeps its start-up budget.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from tmdht.errors import ConfigError, TmdhtError, UsageError

if TYPE_CHECKING:
    import ssl

__all__ = [
    "CA_CERT",
    "CA_CRL",
    "CLIENT_CERT",
    "CLIENT_KEY",
    "SERVER_CERT",
    "SERVER_KEY",
    "TlsConfig",
    "TlsError",
    "check_files",
    "check_peer",
    "client_context",
    "describe_tls_error",
    "is_loopback",
    "parse_subject",
    "require_tls_or_loopback",
    "server_context",
]

CA_CERT: Final = "ca-cert.pem"
CA_CRL: Final = "ca-crl.pem"
SERVER_CERT: Final = "server-cert.pem"
SERVER_KEY: Final = "server-key.pem"
CLIENT_CERT: Final = "client-cert.pem"
CLIENT_KEY: Final = "client-key.pem"


class TlsError(TmdhtError):
    """The TLS handshake failed or the peer's certificate was refused."""


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """TLS settings of one proxy."""

    creds_dir: Path
    """A directory laid out like QEMU's tls-creds-x509 ``dir=`` (see the module docstring)."""
    peer_subjects: tuple[str, ...] = ()
    """Accepted subjects of the peer's certificate (``CN=sender,O=Example``); empty: any
    certificate the CA signed."""
    hostname: str | None = None
    """Sender only: the name the receiver's certificate must carry (default: the host of
    ``--to``)."""

    def __post_init__(self) -> None:
        """Validate the pins (ConfigError) and accept a str path."""
        object.__setattr__(self, "creds_dir", Path(self.creds_dir))
        object.__setattr__(self, "peer_subjects", tuple(self.peer_subjects))
        for subject in self.peer_subjects:
            parse_subject(subject)


def parse_subject(text: str) -> frozenset[tuple[str, str]]:
    """A distinguished name as ``attr=value`` pairs separated by commas (``CN=a, O=b``; order
    and spaces around names do not matter; ``\\,`` is a literal comma). Raises ConfigError."""
    pairs: list[tuple[str, str]] = []
    part = ""
    parts: list[str] = []
    escaped = False
    for char in text:
        if escaped:
            part += char
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == ",":
            parts.append(part)
            part = ""
        else:
            part += char
    parts.append(part)
    for raw in parts:
        name, eq, value = raw.partition("=")
        if not eq or not name.strip() or not value.strip():
            raise ConfigError(f"certificate subject {text!r}: expected attr=value pairs like "
                              "'CN=sender.example,O=Example'")
        pairs.append((name.strip().upper(), value.strip()))
    return frozenset(pairs)


_SHORT_NAMES: Final = {
    "commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU",
    "countryName": "C", "stateOrProvinceName": "ST", "localityName": "L",
    "emailAddress": "EMAILADDRESS", "domainComponent": "DC", "serialNumber": "SERIALNUMBER",
}


def _subject_of(cert: dict[str, Any]) -> frozenset[tuple[str, str]]:
    """The subject of a certificate as :meth:`ssl.SSLSocket.getpeercert` returns it."""
    return frozenset((_SHORT_NAMES.get(name, name).upper(), str(value))
                     for rdn in cert.get("subject", ()) for name, value in rdn)


def _format_subject(subject: Iterable[tuple[str, str]]) -> str:
    return ",".join(f"{name}={value}" for name, value in sorted(subject))


def check_peer(cert: dict[str, Any] | None, config: TlsConfig, peer: str) -> str:
    """The peer's subject as text if its certificate passes the pins; TlsError otherwise.
    ``peer`` names the other side in the message (``sender``, ``receiver``)."""
    if not cert:
        raise TlsError(f"the {peer} presented no certificate")
    subject = _subject_of(cert)
    text = _format_subject(subject)
    if config.peer_subjects and subject not in {parse_subject(s) for s in config.peer_subjects}:
        raise TlsError(f"the {peer}'s certificate subject {text!r} is not one --tls-authz "
                       "allows")
    return text


def _files(config: TlsConfig, cert: str, key: str) -> tuple[Path, Path, Path, Path | None]:
    folder = config.creds_dir
    if not folder.is_dir():
        raise ConfigError(f"--tls-creds {folder}: not a directory (expected QEMU's "
                          f"tls-creds-x509 layout: {CA_CERT}, {cert}, {key})")
    paths = [folder / CA_CERT, folder / cert, folder / key]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise ConfigError(f"--tls-creds {folder}: missing {', '.join(missing)}")
    crl = folder / CA_CRL
    return paths[0], paths[1], paths[2], crl if crl.is_file() else None


def check_files(config: TlsConfig, *, server: bool) -> None:
    """ConfigError if the credential directory lacks a file this side needs (cheap: no ssl
    import, nothing parsed; :func:`client_context`/:func:`server_context` check the rest)."""
    _files(config, *((SERVER_CERT, SERVER_KEY) if server else (CLIENT_CERT, CLIENT_KEY)))


def _context(config: TlsConfig, *, server: bool) -> ssl.SSLContext:
    import ssl  # noqa: PLC0415 - only when TLS is used

    cert_name, key_name = (SERVER_CERT, SERVER_KEY) if server else (CLIENT_CERT, CLIENT_KEY)
    ca, cert, key, crl = _files(config, cert_name, key_name)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.verify_mode = ssl.CERT_REQUIRED
    context.check_hostname = not server
    if server:
        context.num_tickets = 0  # one connection per migration: no session to resume
    try:
        context.load_verify_locations(cafile=str(ca))
    except ssl.SSLError as exc:
        raise ConfigError(f"{ca}: not a PEM certificate ({exc.reason or exc})") from None
    if crl is not None:
        try:
            context.load_verify_locations(cafile=str(crl))
        except ssl.SSLError as exc:
            raise ConfigError(f"{crl}: not a PEM CRL ({exc.reason or exc})") from None
        context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    try:
        context.load_cert_chain(str(cert), str(key))
    except ssl.SSLError as exc:
        raise ConfigError(f"{cert} / {key}: unusable ({exc.reason or exc}: is the key the "
                          "certificate's?)") from None
    return context


def client_context(config: TlsConfig) -> ssl.SSLContext:
    """The sender's context: ca-cert.pem, client-cert.pem/client-key.pem. ConfigError if the
    files are missing or unusable."""
    return _context(config, server=False)


def server_context(config: TlsConfig) -> ssl.SSLContext:
    """The receiver's context: ca-cert.pem, server-cert.pem/server-key.pem. ConfigError if the
    files are missing or unusable."""
    return _context(config, server=True)


_REASONS: Final = {
    "TLSV1_ALERT_UNKNOWN_CA": "it does not trust the CA that signed our certificate",
    "SSLV3_ALERT_BAD_CERTIFICATE": "it refused our certificate",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "our certificate has expired",
    "SSLV3_ALERT_CERTIFICATE_REVOKED": "our certificate is revoked",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "it requires a client certificate",
    "TLSV1_ALERT_PROTOCOL_VERSION": "it does not speak TLS 1.3",
    "TLSV1_ALERT_DECRYPT_ERROR": "it refused our certificate",
}


def describe_tls_error(exc: BaseException, peer: str) -> str:
    """One line saying why a handshake with ``peer`` (``the receiver``) failed."""
    import ssl  # noqa: PLC0415

    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS handshake failed: {peer}'s certificate is refused: {exc.verify_message}"
    reason = getattr(exc, "reason", None) or ""
    if reason in _REASONS:
        return f"TLS handshake failed: {peer} refused the connection: {_REASONS[reason]}"
    if isinstance(exc, ssl.SSLEOFError | ConnectionError) or reason in (
        "WRONG_VERSION_NUMBER", "UNEXPECTED_EOF_WHILE_READING", "RECORD_LAYER_FAILURE",
    ):
        return (f"TLS handshake failed: {peer} does not speak TLS or closed the connection "
                f"({reason or type(exc).__name__}); does it run with --tls-creds?")
    if isinstance(exc, TimeoutError):
        return f"TLS handshake failed: {peer} did not complete it in time"
    return f"TLS handshake failed with {peer}: {reason or exc}"


def is_loopback(host: str) -> bool:
    """True for a loopback IP literal or ``localhost``; names are not resolved (any other name
    counts as not loopback)."""
    if host.lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def require_tls_or_loopback(option: str, address: tuple[str, int], tls: TlsConfig | None,
                            insecure_plaintext: bool) -> None:
    """Secure by default: UsageError for a non-loopback address without TLS, unless the
    operator said ``--insecure-plaintext``."""
    host, port = address
    if tls is None and not insecure_plaintext and not is_loopback(host):
        raise UsageError(
            f"{option} {host}:{port} is not a loopback address and TLS is off: guest memory "
            "would cross the network readable by anyone on the path; give --tls-creds DIR "
            "(QEMU's tls-creds-x509 layout) or --insecure-plaintext")
