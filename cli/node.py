"""``tmdht node run`` and ``tmdht cluster up|status``."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import click
from rich.table import Table

from tmdht.cli.access import cluster_access
from tmdht.cli.main import human_bytes, run_async, stderr, stdout
from tmdht.config import NodeConfig
from tmdht.errors import UsageError
from tmdht.net.address import format_address

if TYPE_CHECKING:
    from tmdht.client.store import MemberStatus
    from tmdht.net.membership import ClusterRule


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


class ServiceConfig(Protocol):
    """What :func:`service_config` needs of a service's config: how it logs."""

    @property
    def log_format(self) -> str: ...

    @property
    def log_level(self) -> str: ...


C = TypeVar("C", bound=ServiceConfig)


def service_config(from_sources: Callable[..., C], config_file: Path | None,
                   seeds: tuple[str, ...], flags: dict[str, object]) -> C:
    """A service's config (its class's ``from_sources``) from its TOML file, the environment
    and the flags (repeated ``--seed`` joined), with logging set up as it says."""
    toml_text = None
    if config_file is not None:
        try:
            toml_text = config_file.read_text(encoding="utf-8")
        except OSError as exc:
            raise UsageError(f"{config_file}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise UsageError(f"{config_file}: not a TOML config file (binary content)") from None
    if seeds:
        flags["seeds"] = ",".join(seeds)
    config = from_sources(
        toml_text=toml_text, env=os.environ, flags=flags, source=str(config_file or "config")
    )
    setup_logging(config.log_format, config.log_level)
    return config


def print_ready_line(status: Mapping[str, object]) -> None:
    """``READY {json}`` on stdout: how a supervisor or a test learns a service's addresses."""
    from tmdht.node.local import READY_PREFIX  # noqa: PLC0415 - keep `tmdht --help` light

    sys.stdout.write(READY_PREFIX + json.dumps(status) + "\n")
    sys.stdout.flush()


@click.group()
def node() -> None:
    """Store node service: run."""


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
@click.option("--virtual-ids", type=int, help="Placement tokens per node (cluster-wide, like R).")
@click.option("--capacity")
@click.option("--wave-capacity", help="Bytes of migration-wave pages kept apart from templates "
              "(0: none).")
@click.option("--wave-max-ttl", type=float, help="Longest life of a wave page, seconds.")
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
@click.option(
    "--require-stamped",
    is_flag=True,
    default=None,
    help="Refuse unstamped (version 1) overlay datagrams: once every node and client is upgraded.",
)
@click.option("--replication-interval", type=float)
@click.option("--replication-rate", type=int, help="Pages/s the replication job may move.")
@click.option(
    "--anti-entropy",
    type=click.Choice(["range", "full"]),
    help="Sweep by bucket-hash comparison (range, default) or ask about every page (full).",
)
@click.option(
    "--rate-limit", type=float, help="Data-plane datagrams/s per source IP (0: no limit)."
)
@click.option("--rate-limit-burst", type=int, help="Data-plane datagrams per source IP at once.")
@click.option("--surplus-grace", type=float)
@click.option("--commit-delay", type=float,
              help="Seconds a group commit may wait for more PUTs while they stream in (0: never).")
@click.option("--refresh-interval", type=float)
@click.option("--rpc-timeout", type=float)
@click.option("--log-format", type=click.Choice(["json", "text"]))
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]))
@click.option("--status-file", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--zone", help="Failure domain: zone (replicas go to distinct zones first).")
@click.option("--rack", help="Failure domain: rack within the zone.")
@click.option("--host-label", help="Failure domain: machine (default: the host name).")
@click.option("--ready-line", is_flag=True, help="Print 'READY {json}' on stdout once serving.")
@click.option("--event-loop", type=click.Choice(["uvloop", "asyncio"]), default="uvloop")
def node_run(
    config_file: Path | None,
    ready_line: bool,
    seeds: tuple[str, ...],
    event_loop: str,
    **flags: object,
) -> None:
    """Run a store node until SIGTERM or SIGINT."""
    from tmdht.node.service import StoreNode  # noqa: PLC0415 - keep `tmdht --help` light

    config = service_config(NodeConfig.from_sources, config_file, seeds, flags)

    async def main() -> None:
        await StoreNode(config, on_ready=print_ready_line if ready_line else None).run()

    run_async(main(), event_loop)


@click.group()
def cluster() -> None:
    """Clusters: up (a local one for development), status (of any)."""


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
@click.option(
    "--restart",
    is_flag=True,
    help="Start a node that dies again, with its data dir (default: the others keep serving).",
)
def cluster_up(nodes: int, root: Path, replicas: int, insecure_open: bool, restart: bool) -> None:
    """Start a local N-node cluster as separate processes; Ctrl-C stops them all.

    A node that dies is reported (how, and its log); the others keep serving.
    """
    from tmdht.node.local import ClusterError, LocalCluster  # noqa: PLC0415

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
            metrics = f"http://{format_address(n.address('metrics'))}/metrics"
            table.add_row(
                str(n.index), n.status["node_id"][:16], format_address(n.address("kademlia")),
                format_address(n.address("data")), metrics, str(n.pid),
            )  # fmt: skip
        stdout.print(table)
        key = "none (open)" if insecure_open else str(local.key_file)
        seed = local.seed
        stdout.print(f"seed: {format_address(seed)}   key: {key}")
        stdout.print("Ctrl-C stops the cluster.")
        while True:
            try:
                exited = local.wait_for_exit()
            except ClusterError:
                raise ClusterError(
                    f"every node of {root} has exited; nothing left to serve"
                ) from None
            for n in exited:
                _note(local.describe_exit(n), "red")
                if restart:
                    try:
                        local.restart_node(n.index)
                    except ClusterError as exc:
                        _note(f"node {n.index} not restarted: {exc}", "red")
                    else:
                        _note(
                            f"node {n.index} restarted with its data dir {n.data_dir} (pid "
                            f"{n.pid}, kademlia {format_address(n.address('kademlia'))}, data "
                            f"{format_address(n.address('data'))}, metrics "
                            f"{format_address(n.address('metrics'))})"
                        )
            alive = [n for n in local.nodes if n.running]
            if len(alive) < nodes:
                _note(f"{len(alive)} of {nodes} nodes serving; Ctrl-C stops them")
            if alive and not any(n.address("kademlia") == seed for n in alive):
                seed = local.seed
                _note(f"seed now: {format_address(seed)}")
    except Stop:
        pass
    finally:
        stderr.print("stopping nodes ...")
        local.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)


