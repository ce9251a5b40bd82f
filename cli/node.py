"""``tmdht node run`` and ``tmdht cluster up|status``."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from tmdht.cli.main import human_bytes, run_async, stderr, stdout
from tmdht.config import NodeConfig, parse_address
from tmdht.errors import ConfigError, UsageError


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message (and the exception, if any)."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc)


def hostport(address: tuple[str, int]) -> str:
    """('127.0.0.1', 80) -> '127.0.0.1:80'."""
    return f"{address[0]}:{address[1]}"


def setup_logging(fmt: str, level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    if level != "debug":
        logging.getLogger("kademlia").setLevel(logging.WARNING)
        logging.getLogger("rpcudp").setLevel(logging.WARNING)


def service_config(config_class: Any, config_file: Path | None, seeds: tuple[str, ...],
                   flags: dict[str, Any]) -> Any:
    """A service's config (``config_class.from_sources``) from its TOML file, the environment
    and the flags (repeated ``--seed`` joined), with logging set up as it says."""
    toml_text = None
    if config_file is not None:
        try:
            toml_text = config_file.read_text()
        except OSError as exc:
            raise UsageError(f"{config_file}: {exc.strerror}") from None
    if seeds:
        flags["seeds"] = ",".join(seeds)
    config = config_class.from_sources(
        toml_text=toml_text, env=os.environ, flags=flags, source=str(config_file or "config")
    )
    setup_logging(config.log_format, config.log_level)
    return config


def print_ready_line(status: dict[str, Any]) -> None:
    """``READY {json}`` on stdout: how a supervisor or a test learns a service's addresses."""
    from tmdht.node.local import READY_PREFIX  # noqa: PLC0415 - keep `tmdht --help` light

    sys.stdout.write(READY_PREFIX + json.dumps(status) + "\n")
    sys.stdout.flush()


@click.group()
def node() -> None:
    """Store node service."""


# Flags of `node run`; every one may also come from the config file and TMDHT_NODE_* variables.
@node.command("run", context_settings={"auto_envvar_prefix": None})
@click.option(
    "-c",
    "--config",
    "config_file",
    type=click.Path(path_type=Path, dir_okay=False),
    envvar="TMDHT_NODE_CONFIG",
    help="TOML config file.",
)
@click.option("--data-dir", type=click.Path(path_type=Path, file_okay=False))
@click.option("--host")
@click.option("--advertise-host")
@click.option("--kademlia-port", type=int)
@click.option("--data-port", type=int)
@click.option("--metrics-port", type=int)
@click.option(
    "--seed", "seeds", multiple=True, help="host:port of a node's Kademlia port (repeatable)."
)
@click.option("--replicas", type=int)
@click.option("--capacity")
@click.option("--max-datagram")
@click.option(
    "--cluster-key-file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Cluster key: 64 hex digits, or id:hex lines (first sends) during a rotation.",
)
@click.option(
    "--insecure-open",
    is_flag=True,
    default=None,
    help="Run without a cluster key (development only).",
)
@click.option("--replication-interval", type=float)
@click.option("--replication-rate", type=int, help="Pages/s the replication job may move.")
@click.option(
    "--rate-limit", type=float, help="Data-plane datagrams/s per source IP (0: no limit)."
)
@click.option("--rate-limit-burst", type=int, help="Data-plane datagrams per source IP at once.")
@click.option("--surplus-grace", type=float)
@click.option("--refresh-interval", type=float)
@click.option("--rpc-timeout", type=float)
@click.option("--log-format", type=click.Choice(["json", "text"]))
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]))
@click.option("--status-file", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--ready-line", is_flag=True, help="Print 'READY {json}' on stdout once serving.")
@click.option("--event-loop", type=click.Choice(["uvloop", "asyncio"]), default="uvloop")
def node_run(
    config_file: Path | None,
    ready_line: bool,
    seeds: tuple[str, ...],
    event_loop: str,
    **flags: Any,
) -> None:
    """Run a store node until SIGTERM or SIGINT."""
    from tmdht.node.service import StoreNode  # noqa: PLC0415 - keep `tmdht --help` light

    config = service_config(NodeConfig, config_file, seeds, flags)

    async def main() -> None:
        await StoreNode(config, on_ready=print_ready_line if ready_line else None).run()

    run_async(main(), event_loop)


@click.group()
def cluster() -> None:
    """Local clusters for development, and cluster status."""


@cluster.command("up")
@click.option("-n", "--nodes", default=4, show_default=True, help="Number of node processes.")
@click.option(
    "--dir",
    "root",
    type=click.Path(path_type=Path, file_okay=False),
    default=Path("build/cluster"),
    show_default=True,
)
@click.option("--replicas", default=3, show_default=True)
@click.option("--insecure-open", is_flag=True, help="No cluster key (development only).")
def cluster_up(nodes: int, root: Path, replicas: int, insecure_open: bool) -> None:
    """Start a local N-node cluster as separate processes; Ctrl-C stops them all."""
    from tmdht.node.local import LocalCluster  # noqa: PLC0415

    local = LocalCluster(root, nodes, replicas=replicas, open_mode=insecure_open)
    stderr.print(f"starting {nodes} nodes in {root} ...")

    class Stop(Exception):
        """Raised by the signal handler to end the wait."""

    def on_signal(signum: int, frame: Any) -> None:
        raise Stop

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        local.start()
        table = Table(title=f"tmdht cluster ({nodes} nodes, R={replicas})")
        for name in ("node", "id", "kademlia", "data", "metrics", "pid"):
            table.add_column(name)
        for n in local.nodes:
            metrics = f"http://{hostport(n.address('metrics'))}/metrics"
            table.add_row(
                str(n.index), n.status["node_id"][:16], hostport(n.address("kademlia")),
                hostport(n.address("data")), metrics, str(n.pid),
            )  # fmt: skip
        stdout.print(table)
        key = "none (open)" if insecure_open else str(local.key_file)
        stdout.print(f"seed: {hostport(local.seed)}   key: {key}")
        stdout.print("Ctrl-C stops the cluster.")
        # Block until a node exits (without reaping it: Popen does that) or a signal arrives.
        os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOWAIT)
        dead = [n for n in local.nodes if not n.running]
        if dead:
            code = dead[0].proc.returncode if dead[0].proc else "?"
            stderr.print(f"[red]node {dead[0].index} exited (code {code}); stopping the cluster[/]")
    except Stop:
        pass
    finally:
        stderr.print("stopping nodes ...")
        local.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)


