"""Entry point of the ``tmdht`` command: option parsing, error reporting, output helpers.

Every option can also come from the environment: ``TMDHT_<COMMAND>_<OPTION>`` (click's
``auto_envvar_prefix``), e.g. ``TMDHT_TEMPLATES_MINE_THRESHOLD=3``.
"""

from __future__ import annotations

import importlib
import json
import logging
import sys
from collections.abc import Mapping
from typing import Any

import click
from rich.console import Console

from tmdht.cli.exits import EXIT_FAILED, EXIT_UNUSABLE_INPUT, exit_code_for, one_line
from tmdht.cli.proxy import run_async as run_async  # noqa: PLC0414 - re-exported
from tmdht.errors import TmdhtError

log = logging.getLogger("tmdht.cli")

stdout = Console(highlight=False)
stderr = Console(stderr=True, highlight=False)
if not stdout.is_terminal:
    stdout.width = 120  # logs and pipes: don't squeeze tables into 80 columns


class CommandFailed(click.ClickException):
    """An error on its way out: ``Error: <one line>`` on stderr, exit code 1."""

    exit_code = EXIT_FAILED


class UnusableInput(CommandFailed):
    """The same with exit code 2."""

    exit_code = EXIT_UNUSABLE_INPUT


def command_failed(message: str, exit_code: int) -> CommandFailed:
    """The ClickException that prints ``message`` and exits with ``exit_code`` (1 or 2)."""
    return (UnusableInput if exit_code == EXIT_UNUSABLE_INPUT else CommandFailed)(message)


# Subcommands, imported only when used: ``tmdht qemu send`` runs as QEMU's ``exec:`` migration
# command, and every import before it reads its stdin adds to the migration's total time
# (importing every subcommand's module took ~0.5 s here, numpy, rich tables and the guest lab
# included).
_COMMANDS: dict[str, str] = {
    "cluster": "tmdht.cli.node:cluster",
    "demo": "tmdht.cli.demo:demo",
    "encode": "tmdht.cli.codec:encode",
    "get": "tmdht.cli.get:get",
    "image": "tmdht.cli.image:image",
    "node": "tmdht.cli.node:node",
    "qemu": "tmdht.cli.qemu:qemu",
    "rebuild": "tmdht.cli.codec:rebuild",
    "templates": "tmdht.cli.templates:templates",
    "vnet": "tmdht.cli.vnet:vnet",
}


class TmdhtGroup(click.Group):
    """A group that turns tmdht's own errors into one-line messages and exit codes, and loads
    its subcommands lazily."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *_COMMANDS})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command = super().get_command(ctx, cmd_name)
        if command is None and cmd_name in _COMMANDS:
            module, attribute = _COMMANDS[cmd_name].split(":")
            command = getattr(importlib.import_module(module), attribute)
            self.add_command(command, cmd_name)
        return command

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (TmdhtError, OSError) as exc:
            raise command_failed(one_line(exc), exit_code_for(exc)) from None
        except click.UsageError as exc:  # click's own: usage, hint and error on three lines
            where = exc.ctx.command_path if exc.ctx is not None else ctx.command_path
            message = f"{exc.format_message()} (see {where} --help)"
            raise command_failed(" ".join(message.split()), exc.exit_code) from None


def emit_json(doc: Mapping[str, object]) -> None:
    """Print a machine-readable summary on stdout."""
    sys.stdout.write(json.dumps(doc, indent=2, sort_keys=True) + "\n")


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def parse_size(text: str) -> int:
    """'256MiB', '1G', '4096' -> bytes."""
    units = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    raw = text.strip().lower().removesuffix("b").removesuffix("i")
    number, unit = (raw[:-1], raw[-1]) if raw and raw[-1] in units else (raw, "")
    try:
        value = float(number) * units[unit]
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a size (e.g. 256MiB)") from None
    if value <= 0:
        raise click.BadParameter(f"{text!r}: a size must be positive")
    return int(value)


def _print_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    from tmdht import __version__  # noqa: PLC0415
    from tmdht.native import describe  # noqa: PLC0415

    click.echo(f"{ctx.find_root().info_name}, version {__version__}\n{describe()}")
    ctx.exit()


@click.group(cls=TmdhtGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--version", is_flag=True, expose_value=False, is_eager=True,
              callback=_print_version,
              help="Show the version and which migration pipeline (native or pure-Python) runs.")
def cli() -> None:
    """tmdht: template-page deduplication for live VM migration."""


def main() -> None:
    """Console script entry point."""
    # Library warnings ("[node id] no seed answered") would come before the error line and
    # repeat it; only errors get through. `node run` and the QEMU proxies set up their own logs.
    logging.basicConfig(level=logging.ERROR, format="%(name)s: %(message)s")
    cli(auto_envvar_prefix="TMDHT")