def _note(text: str, style: str | None = None) -> None:
    """One line on stderr, printed as is (log excerpts may hold brackets rich would parse)."""
    stderr.print(text, style=style, markup=False, highlight=False, soft_wrap=True)


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
    from tmdht.client.errors import ClusterUnreachable  # noqa: PLC0415 - IO stack on demand
    from tmdht.client.store import TemplateStoreClient  # noqa: PLC0415

    access = cluster_access((seed,), cluster_key_file, insecure_open)

    async def gather() -> tuple[list[MemberStatus], ClusterRule]:
        # ClusterUnreachable says why none answered (nothing there, or another cluster key).
        async with TemplateStoreClient.connect(access, timeout=0.5) as store:
            return await store.cluster_status(), store.rule

    statuses, rule = run_async(gather())
    if not statuses:
        raise ClusterUnreachable(access.seeds)
    if as_json:
        doc = {
            "members": [_status_doc(s) for s in statuses],
            "placement": {
                "virtual_ids": rule.virtual_ids,
                "replicas": rule.replicas,
                "agreed": rule.agreed,
            },
        }
        click.echo(json.dumps(doc, indent=2))
        return
    table = Table(title=f"{len(statuses)} members")
    numeric = ("V", "R", "pages", "bytes", "capacity")
    for name in ("id", "domain", "kademlia", "data", *numeric, "health"):
        table.add_column(name, justify="right" if name in numeric else "left")
    for status in statuses:
        m, info = status.member, status.info
        table.add_row(
            m.node_id.hex()[:16], str(m.domain),
            format_address((m.host, m.port)), format_address(m.data_address),
            _advertised(m.virtual_ids), _advertised(m.replicas),
            "-" if info is None else f"{info.pages_stored:,}",
            "-" if info is None else human_bytes(info.bytes_stored),
            "-" if info is None else human_bytes(info.capacity_bytes),
            status.health,
        )  # fmt: skip
    stdout.print(table)
    total = sum(s.info.pages_stored for s in statuses if s.info is not None)
    stdout.print(f"total: {total:,} page copies")
    if not rule.agreed:
        stdout.print(f"[bold red]members disagree on the placement rule:[/] {rule.describe()}")


def _advertised(value: int | None) -> str:
    """A member's advertised V or R for the table ("?": an older node that advertises none)."""
    return "?" if value is None else str(value)


def _status_doc(status: MemberStatus) -> dict[str, object]:
    """One member as ``cluster status --json`` prints it."""
    m, info = status.member, status.info
    return {
        "node_id": m.node_id.hex(),
        "domain": {"zone": m.domain.zone, "rack": m.domain.rack, "host": m.domain.host},
        "kademlia": f"{m.host}:{m.port}",
        "data": f"{m.data_host}:{m.data_port}",
        "metrics_port": m.metrics_port,
        "virtual_ids": m.virtual_ids,
        "replicas": m.replicas,
        "pages": info.pages_stored if info else None,
        "bytes": info.bytes_stored if info else None,
        "capacity": info.capacity_bytes if info else None,
        "version": info.version if info else m.version,
        "health": status.health,
    }
