"""``tmdht qemu send`` / ``tmdht qemu receive``: live-migrate an unpatched QEMU through tmdht.

Source host::

    (qemu) migrate "exec:tmdht qemu send --catalog CATALOG --to RECEIVER:PORT"

Destination host (the same QEMU command line plus)::

    -incoming "exec:tmdht qemu receive --listen 0.0.0.0:PORT --seed NODE:7400
               --cluster-key-file cluster.key"

stdin/stdout carry QEMU's stream, so both commands keep stdout for it and print their summary,
progress and logs on stderr (QEMU passes its own stderr on to them).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import click

from tmdht.cli.access import cluster_access, cluster_options
from tmdht.cli.main import parse_size
from tmdht.cli.proxy import run_proxy, setup_logging
from tmdht.client.tls import TlsConfig
from tmdht.config import parse_address
from tmdht.errors import ConfigError, UsageError
from tmdht.wave import DEFAULT_WAVE_TTL, MAX_WAVE_TTL, WAVE_SECRET_ENV, WaveCredentials

log = logging.getLogger("tmdht.cli.qemu")
F = TypeVar("F", bound=Callable[..., object])


def _address(text: str, what: str, *, any_port: bool = False) -> tuple[str, int]:
    if any_port and text.strip().endswith(":0"):
        text = text.strip()[:-1] + "1"  # port 0 (any free port) is fine for a listener
        host, _port = _address(text, what)
        return host, 0
    try:
        host, port = parse_address(text)
    except ConfigError as exc:
        raise UsageError(f"{what}: {exc}") from None
    return host, port


@click.group()
def qemu() -> None:
    """Live-migrate an unpatched QEMU through tmdht: send, receive (exec: migration proxies)."""


def tls_options(*, sender: bool) -> Callable[[F], F]:
    """--tls-creds, --tls-authz (and the sender's --tls-hostname), --insecure-plaintext."""
    peer = "receiver" if sender else "sender"

    def decorate(command: F) -> F:
        command = click.option(
            "--insecure-plaintext", is_flag=True,
            help="Allow a non-loopback address without TLS (guest memory in the clear).")(command)
        if sender:
            command = click.option(
                "--tls-hostname", metavar="NAME",
                help="Name the receiver's certificate must carry (default: the host of --to)."
            )(command)
        command = click.option(
            "--tls-authz", "tls_authz", multiple=True, metavar="SUBJECT",
            help=f"Accept only a {peer} certificate with this subject ('CN=host,O=Org'; "
            "repeat to allow several).")(command)
        return click.option(
            "--tls-creds", type=click.Path(path_type=Path, file_okay=False),
            help="Mutual TLS 1.3: a directory laid out like QEMU's tls-creds-x509 dir "
            "(ca-cert.pem, server-cert.pem/server-key.pem, client-cert.pem/client-key.pem)."
        )(command)

    return decorate


def _tls(creds: Path | None, authz: tuple[str, ...], hostname: str | None = None
         ) -> TlsConfig | None:
    if creds is None:
        if authz or hostname:
            raise UsageError("--tls-authz and --tls-hostname need --tls-creds")
        return None
    return TlsConfig(creds, peer_subjects=authz, hostname=hostname)


def wave_options(command: F) -> F:
    """--wave and --wave-secret-file (the secret may come from $TMDHT_WAVE_SECRET)."""
    command = click.option(
        "--wave-secret-file", type=click.Path(path_type=Path, dir_okay=False),
        help=f"With --wave: the wave's secret, 64 hex digits (or ${WAVE_SECRET_ENV}).")(command)
    return click.option(
        "--wave", metavar="ID", help="Migrate in this wave: pages a receiver of the wave "
        "already stored at the destination do not cross the WAN again.")(command)


def _wave(wave: str | None, secret_file: Path | None) -> WaveCredentials | None:
    if wave is None:
        if secret_file is not None:
            raise click.UsageError("--wave-secret-file needs --wave")
        return None
    return WaveCredentials.load(wave, secret_file=secret_file)


@qemu.command()
@click.option("--catalog", type=click.Path(path_type=Path, dir_okay=False, exists=True),
              required=True, help="Template catalog: pages in it travel as digests.")
@click.option("--to", "to", required=True, help="HOST:PORT of the receiver.")
@click.option("--compress", is_flag=True, help="zstd-compress pages sent in full.")
@click.option("--backref-window", type=click.IntRange(1, 1 << 18), default=32768,
              show_default=True, help="Pages the receiver keeps for back-references.")
@click.option("--flow-window", default="64MiB", show_default=True,
              help="QEMU bytes in flight ahead of the receiver.")
@click.option("--connect-timeout", type=float, default=30.0, show_default=True)
@click.option("--done-timeout", type=float, default=120.0, show_default=True,
              help="Seconds to wait for the receiver's verdict after QEMU's stream ended.")
@click.option("--progress", is_flag=True, help="Show a live bar on stderr.")
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=None,
              help="Serve Prometheus /metrics on this port (127.0.0.1).")
@click.option("--report", "report_path", type=click.Path(path_type=Path, dir_okay=False),
              help="Write the end-of-migration report here as JSON.")
@click.option("--log-level", default="warning", show_default=True)
@wave_options
@click.option("--offer-window", default="64MiB", show_default=True,
              help="With --wave: bytes of offered pages awaiting the receiver at most; beyond, "
              "pages are sent whole.")
@click.option("--offer-every-page", is_flag=True,
              help="With --wave: offer every non-template page, even while recent offers "
              "were not found in the wave store (by default such pages are sent whole, with "
              "one in 8 still offered to notice when offers are found again).")