def _fetch_health(host: str, port: int) -> str:
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/readyz", timeout=2) as response:
            return "ready" if response.status == 200 else f"HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        return "not ready" if exc.code == 503 else f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError):
        return "unreachable"


@cluster.command("status")
@click.option("--seed", required=True, help="host:port of any node's Kademlia port.")
@click.option(
    "--cluster-key-file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Cluster key (or $TMDHT_CLUSTER_KEY).",
)
@click.option("--insecure-open", is_flag=True, help="The cluster runs without a key.")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def cluster_status(
    seed: str, cluster_key_file: Path | None, insecure_open: bool, as_json: bool
) -> None:
    """Members of a cluster: pages, bytes and health of each node."""
    from tmdht.client.dataplane import DataPlaneClient, NodeUnreachableError  # noqa: PLC0415
    from tmdht.node.overlay import Overlay, OverlayConfig  # noqa: PLC0415
    from tmdht.node.service import load_cluster_keys  # noqa: PLC0415

    try:
        seed_address = parse_address(seed)
    except ConfigError as exc:
        raise UsageError(f"--seed: {exc}") from None
    cfg = NodeConfig(
        data_dir=Path("."), cluster_key_file=cluster_key_file, insecure_open=insecure_open
    )
    keys = load_cluster_keys(cfg)

    async def gather() -> list[dict[str, Any]]:
        from tmdht.auth import Authenticator, keyring_from  # noqa: PLC0415

        auth = (
            Authenticator.open_mode() if keys is None else Authenticator.keyed(keyring_from(keys))
        )
        overlay = await Overlay.start(
            OverlayConfig(
                data_port=0,
                join=False,
                seeds=(seed_address,),
                cluster_key=None if keys is None else keys[0].secret,
                accepted_cluster_keys=tuple(k.secret for k in (keys or [])[1:]),
            )
        )
        try:
            members = await overlay.crawl()
        finally:
            await overlay.stop()
        rows = []
        async with await DataPlaneClient.open(auth, attempts=3, timeout=0.5) as client:
            for m in members:
                row: dict[str, Any] = {
                    "node_id": m.node_id.hex(), "kademlia": f"{m.host}:{m.port}",
                    "data": f"{m.data_host}:{m.data_port}", "metrics_port": m.metrics_port,
                }  # fmt: skip
                try:
                    info = await client.node_info(m.data_address)
                    row.update(
                        pages=info.pages_stored,
                        bytes=info.bytes_stored,
                        capacity=info.capacity_bytes,
                        version=info.version,
                    )
                except NodeUnreachableError:
                    row.update(pages=None, bytes=None, capacity=None, version=m.version)
                row["health"] = (
                    await asyncio.to_thread(_fetch_health, m.host, m.metrics_port)
                    if m.metrics_port
                    else "unknown"
                )
                rows.append(row)
        return rows

    rows = run_async(gather())
    if not rows:
        raise UsageError(f"no cluster answered at {seed}")
    if as_json:
        click.echo(json.dumps({"members": rows}, indent=2))
        return
    table = Table(title=f"{len(rows)} members")
    for name in ("id", "kademlia", "data", "pages", "bytes", "capacity", "health"):
        table.add_column(
            name, justify="right" if name in ("pages", "bytes", "capacity") else "left"
        )
    for r in rows:
        table.add_row(
            r["node_id"][:16], r["kademlia"], r["data"],
            "-" if r["pages"] is None else f"{r['pages']:,}",
            "-" if r["bytes"] is None else human_bytes(r["bytes"]),
            "-" if r["capacity"] is None else human_bytes(r["capacity"]),
            r["health"],
        )  # fmt: skip
    stdout.print(table)
    stdout.print(f"total: {sum(r['pages'] or 0 for r in rows):,} page copies")
