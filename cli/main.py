"""Entry point of the ``tmdht`` command."""

from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="tmdht")
def cli() -> None:
    """tmdht: template-page deduplication for live VM migration."""


def main() -> None:
    cli(auto_envvar_prefix="TMDHT")