@click.option("--offer-ahead", default="4MiB", show_default=True,
              help="With --wave: stop reading QEMU's stream while the offers awaiting the "
              "receiver are expected to need more than this in bodies (keeps QEMU from "
              "pausing the guest far ahead of what crossed).")
@tls_options(sender=True)
def send(catalog: Path, to: str, compress: bool, backref_window: int, flow_window: str,
         connect_timeout: float, done_timeout: float, progress: bool,
         metrics_port: int | None, report_path: Path | None, log_level: str,
         wave: str | None, wave_secret_file: Path | None, offer_window: str,
         offer_every_page: bool, offer_ahead: str, tls_creds: Path | None,
         tls_authz: tuple[str, ...], tls_hostname: str | None,
         insecure_plaintext: bool) -> None:
    """Read QEMU's migration stream on stdin, send it deduplicated to a receiver."""
    from tmdht.client.migration import SenderConfig, run_sender  # noqa: PLC0415

    setup_logging(log_level)
    config = SenderConfig(catalog=catalog, to=_address(to, "--to"), compress=compress,
                          backref_window=backref_window, flow_window=parse_size(flow_window),
                          connect_timeout=connect_timeout, done_timeout=done_timeout,
                          tls=_tls(tls_creds, tls_authz, tls_hostname),
                          insecure_plaintext=insecure_plaintext,
                          wave=_wave(wave, wave_secret_file),
                          offer_window=parse_size(offer_window),
                          adaptive_offers=not offer_every_page,
                          offer_ahead=parse_size(offer_ahead))
    run_proxy("send", progress, metrics_port, report_path,
               lambda metrics, update: run_sender(config, metrics=metrics, on_progress=update),
               run_in_loop=False)


@qemu.command()
@click.option("--listen", required=True, help="HOST:PORT to listen on for the sender (port 0: "
              "any; the bound address is printed as 'READY host:port' on stderr).")
@cluster_options
@click.option("--no-cluster", is_flag=True,
              help="Use no store cluster: every template page comes from the sender.")
@click.option("--catalog", type=click.Path(path_type=Path, dir_okay=False, exists=True),
              help="Refuse a sender that used another catalog than this one.")
@click.option("--ready-file", type=click.Path(path_type=Path, dir_okay=False),
              help="Also write 'READY host:port' to this file (or FIFO).")
@click.option("--accept-timeout", type=float, default=600.0, show_default=True)
@click.option("--resolve-batch", type=click.IntRange(1, 8192), default=512, show_default=True)
@click.option("--resolve-parallel", type=click.IntRange(1, 256), default=8, show_default=True)
@click.option("--resolve-timeout", type=float, default=3.0, show_default=True)
@click.option("--progress", is_flag=True, help="Show a live bar on stderr.")
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=None,
              help="Serve Prometheus /metrics on this port (127.0.0.1).")
@click.option("--report", "report_path", type=click.Path(path_type=Path, dir_okay=False),
              help="Write the end-of-migration report here as JSON.")
@click.option("--log-level", default="warning", show_default=True)
@wave_options
@click.option("--wave-ttl", type=click.FloatRange(1, MAX_WAVE_TTL), default=DEFAULT_WAVE_TTL,
              show_default=True, help="With --wave: seconds the pages this receiver stores "
              "into the wave store live there.")
@click.option("--wave-claim-wait", type=click.FloatRange(0, 600), default=6.0,
              show_default=True, help="With --wave: seconds to wait for a page another "
              "receiver of the wave is fetching (it claimed it) before asking this one's "
              "sender; 0: no claims.")
@tls_options(sender=False)
def receive(listen: str, seeds: tuple[str, ...], cluster_key_file: Path | None,
            insecure_open: bool, no_cluster: bool, catalog: Path | None,
            ready_file: Path | None, accept_timeout: float, resolve_batch: int,
            resolve_parallel: int, resolve_timeout: float, progress: bool,
            metrics_port: int | None, report_path: Path | None, log_level: str,
            wave: str | None, wave_secret_file: Path | None, wave_ttl: float,
            wave_claim_wait: float, tls_creds: Path | None, tls_authz: tuple[str, ...],
            insecure_plaintext: bool) -> None:
    """Accept a sender, rebuild QEMU's migration stream on stdout (resolving via the cluster)."""
    from tmdht.catalog_file import read_template_digests  # noqa: PLC0415
    from tmdht.client.migration import (  # noqa: PLC0415 - IO stack on demand
        ReceiverConfig,
        run_receiver,
        save_report,
    )

    setup_logging(log_level)
    store = None if no_cluster else cluster_access(seeds, cluster_key_file, insecure_open)
    config = ReceiverConfig(
        listen=_address(listen, "--listen", any_port=True), store=store,
        expected_catalog_id=read_template_digests(catalog).catalog_id if catalog else None,
        ready_file=ready_file, accept_timeout=accept_timeout, resolve_batch=resolve_batch,
        resolve_parallel=resolve_parallel, resolve_timeout=resolve_timeout,
        tls=_tls(tls_creds, tls_authz), insecure_plaintext=insecure_plaintext,
        wave=_wave(wave, wave_secret_file), wave_ttl=wave_ttl,
        wave_claim_wait=wave_claim_wait)

    def listening(address: tuple[str, int]) -> None:
        sys.stderr.write(f"READY {address[0]}:{address[1]}\n")
        sys.stderr.flush()

    run_proxy("receive", progress, metrics_port, report_path,
               lambda metrics, update: run_receiver(
                   config, metrics=metrics, on_listening=listening, on_progress=update,
                   on_verified=lambda r: save_report(r, report_path)))
