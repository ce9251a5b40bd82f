"""``tmdht vnet run|attach|detach|status``: the virtual network agent and its control."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from tmdht.cli.main import run_async, stdout
from tmdht.cli.node import print_ready_line, service_config
from tmdht.errors import UsageError
from tmdht.vnet_config import VnetConfig


@click.group()
def vnet() -> None:
    """Virtual network agent: run, attach, detach, status.

    The agent carries VMs' Ethernet frames between hosts and keeps them while the VMs migrate.
    """


@vnet.command("run", context_settings={"auto_envvar_prefix": None})
@click.option("-c", "--config", "config_file", type=click.Path(path_type=Path, dir_okay=False),
              envvar="TMDHT_VNET_CONFIG", help="TOML config file ([vnet] table).")
@click.option("--data-dir", type=click.Path(path_type=Path, file_okay=False))
@click.option("--seed", "seeds", multiple=True,
              help="host:port of a store node's Kademlia port (repeatable).")
@click.option("--host")
@click.option("--advertise-host")
@click.option("--tunnel-port", type=int)
@click.option("--metrics-port", type=int)
@click.option("--control-socket", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--site", help="This host's site: tunnels to other sites are encrypted.")
@click.option("--encrypt", type=click.Choice(["wan", "always", "never"]))
@click.option("--cluster-key-file", type=click.Path(path_type=Path, dir_okay=False),
              help="The store cluster's key file (or $TMDHT_CLUSTER_KEY).")
@click.option("--insecure-open", is_flag=True, default=None,
              help="Run without a key (development only).")
@click.option("--replicas", type=int)
@click.option("--lease", type=float)
@click.option("--members-interval", type=float)
@click.option("--hold-frames", type=int)
@click.option("--hold-bytes")
@click.option("--hold-timeout", type=float)
@click.option("--handover-rto", type=float)
@click.option("--fence-timeout", type=float)
@click.option("--gap-timeout", type=float)
@click.option("--log-format", type=click.Choice(["json", "text"]))
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]))
@click.option("--status-file", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--ready-line", is_flag=True, help="Print 'READY {json}' on stdout once serving.")
def vnet_run(config_file: Path | None, seeds: tuple[str, ...], ready_line: bool,
             **flags: object) -> None:
    """Run the agent until SIGTERM or SIGINT."""
    from tmdht.vnet.agent import VnetAgent  # noqa: PLC0415 - keep `tmdht --help` light

    config = service_config(VnetConfig.from_sources, config_file, seeds, flags)

    async def main() -> None:
        await VnetAgent(config, on_ready=print_ready_line if ready_line else None).run()

    run_async(main())


def _control(data_dir: Path | None, control_socket: Path | None) -> Path:
    if control_socket is not None:
        return control_socket
    if data_dir is not None:
        return data_dir / "control.sock"
    raise UsageError("say which agent: --control-socket PATH or --data-dir DIR")


_agent_options = [
    click.option("--data-dir", type=click.Path(path_type=Path, file_okay=False),
                 envvar="TMDHT_VNET_DATA_DIR", help="The agent's data directory."),
    click.option("--control-socket", type=click.Path(path_type=Path, dir_okay=False),
                 envvar="TMDHT_VNET_CONTROL_SOCKET",
                 help="The agent's control socket (default: DATA_DIR/control.sock)."),
]


def agent_options(func: Any) -> Any:
    for option in reversed(_agent_options):
        func = option(func)
    return func


@vnet.command("attach")
@click.argument("name")
@click.option("--vnet", "network", type=click.IntRange(0, 0xFFFF_FFFF), required=True,
              help="The virtual network (a number).")
@click.option("--net-socket", type=click.Path(path_type=Path, dir_okay=False),
              help="The unix socket of the VM's -netdev stream,server=on.")
@click.option("--qmp-socket", type=click.Path(path_type=Path, dir_okay=False),
              help="A QMP monitor of the VM for the agent (-qmp unix:PATH,server=on,wait=off).")
@click.option("--mac", help="The NIC's MAC (default: asked from QEMU).")
@click.option("--nic-id", help="The NIC's -device id, if the VM has several virtio NICs.")
@click.option("--tap", help="Attach this tap device instead of a VM (created if missing).")
@agent_options
@click.option("--json", "as_json", is_flag=True, help="Print the port as JSON.")
def vnet_attach(name: str, network: int, net_socket: Path | None, qmp_socket: Path | None,
                mac: str | None, nic_id: str | None, tap: str | None, data_dir: Path | None,
                control_socket: Path | None, as_json: bool) -> None:
    """Attach a VM's NIC (or a tap device) to a virtual network of the running agent.

    A migration's destination VM (started with -incoming) is attached the same way, before the
    migration starts: the agent holds its frames until it resumes.
    """
    from tmdht.vnet.control import control_request  # noqa: PLC0415

    request: dict[str, Any] = {"op": "attach", "name": name, "vnet": network}
    if tap is not None:
        if net_socket or qmp_socket:
            raise UsageError("--tap, or --net-socket and --qmp-socket, not both")
        request.update(kind="tap", tap=tap)
    else:
        if net_socket is None or qmp_socket is None:
            raise UsageError("a VM needs --net-socket and --qmp-socket (or use --tap)")
        request.update(kind="qemu", net_socket=str(net_socket.resolve()),
                       qmp_socket=str(qmp_socket.resolve()))
    if mac is not None:
        request["mac"] = mac
    if nic_id is not None:
        request["nic_id"] = nic_id
    answer = control_request(_control(data_dir, control_socket), request)
    port = answer["port"]
    if as_json:
        click.echo(json.dumps(port, indent=2))
    else:
        stdout.print(f"attached {port['name']}: vnet {port['vnet']}, mac {port.get('mac')}, "
                     f"{port['state']}")


@vnet.command("detach")
@click.argument("name")
@agent_options
def vnet_detach(name: str, data_dir: Path | None, control_socket: Path | None) -> None:
    """Detach a port (a VM that still runs here has its MAC published as gone)."""
    from tmdht.vnet.control import control_request  # noqa: PLC0415

    control_request(_control(data_dir, control_socket), {"op": "detach", "name": name})
    stdout.print(f"detached {name}")


@vnet.command("status")
@agent_options
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def vnet_status(data_dir: Path | None, control_socket: Path | None, as_json: bool) -> None:
    """The agent's ports and their states."""
    from tmdht.vnet.control import control_request  # noqa: PLC0415

    status = control_request(_control(data_dir, control_socket), {"op": "status"})["status"]
    if as_json:
        click.echo(json.dumps(status, indent=2))
        return
    stdout.print(f"agent {status['agent']} site {status['site']} tunnel "
                 f"{status['tunnel'][0]}:{status['tunnel'][1]} store nodes {status['store_nodes']}")
    table = Table()
    for column in ("port", "vnet", "mac", "state", "frames in", "frames out"):
        table.add_column(column)
    for port in status["ports"]:
        table.add_row(port["name"], str(port["vnet"]), str(port.get("mac", "-")), port["state"],
                      str(port["frames_in"]), str(port["frames_out"]))
    stdout.print(table)
